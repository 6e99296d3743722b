"""The closed-form pieces of the hand-written backward against autograd, in float64."""

import torch
import torch.nn.functional as F

from components.ttt.ops.dual_steps import (
    gelu_tanh,
    gelu_tanh_slope,
    gelu_tanh_slope_and_curvature,
    ln_bwd,
    ln_fwd,
    ln_l2_grad_bwd,
    ln_l2_grad_fwd,
)

DTYPE = torch.float64


def test_gelu_and_its_first_two_derivatives_match_autograd():
    x = torch.linspace(-6, 6, 241, dtype=DTYPE, requires_grad=True)
    reference = F.gelu(x, approximate="tanh")
    (first,) = torch.autograd.grad(reference.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    value, s = gelu_tanh(x.detach())
    slope, curvature = gelu_tanh_slope_and_curvature(x.detach(), s)
    torch.testing.assert_close(value, reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slope, first.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gelu_tanh_slope(x.detach(), s), first.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(curvature, second, rtol=1e-10, atol=1e-12)


def _ln_l2_grad_by_autograd(z, target, w, b):
    loss = 0.5 * (F.layer_norm(z, z.shape[-1:], eps=1e-6) * w + b - target).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    return grad


def test_ln_l2_grad_and_its_backward_match_autograd():
    gen = torch.Generator().manual_seed(0)
    z, target, d_out = (torch.randn(6, 5, 8, dtype=DTYPE, generator=gen) for _ in range(3))
    w = 1 + 0.3 * torch.randn(6, 1, 8, dtype=DTYPE, generator=gen)
    b = 0.3 * torch.randn(6, 1, 8, dtype=DTYPE, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (z, target, w, b)]
    reference = _ln_l2_grad_by_autograd(*leaves)
    expected = torch.autograd.grad(reference, leaves, d_out)

    grad, cache = ln_l2_grad_fwd(z, target, w, b)
    d_z, d_target, d_w, d_b = ln_l2_grad_bwd(cache, d_out, w)
    torch.testing.assert_close(grad, reference.detach(), rtol=1e-12, atol=1e-12)
    got = (d_z, d_target, d_w.sum(dim=1, keepdim=True), d_b.sum(dim=1, keepdim=True))
    for name, a, e in zip(("z", "target", "ln_w", "ln_b"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"d {name}: {m}")


def test_output_layer_norm_and_its_backward_match_autograd():
    gen = torch.Generator().manual_seed(1)
    z, d_y = (torch.randn(4, 7, 8, dtype=DTYPE, generator=gen) for _ in range(2))
    w = 1 + 0.3 * torch.randn(4, 1, 8, dtype=DTYPE, generator=gen)
    b = 0.3 * torch.randn(4, 1, 8, dtype=DTYPE, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    reference = F.layer_norm(leaves[0], (8,), eps=1e-6) * leaves[1] + leaves[2]
    expected = torch.autograd.grad(reference, leaves, d_y)
    torch.testing.assert_close(ln_fwd(z, w, b), reference.detach(), rtol=1e-12, atol=1e-12)
    d_z, d_w, d_b = ln_bwd(z, d_y, w)
    got = (d_z, d_w.sum(dim=1, keepdim=True), d_b.sum(dim=1, keepdim=True))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
