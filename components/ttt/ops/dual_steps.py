"""One mini-batch of the dual form, forward and hand-written backward, for TTT-Linear and TTT-MLP.

Autograd over the scan records ~100 small ops per mini-batch; these functions do the same
math with a fraction of them. Tensors are per mini-batch with streams and heads folded into
one batch dim, ``[BH, K, f]`` (MLP hidden: ``4f``), so every matmul is one ``bmm``;
``ln_w``/``ln_b`` are ``[BH, 1, f]``. ``pending`` is the unfinished mini-batch's
accumulator when a stream starts inside it (first mini-batch only), else None.

Inputs of a step (from ``_step_inputs`` in dual.py, which also owns their backward):
    q, k: queries and keys after RoPE; target = v - k;
    eta: ``tril(token_eta_i * lr_j)`` ``[BH, K, K]``;
    attn1: ``eta * (q k^T + 1)``; lr_k: ``lr * k``; lr: ``[BH, K]``.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from components.ttt.ops.common import LN_EPS

_A = math.sqrt(2.0 / math.pi)
_C = 0.044715


def gelu_tanh(x: Tensor):
    """``gelu(x, approximate="tanh")`` as ``x * sigmoid(2u)``, ``u = a (x + c x^3)``; also returns
    the sigmoid, from which both derivatives follow. (torch's fused tanh-GELU is ~4x slower
    on CPU than these few vectorized ops.)"""
    s = torch.sigmoid((2 * _A) * torch.addcmul(x, x * x, x, value=_C))
    return x * s, s


def _du(x: Tensor) -> Tensor:
    """d(2u)/dx = 2a (1 + 3c x^2)."""
    return (x * x).mul_(6 * _A * _C).add_(2 * _A)


def gelu_tanh_slope(x: Tensor, s: Tensor) -> Tensor:
    """gelu'(x) given ``s`` from :func:`gelu_tanh`: ``s + x s (1 - s) du``."""
    return (s - s * s).mul_(x).mul_(_du(x)).add_(s)


def gelu_tanh_slope_and_curvature(x: Tensor, s: Tensor):
    """gelu'(x) and gelu''(x) given ``s``; gelu'' = ``s (1 - s) (2 du + x ((1 - 2s) du^2 + 12 a c x))``."""
    du = _du(x)
    ds = s - s * s
    slope = (ds * x).mul_(du).add_(s)
    du2 = du * du
    curvature = du2.addcmul_(du2, s, value=-2.0).add_(x, alpha=12 * _A * _C).mul_(x).add_(du, alpha=2.0).mul_(ds)
    return slope, curvature


def addmm(base: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``base + alpha * a @ b`` in one batched op; base may be a broadcast row (a bias)."""
    return torch.baddbmm(base, a, b, alpha=alpha)


def addmm_(base: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """In-place ``base += alpha * a @ b`` on a tensor this code owns."""
    if base.is_contiguous():
        return base.baddbmm_(a, b, alpha=alpha)
    return base.copy_(torch.baddbmm(base, a, b, alpha=alpha))


def ln_l2_grad_fwd(z: Tensor, target: Tensor, ln_w: Tensor, ln_b: Tensor):
    """``d/dz 0.5 ||LN(z) - target||^2`` and what its backward needs."""
    z_hat = z - z.mean(dim=-1, keepdim=True)
    rstd = z_hat.pow(2).mean(dim=-1, keepdim=True).add_(LN_EPS).rsqrt_()
    z_hat.mul_(rstd)
    err = torch.addcmul(ln_b - target, ln_w, z_hat)  # LN(z) - target
    g_hat = err * ln_w
    s2 = (g_hat * z_hat).mean(dim=-1, keepdim=True)
    inner = (g_hat - g_hat.mean(dim=-1, keepdim=True)).addcmul_(z_hat, s2, value=-1.0)
    return rstd * inner, (z_hat, rstd, err, s2, inner)


def ln_l2_grad_bwd(cache, d_out: Tensor, ln_w: Tensor):
    """Backward of :func:`ln_l2_grad_fwd`: grads w.r.t. z and target, and the per-element
    contributions to ln_w and ln_b (summed by the caller)."""
    z_hat, rstd, err, s2, inner = cache
    f = z_hat.shape[-1]
    p = rstd * d_out
    m1 = (p * z_hat).mean(dim=-1, keepdim=True)
    d_g_hat = (p - p.mean(dim=-1, keepdim=True)).addcmul_(z_hat, m1, value=-1.0)
    d_err = d_g_hat * ln_w
    d_z_hat = (d_err * ln_w).addcmul_(p, s2, value=-1.0).addcmul_(err * ln_w, m1, value=-1.0)
    # LN backward of d_z_hat, plus the path through the rstd factor in front of `inner`
    d_rstd = (d_out * inner).sum(dim=-1, keepdim=True)
    m2 = (d_z_hat * z_hat).mean(dim=-1, keepdim=True)
    d_z = (d_z_hat - d_z_hat.mean(dim=-1, keepdim=True)).addcmul_(z_hat, m2, value=-1.0).mul_(rstd)
    d_z.addcmul_(d_rstd * rstd * rstd, z_hat, value=-1.0 / f)
    d_ln_w = (d_g_hat * err).addcmul_(d_err, z_hat)
    return d_z, -d_err, d_ln_w, d_err


def ln_fwd(z: Tensor, ln_w: Tensor, ln_b: Tensor) -> Tensor:
    """The TTT-LayerNorm: over the last dim, per-head affine ``[H, 1, f]``."""
    z_hat = z - z.mean(dim=-1, keepdim=True)
    z_hat.mul_(z_hat.pow(2).mean(dim=-1, keepdim=True).add_(LN_EPS).rsqrt_())
    return torch.addcmul(ln_b, z_hat, ln_w)


def ln_bwd(z: Tensor, d_y: Tensor, ln_w: Tensor):
    """Backward of :func:`ln_fwd` from its input: grads w.r.t. z and the per-element
    contributions to ln_w and ln_b."""
    z_hat = z - z.mean(dim=-1, keepdim=True)
    rstd = z_hat.pow(2).mean(dim=-1, keepdim=True).add_(LN_EPS).rsqrt_()
    z_hat.mul_(rstd)
    d_z_hat = d_y * ln_w
    m = (d_z_hat * z_hat).mean(dim=-1, keepdim=True)
    d_z = (d_z_hat - d_z_hat.mean(dim=-1, keepdim=True)).addcmul_(z_hat, m, value=-1.0).mul_(rstd)
    return d_z, d_y * z_hat, d_y


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _sum_rows(x: Tensor) -> Tensor:
    return x.sum(dim=-2, keepdim=True)


def linear_fwd(q, k, target, attn1, lr_k, lr, eta_col, ln_w, ln_b, W1, b1, pending: Optional[tuple]):
    """Returns ``z_bar``, the accumulated updates ``(U_W1, U_b1)`` and a cache for backward."""
    zk = addmm(b1, k, W1)  # [BH,K,f] @ [BH,f,f] + [BH,1,f] -> [BH,K,f]
    grad, ln_cache = ln_l2_grad_fwd(zk, target, ln_w, ln_b)
    z_bar = addmm_(addmm(b1, q, W1), attn1, grad, alpha=-1.0)  # - [BH,K,K] @ [BH,K,f]
    u_w = torch.bmm(_t(lr_k), grad)  # [BH,f,K] @ [BH,K,f] -> [BH,f,f]
    u_b = torch.bmm(lr.unsqueeze(-2), grad)  # [BH,1,K] @ [BH,K,f] -> [BH,1,f]
    seen = None
    if pending is not None:
        seen = addmm(pending[1], q, pending[0])  # what the pending gradients do to q
        z_bar = z_bar - eta_col * seen
        u_w, u_b = u_w + pending[0], u_b + pending[1]
    return z_bar, (u_w, u_b), (grad, ln_cache, seen)


def linear_bwd(cache, d_z_bar, d_u, q, k, attn1, lr_k, lr, eta_col, ln_w, W1, pending):
    """Grads of :func:`linear_fwd`'s inputs given those of z_bar and the updates."""
    grad, ln_cache, seen = cache
    d_uw, d_ub = d_u
    d_grad = addmm_(addmm(lr.unsqueeze(-1) * d_ub, lr_k, d_uw), _t(attn1), d_z_bar, alpha=-1.0)
    d_lr_k = torch.bmm(grad, _t(d_uw))  # [BH,K,f] @ [BH,f,f]
    d_lr = (grad * d_ub).sum(dim=-1)
    d_attn1 = torch.bmm(d_z_bar, _t(grad)).neg_()  # [BH,K,f] @ [BH,f,K]
    d_q = torch.bmm(d_z_bar, _t(W1))
    d_b1 = _sum_rows(d_z_bar)
    d_eta_col, d_pending = None, None
    if pending is not None:
        d_eta_col = -(d_z_bar * seen).sum(dim=-1, keepdim=True)  # [BH,K,1]
        d_seen = -eta_col * d_z_bar
        addmm_(d_q, d_seen, _t(pending[0]))
        d_pending = (addmm(d_uw, _t(q), d_seen), d_ub + _sum_rows(d_seen))
    d_zk, d_target, d_ln_w, d_ln_b = ln_l2_grad_bwd(ln_cache, d_grad, ln_w)
    d_k = torch.bmm(d_zk, _t(W1))
    d_W1 = addmm_(torch.bmm(_t(q), d_z_bar), _t(k), d_zk)
    d_b1 = d_b1 + _sum_rows(d_zk)
    inputs = dict(q=d_q, k=d_k, target=d_target, attn1=d_attn1, lr_k=d_lr_k, lr=d_lr, ln_w=d_ln_w, ln_b=d_ln_b)
    return inputs, (d_W1, d_b1), d_pending, d_eta_col


def mlp_fwd(q, k, target, eta, attn1, lr_k, lr, eta_col, ln_w, ln_b, W1, b1, W2, b2, pending: Optional[tuple]):
    """TTT-MLP step; same contract as :func:`linear_fwd` with updates ``(U_W1, U_b1, U_W2, U_b2)``."""
    z1k = addmm(b1, k, W1)  # [BH,K,f] @ [BH,f,4f] -> [BH,K,4f]
    x2, s1 = gelu_tanh(z1k)
    z2 = addmm(b2, x2, W2)  # [BH,K,4f] @ [BH,4f,f] -> [BH,K,f]
    grad2, ln_cache = ln_l2_grad_fwd(z2, target, ln_w, ln_b)
    back2 = torch.bmm(grad2, _t(W2))  # [BH,K,f] @ [BH,f,4f] -> [BH,K,4f]
    grad1 = gelu_tanh_slope(z1k, s1).mul_(back2)
    z1_bar = addmm_(addmm(b1, q, W1), attn1, grad1, alpha=-1.0)  # - [BH,K,K] @ [BH,K,4f]
    seen1 = seen2 = None
    if pending is not None:
        seen1 = addmm(pending[1], q, pending[0])
        z1_bar = z1_bar - eta_col * seen1
    x2_bar, s1_bar = gelu_tanh(z1_bar)
    scores2 = torch.bmm(x2_bar, _t(x2)).add_(1.0)  # [BH,K,4f] @ [BH,4f,K] -> [BH,K,K]
    z_bar = addmm_(addmm(b2, x2_bar, W2), eta * scores2, grad2, alpha=-1.0)
    if pending is not None:
        seen2 = addmm(pending[3], x2_bar, pending[2])
        z_bar = z_bar - eta_col * seen2
    lr_row = lr.unsqueeze(-2)  # [BH,1,K]
    updates = [
        torch.bmm(_t(lr_k), grad1),  # [BH,f,K] @ [BH,K,4f]
        torch.bmm(lr_row, grad1),
        torch.bmm(_t(x2), lr.unsqueeze(-1) * grad2),  # (lr x2)^T grad2: [BH,4f,K] @ [BH,K,f]
        torch.bmm(lr_row, grad2),
    ]
    if pending is not None:
        updates = [u + p for u, p in zip(updates, pending)]
    cache = (z1k, s1, grad2, ln_cache, back2, grad1, z1_bar, s1_bar, scores2, seen1, seen2)
    return z_bar, tuple(updates), cache


def mlp_bwd(cache, d_z_bar, d_u, q, k, eta, attn1, lr_k, lr, eta_col, ln_w, W1, W2, pending):
    """Grads of :func:`mlp_fwd`'s inputs given those of z_bar and the updates."""
    z1k, s1, grad2, ln_cache, back2, grad1, z1_bar, s1_bar, scores2, seen1, seen2 = cache
    # Cheaper to recompute than to keep (keeping costs fresh pages).
    x2, x2_bar, attn2 = z1k * s1, z1_bar * s1_bar, eta * scores2
    d_uw1, d_ub1, d_uw2, d_ub2 = d_u
    lr_col = lr.unsqueeze(-1)
    # The updates: U_W1 = lr_k^T grad1, U_b1 = lr^T grad1, U_W2 = (lr x2)^T grad2, U_b2 = lr^T grad2.
    d_grad1 = addmm(lr_col * d_ub1, lr_k, d_uw1)
    d_lr_k = torch.bmm(grad1, _t(d_uw1))
    d_lr_x2 = torch.bmm(grad2, _t(d_uw2))  # [BH,K,f] @ [BH,f,4f]
    d_grad2 = addmm(d_ub2, x2, d_uw2).mul_(lr_col)  # lr * (x2 dU_W2 + dU_b2)
    d_lr = (grad1 * d_ub1).sum(-1) + (grad2 * d_ub2).sum(-1) + (d_lr_x2 * x2).sum(-1)
    d_x2 = lr_col * d_lr_x2
    # z_bar = x2_bar W2 + b2 - attn2 grad2 (- eta_col * seen2)
    d_x2_bar = torch.bmm(d_z_bar, _t(W2))
    d_W2 = torch.bmm(_t(x2_bar), d_z_bar)
    d_b2 = _sum_rows(d_z_bar)
    d_attn2 = torch.bmm(d_z_bar, _t(grad2)).neg_()
    addmm_(d_grad2, _t(attn2), d_z_bar, alpha=-1.0)
    d_eta_col, d_pending = None, None
    if pending is not None:
        d_eta_col = -(d_z_bar * seen2).sum(dim=-1, keepdim=True)
        d_seen2 = -eta_col * d_z_bar
        addmm_(d_x2_bar, d_seen2, _t(pending[2]))
        d_pw2, d_pb2 = torch.bmm(_t(x2_bar), d_seen2), _sum_rows(d_seen2)
    # attn2 = eta * (x2_bar x2^T + 1)
    d_eta = d_attn2 * scores2
    d_scores2 = d_attn2.mul_(eta)
    addmm_(d_x2_bar, d_scores2, x2)
    addmm_(d_x2, _t(d_scores2), x2_bar)
    # x2_bar = gelu(z1_bar); z1_bar = q W1 + b1 - attn1 grad1 (- eta_col * seen1)
    d_z1_bar = d_x2_bar.mul_(gelu_tanh_slope(z1_bar, s1_bar))
    d_q = torch.bmm(d_z1_bar, _t(W1))
    d_b1 = _sum_rows(d_z1_bar)
    d_attn1 = torch.bmm(d_z1_bar, _t(grad1)).neg_()
    addmm_(d_grad1, _t(attn1), d_z1_bar, alpha=-1.0)
    if pending is not None:
        d_eta_col = d_eta_col - (d_z1_bar * seen1).sum(dim=-1, keepdim=True)
        d_seen1 = -eta_col * d_z1_bar
        addmm_(d_q, d_seen1, _t(pending[0]))
        d_pending = (addmm(d_uw1, _t(q), d_seen1), d_ub1 + _sum_rows(d_seen1), d_uw2 + d_pw2, d_ub2 + d_pb2)
    # grad1 = (grad2 W2^T) * gelu'(z1k)
    slope1, curvature1 = gelu_tanh_slope_and_curvature(z1k, s1)
    d_back2 = d_grad1 * slope1
    d_z1k = (d_grad1 * back2).mul_(curvature1)
    addmm_(d_grad2, d_back2, W2)  # [BH,K,4f] @ [BH,4f,f]
    addmm_(d_W2, _t(d_back2), grad2)  # [BH,4f,K] @ [BH,K,f]
    # grad2 = LN-L2 grad of z2 = x2 W2 + b2; x2 = gelu(z1k); z1k = k W1 + b1
    d_z2, d_target, d_ln_w, d_ln_b = ln_l2_grad_bwd(ln_cache, d_grad2, ln_w)
    addmm_(d_x2, d_z2, _t(W2))
    addmm_(d_W2, _t(x2), d_z2)
    d_b2 = d_b2 + _sum_rows(d_z2)
    d_z1k.addcmul_(d_x2, slope1)
    d_k = torch.bmm(d_z1k, _t(W1))
    d_W1 = addmm_(torch.bmm(_t(q), d_z1_bar), _t(k), d_z1k)
    d_b1 = d_b1 + _sum_rows(d_z1k)
    inputs = dict(
        q=d_q, k=d_k, target=d_target, eta=d_eta, attn1=d_attn1, lr_k=d_lr_k, lr=d_lr, ln_w=d_ln_w, ln_b=d_ln_b
    )
    return inputs, (d_W1, d_b1, d_W2, d_b2), d_pending, d_eta_col
