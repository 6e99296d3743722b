"""TTT in the dual form: a scan over mini-batches of K tokens, each computed with matmuls.

Within a mini-batch every token's inner gradient is taken at the mini-batch's starting
weights W, so the K outputs follow from a few matmuls (Sun et al. 2024, Sec. 2.7):

    Z_bar = XQ W - (eta * (XQ XK^T + 1)) @ grad          eta_ij = token_eta_i * lr_j, j <= i
    W'    = W - token_eta_{K-1} * (lr * XK)^T @ grad

(and the same for the bias). The scan is one autograd.Function whose backward is written by
hand (components/ttt/ops/dual_steps.py) rather than recorded op by op; each step works on
cache-sized ``[B*H, K, f]`` tiles, RoPE included (on the grid, a slot's position is its
index in the mini-batch).

Streams may start inside a mini-batch and rows may have different offsets and lengths:
each row is shifted onto a common grid of mini-batches (its offset becomes masked slots in
front, its padding masked slots behind), masked slots get a zero learning rate, and a
mini-batch whose last slot a row has not reached leaves that row's weights where they were
and its gradients in the accumulator.
"""

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from components.ttt.ops.common import check_op_args, rope_angles
from components.ttt.ops.dual_steps import addmm_, linear_bwd, linear_fwd, ln_bwd, ln_fwd, mlp_bwd, mlp_fwd
from components.ttt.state import TTTState

# Per mini-batch: True when every row completes it, False when none does, else a [B*H] mask.
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


def _completions(offsets: List[int], lengths: List[int], K: int, n: int, H: int, device) -> List[Completion]:
    """For each mini-batch: True, False, or a ``[B*H]`` mask of the (stream, head) rows that complete it."""
    result = []
    for m in range(n):
        done = [(m + 1) * K <= o + L for o, L in zip(offsets, lengths)]
        if all(done) or not any(done):
            result.append(all(done))
        else:
            result.append(torch.tensor(done, device=device).repeat_interleave(H))
    return result


def _advance(weights: tuple, updates: tuple, eta_last: Tensor, complete: Completion):
    """Moves the weights of rows that completed the mini-batch; the others keep accumulating.

    ``updates`` already include what was pending. Returns ``(weights, pending)``.
    """
    if complete is True:
        return tuple(torch.addcmul(w, u, -eta_last) for w, u in zip(weights, updates)), None
    if complete is False:
        return weights, updates
    done = complete.view(-1, 1, 1)
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
    done = complete.view(-1, 1, 1).to(eta_last.dtype)
    d_updates = tuple(-eta_last * done * d + (1 - done) * dp for d, dp in zip(d_weights, d_pending))
    d_eta_last = -sum((done * d * u).sum() for d, u in zip(d_weights, updates))
    return d_updates, d_eta_last


class _StepInputs(NamedTuple):
    """What a mini-batch needs that does not depend on the fast weights, streams and heads
    folded: ``[BH, ...]``."""

    lr: Tensor  # [BH,K]
    q: Tensor  # queries after RoPE, [BH,K,f]
    k: Tensor  # keys after RoPE
    target: Tensor  # v - k
    eta: Tensor  # tril(token_eta_i * lr_j), [BH,K,K]
    scores1: Tensor  # q k^T + 1, [BH,K,K]
    attn1: Tensor  # eta * scores1
    lr_k: Tensor  # lr * k, [BH,K,f]


def _rope_factors(K: int, f: int, base: float, dtype: torch.dtype, device) -> Tensor:
    """``exp(i * angle)`` for mini-batch slots 0..K-1: ``[K, f/2]`` complex. On the grid, a slot's
    RoPE position is its index in the mini-batch."""
    angles = rope_angles(torch.arange(K, device=device), f, base, dtype)
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(x: Tensor, factors: Tensor) -> Tensor:
    """Rotates interleaved pairs of ``x [..., K, f]`` by complex ``factors [K, f/2]``."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * factors).flatten(-2)


def _step_inputs(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, token_eta: Tensor, rope: Tensor) -> _StepInputs:
    """From one mini-batch of the grid: q, k, v ``[B,H,K,f]``, lr ``[B,H,K]``."""
    B, H, K, f = q.shape
    q, k = _rotate(q, rope).reshape(B * H, K, f), _rotate(k, rope).reshape(B * H, K, f)
    lr = lr.reshape(B * H, K)
    eta = torch.tril(token_eta.view(K, 1) * lr.unsqueeze(-2))  # [K,1] * [BH,1,K] -> [BH,K,K]
    scores1 = torch.bmm(q, k.transpose(-1, -2)).add_(1.0)  # [BH,K,f] @ [BH,f,K]
    return _StepInputs(lr, q, k, v.reshape(B * H, K, f) - k, eta, scores1, eta * scores1, lr.unsqueeze(-1) * k)


def _step_inputs_bwd(grads: dict, lr: Tensor, token_eta: Tensor, rope: Tensor, pre: _StepInputs):
    """Turns grads of a step's inputs into grads of q, k, v (before RoPE), lr and token_eta."""
    d_eta = grads["attn1"] * pre.scores1
    if "eta" in grads:
        d_eta = d_eta + grads["eta"]
    d_eta = torch.tril(d_eta)
    d_scores1 = grads["attn1"] * pre.eta
    d_q = addmm_(grads["q"], d_scores1, pre.k)  # [BH,K,K] @ [BH,K,f]
    d_k = (grads["k"] - grads["target"]).addcmul_(lr.unsqueeze(-1), grads["lr_k"])
    addmm_(d_k, d_scores1.transpose(-1, -2), pre.q)
    d_lr = grads["lr"] + (grads["lr_k"] * pre.k).sum(-1) + (d_eta * token_eta.view(-1, 1)).sum(-2)
    d_token_eta = (d_eta * lr.unsqueeze(-2)).sum(dim=(0, 2))
    back = rope.conj()
    return _rotate(d_q, back), _rotate(d_k, back), grads["target"], d_lr, d_token_eta


def _scan(mlp, q, k, v, lr, token_eta, ln_w, ln_b, rope, weights, pending, completions, out=None, keep=False):
    """Runs mini-batches ``0..len(q)-1`` from the given carry; writes ``q + LN(z_bar)`` into ``out``
    (q after RoPE).

    Returns ``(weights, pending, kept)``; with ``keep``, ``kept`` holds for each step what its
    backward needs: ``(weights, pending, updates, cache, step_inputs, z_bar)``.
    """
    eta_col, eta_last = token_eta.view(-1, 1), token_eta[-1]
    kept = []
    for m in range(q.shape[0]):
        pre = _step_inputs(q[m], k[m], v[m], lr[m], token_eta, rope)
        if mlp:
            z_bar, updates, cache = mlp_fwd(
                pre.q, pre.k, pre.target, pre.eta, pre.attn1, pre.lr_k, pre.lr, eta_col, ln_w, ln_b, *weights, pending
            )
        else:
            z_bar, updates, cache = linear_fwd(
                pre.q, pre.k, pre.target, pre.attn1, pre.lr_k, pre.lr, eta_col, ln_w, ln_b, *weights, pending
            )
        if out is not None:
            shape = out[m].shape  # [B,H,K,f], strided when the grid is a view of the input
            torch.add(pre.q.view(shape), ln_fwd(z_bar, ln_w, ln_b).view(shape), out=out[m])
        if keep:
            kept.append((weights, pending, updates, cache, pre, z_bar))
        weights, pending = _advance(weights, updates, eta_last, completions[m])
    return weights, pending, kept


def _scan_bwd(mlp, kept, d_out, d_weights, d_pending, token_eta, ln_w, rope, completions, grads_out):
    """Walks ``kept`` backwards; writes grads of q, k, v, lr into ``grads_out`` and returns the
    grads of the carry at the start plus those of token_eta, ln_w and ln_b."""
    eta_col, eta_last = token_eta.view(-1, 1), token_eta[-1]
    d_q, d_k, d_v, d_lr = grads_out
    B, H, K, f = d_q.shape[1:]
    d_token_eta = torch.zeros_like(token_eta)
    d_ln_w = d_ln_b = 0.0
    for m in reversed(range(len(kept))):
        weights, pending, updates, cache, pre, z_bar = kept[m]
        d_out_m = d_out[m].reshape(B * H, K, f)
        d_z_bar, d_ln_w_out, d_ln_b_out = ln_bwd(z_bar, d_out_m, ln_w)
        d_updates, d_eta_last = _advance_bwd(d_weights, d_pending, updates, eta_last, completions[m])
        if mlp:
            step, d_w, d_pending, d_eta_col = mlp_bwd(
                cache, d_z_bar, d_updates, pre.q, pre.k, pre.eta, pre.attn1, pre.lr_k, pre.lr, eta_col, ln_w,
                weights[0], weights[2], pending,
            )
        else:
            step, d_w, d_pending, d_eta_col = linear_bwd(
                cache, d_z_bar, d_updates, pre.q, pre.k, pre.attn1, pre.lr_k, pre.lr, eta_col, ln_w, weights[0], pending
            )
        d_weights = tuple(a + b for a, b in zip(d_weights, d_w))
        d_ln_w = d_ln_w + (step.pop("ln_w") + d_ln_w_out).view(B, H, K, f).sum(dim=(0, 2))  # -> [H,f]
        d_ln_b = d_ln_b + (step.pop("ln_b") + d_ln_b_out).view(B, H, K, f).sum(dim=(0, 2))
        step["q"] = step["q"] + d_out_m  # the residual of out = q + LN(z_bar)
        dq, dk, dv, dlr, d_te = _step_inputs_bwd(step, pre.lr, token_eta, rope, pre)
        d_q[m], d_k[m], d_v[m], d_lr[m] = dq.view(B, H, K, f), dk.view(B, H, K, f), dv.view(B, H, K, f), dlr.view(B, H, K)
        d_token_eta = d_token_eta + d_te
        d_token_eta[-1] += d_eta_last
        if d_eta_col is not None:
            d_token_eta = d_token_eta + d_eta_col.sum(dim=0).view(-1)
    return d_weights, d_pending, d_token_eta, d_ln_w, d_ln_b


def _fold(tensors) -> tuple:
    """``[B, H, ...]`` -> ``[B*H, ...]``."""
    return tuple(t.reshape(-1, *t.shape[2:]) for t in tensors)


def _unfold(tensors, B: int, H: int) -> tuple:
    return tuple(t.view(B, H, *t.shape[1:]) for t in tensors)


def _fold_heads(param: Tensor, B: int) -> Tensor:
    """A per-head ``[H, 1, f]`` parameter repeated for each stream: ``[B*H, 1, f]``."""
    return param.expand(B, *param.shape).reshape(-1, *param.shape[1:])


class _DualScan(torch.autograd.Function):
    """The scan over mini-batches with a hand-written backward.

    Without checkpointing (``segment`` = all mini-batches), forward keeps what each step's
    backward needs; with it, forward keeps only the carried weights at the start of each
    segment, and backward recomputes one segment at a time. Everything kept goes through
    ``save_for_backward``, so an outer activation checkpoint can drop and recompute it.
    """

    @staticmethod
    def forward(ctx, mlp, completions, segment, needs_backward, rope_base, q, k, v, lr, token_eta, ln_w, ln_b, *carry):
        n_w = 4 if mlp else 2
        n, B, H = q.shape[:3]
        rope = _rope_factors(q.shape[-2], q.shape[-1], rope_base, q.dtype, q.device)
        weights, pending = _fold(carry[:n_w]), (_fold(carry[n_w:]) or None)
        ln_w3, ln_b3 = _fold_heads(ln_w, B), _fold_heads(ln_b, B)
        out = torch.empty_like(q)
        starts, kept = [], []
        for s in range(0, n, segment):
            e = min(s + segment, n)
            starts.append((weights, pending))
            weights, pending, seg_kept = _scan(
                mlp, q[s:e], k[s:e], v[s:e], lr[s:e], token_eta, ln_w3, ln_b3, rope, weights, pending,
                completions[s:e], out=out[s:e], keep=needs_backward and segment == n,
            )
            kept += seg_kept
        leaves, ctx.spec = tree_flatten((starts, kept))
        ctx.tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        ctx.other_leaves = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        ctx.save_for_backward(q, k, v, lr, token_eta, ln_w, ln_b, *(leaves[i] for i in ctx.tensor_slots))
        ctx.mlp, ctx.completions, ctx.segment, ctx.n_w, ctx.rope_base = mlp, completions, segment, n_w, rope_base
        ctx.initial_pending, ctx.final_pending = len(carry) > n_w, pending is not None
        if all(c is False for c in completions):
            weights = tuple(w.clone() for w in weights)  # unmoved: still the inputs, and outputs must be new
        carry_out = _unfold(weights + (pending if pending is not None else ()), B, H)
        return (out,) + carry_out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, *d_carry):
        q, k, v, lr, token_eta, ln_w, ln_b, *saved = ctx.saved_tensors
        leaves = list(ctx.other_leaves)
        for slot, tensor in zip(ctx.tensor_slots, saved):
            leaves[slot] = tensor
        starts, kept = tree_unflatten(leaves, ctx.spec)
        mlp, n_w, segment = ctx.mlp, ctx.n_w, ctx.segment
        n, B, H = q.shape[:3]
        rope = _rope_factors(q.shape[-2], q.shape[-1], ctx.rope_base, q.dtype, q.device)
        ln_w3, ln_b3 = _fold_heads(ln_w, B), _fold_heads(ln_b, B)
        d_weights = _fold(d_carry[:n_w])
        d_pending = _fold(d_carry[n_w:]) if ctx.final_pending else None
        grads_out = tuple(torch.empty_like(t) for t in (q, k, v, lr))
        d_token_eta = torch.zeros_like(token_eta)
        d_ln_w, d_ln_b = torch.zeros_like(ln_w), torch.zeros_like(ln_b)
        for seg in reversed(range(len(starts))):
            s, e = seg * segment, min((seg + 1) * segment, n)
            if segment < n:
                weights, pending = starts[seg]
                _, _, seg_kept = _scan(
                    mlp, q[s:e], k[s:e], v[s:e], lr[s:e], token_eta, ln_w3, ln_b3, rope, weights, pending,
                    ctx.completions[s:e], keep=True,
                )
            else:
                seg_kept = kept
            d_weights, d_pending, d_te, d_w, d_b = _scan_bwd(
                mlp, seg_kept, d_out[s:e], d_weights, d_pending, token_eta, ln_w3, rope,
                ctx.completions[s:e], tuple(g[s:e] for g in grads_out),
            )
            d_token_eta += d_te
            d_ln_w += d_w.unsqueeze(1)
            d_ln_b += d_b.unsqueeze(1)
        d_initial = _unfold(d_weights + (d_pending if ctx.initial_pending else ()), B, H)
        return (None, None, None, None, None, *grads_out, d_token_eta, d_ln_w, d_ln_b) + d_initial


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
    rope_base: float = 10000.0,
    checkpoint_group_size: int = 0,
) -> Tuple[Tensor, TTTState]:
    """TTT-Linear or TTT-MLP (by the state's kind) over a chunk of a stream, dual form.

    Args:
        xq, xk, xv: ``[B, T, H, f]`` queries, keys, values (before RoPE).
        lr: ``[B, T, H]`` inner learning rate of each token (``ttt_lr_eta``).
        token_eta: ``[K]`` position factor of each slot of a mini-batch of K tokens.
        ln_weight, ln_bias: ``[H, f]`` TTT-LayerNorm parameters.
        state: the state before the chunk; row b has seen ``state.offset[b]`` tokens of its
            current mini-batch.
        lengths: ``[B]`` number of real tokens of each row (right padding after them).
        rope_base: RoPE on q and k at each token's position inside its mini-batch.
        checkpoint_group_size: when > 0, keep only every this many mini-batches' weights
            and recompute the scan in backward one group at a time, instead of storing it.

    Returns:
        ``(out, state)``: out ``[B, T, H, f]`` is ``q + LN(f(q))`` (q after RoPE) for each token with the
        weights it sees (zero at padding); state is after each row's last real token.
    """
    check_op_args(xq, xk, xv, lr, token_eta, state, lengths)
    B, T, H, f = xq.shape
    K = token_eta.shape[0]
    offsets, lens = state.offset.tolist(), lengths.tolist()
    if T == 0:
        return xq.clone(), state
    n = math.ceil((max(offsets) + T) / K)
    aligned = T % K == 0 and not any(offsets) and all(L == T for L in lens)
    if aligned:
        # The grid is a view: [B,T,H,f] = [B,n,K,H,f] -> [n,B,H,K,f], no copies.
        q, k, v = (x.reshape(B, n, K, H, f).permute(1, 0, 3, 2, 4) for x in (xq, xk, xv))
        lr_grid = lr.reshape(B, n, K, H).permute(1, 0, 3, 2)
    else:
        to_grid, valid, from_grid = _grid_indices(state.offset, lengths, T, H, K, n)
        all_valid = bool(valid.all())

        def grid(x: Tensor) -> Tensor:  # [B,T,H,f] -> [n,B,H,K,f], zero outside real tokens
            moved = x.reshape(B * T * H, -1).index_select(0, to_grid).view(n, B, H, K, -1)
            return moved if all_valid else torch.where(valid.unsqueeze(-1), moved, 0.0)

        q, k, v = grid(xq), grid(xk), grid(xv)
        lr_grid = grid(lr.unsqueeze(-1)).squeeze(-1)  # [n,B,H,K]
    ln_w, ln_b = ln_weight.unsqueeze(1), ln_bias.unsqueeze(1)  # [H,1,f]
    completions = _completions(offsets, lens, K, n, H, xq.device)

    weights = state.weights()
    pending = None
    if any(o > 0 for o in offsets):
        inside = (state.offset > 0).view(B, 1, 1, 1)  # rows at a boundary have nothing pending
        pending = tuple(torch.where(inside, G, 0.0) for G in state.grads())
    segment = checkpoint_group_size if 0 < checkpoint_group_size < n else n
    # Without a backward to come (inference, decoding), the scan keeps no per-step caches.
    leaves = (xq, xk, xv, lr, token_eta, ln_weight, ln_bias, *weights, *(pending or ()))
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    out_grid, *carry = _DualScan.apply(
        state.is_mlp, completions, segment, needs_backward, rope_base, q, k, v, lr_grid, token_eta, ln_w, ln_b,
        *weights, *(pending or ()),
    )
    new_weights = tuple(carry[: len(weights)])
    new_grads = tuple(carry[len(weights) :]) or tuple(torch.zeros_like(w) for w in new_weights)
    if aligned:
        out = out_grid.permute(1, 0, 3, 2, 4).reshape(B, T, H, f)  # a view: out_grid keeps q's strides
    else:
        out = out_grid.reshape(n * B * H * K, f).index_select(0, from_grid).view(B, T, H, f)
        if any(L < T for L in lens):
            out = torch.where((torch.arange(T, device=xq.device) < lengths.view(B, 1)).view(B, T, 1, 1), out, 0.0)
    return out, TTTState.from_parts(new_weights, new_grads, (state.offset + lengths) % K)
