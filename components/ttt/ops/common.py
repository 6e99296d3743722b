"""Pieces shared by the TTT ops: RoPE inside the mini-batch and the checks every op applies
to its arguments."""

import torch
from torch import Tensor

from components.ttt.state import TTTState

LN_EPS = 1e-6  # TTT-LayerNorm, as in the reference


def rope_angles(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Tensor:
    """RoPE angles ``position * base^(-2i/f)``: ``[...]`` integer positions -> ``[..., f/2]``.
    The frequencies are computed in float32, as the reference does."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    return (positions.unsqueeze(-1).float() * (1.0 / base**exponents)).to(dtype)


def rope_rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotates interleaved pairs ``(x[2i], x[2i+1])`` of ``x [..., f]`` by ``angles [..., f/2]``.

    This is what the reference computes with ``permute_qk`` + half-split ``rotate_half`` +
    ``undo_permute_qk``; it is also torchtune's (Meta's) pairing.
    """
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def check_op_args(xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, token_eta: Tensor, state: TTTState, lengths: Tensor):
    """Raises a ValueError naming the argument whose shape or dtype does not fit the others."""
    B, T, H, f = xq.shape
    for name, t in (("xk", xk), ("xv", xv)):
        if t.shape != xq.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(xq.shape)} like xq")
    if lr.shape != (B, T, H):
        raise ValueError(f"lr has shape {tuple(lr.shape)}, expected {(B, T, H)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)}, expected {(B,)}")
    if token_eta.dim() != 1:
        raise ValueError(f"token_eta must be [K], got shape {tuple(token_eta.shape)}")
    if state.batch_size != B or state.W1.shape[1] != H or state.W1.shape[2] != f:
        raise ValueError(
            f"state holds W1 of shape {tuple(state.W1.shape)}, which does not fit inputs with "
            f"batch {B}, {H} heads of dim {f}"
        )
    dtype = state.W1.dtype
    for name, t in zip(TTTState._fields, state):
        if t is not None and name != "offset" and t.dtype != dtype:
            raise ValueError(f"state.{name} is {t.dtype} but state.W1 is {dtype}; a state has one dtype")
    for name, t in (("xq", xq), ("xk", xk), ("xv", xv), ("lr", lr), ("token_eta", token_eta)):
        if t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype} but the state is {dtype}; the inner loop runs in one dtype")
