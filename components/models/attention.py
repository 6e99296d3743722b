"""Causal self-attention with an optional sliding window and a KV memory carried across calls.

Runs on a torchtune ``MultiHeadAttention``'s own projections and RoPE (so parameter names,
checkpoints and LoRA wrappers stay torchtune's). The memory keeps the last ``memory_len``
keys (before RoPE) and values, detached; each call rotates memory and new keys at positions
counted from the memory's start, so scores depend only on distances and a conversation read
in chunks sees what it would see in one call. Each memory entry has a validity flag per row:
padding never enters as a visible key, and a batch slot that starts a new conversation
forgets its old one (:meth:`KVMemory.forget`) while the other rows keep theirs.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtune.modules import MultiHeadAttention


class KVMemory(NamedTuple):
    """Keys (before RoPE) and values of the last tokens seen, ``[B, n_kv, M, head_dim]`` each,
    and ``valid [B, M]`` bool: which entries a row's queries may see (False: padding, or a
    conversation the row has forgotten)."""

    k: Tensor
    v: Tensor
    valid: Tensor

    def detach(self) -> "KVMemory":
        return KVMemory(self.k.detach(), self.v.detach(), self.valid)

    def forget(self, rows: Tensor) -> "KVMemory":
        """The memory with the rows where ``rows [B]`` (bool) is True emptied.

        Their keys and values are zeroed too: a masked NaN would still poison the attention
        output (its weight is 0, and 0 * NaN is NaN).
        """
        drop = rows.view(-1, 1, 1, 1)
        return KVMemory(self.k.masked_fill(drop, 0.0), self.v.masked_fill(drop, 0.0), self.valid & ~rows.unsqueeze(1))


def _allowed(q_start: int, q_end: int, k_start: int, k_end: int, window: Optional[int], device) -> Tensor:
    """``[q_end - q_start, k_end - k_start]`` bool: query at position i may see key at position j."""
    q_pos = torch.arange(q_start, q_end, device=device).view(-1, 1)
    k_pos = torch.arange(k_start, k_end, device=device).view(1, -1)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _attend(q: Tensor, k: Tensor, v: Tensor, M: int, window: Optional[int], memory_valid: Optional[Tensor]) -> Tensor:
    """Causal attention of queries at positions ``M..M+T-1`` over keys at ``0..M+T-1``.

    Args:
        q: ``[B, h, T, d]``; k, v: ``[B, h, M+T, d]`` (RoPE applied, KV heads expanded).
        memory_valid: ``[B, M]`` which memory keys are real (None: all).

    With a window, queries go in blocks of ``window``, each against the at most
    ``2 * window`` keys it can see: memory and time grow linearly with T, not as ``T^2``.
    """
    B, _, T, _ = q.shape
    if window is None and M == 0:  # plain causal self-attention: the fused kernels need no mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # The chunk's own keys are always visible (causal order hides its padding from real
    # tokens), so every query sees at least itself: no row of a mask is empty.
    valid = None
    if memory_valid is not None:
        valid = torch.cat([memory_valid, torch.ones(B, T, dtype=torch.bool, device=q.device)], dim=1)  # [B, M+T]
    block = T if window is None else window
    outs = []
    for a in range(0, T, block):
        b = min(a + block, T)
        lo = 0 if window is None else max(0, M + a - window + 1)  # first key any query of the block sees
        allowed = _allowed(M + a, M + b, lo, M + b, window, q.device)  # [b-a, M+b-lo]
        if valid is not None:
            allowed = allowed & valid[:, None, None, lo : M + b]  # [B, 1, b-a, M+b-lo]
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo : M + b], v[:, :, lo : M + b], attn_mask=allowed))
    return torch.cat(outs, dim=2)  # [B,h,T,d]


def windowed_attention(
    attn: MultiHeadAttention,
    x: Tensor,
    memory: Optional[KVMemory] = None,
    window: Optional[int] = None,
    memory_len: int = 0,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[KVMemory]]:
    """Causal self-attention of ``x [B, T, D]`` over the memory and itself.

    Args:
        attn: the torchtune attention whose projections and RoPE are used.
        memory: keys/values of earlier calls, or None.
        window: each token sees at most this many tokens, itself included (None: all).
        memory_len: how many of the last keys/values to return as the new memory (0: none).
        mask: ``[B, T]`` bool, True for real tokens (right-padded). Padding is never a visible
            key of a later call; within the call causal order already hides it from real tokens.

    Returns:
        ``(y, memory)``: y ``[B, T, D]``; the new memory (detached) or None.
    """
    B, T, _ = x.shape
    n_h, n_kv, h_d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, n_h, h_d)
    k = attn.k_proj(x).view(B, T, n_kv, h_d).transpose(1, 2)  # [B,n_kv,T,h_d]
    v = attn.v_proj(x).view(B, T, n_kv, h_d).transpose(1, 2)
    if memory is not None:
        k, v = torch.cat([memory.k, k], dim=2), torch.cat([memory.v, v], dim=2)
    M = k.shape[2] - T
    positions = torch.arange(M + T, device=x.device).expand(B, -1)
    q = attn.pos_embeddings(q, input_pos=positions[:, M:]).transpose(1, 2)  # [B,n_h,T,h_d]
    k_rot = attn.pos_embeddings(k.transpose(1, 2), input_pos=positions).transpose(1, 2)
    if n_h != n_kv:  # grouped KV heads: [B,n_kv,S,h_d] -> [B,n_h,S,h_d]
        k_rot = k_rot.repeat_interleave(n_h // n_kv, dim=1)
        v_all = v.repeat_interleave(n_h // n_kv, dim=1)
    else:
        v_all = v
    y = _attend(q, k_rot, v_all, M, window, None if memory is None else memory.valid)  # [B,n_h,T,h_d]
    y = attn.output_proj(y.transpose(1, 2).reshape(B, T, n_h * h_d))
    new_memory = None
    if memory_len > 0:
        new = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        valid = new if memory is None else torch.cat([memory.valid, new], dim=1)  # padding never becomes visible
        new_memory = KVMemory(k[:, :, -memory_len:], v[:, :, -memory_len:], valid[:, -memory_len:]).detach()
    return y, new_memory
