"""Windowed attention with a KV memory against a dense float64 reference written out by hand."""

import pytest
import torch

from components.models import llama_omni_tiny
from components.models.attention import KVMemory, windowed_attention


def _dense_reference(attn, x, memory, window):
    """softmax(q k^T / sqrt(d) + mask) v over all memory + new keys, float64, no blocks."""
    B, T, _ = x.shape
    n_h, n_kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    k = torch.cat([memory.k, attn.k_proj(x).view(B, T, n_kv, d).transpose(1, 2)], dim=2)
    v = torch.cat([memory.v, attn.v_proj(x).view(B, T, n_kv, d).transpose(1, 2)], dim=2)
    M = memory.k.shape[2]
    pos = torch.arange(M + T).expand(B, -1)
    q = attn.pos_embeddings(attn.q_proj(x).view(B, T, n_h, d), input_pos=pos[:, M:]).transpose(1, 2)
    k = attn.pos_embeddings(k.transpose(1, 2), input_pos=pos).transpose(1, 2).repeat_interleave(n_h // n_kv, dim=1)
    v = v.repeat_interleave(n_h // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) / d**0.5  # [B,h,T,d] @ [B,h,d,M+T] -> [B,h,T,M+T]
    qp, kp = torch.arange(M, M + T).view(-1, 1), torch.arange(M + T).view(1, -1)
    allowed = (kp <= qp) & (kp > qp - window)
    allowed = allowed & torch.cat([memory.valid, torch.ones(B, T, dtype=torch.bool)], dim=1)[:, None, None, :]
    y = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # [B,h,T,d]
    return attn.output_proj(y.transpose(1, 2).reshape(B, T, n_h * d))


@pytest.mark.parametrize("T, window", [(100, 16), (37, 64), (64, 64)])
def test_blockwise_windowed_attention_matches_the_dense_formula(T, window):
    torch.manual_seed(0)
    attn = llama_omni_tiny().decoder.layers[0].attn.double()
    assert attn.num_heads != attn.num_kv_heads  # grouped KV heads are expanded
    B, M = 2, 40
    memory = KVMemory(torch.randn(B, attn.num_kv_heads, M, attn.head_dim, dtype=torch.float64),
                      torch.randn(B, attn.num_kv_heads, M, attn.head_dim, dtype=torch.float64),
                      torch.rand(B, M) > 0.3)
    x = torch.randn(B, T, attn.q_proj.in_features, dtype=torch.float64)
    y, new_memory = windowed_attention(attn, x, memory, window=window, memory_len=M)
    torch.testing.assert_close(y, _dense_reference(attn, x, memory, window), rtol=1e-10, atol=1e-10)
    assert new_memory.valid[:, -min(M, T):].all()
