"""Llama-3 chat-format tokenization of conversations into one token stream.

The stream: ``<|begin_of_text|>`` and the Llama-Omni system turn, then each turn as
``<|start_header_id|>role<|end_header_id|>\\n\\n`` + content + ``<|eot_id|>``. Labels are
-100 except on assistant content and its ``<|eot_id|>``. Each ``<speech>`` becomes
``SPEECH_TOKEN_ID`` repeated for the positions of its audio (one run per 30 s piece).

The vocabulary comes from a checkpoint directory: ``tokenizer.json`` (Llama-3.1's, or the
tiny one this repo builds) or, failing that, the tiktoken ``original/tokenizer.model``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple, Union

from components.data.conversation import SPEECH_PLACEHOLDER, Conversation
from components.data.tiny_tokenizer import SYSTEM_PROMPT
from components.models.llama_omni import SPEECH_TOKEN_ID

IGNORE_INDEX = -100
SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class ChatTokenizer:
    """Text -> ids and the Llama-3 special ids, over either vocabulary format.

    Args:
        encode: plain text -> ids, adding no special tokens.
        special_ids: ids of :data:`SPECIALS`.
        system_prompt: the system turn of every conversation (Llama-Omni's by default).
    """

    def __init__(self, encode: Callable[[str], List[int]], special_ids: Dict[str, int], system_prompt: str = SYSTEM_PROMPT):
        missing = [t for t in SPECIALS if t not in special_ids]
        if missing:
            raise ValueError(f"the tokenizer lacks the Llama-3 special tokens {missing}")
        self.encode, self.special_ids, self.system_prompt = encode, dict(special_ids), system_prompt

    @classmethod
    def from_tokenizers(cls, tokenizer, system_prompt: str = SYSTEM_PROMPT) -> "ChatTokenizer":
        """From a ``tokenizers.Tokenizer`` (the format of Llama-3.1's ``tokenizer.json``)."""
        specials = {t: tokenizer.token_to_id(t) for t in SPECIALS if tokenizer.token_to_id(t) is not None}
        return cls(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, specials, system_prompt)

    @classmethod
    def from_dir(cls, path: Union[str, Path], system_prompt: str = SYSTEM_PROMPT) -> "ChatTokenizer":
        path = Path(path)
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            return cls.from_tokenizers(Tokenizer.from_file(str(path / "tokenizer.json")), system_prompt)
        if (path / "original" / "tokenizer.model").exists():
            from torchtune.models.llama3 import llama3_tokenizer

            tokenizer = llama3_tokenizer(str(path / "original" / "tokenizer.model"))
            specials = {t: tokenizer.special_tokens[t] for t in SPECIALS if t in tokenizer.special_tokens}
            return cls(lambda text: tokenizer.encode(text, add_bos=False, add_eos=False), specials, system_prompt)
        raise FileNotFoundError(f"{path} has neither tokenizer.json nor original/tokenizer.model")


def chat_tokenizer(path: Union[str, Path]) -> ChatTokenizer:
    """The tokenizer of a checkpoint directory, for configs
    (``_component_: components.data.tokenizer.chat_tokenizer``)."""
    return ChatTokenizer.from_dir(path)


@dataclass(frozen=True)
class SpeechSpan:
    """One 30 s piece of one audio file, at ``start`` in the stream, taking ``positions`` positions."""

    audio: Path
    piece: int
    start: int
    positions: int


@dataclass(frozen=True)
class UnitSpan:
    """An assistant turn's target speech units and its response tokens ``[start, end)`` in the
    stream (content and ``<|eot_id|>``: the positions its labels cover)."""

    start: int
    end: int
    units: Tuple[int, ...]


@dataclass(frozen=True)
class StreamWindow:
    """Tokens ``[start, start + len)`` of a stream and the speech they hold: for each piece,
    ``(span, first position used, positions used)`` (a window may cut a piece).

    ``targets[t]`` is the label of the token after ``tokens[t]`` in the stream, so the last
    token of a window is scored on the first token of the next one, as in one long window.
    ``units`` are the unit spans wholly inside the window, relative to its start (a turn
    that the window cuts gives no unit target; its text is still scored).
    """

    conversation: str
    index: int
    start: int
    tokens: List[int]
    labels: List[int]
    targets: List[int]
    speech: List[Tuple[SpeechSpan, int, int]]
    units: Tuple[UnitSpan, ...] = ()


@dataclass(frozen=True)
class ConversationStream:
    id: str
    tokens: List[int]
    labels: List[int]
    speech: List[SpeechSpan]
    unit_spans: Tuple[UnitSpan, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, index: int, size: int) -> StreamWindow:
        """The ``index``-th window of ``size`` tokens (the last one may be shorter)."""
        start, end = index * size, min((index + 1) * size, len(self.tokens))
        if not 0 <= start < len(self.tokens):
            raise IndexError(f"conversation {self.id} has {len(self.tokens)} tokens: no window {index} of {size}")
        pieces = []
        for span in self.speech:
            first, last = max(start, span.start), min(end, span.start + span.positions)
            if first < last:
                pieces.append((span, first - span.start, last - first))
        targets = self.labels[start + 1 : end + 1]
        if end == len(self.tokens):
            targets.append(IGNORE_INDEX)  # the stream's last token predicts nothing
        units = tuple(
            UnitSpan(u.start - start, u.end - start, u.units) for u in self.unit_spans if start <= u.start and u.end <= end
        )
        return StreamWindow(self.id, index, start, self.tokens[start:end], self.labels[start:end], targets, pieces, units)


def _header(tok: ChatTokenizer, role: str) -> List[int]:
    s = tok.special_ids
    return [s["<|start_header_id|>"]] + tok.encode(role) + [s["<|end_header_id|>"]] + tok.encode("\n\n")


def tokenize_conversation(
    conversation: Conversation, tok: ChatTokenizer, audio_positions: Callable[[Path], Sequence[int]]
) -> ConversationStream:
    """The conversation as one stream.

    Args:
        audio_positions: for an audio file, the LLM positions of each of its 30 s pieces
            (300 each in Llama-Omni; fewer when utterances are trimmed to their length).
    """
    eot = tok.special_ids["<|eot_id|>"]
    tokens = [tok.special_ids["<|begin_of_text|>"]] + _header(tok, "system") + tok.encode(tok.system_prompt) + [eot]
    labels = [IGNORE_INDEX] * len(tokens)
    speech: List[SpeechSpan] = []
    unit_spans: List[UnitSpan] = []
    for turn in conversation.turns:
        header = _header(tok, turn.role)
        tokens += header
        labels += [IGNORE_INDEX] * len(header)
        body: List[int] = []
        texts = turn.content.split(SPEECH_PLACEHOLDER)
        for i, text in enumerate(texts):
            body += tok.encode(text) if text else []
            if i < len(turn.audio):
                for piece, positions in enumerate(audio_positions(turn.audio[i])):
                    speech.append(SpeechSpan(turn.audio[i], piece, len(tokens) + len(body), positions))
                    body += [SPEECH_TOKEN_ID] * positions
        body.append(eot)
        if turn.role == "assistant" and turn.units:
            unit_spans.append(UnitSpan(len(tokens), len(tokens) + len(body), tuple(turn.units)))
        tokens += body
        labels += body if turn.role == "assistant" else [IGNORE_INDEX] * len(body)
    return ConversationStream(conversation.id, tokens, labels, speech, tuple(unit_spans))
