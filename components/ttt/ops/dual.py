"""TTT in the dual form: a scan over mini-batches of K tokens, each computed with matmuls.

Within a mini-batch every token's inner gradient is taken at the mini-batch's starting
weights W, so the K outputs follow from a few matmuls (Sun et al. 2024, Sec. 2.7):

    Z_bar = XQ W - (eta * (XQ XK^T + 1)) @ grad          eta_ij = token_eta_i * lr_j, j <= i
    W'    = W - token_eta_{K-1} * (lr * XK)^T @ grad

with the bias folded into W by a column of ones on XQ and XK. Everything that does not
depend on W (the eta and attention matrices, the targets) is computed for a whole group of
mini-batches at once; the Python loop only runs what the carried weights need.

Streams may start inside a mini-batch and rows may have different offsets and lengths:
each row is shifted onto a common grid of mini-batches (its offset becomes masked slots in
front, its padding masked slots behind), masked slots get a zero learning rate, and a
mini-batch whose last slot a row has not reached leaves that row's weights where they were
and its gradients in the accumulator.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from components.ttt.ops.common import check_op_args, gelu_tanh_grad, ttt_layer_norm, ttt_layer_norm_l2_grad
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


def _advance(weights: tuple, updates: tuple, pending: Optional[tuple], eta_last: Tensor, complete: Completion):
    """Adds a mini-batch's accumulated gradients; moves the weights of rows that completed it."""
    if pending is not None:
        updates = tuple(u + p for u, p in zip(updates, pending))
    if complete is True:
        return tuple(torch.addcmul(w, u, -eta_last) for w, u in zip(weights, updates)), None
    if complete is False:
        return weights, updates
    done = complete.view(-1, 1, 1, 1)
    moved = tuple(torch.where(done, w - eta_last * u, w) for w, u in zip(weights, updates))
    return moved, tuple(torch.where(done, torch.zeros_like(u), u) for u in updates)


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


def _run_group(q, k, v, lr, token_eta, ln_w, ln_b, weights, pending, completions, pending_in_output):
    """Runs G consecutive mini-batches.

    Args:
        q, k, v: ``[G, B, H, K, f]``; lr: ``[G, B, H, K]``; token_eta: ``[K]``;
        ln_w, ln_b: ``[H, 1, f]``.
        weights: ``(W1a,)`` for Linear, ``(W1a, W2a)`` for MLP, biases folded in as a last row:
            W1a ``[B, H, f+1, F]``, W2a ``[B, H, F+1, f]``.
        pending: accumulators of the unfinished mini-batch in the layout of ``weights``, or None.
        completions: G entries, see :data:`Completion`.
        pending_in_output: whether the first mini-batch's outputs must see ``pending``.

    Returns:
        ``(weights, pending, z_bar)`` with z_bar ``[G, B, H, K, f]`` before the TTT-LayerNorm.
    """
    K = q.shape[-2]
    eta_last = token_eta[-1]
    eta_col = token_eta.view(K, 1)
    xkqa = _with_ones(torch.cat([k, q], dim=-2))  # [G,B,H,2K,f+1]
    xka, xqa = xkqa[..., :K, :], xkqa[..., K:, :]
    eta = torch.tril(token_eta.view(K, 1) * lr.unsqueeze(-2))  # [K,1] * [G,B,H,1,K] -> [G,B,H,K,K]
    attn1 = eta * (xqa @ xka.transpose(-1, -2))  # [G,B,H,K,f+1] @ [G,B,H,f+1,K] -> [G,B,H,K,K]
    lr_xka_t = (lr.unsqueeze(-1) * xka).transpose(-1, -2)  # [G,B,H,f+1,K]
    target = v - k
    # One unbind per tensor: indexing x[g] in the loop would make backward build a zero-filled
    # gradient of the whole group for every mini-batch.
    xkqa, xqa, attn1, lr_xka_t, target, eta, lr = (
        t.unbind(0) for t in (xkqa, xqa, attn1, lr_xka_t, target, eta, lr)
    )
    z_bars = []
    for g in range(q.shape[0]):
        see_pending = pending_in_output and g == 0 and pending is not None
        if len(weights) == 1:
            (W1a,) = weights
            z = xkqa[g] @ W1a  # [B,H,2K,f+1] @ [B,H,f+1,f] -> [B,H,2K,f]
            grad = ttt_layer_norm_l2_grad(z[..., :K, :], target[g], ln_w, ln_b)
            z_bar = z[..., K:, :] - attn1[g] @ grad  # [B,H,K,K] @ [B,H,K,f]
            if see_pending:
                z_bar = z_bar - eta_col * (xqa[g] @ pending[0])
            updates = (lr_xka_t[g] @ grad,)  # [B,H,f+1,K] @ [B,H,K,f] -> [B,H,f+1,f]
        else:
            W1a, W2a = weights
            F4 = W2a.shape[-2] - 1
            z1 = xkqa[g] @ W1a  # [B,H,2K,f+1] @ [B,H,f+1,4f] -> [B,H,2K,4f]
            z1k = z1[..., :K, :]
            x2a = _with_ones(F.gelu(z1k, approximate="tanh"))  # [B,H,K,4f+1]
            grad2 = ttt_layer_norm_l2_grad(x2a @ W2a, target[g], ln_w, ln_b)  # [B,H,K,f]
            # [B,H,K,f] @ [B,H,f,4f] -> [B,H,K,4f]
            grad1 = (grad2 @ W2a[..., :F4, :].transpose(-1, -2)) * gelu_tanh_grad(z1k)
            z1_bar = z1[..., K:, :] - attn1[g] @ grad1  # [B,H,K,K] @ [B,H,K,4f]
            if see_pending:
                z1_bar = z1_bar - eta_col * (xqa[g] @ pending[0])
            x2a_bar = _with_ones(F.gelu(z1_bar, approximate="tanh"))  # [B,H,K,4f+1]
            attn2 = eta[g] * (x2a_bar @ x2a.transpose(-1, -2))  # [B,H,K,4f+1] @ [B,H,4f+1,K]
            z_bar = x2a_bar @ W2a - attn2 @ grad2  # [B,H,K,f]
            if see_pending:
                z_bar = z_bar - eta_col * (x2a_bar @ pending[1])
            lr_x2a_t = (lr[g].unsqueeze(-1) * x2a).transpose(-1, -2)  # [B,H,4f+1,K]
            updates = (lr_xka_t[g] @ grad1, lr_x2a_t @ grad2)
        weights, pending = _advance(weights, updates, pending, eta_last, completions[g])
        z_bars.append(z_bar)
    return weights, pending, torch.stack(z_bars)


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

    def grid(x: Tensor) -> Tensor:  # [B,T,H,f] -> [n,B,H,K,f], zero outside real tokens
        moved = x.reshape(B * T * H, -1).index_select(0, to_grid).view(n, B, H, K, -1)
        return torch.where(valid.unsqueeze(-1), moved, 0.0)

    q, k, v = grid(xq), grid(xk), grid(xv)
    lr_grid = grid(lr.unsqueeze(-1)).squeeze(-1)  # [n,B,H,K]
    ln_w, ln_b = ln_weight.unsqueeze(1), ln_bias.unsqueeze(1)  # [H,1,f]
    completions = _completions(offsets, lens, K, n, xq.device)

    fold = lambda w, b: torch.cat([w, b], dim=-2)  # noqa: E731  W [B,H,i,o], b [B,H,1,o] -> [B,H,i+1,o]
    weights = (fold(state.W1, state.b1),) if not state.is_mlp else (fold(state.W1, state.b1), fold(state.W2, state.b2))
    pending = None
    if any(o > 0 for o in offsets):
        inside = (state.offset > 0).view(B, 1, 1, 1)  # rows at a boundary have nothing pending
        grads = [torch.where(inside, G, 0.0) for G in state.grads()]
        pending = tuple(fold(grads[i], grads[i + 1]) for i in range(0, len(grads), 2))

    group = checkpoint_group_size if checkpoint_group_size > 0 and torch.is_grad_enabled() else n
    z_bars = []
    for start in range(0, n, group):
        end = min(start + group, n)
        args = (q[start:end], k[start:end], v[start:end], lr_grid[start:end], token_eta, ln_w, ln_b)
        args += (weights, pending, completions[start:end], start == 0)
        if group < n:
            weights, pending, z_bar = torch.utils.checkpoint.checkpoint(_run_group, *args, use_reentrant=False)
        else:
            weights, pending, z_bar = _run_group(*args)
        z_bars.append(z_bar)
    out_grid = q + ttt_layer_norm(torch.cat(z_bars), ln_w, ln_b)  # [n,B,H,K,f]
    out = out_grid.reshape(n * B * H * K, f).index_select(0, from_grid).view(B, T, H, f)
    out = torch.where((torch.arange(T, device=xq.device) < lengths.view(B, 1)).view(B, T, 1, 1), out, 0.0)

    unfold = lambda wa: (wa[..., :-1, :], wa[..., -1:, :])  # noqa: E731
    new_weights = sum((unfold(w) for w in weights), ())
    new_grads = (
        sum((unfold(p) for p in pending), ()) if pending is not None else tuple(torch.zeros_like(w) for w in new_weights)
    )
    return out, TTTState.from_parts(new_weights, new_grads, (state.offset + lengths) % K)
