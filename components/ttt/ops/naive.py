"""Token-by-token TTT in the primal form: the obviously-correct reference for the dual form.

Each token takes the gradient of its reconstruction loss with autograd at the weights its
mini-batch started with, adds it (scaled by its inner learning rate) to the mini-batch's
accumulator, and reads out with the weights moved by that accumulator. Slow (a Python loop
over tokens), any float dtype, differentiable (the inner gradient keeps its graph), so it can
check the fast op's outputs, every gradient and the final state.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from components.ttt.ops.common import LN_EPS, check_op_args, rope_angles, rope_rotate
from components.ttt.state import TTTState


def inner_model(x: Tensor, weights: tuple, ln_weight: Tensor, ln_bias: Tensor) -> Tensor:
    """LN(f(x)) for x ``[B, H, n, f]`` and per-stream, per-head weights (no residual)."""
    if len(weights) == 2:
        W1, b1 = weights
        z = x @ W1 + b1  # [B,H,n,f] @ [B,H,f,f] -> [B,H,n,f]
    else:
        W1, b1, W2, b2 = weights
        z = F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2  # [B,H,n,4f] @ [B,H,4f,f] -> [B,H,n,f]
    f = z.shape[-1]
    return F.layer_norm(z, (f,), eps=LN_EPS) * ln_weight[:, None, :] + ln_bias[:, None, :]


def ttt_naive(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr: Tensor,
    token_eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    state: TTTState,
    lengths: Tensor,
    rope_base: float = 10000.0,
) -> Tuple[Tensor, TTTState]:
    """Runs TTT token by token: the reference for :func:`components.ttt.ops.dual.ttt_dual`,
    which documents the arguments and the result (the same here, without checkpointing).
    """
    check_op_args(xq, xk, xv, lr, token_eta, state, lengths)
    B, T, H, f = xq.shape
    K = token_eta.shape[0]
    build_graph = torch.is_grad_enabled()
    positions = (state.offset.view(B, 1) + torch.arange(T, device=xq.device)) % K  # [B,T]
    angles = rope_angles(positions, f, rope_base, xq.dtype).unsqueeze(2)  # [B,T,1,f/2]
    xq, xk = rope_rotate(xq, angles), rope_rotate(xk, angles)
    weights, grads, offset = list(state.weights()), list(state.grads()), state.offset.clone()
    # A row at a mini-batch boundary has nothing accumulated (see TTTState).
    at_boundary = (offset == 0)[:, None, None, None]
    grads = [torch.where(at_boundary, torch.zeros_like(G), G) for G in grads]
    outs = []
    for t in range(T):
        real = t < lengths  # [B]
        k_t, v_t, q_t = (x[:, t].unsqueeze(2) for x in (xk, xv, xq))  # [B,H,1,f]
        with torch.enable_grad():
            wrt = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
            loss = 0.5 * (inner_model(k_t, wrt, ln_weight, ln_bias) - (v_t - k_t)).pow(2).sum()
            token_grads = torch.autograd.grad(loss, wrt, create_graph=build_graph)
        lr_t = lr[:, t][:, :, None, None]  # [B,H,1,1]
        row = real[:, None, None, None]
        grads = [torch.where(row, G + lr_t * g, G) for G, g in zip(grads, token_grads)]
        eta_t = token_eta[offset][:, None, None, None]  # [B,1,1,1]
        moved = [w - eta_t * G for w, G in zip(weights, grads)]
        out_t = q_t + inner_model(q_t, moved, ln_weight, ln_bias)
        outs.append(torch.where(row, out_t, torch.zeros_like(out_t)).squeeze(2))
        complete = (real & (offset == K - 1))[:, None, None, None]
        weights = [torch.where(complete, w_new, w) for w_new, w in zip(moved, weights)]
        grads = [torch.where(complete, torch.zeros_like(G), G) for G in grads]
        offset = torch.where(real, (offset + 1) % K, offset)
    out = torch.stack(outs, dim=1) if outs else xq.new_zeros(xq.shape)
    return out, TTTState.from_parts(weights, grads, offset)
