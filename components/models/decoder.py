"""The Llama-3.1 decoder of Llama-Omni, with room for TTT layers and a conversation state.

The modules are torchtune's (built by ``torchtune.models.llama3_1.llama3_1``), so parameter
names match torchtune's checkpoints and LoRA builders; the loop over layers is ours, so the
model can start from spliced embeddings and carry each layer's state from call to call.
"""

from typing import List, Optional

from torch import Tensor, nn
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules import TransformerDecoder

from components.models.attention import windowed_attention


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + mixer(sa_norm(x))``, then ``x + mlp(mlp_norm(x))``.

    The mixer is the attention, a TTT layer (``mode="replace"``), or both with the TTT
    branch gated by ``tanh(alpha)`` per channel (``mode="parallel"``, ``ttt_gate``). Submodule names
    are torchtune's (``attn``, ``mlp``, ``sa_norm``, ``mlp_norm``) plus ``ttt``, ``ttt_gate``.
    """

    def __init__(self, attn: Optional[nn.Module], mlp: nn.Module, sa_norm: nn.Module, mlp_norm: nn.Module):
        super().__init__()
        self.attn, self.mlp, self.sa_norm, self.mlp_norm = attn, mlp, sa_norm, mlp_norm
        self.ttt: Optional[nn.Module] = None
        self.ttt_gate: Optional[nn.Module] = None
        self.window: Optional[int] = None
        self.memory_len = 0

    def forward(self, x: Tensor, state, mask: Optional[Tensor] = None, reset: Optional[Tensor] = None):
        """Returns ``(x, state)``; the state is ``(KVMemory or None, TTTState or None)``.

        ``reset [B]`` (bool) starts those rows' conversations afresh: their memory is
        forgotten and their TTT state re-initialised (inside the TTT layer's forward).
        """
        memory, ttt_state = state if state is not None else (None, None)
        if memory is not None and reset is not None:
            memory = memory.forget(reset)
        h = self.sa_norm(x)
        out = 0.0
        if self.attn is not None:
            out, memory = windowed_attention(self.attn, h, memory, self.window, self.memory_len, mask)
        if self.ttt is not None:
            y, ttt_state = self.ttt(h, state=ttt_state, mask=mask, reset=reset)
            y = self.ttt_gate(y) if self.ttt_gate is not None else y
            # Under FSDP the TTT modules compute in float32 (their own policy); the residual
            # stream keeps its dtype.
            out = out + y.to(x.dtype)
        x = x + out
        return x + self.mlp(self.mlp_norm(x)), (memory, ttt_state)


class OmniDecoder(nn.Module):
    """Token embeddings, decoder layers, final norm and LM head (torchtune names)."""

    def __init__(self, tok_embeddings: nn.Embedding, layers: List[DecoderLayer], norm: nn.Module, output: nn.Module):
        super().__init__()
        self.tok_embeddings, self.layers, self.norm, self.output = tok_embeddings, nn.ModuleList(layers), norm, output

    def set_attention_window(self, window: Optional[int], memory_len: int) -> None:
        """Every attention layer sees at most ``window`` tokens (None: all) and carries the
        keys/values of its last ``memory_len`` tokens to the next call."""
        for layer in self.layers:
            layer.window, layer.memory_len = window, memory_len

    def forward(self, h: Tensor, states: Optional[tuple] = None, mask: Optional[Tensor] = None, reset: Optional[Tensor] = None):
        """``h [B, T, D]`` embeddings -> ``(final hidden [B, T, D] after the norm, states)``."""
        states = states if states is not None else (None,) * len(self.layers)
        new_states = []
        for layer, state in zip(self.layers, states):
            h, state = layer(h, state, mask, reset)
            new_states.append(state)
        return self.norm(h), tuple(new_states)


def llama3_1_decoder(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float = 500_000.0,
    rope_scale_factor: int = 8,
    norm_eps: float = 1e-5,
    attention_window: Optional[int] = None,
    memory_len: int = 0,
) -> OmniDecoder:
    """torchtune's Llama-3.1 modules in an :class:`OmniDecoder`; attention windowed as asked."""
    base = llama3_1(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        embed_dim=embed_dim, max_seq_len=max_seq_len, intermediate_dim=intermediate_dim,
        rope_base=rope_base, norm_eps=norm_eps, scale_factor=rope_scale_factor,
    )
    return from_torchtune(base, attention_window, memory_len)


def from_torchtune(base: TransformerDecoder, attention_window: Optional[int] = None, memory_len: int = 0) -> OmniDecoder:
    """Re-homes a torchtune ``TransformerDecoder``'s modules (shared, not copied)."""
    layers = []
    for block in base.layers:
        layer = DecoderLayer(block.attn, block.mlp, block.sa_norm, block.mlp_norm)
        layer.window, layer.memory_len = attention_window, memory_len
        layers.append(layer)
    return OmniDecoder(base.tok_embeddings, layers, base.norm, base.output)
