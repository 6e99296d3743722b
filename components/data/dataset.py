"""Conversations as token streams, cut into windows and collated into batches for the model.

``ConversationDataset`` reads JSON files, tokenizes every conversation into a stream (audio
headers only; features are computed when a window needs them) and gives the stream lengths
to :class:`components.data.sampler.StatefulConversationSampler`. ``collate`` turns one
sampler step (a window or nothing per slot) into a :class:`Batch`: windows padded to a
multiple of the TTT mini-batch with a mask, speech pieces stacked in placeholder order with
the slice of each that the window holds, slot ids, reset flags and conversation ids.
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from components.data.audio import BadAudio, LogMel, audio_positions
from components.data.conversation import BadRecord, ReadReport, read_conversations
from components.data.sampler import Step
from components.data.tokenizer import IGNORE_INDEX, ChatTokenizer, ConversationStream, StreamWindow, tokenize_conversation


class ConversationDataset:
    """Every conversation of the given JSON files as a token stream.

    Args:
        sources: JSON files (Llama-Omni v1 or multi-turn records).
        tokenizer: the chat tokenizer.
        trim_speech: give each utterance only the positions its audio needs (else 300 per
            30 s piece, as Llama-Omni does).
        on_bad_record: ``"raise"`` or ``"skip"`` (skips are counted in ``self.report``).
    """

    def __init__(
        self,
        sources: Sequence[Union[str, Path]],
        tokenizer: ChatTokenizer,
        trim_speech: bool = False,
        on_bad_record: str = "raise",
    ):
        self.report = ReadReport()
        self.streams: List[ConversationStream] = []
        for source in sources:
            for conversation in read_conversations(source, on_bad_record, self.report):
                try:
                    stream = tokenize_conversation(conversation, tokenizer, lambda p: audio_positions(p, trim_speech))
                except BadAudio as error:
                    problem = f"record {conversation.id} of {conversation.source}: {error}"
                    if on_bad_record == "raise":
                        raise BadRecord(problem) from None
                    self.report.read -= 1
                    self.report.skipped.append(problem)
                    continue
                self.streams.append(stream)
        self.log_mel = LogMel()
        self._features = lru_cache(maxsize=64)(self.log_mel)

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def lengths(self) -> List[int]:
        return [len(s) for s in self.streams]

    def window(self, conversation: int, index: int, size: int) -> StreamWindow:
        return self.streams[conversation].window(index, size)

    def features(self, audio: Path, piece: int) -> Tensor:
        """``[128, 3000]`` log-mel of one 30 s piece (a file's features are cached)."""
        return self._features(audio)[piece]


@dataclass
class Batch:
    tokens: Tensor  # [B, T] long, T a multiple of pad_multiple
    labels: Tensor  # [B, T] long, -100 outside assistant tokens and at padding
    targets: Tensor  # [B, T] long, the label of each token's successor in its stream (score logits on it)
    mask: Tensor  # [B, T] bool, True for real tokens (right-padded)
    speech: Optional[Tensor]  # [U, 128, 3000] pieces in placeholder order, or None
    speech_starts: Optional[Tensor]  # [U] first position of each piece this batch uses
    speech_lengths: Optional[Tensor]  # [U] positions used
    slots: Tensor  # [B] slot ids
    active: Tensor  # [B] bool: the slot reads a window this step
    reset: Tensor  # [B] bool: start the slot's state afresh before this window
    last: Tensor  # [B] bool: the window ends its conversation
    conversation_ids: List[Optional[str]]
    units: Optional[Tensor] = None  # [N, U_max] target units of the N whole assistant turns with units, -100 padded
    unit_turns: Optional[Tensor] = None  # [N, 3] (row, start, end): each such turn's response positions


def collate(step: Step, dataset: ConversationDataset, window: int, pad_multiple: int = 64, pad_id: int = 0) -> Batch:
    """One sampler step -> a batch (idle slots are all padding)."""
    windows = [None if item is None else dataset.window(item.conversation, item.window, window) for item in step]
    longest = max([len(w.tokens) for w in windows if w is not None] or [1])
    T = -(-longest // pad_multiple) * pad_multiple
    B = len(step)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    pieces, starts, lengths = [], [], []
    turns, unit_targets = [], []
    for row, w in enumerate(windows):
        if w is None:
            continue
        turns += [(row, span.start, span.end) for span in w.units]
        unit_targets += [torch.tensor(span.units) for span in w.units]
        n = len(w.tokens)
        tokens[row, :n] = torch.tensor(w.tokens)
        labels[row, :n] = torch.tensor(w.labels)
        targets[row, :n] = torch.tensor(w.targets)
        mask[row, :n] = True
        for span, first, count in w.speech:
            pieces.append(dataset.features(span.audio, span.piece))
            starts.append(first)
            lengths.append(count)
    flags = lambda name: torch.tensor([bool(item and getattr(item, name)) for item in step])  # noqa: E731
    return Batch(
        tokens=tokens,
        labels=labels,
        targets=targets,
        mask=mask,
        speech=torch.stack(pieces) if pieces else None,
        speech_starts=torch.tensor(starts) if pieces else None,
        speech_lengths=torch.tensor(lengths) if pieces else None,
        slots=torch.arange(B),
        active=torch.tensor([item is not None for item in step]),
        reset=flags("reset"),
        last=flags("last"),
        conversation_ids=[None if w is None else w.conversation for w in windows],
        units=pad_sequence(unit_targets, batch_first=True, padding_value=IGNORE_INDEX) if turns else None,
        unit_turns=torch.tensor(turns) if turns else None,
    )
