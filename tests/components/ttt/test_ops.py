"""The dual form against the token-by-token primal form, in float64: outputs, every
gradient and the final state, with streams that start inside a mini-batch and rows of
different lengths."""

import pytest
import torch

from components.ttt.ops import ttt_dual, ttt_naive
from components.ttt.state import TTTState

DTYPE = torch.float64


def _random_state(B, H, f, mlp, offsets, generator):
    inner = 4 * f if mlp else f
    shapes = [(B, H, f, inner), (B, H, 1, inner)] + ([(B, H, inner, f), (B, H, 1, f)] if mlp else [])
    weights = tuple(0.3 * torch.randn(s, generator=generator, dtype=DTYPE) for s in shapes)
    offset = torch.tensor(offsets)
    # A mid-mini-batch row carries accumulated gradients; a row at a boundary has none.
    started = (offset > 0).view(B, 1, 1, 1).to(DTYPE)
    grads = tuple(0.1 * torch.randn(s, generator=generator, dtype=DTYPE) * started for s in shapes)
    return TTTState.from_parts(weights, grads, offset)


def _random_inputs(B, T, H, f, K, generator):
    g = dict(generator=generator, dtype=DTYPE)
    return dict(
        xq=torch.randn(B, T, H, f, **g),
        xk=torch.randn(B, T, H, f, **g),
        xv=torch.randn(B, T, H, f, **g),
        lr=0.3 * torch.rand(B, T, H, **g),
        token_eta=1.0 / torch.arange(1, K + 1, dtype=DTYPE) + 0.05 * torch.randn(K, **g),
        ln_weight=1.0 + 0.2 * torch.randn(H, f, **g),
        ln_bias=0.2 * torch.randn(H, f, **g),
    )


CASES = [
    # (B, T, H, f, K, offsets, lengths)
    (2, 130, 2, 8, 16, [0, 0], [130, 130]),
    (2, 130, 2, 8, 16, [5, 0], [130, 97]),
    (3, 40, 2, 8, 16, [15, 3, 0], [40, 1, 0]),
    (1, 7, 4, 4, 8, [6], [7]),
    (2, 64, 2, 8, 64, [0, 63], [64, 64]),
    # aligned chunks (no offset, no padding, whole mini-batches) take the copy-free grid view
    (2, 128, 2, 8, 16, [0, 0], [128, 128]),
    (3, 32, 2, 8, 16, [0, 0, 0], [32, 32, 32]),
]


def _case_id(case):
    B, T, H, f, K, offsets, lengths = case
    return f"B{B}-T{T}-H{H}-f{f}-K{K}-off{'_'.join(map(str, offsets))}-len{'_'.join(map(str, lengths))}"


def _run(op, inputs, state, lengths, **kwargs):
    args = dict(inputs)
    return op(
        args["xq"], args["xk"], args["xv"], args["lr"], args["token_eta"], args["ln_weight"], args["ln_bias"],
        state, lengths, **kwargs,
    )


def _leaves(inputs, state):
    return list(inputs.values()) + [t for t in state[:-1] if t is not None]


def _with_grad(inputs, state):
    inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    state = TTTState(*(None if t is None or t.dtype == torch.long else t.clone().requires_grad_() for t in state[:-1]), state.offset)
    return inputs, state


def _scalar_loss(out, state, generator):
    """A loss that touches the outputs and every part of the final state with random weights."""
    parts = [out] + [t for t in state[:-1] if t is not None]
    return sum((p * torch.randn(p.shape, generator=generator, dtype=p.dtype)).sum() for p in parts)


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dual_matches_naive_outputs_gradients_and_state(case, mlp):
    B, T, H, f, K, offsets, lengths = case
    gen = torch.Generator().manual_seed(hash((B, T, K, mlp)) % 2**31)
    inputs = _random_inputs(B, T, H, f, K, gen)
    state = _random_state(B, H, f, mlp, offsets, gen)
    lengths = torch.tensor(lengths)

    results = []
    for op in (ttt_naive, ttt_dual):
        ins, st = _with_grad(inputs, state)
        out, final = _run(op, ins, st, lengths)
        loss = _scalar_loss(out, final, torch.Generator().manual_seed(7))
        leaves = _leaves(ins, st)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append((out.detach(), final.detach(), grads))

    (out_n, state_n, grads_n), (out_d, state_d, grads_d) = results
    torch.testing.assert_close(out_d, out_n, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(TTTState._fields, state_d, state_n):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"state.{name}: {m}")
    names = list(inputs) + [n for n, t in zip(TTTState._fields[:-1], state) if t is not None]
    for name, gd, gn in zip(names, grads_d, grads_n):
        gd = torch.zeros_like(gn) if gd is None else gd
        torch.testing.assert_close(gd, gn, rtol=1e-9, atol=1e-10, msg=lambda m: f"d loss / d {name}: {m}")
    # Padding really is excluded: the grads of padded inputs are exactly zero.
    for row, L in enumerate(lengths.tolist()):
        for name in ("xq", "xk", "xv", "lr"):
            assert torch.all(grads_d[names.index(name)][row, L:] == 0), f"padding of row {row} got a {name} gradient"


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("group", [1, 3, 100])
def test_checkpoint_groups_give_the_same_gradients(mlp, group):
    B, T, H, f, K = 2, 150, 2, 8, 16
    gen = torch.Generator().manual_seed(3)
    inputs = _random_inputs(B, T, H, f, K, gen)
    state = _random_state(B, H, f, mlp, [4, 0], gen)
    lengths = torch.tensor([T, 120])
    results = []
    for g in (0, group):
        ins, st = _with_grad(inputs, state)
        out, final = _run(ttt_dual, ins, st, lengths, checkpoint_group_size=g)
        loss = _scalar_loss(out, final, torch.Generator().manual_seed(1))
        results.append((out.detach(), torch.autograd.grad(loss, _leaves(ins, st))))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_op_rejects_mismatched_shapes_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    inputs = _random_inputs(2, 10, 2, 8, 16, gen)
    state = _random_state(2, 2, 8, False, [0, 0], gen)
    bad = dict(inputs, xk=inputs["xk"][:, :5])
    with pytest.raises(ValueError, match="xk has shape"):
        _run(ttt_dual, bad, state, torch.tensor([10, 10]))
    bad = dict(inputs, lr=inputs["lr"].float())
    with pytest.raises(ValueError, match="lr is torch.float32"):
        _run(ttt_dual, bad, state, torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="state holds W1"):
        _run(ttt_dual, inputs, _random_state(3, 2, 8, False, [0, 0, 0], gen), torch.tensor([10, 10]))
