"""TTT in the dual form: a scan over mini-batches of K tokens, each computed with matmuls.

Within a mini-batch every token's inner gradient is taken at the mini-batch's starting
weights W, so the K outputs follow from a few matmuls (Sun et al. 2024, Sec. 2.7):

    Z_bar = XQ W - (eta * (XQ XK^T + 1)) @ grad          eta_ij = token_eta_i * lr_j, j <= i
    W'    = W - token_eta_{K-1} * (lr * XK)^T @ grad

(and the same for the bias). Everything that does not depend on W (the eta and attention
matrices, the targets) is computed for a segment of mini-batches at once; the Python loop
only runs what the carried weights need, and backward is written by hand
(components/ttt/ops/dual_steps.py) rather than recorded op by op.

Streams may start inside a mini-batch and rows may have different offsets and lengths:
each row is shifted onto a common grid of mini-batches (its offset becomes masked slots in
front, its padding masked slots behind), masked slots get a zero learning rate, and a
mini-batch whose last slot a row has not reached leaves that row's weights where they were
and its gradients in the accumulator.
"""

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from components.ttt.ops.common import LN_EPS, check_op_args
from components.ttt.ops.dual_steps import linear_bwd, linear_fwd, mlp_bwd, mlp_fwd
from components.ttt.state import TTTState

# Per mini-batch: True when every row completes it, False when none does, else a [B] mask.
Completion = Union[bool, Tensor]


def _grid_indices(offsets: Tensor, lengths: Tensor, T: int, H: int, K: int, n: int):
    """Flat indices that move ``[B, T, H, *]`` rows onto the ``[n, B, H, K, *]`` grid and back.

    Returns:
        to_grid: ``[n*B*H*K]`` index into the ``[B*T*H, *]`` view of the input.
        valid: ``[n, B, 1, K]`` True where a grid slot holds a real token.
        from_grid: ``[B*T*H]`` index into the ``[n*B*H*K, *]`` view of the grid.
    """
    device = offsets.device
    B = offsets.shape[0]
    slot = torch.arange(n * K, device=device).view(n, 1, 1, K)  # [n,1,1,K] grid position
    rows = torch.arange(B, device=device).view(1, B, 1, 1)
    heads = torch.arange(H, device=device).view(1, 1, H, 1)
    t = slot - offsets.view(1, B, 1, 1)  # [n,B,1,K] token index in the input
    valid = (t >= 0) & (t < lengths.view(1, B, 1, 1))
    to_grid = ((rows * T + t.clamp(0, max(T - 1, 0))) * H + heads).reshape(-1)
    v = torch.arange(T, device=device).view(1, T, 1) + offsets.view(B, 1, 1)  # [B,T,1] grid position
    b = torch.arange(B, device=device).view(B, 1, 1)
    h = torch.arange(H, device=device).view(1, 1, H)
    from_grid = ((((v // K) * B + b) * H + h) * K + v % K).reshape(-1)
    return to_grid, valid, from_grid


def _completions(offsets: List[int], lengths: List[int], K: int, n: int, device) -> List[Completion]:
    result = []
    for m in range(n):
        done = [(m + 1) * K <= o + L for o, L in zip(offsets, lengths)]
        result.append(True if all(done) else False if not any(done) else torch.tensor(done, device=device))
    return result


def _advance(weights: tuple, updates: tuple, eta_last: Tensor, complete: Completion):
    """Moves the weights of rows that completed the mini-batch; the others keep accumulating.

    ``updates`` already include what was pending. Returns ``(weights, pending)``.
    """
    if complete is True:
        return tuple(torch.addcmul(w, u, -eta_last) for w, u in zip(weights, updates)), None
    if complete is False:
        return weights, updates
    done = complete.view(-1, 1, 1, 1)
    moved = tuple(torch.where(done, w - eta_last * u, w) for w, u in zip(weights, updates))
    return moved, tuple(torch.where(done, torch.zeros_like(u), u) for u in updates)


def _advance_bwd(d_weights: tuple, d_pending: Optional[tuple], updates: tuple, eta_last: Tensor, complete: Completion):
    """Backward of :func:`_advance`: grads of the updates and of ``eta_last``."""
    if complete is False:
        return d_pending, eta_last.new_zeros(())
    if complete is True:
        d_updates = tuple(-eta_last * d for d in d_weights)
        d_eta_last = -sum((d * u).sum() for d, u in zip(d_weights, updates))
        return d_updates, d_eta_last
    done = complete.view(-1, 1, 1, 1).to(eta_last.dtype)
    d_updates = tuple(-eta_last * done * d + (1 - done) * dp for d, dp in zip(d_weights, d_pending))
    d_eta_last = -sum((done * d * u).sum() for d, u in zip(d_weights, updates))
    return d_updates, d_eta_last


class _Precomputed(NamedTuple):
    """What a segment of mini-batches needs that does not depend on the fast weights.
    Each tensor has a leading ``[S]`` (mini-batches of the segment)."""

    target: Tensor  # v - k, [S,B,H,K,f]
    eta: Tensor  # tril(token_eta_i * lr_j), [S,B,H,K,K]
    scores1: Tensor  # q k^T + 1, [S,B,H,K,K]
    attn1: Tensor  # eta * scores1
    lr_k: Tensor  # lr * k, [S,B,H,K,f]


def _precompute(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, token_eta: Tensor) -> _Precomputed:
    K = q.shape[-2]
    eta = torch.tril(token_eta.view(K, 1) * lr.unsqueeze(-2))  # [K,1] * [S,B,H,1,K] -> [S,B,H,K,K]
    scores1 = torch.matmul(q, k.transpose(-1, -2)) + 1.0  # [S,B,H,K,f] @ [S,B,H,f,K]
    return _Precomputed(v - k, eta, scores1, eta * scores1, lr.unsqueeze(-1) * k)


def _precompute_bwd(grads: dict, q, k, lr, token_eta, pre: _Precomputed):
    """Turns grads of the precomputed tensors into grads of q, k, v, lr and token_eta."""
    d_eta = grads["attn1"] * pre.scores1
    if "eta" in grads:
        d_eta = d_eta + grads["eta"]
    d_eta = torch.tril(d_eta)
    d_scores1 = grads["attn1"] * pre.eta
    d_q = grads["q"] + torch.matmul(d_scores1, k)  # [S,B,H,K,K] @ [S,B,H,K,f]
    d_k = grads["k"] - grads["target"] + lr.unsqueeze(-1) * grads["lr_k"] + torch.matmul(d_scores1.transpose(-1, -2), q)
    d_v = grads["target"]
    d_lr = grads["lr"] + (grads["lr_k"] * k).sum(-1) + (d_eta * token_eta.view(-1, 1)).sum(-2)
    d_token_eta = (d_eta * lr.unsqueeze(-2)).sum(dim=(0, 1, 2, 4))
    return d_q, d_k, d_v, d_lr, d_token_eta


def _run_segment(mlp, pre, q, k, lr, token_eta, ln_w, ln_b, weights, pending, completions, keep):
    """Forward over a segment's mini-batches. With ``keep``, also returns for each step its
    carry, updates and cache (for backward)."""
    eta_col = token_eta.view(-1, 1)
    z_bars, kept = [], []
    for g in range(q.shape[0]):
        if mlp:
            z_bar, updates, cache = mlp_fwd(
                q[g], k[g], pre.target[g], pre.eta[g], pre.attn1[g], pre.lr_k[g], lr[g], eta_col, ln_w, ln_b,
                *weights, pending,
            )
        else:
            z_bar, updates, cache = linear_fwd(
                q[g], k[g], pre.target[g], pre.attn1[g], pre.lr_k[g], lr[g], eta_col, ln_w, ln_b, *weights, pending
            )
        if keep:
            kept.append((weights, pending, updates, cache))
        weights, pending = _advance(weights, updates, token_eta[-1], completions[g])
        z_bars.append(z_bar)
    return torch.stack(z_bars), weights, pending, kept


class _DualScan(torch.autograd.Function):
    """The scan over mini-batches with a hand-written backward.

    Backward walks the segments from last to first. Without checkpointing (``segment`` =
    all mini-batches) forward keeps every step's cache; with it, forward keeps only the
    carried weights at each segment's start and backward recomputes that segment first.
    """

    @staticmethod
    def forward(ctx, mlp, completions, segment, q, k, v, lr, token_eta, ln_w, ln_b, *carry):
        n_w = 4 if mlp else 2
        weights, pending = tuple(carry[:n_w]), (tuple(carry[n_w:]) or None)
        n = q.shape[0]
        checkpointing = segment < n
        ctx.mlp, ctx.completions, ctx.segment, ctx.n_w = mlp, completions, segment, n_w
        ctx.initial_pending = pending is not None
        starts, z_bars = [], []
        for s in range(0, n, segment):
            e = min(s + segment, n)
            starts.append((weights, pending))
            pre = _precompute(q[s:e], k[s:e], v[s:e], lr[s:e], token_eta)
            z_bar, weights, pending, kept = _run_segment(
                mlp, pre, q[s:e], k[s:e], lr[s:e], token_eta, ln_w, ln_b, weights, pending, completions[s:e],
                keep=not checkpointing,
            )
            z_bars.append(z_bar)
        ctx.kept = None if checkpointing else kept
        # Segment starts go through save_for_backward so that an outer activation checkpoint can free them.
        ctx.has_pending = [p is not None for _, p in starts]
        flat = [t for w, p in starts for t in (w + (p if p is not None else ()))]
        ctx.save_for_backward(q, k, v, lr, token_eta, ln_w, ln_b, *flat)
        ctx.final_pending = pending is not None
        out = weights + (pending if pending is not None else ())
        # A weight that no mini-batch moved is still the input tensor; outputs must be new tensors.
        out = tuple(t.clone() if any(t is c for c in carry) else t for t in out)
        return (torch.cat(z_bars),) + out

    @staticmethod
    def backward(ctx, d_z_bar, *d_carry):
        q, k, v, lr, token_eta, ln_w, ln_b, *flat = ctx.saved_tensors
        mlp, n_w, n = ctx.mlp, ctx.n_w, q.shape[0]
        starts, i = [], 0
        for has_pending in ctx.has_pending:
            width = n_w * (2 if has_pending else 1)
            group = tuple(flat[i : i + width])
            starts.append((group[:n_w], group[n_w:] or None))
            i += width
        d_weights = tuple(d_carry[:n_w])
        d_pending = tuple(d_carry[n_w:]) if ctx.final_pending else None
        d_q, d_k, d_v, d_lr = (torch.zeros_like(t) for t in (q, k, v, lr))
        d_token_eta = torch.zeros_like(token_eta)
        d_ln_w, d_ln_b = torch.zeros_like(ln_w), torch.zeros_like(ln_b)
        eta_col, eta_last = token_eta.view(-1, 1), token_eta[-1]
        for seg in reversed(range(len(starts))):
            s = seg * ctx.segment
            e = min(s + ctx.segment, n)
            pre = _precompute(q[s:e], k[s:e], v[s:e], lr[s:e], token_eta)
            kept = ctx.kept
            if kept is None:
                weights, pending = starts[seg]
                _, _, _, kept = _run_segment(
                    mlp, pre, q[s:e], k[s:e], lr[s:e], token_eta, ln_w, ln_b, weights, pending,
                    ctx.completions[s:e], keep=True,
                )
            grads = {name: [] for name in ("q", "k", "target", "eta", "attn1", "lr_k", "lr")}
            for g in reversed(range(e - s)):
                weights, pending, updates, cache = kept[g]
                d_updates, d_eta_last = _advance_bwd(d_weights, d_pending, updates, eta_last, ctx.completions[s + g])
                d_token_eta[-1] += d_eta_last
                if mlp:
                    step, d_w, d_pending_in, d_eta_col = mlp_bwd(
                        cache, d_z_bar[s + g], d_updates, q[s + g], k[s + g], pre.eta[g], pre.attn1[g],
                        pre.lr_k[g], lr[s + g], eta_col, ln_w, weights[0], weights[2], pending,
                    )
                else:
                    step, d_w, d_pending_in, d_eta_col = linear_bwd(
                        cache, d_z_bar[s + g], d_updates, q[s + g], k[s + g], pre.attn1[g], pre.lr_k[g],
                        lr[s + g], eta_col, ln_w, weights[0], pending,
                    )
                d_weights = tuple(a + b for a, b in zip(d_weights, d_w))
                d_pending = d_pending_in
                if d_eta_col is not None:
                    d_token_eta += d_eta_col.sum(dim=(0, 1)).view(-1)
                d_ln_w += step.pop("ln_w").sum(dim=(0, 2)).unsqueeze(1)
                d_ln_b += step.pop("ln_b").sum(dim=(0, 2)).unsqueeze(1)
                for name, value in step.items():
                    grads[name].append(value)
            grads = {name: torch.stack(values[::-1]) for name, values in grads.items() if values}
            dq, dk, dv, dlr, dte = _precompute_bwd(grads, q[s:e], k[s:e], lr[s:e], token_eta, pre)
            d_q[s:e], d_k[s:e], d_v[s:e], d_lr[s:e] = dq, dk, dv, dlr
            d_token_eta += dte
        ctx.kept = None
        d_initial = d_weights + (d_pending if ctx.initial_pending else ())
        return (None, None, None, d_q, d_k, d_v, d_lr, d_token_eta, d_ln_w, d_ln_b) + d_initial


def ttt_dual(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr: Tensor,
    token_eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    state: TTTState,
    lengths: Tensor,
    checkpoint_group_size: int = 0,
) -> Tuple[Tensor, TTTState]:
    """TTT-Linear or TTT-MLP (by the state's kind) over a chunk of a stream, dual form.

    Args:
        xq, xk, xv: ``[B, T, H, f]`` queries, keys, values (RoPE already applied).
        lr: ``[B, T, H]`` inner learning rate of each token (``ttt_lr_eta``).
        token_eta: ``[K]`` position factor of each slot of a mini-batch of K tokens.
        ln_weight, ln_bias: ``[H, f]`` TTT-LayerNorm parameters.
        state: the state before the chunk; row b has seen ``state.offset[b]`` tokens of its
            current mini-batch.
        lengths: ``[B]`` number of real tokens of each row (right padding after them).
        checkpoint_group_size: when > 0 and gradients are on, recompute the scan in
            backward, in groups of this many mini-batches, instead of storing it.

    Returns:
        ``(out, state)``: out ``[B, T, H, f]`` is ``xq + LN(f(xq))`` for each token with the
        weights it sees (zero at padding); state is after each row's last real token.
    """
    check_op_args(xq, xk, xv, lr, token_eta, state, lengths)
    B, T, H, f = xq.shape
    K = token_eta.shape[0]
    offsets, lens = state.offset.tolist(), lengths.tolist()
    if T == 0:
        return xq.clone(), state
    n = math.ceil((max(offsets) + T) / K)
    to_grid, valid, from_grid = _grid_indices(state.offset, lengths, T, H, K, n)

    all_valid = bool(valid.all())

    def grid(x: Tensor) -> Tensor:  # [B,T,H,f] -> [n,B,H,K,f], zero outside real tokens
        moved = x.reshape(B * T * H, -1).index_select(0, to_grid).view(n, B, H, K, -1)
        return moved if all_valid else torch.where(valid.unsqueeze(-1), moved, 0.0)

    q, k, v = grid(xq), grid(xk), grid(xv)
    lr_grid = grid(lr.unsqueeze(-1)).squeeze(-1)  # [n,B,H,K]
    ln_w, ln_b = ln_weight.unsqueeze(1), ln_bias.unsqueeze(1)  # [H,1,f]
    completions = _completions(offsets, lens, K, n, xq.device)

    weights = state.weights()
    pending = None
    if any(o > 0 for o in offsets):
        inside = (state.offset > 0).view(B, 1, 1, 1)  # rows at a boundary have nothing pending
        pending = tuple(torch.where(inside, G, 0.0) for G in state.grads())
    segment = checkpoint_group_size if 0 < checkpoint_group_size < n else n
    z_bar, *carry = _DualScan.apply(
        state.is_mlp, completions, segment, q, k, v, lr_grid, token_eta, ln_w, ln_b, *weights, *(pending or ())
    )
    new_weights = tuple(carry[: len(weights)])
    new_grads = tuple(carry[len(weights) :]) or tuple(torch.zeros_like(w) for w in new_weights)
    # [n,B,H,K,f]: LN over f with per-head affine
    out_grid = q + F.layer_norm(z_bar, (f,), eps=LN_EPS) * ln_w + ln_b
    out = out_grid.reshape(n * B * H * K, f).index_select(0, from_grid).view(B, T, H, f)
    if any(L < T for L in lens):
        out = torch.where((torch.arange(T, device=xq.device) < lengths.view(B, 1)).view(B, T, 1, 1), out, 0.0)
    return out, TTTState.from_parts(new_weights, new_grads, (state.offset + lengths) % K)
