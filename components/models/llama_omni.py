"""Llama-Omni: speech encoder + projector, Llama-3.1 decoder, CTC speech generator.

Speech is spliced into the token embeddings at the placeholder id ``SPEECH_TOKEN_ID``
(-200, as in Llama-Omni): the placeholders of a batch are filled, in order (row by row, left
to right), with the projected positions of the utterances given. Each utterance gives all
its positions (300 for 30 s, the original behaviour) or, with ``speech_lengths``, only its
first ones, so that a short question costs tens of positions instead of hundreds.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from components.models.decoder import OmniDecoder
from components.models.speech import SpeechEncoder
from components.models.speech_generator import CTCSpeechGenerator

SPEECH_TOKEN_ID = -200
POSITIONS_PER_SECOND = 10  # 100 mel frames/s, halved by the encoder, then k=5 per position


def speech_positions(num_samples: int, sample_rate: int = 16000, max_positions: int = 300) -> int:
    """LLM positions that cover an utterance of ``num_samples`` audio samples (at most 30 s)."""
    return max(1, min(max_positions, math.ceil(num_samples * POSITIONS_PER_SECOND / sample_rate)))


class OmniState(NamedTuple):
    """A conversation's state: per decoder layer ``(KVMemory or None, TTTState or None)``."""

    layers: tuple

    def detach(self) -> "OmniState":
        return OmniState(tuple(tuple(None if s is None else s.detach() for s in layer) for layer in self.layers))


class LlamaOmniOutput(NamedTuple):
    logits: Optional[Tensor]  # [B, T, vocab]; None when ``targets`` are given (the loss instead)
    state: OmniState
    hidden: Tensor  # [B, T, D], after the final norm
    ctc_loss: Optional[Tensor]  # when unit targets are given
    token_loss: Optional[Tensor] = None  # [B] float32: each row's summed cross-entropy on ``targets``


def _chunk_cross_entropy(output: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """``hidden [B, t, D]``, ``targets [B, t]`` -> ``[B]`` summed cross-entropy (float32)."""
    logits = output(hidden).float()  # [B, t, vocab]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return losses.view(targets.shape).sum(dim=1)


def _in_graph(x: Tensor, unused: nn.Module) -> Tensor:
    """``x`` plus zero times the trainable parameters of a module this call does not run.

    Data-parallel ranks with and without speech (or unit targets) in their batch then reduce
    the same gradients: FSDP2 reduces only the parameters that have one.
    """
    trainable = [p for p in unused.parameters() if p.requires_grad]
    if not trainable or not torch.is_grad_enabled():
        return x
    return x + sum(p.sum() for p in trainable).to(x.dtype) * 0.0


class LlamaOmni(nn.Module):
    """The whole model. Build it with :func:`components.models.llama_omni` and friends.

    Args:
        speech: encoder + projector.
        decoder: the language model.
        speech_generator: the CTC unit generator (always carried; its loss only when asked).
        config: the builder arguments, kept for checkpoints.
    """

    def __init__(self, speech: SpeechEncoder, decoder: OmniDecoder, speech_generator: CTCSpeechGenerator, config: dict):
        super().__init__()
        self.speech, self.decoder, self.speech_generator = speech, decoder, speech_generator
        self.config = dict(config)

    def ttt_modules(self) -> list:
        """The TTT layers and their gates (empty before :func:`components.models.convert_to_ttt`)."""
        return [m for layer in self.decoder.layers for m in (layer.ttt, layer.ttt_gate) if m is not None]

    def ttt_parameters(self) -> list:
        """Parameters owned by TTT layers and gates: for optimizer groups and for freezing the rest."""
        return [p for module in self.ttt_modules() for p in module.parameters()]

    def encode_speech(self, features: Tensor) -> Tensor:
        """Log-mel ``[U, n_mels, frames]`` -> projected speech ``[U, frames / 2 / k, D]``."""
        return self.speech(features)

    def embed(
        self,
        tokens: Tensor,
        speech: Optional[Tensor] = None,
        speech_lengths: Optional[Tensor] = None,
        speech_starts: Optional[Tensor] = None,
    ) -> Tensor:
        """Token embeddings with the speech placeholders filled; ``[B, T] -> [B, T, D]``.

        Utterance u fills ``speech_lengths[u]`` placeholders (default: all its positions) with
        its positions from ``speech_starts[u]`` on (default 0): a training window that begins
        inside an utterance takes the rest of it.
        """
        placeholders = tokens == SPEECH_TOKEN_ID
        h = self.decoder.tok_embeddings(tokens.masked_fill(placeholders, 0))
        wanted = int(placeholders.sum())
        if speech is None:
            if wanted:
                raise ValueError(f"tokens hold {wanted} speech positions ({SPEECH_TOKEN_ID}) but no speech was given")
            return _in_graph(h, self.speech)
        projected = self.encode_speech(speech)  # [U, P, D]
        U, P = projected.shape[:2]
        starts = [0] * U if speech_starts is None else [int(n) for n in speech_starts]
        lengths = [P - s for s in starts] if speech_lengths is None else [int(n) for n in speech_lengths]
        if len(starts) != U or len(lengths) != U or any(s < 0 or n < 1 or s + n > P for s, n in zip(starts, lengths)):
            raise ValueError(
                f"speech_starts/speech_lengths must pick 1..{P} positions inside each of the {U} utterances, "
                f"got starts {starts} and lengths {lengths}"
            )
        rows = torch.cat([projected[u, s : s + n] for u, (s, n) in enumerate(zip(starts, lengths))])  # [sum, D]
        if rows.shape[0] != wanted:
            raise ValueError(
                f"tokens hold {wanted} speech positions but the {U} utterances give {rows.shape[0]} "
                f"(positions per utterance: {lengths})"
            )
        return h.masked_scatter(placeholders.unsqueeze(-1), rows.to(h.dtype))

    def forward(
        self,
        tokens: Tensor,
        speech: Optional[Tensor] = None,
        state: Optional[OmniState] = None,
        mask: Optional[Tensor] = None,
        speech_lengths: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        units: Optional[Tensor] = None,
        speech_starts: Optional[Tensor] = None,
        reset: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
        loss_chunk_size: int = 4096,
        unit_turns: Optional[Tensor] = None,
        ctc_reduction: str = "mean",
    ) -> LlamaOmniOutput:
        """
        Args:
            tokens: ``[B, T]`` token ids with ``SPEECH_TOKEN_ID`` at speech positions.
            speech: ``[U, n_mels, frames]`` log-mel features of the batch's utterances, in order.
            state: the conversations' state after the previous chunk; None starts fresh.
            reset: ``[B]`` bool: rows that start a new conversation (their part of ``state``
                is dropped); the recipe's batch slots.
            mask: ``[B, T]`` bool, True for real tokens (right-padded).
            speech_lengths, speech_starts: ``[U]`` which positions of each utterance fill its
                placeholders (default: all of them); see :meth:`embed`.
            labels: ``[B, T]`` token labels (-100 outside the response); needed with ``units``.
            units: ``[B, U_max]`` target speech units (-100 padded): the CTC loss is returned.
            unit_turns: ``[N, 3]`` rows ``(row, start, end)``: ``units`` is then ``[N, U_max]``, one
                target per assistant turn, generated from that turn's hidden states
                ``hidden[row, start:end]`` (``labels`` are not needed).
            ctc_reduction: ``"mean"`` over target units or ``"sum"``.
            targets: ``[B, T]`` the label each position's logits are scored on (-100: none).
                Then the summed cross-entropy per row is returned instead of the logits,
                computed ``loss_chunk_size`` positions at a time and recomputed in backward,
                so ``[B, T, vocab]`` logits never exist at once (128k vocab x 64k tokens).
        """
        h = self.embed(tokens, speech, speech_lengths, speech_starts)
        hidden, layer_states = self.decoder(h, None if state is None else state.layers, mask, reset)
        ctc_loss = None
        if units is not None and unit_turns is not None:
            turns = pad_sequence([hidden[r, s:e] for r, s, e in unit_turns.tolist()], batch_first=True)  # [N,L,D]
            lengths = (unit_turns[:, 2] - unit_turns[:, 1]).to(hidden.device)
            response = torch.arange(turns.shape[1], device=hidden.device) < lengths.unsqueeze(1)  # [N,L]
            ctc_loss = self.speech_generator(turns, torch.where(response, 0, -100), units, ctc_reduction)
        elif units is not None:
            if labels is None:
                raise ValueError("the CTC loss needs labels (which positions are the response) with units")
            ctc_loss = self.speech_generator(hidden, labels, units, ctc_reduction)
        else:
            hidden = _in_graph(hidden, self.speech_generator)
        if targets is None:
            return LlamaOmniOutput(self.decoder.output(hidden), OmniState(layer_states), hidden, ctc_loss)
        token_loss = sum(
            checkpoint(_chunk_cross_entropy, self.decoder.output, h, t, use_reentrant=False)
            for h, t in zip(hidden.split(loss_chunk_size, dim=1), targets.split(loss_chunk_size, dim=1))
        )
        return LlamaOmniOutput(None, OmniState(layer_states), hidden, ctc_loss, token_loss)
