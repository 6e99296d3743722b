"""Llama-Omni's CTC speech generator (``speech_generator_type: ctc``).

The hidden states of the response tokens are upsampled by repetition (each state copied
``upsample_factor`` times, or more when the unit sequence is longer), projected, run through
a few causal Llama layers and projected to unit logits, the last index being the CTC blank.
The loss is CTC summed over the batch and divided by the number of target units, as in the
original (ictnlp/LLaMA-Omni, ``SpeechGeneratorCTC``).
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.models.llama3._component_builders import llama3_mlp
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import MultiHeadAttention, RMSNorm, TransformerSelfAttentionLayer

IGNORE_INDEX = -100


def _llama_layer(dim: int, num_heads: int, intermediate_dim: int, rope: nn.Module, max_seq_len: int, norm_eps: float):
    head_dim = dim // num_heads
    attn = MultiHeadAttention(
        embed_dim=dim,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(dim, dim, bias=False),
        k_proj=nn.Linear(dim, dim, bias=False),
        v_proj=nn.Linear(dim, dim, bias=False),
        output_proj=nn.Linear(dim, dim, bias=False),
        pos_embeddings=rope,
        max_seq_len=max_seq_len,
        is_causal=True,
    )
    return TransformerSelfAttentionLayer(
        attn=attn,
        mlp=llama3_mlp(dim=dim, hidden_dim=intermediate_dim),
        sa_norm=RMSNorm(dim, eps=norm_eps),
        mlp_norm=RMSNorm(dim, eps=norm_eps),
    )


def upsample_lengths(source_lengths: Tensor, unit_lengths: Tensor, factor: int) -> Tensor:
    """Upsampled length of each sequence: ``factor`` per state, at least the number of units."""
    return torch.maximum(source_lengths * factor, unit_lengths)


class CTCSpeechGenerator(nn.Module):
    """Hidden states of the response -> discrete speech units, trained with CTC.

    Args:
        llm_dim: width of the language model's hidden states.
        num_layers, dim, num_heads, intermediate_dim: the Llama layers
            (``ctc_decoder_config: "(2,4096,32,11008)"``).
        unit_vocab_size: number of units (1000); logits have one more, the blank.
        upsample_factor: ``ctc_upsample_factor`` (25).
        rope_base, rope_scale_factor: RoPE of the layers (Llama-3.1's: 5e5 and 8).
        max_seq_len: longest upsampled sequence the RoPE cache covers.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        llm_dim: int,
        num_layers: int = 2,
        dim: int = 4096,
        num_heads: int = 32,
        intermediate_dim: int = 11008,
        unit_vocab_size: int = 1000,
        upsample_factor: int = 25,
        rope_base: float = 500_000.0,
        rope_scale_factor: int = 8,
        max_seq_len: int = 65536,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.unit_vocab_size, self.upsample_factor = unit_vocab_size, upsample_factor
        rope = Llama3ScaledRoPE(dim // num_heads, max_seq_len=max_seq_len, base=rope_base, scale_factor=rope_scale_factor)
        self.input_proj = nn.Linear(llm_dim, dim)
        self.layers = nn.ModuleList(
            [_llama_layer(dim, num_heads, intermediate_dim, rope, max_seq_len, norm_eps) for _ in range(num_layers)]
        )
        self.output_proj = nn.Linear(dim, unit_vocab_size + 1)

    def _upsample(self, states: List[Tensor], lengths: Tensor):
        """Repeats each sequence's states uniformly up to ``lengths``; returns ``[B, L, D]`` and a mask."""
        source_lengths = torch.tensor([len(s) for s in states], device=lengths.device)
        padded = nn.utils.rnn.pad_sequence(states, batch_first=True)  # [B, S, D]
        positions = torch.arange(int(lengths.max()), device=lengths.device).expand(len(states), -1)  # [B, L]
        valid = positions < lengths.unsqueeze(1)
        ratio = lengths / source_lengths
        index = (positions / ratio.unsqueeze(1)).long().masked_fill(~valid, 0)  # which state each slot copies
        copied = torch.gather(padded, 1, index.unsqueeze(-1).expand(-1, -1, padded.shape[-1]))
        return copied.masked_fill(~valid.unsqueeze(-1), 0.0), valid

    def logits(self, states: List[Tensor], lengths: Tensor):
        """Unit logits ``[B, L, units + 1]`` and the valid-slot mask ``[B, L]``."""
        hidden, valid = self._upsample(states, lengths)
        hidden = self.input_proj(hidden)
        L = hidden.shape[1]
        # causal, and no attention to padding slots (they come last, so no row is empty)
        mask = torch.tril(torch.ones(L, L, dtype=torch.bool, device=hidden.device)) & valid.unsqueeze(1)
        input_pos = torch.arange(L, device=hidden.device).expand(hidden.shape[0], -1)
        for layer in self.layers:
            hidden = layer(hidden, mask=mask, input_pos=input_pos)
        return self.output_proj(hidden), valid

    def forward(self, hidden_states: Tensor, labels: Tensor, units: Tensor, reduction: str = "mean") -> Tensor:
        """CTC loss per target unit (``reduction="mean"``) or summed over them (``"sum"``).

        Args:
            hidden_states: ``[B, T, llm_dim]`` the language model's last hidden states.
            labels: ``[B, T]`` token labels; positions with ``-100`` are not part of the response.
            units: ``[B, U]`` target units, right-padded with ``-100``.
            reduction: ``"mean"`` per target unit, or ``"sum"`` (for normalising across batches).

        Returns:
            The CTC loss, a float32 scalar.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}; expected 'mean' or 'sum'")
        states = [h[label != IGNORE_INDEX] for h, label in zip(hidden_states, labels)]
        if any(len(s) == 0 for s in states):
            raise ValueError("every row needs response tokens (labels != -100) to generate speech units from")
        unit_lengths = units.ne(IGNORE_INDEX).sum(dim=-1)
        source_lengths = torch.tensor([len(s) for s in states], device=units.device)
        lengths = upsample_lengths(source_lengths, unit_lengths, self.upsample_factor)
        logits, valid = self.logits(states, lengths)
        log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        targets = units.masked_select(units.ne(IGNORE_INDEX))
        loss = F.ctc_loss(
            log_probs.transpose(0, 1), targets, valid.sum(dim=-1), unit_lengths,
            blank=self.unit_vocab_size, reduction="sum", zero_infinity=True,
        )
        return loss / unit_lengths.sum() if reduction == "mean" else loss
