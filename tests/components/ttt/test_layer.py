"""The contracts of TTTLinear / TTTMLP: streaming, padding, precision, fast vs naive."""

from unittest import mock

import pytest
import torch

from components.ttt import TTTLinear, TTTMLP, TTTState
from components.ttt import layer as layer_module

LAYERS = [TTTLinear, TTTMLP]
D, H = 32, 4


def _perturbed(cls, dtype=torch.float32, seed=0, **kwargs):
    """A layer whose every parameter is moved off its initial value (zeros, ones)."""
    torch.manual_seed(seed)
    layer = cls(D, H, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype) if dtype == torch.float64 else layer


def _stream(layer, x, sizes, state=None):
    outs = []
    start = 0
    for size in sizes:
        y, state = layer(x[:, start : start + size], state=state)
        outs.append(y)
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1), state


def _chunk_sizes(T, pattern, generator):
    if pattern == "random":
        sizes = []
        while sum(sizes) < T:
            sizes.append(int(torch.randint(1, 90, (1,), generator=generator)))
        sizes[-1] -= sum(sizes) - T
        return [s for s in sizes if s > 0]
    return [pattern] * (T // pattern) + ([T % pattern] if T % pattern else [])


def _assert_states_close(a: TTTState, b: TTTState, **tol):
    for name, x, y in zip(TTTState._fields, a, b):
        if x is not None:
            torch.testing.assert_close(x, y, msg=lambda m: f"state.{name}: {m}", **tol)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("sizes", [1, 7, 63, 64, 65, 100, "random"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_streaming_in_chunks_equals_one_call(cls, sizes, dtype):
    layer = _perturbed(cls, dtype, mini_batch_size=64, use_gate=True)
    T = 200
    x = torch.randn(2, T, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y_full, state_full = layer(x)
        y_chunks, state_chunks = _stream(layer, x, _chunk_sizes(T, sizes, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(y_chunks, y_full, **tol)
    _assert_states_close(state_chunks, state_full, **tol)
    assert state_full.offset.tolist() == [T % 64] * 2


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_gradients_flow_through_a_carried_state(cls):
    layer = _perturbed(cls, torch.float64, mini_batch_size=16)
    x = torch.randn(1, 50, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 50, D, dtype=torch.float64)
    grads = []
    for sizes in ([50], [13, 20, 17]):
        y, _ = _stream(layer, x, sizes)
        grads.append(torch.autograd.grad((y * w).sum(), [x] + list(layer.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_padding_changes_neither_outputs_nor_state(cls):
    """Rows of different lengths and different offsets inside the mini-batch, padded with NaN,
    give what each row gives on its own, unpadded, and finite gradients."""
    K = 16
    layer = _perturbed(cls, torch.float64, mini_batch_size=K, use_gate=True)
    gen = torch.Generator().manual_seed(3)
    prefix_lengths, chunk_lengths = [5, 16, 30], [40, 3, 21]
    prefix = torch.randn(3, 30, D, dtype=torch.float64, generator=gen)
    chunk = torch.randn(3, 40, D, dtype=torch.float64, generator=gen, requires_grad=True)
    prefix_mask = torch.arange(30) < torch.tensor(prefix_lengths).unsqueeze(1)
    chunk_mask = torch.arange(40) < torch.tensor(chunk_lengths).unsqueeze(1)
    nan_padded = torch.where(chunk_mask.unsqueeze(-1), chunk, float("nan"))

    _, state = layer(torch.where(prefix_mask.unsqueeze(-1), prefix, float("nan")), mask=prefix_mask)
    assert state.offset.tolist() == [5, 0, 14]
    y, state = layer(nan_padded, state=state, mask=chunk_mask)
    (y * torch.randn_like(y)).nan_to_num().sum().backward()
    assert torch.isfinite(chunk.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.all(y[~chunk_mask] == 0)

    for row in range(3):
        P, L = prefix_lengths[row], chunk_lengths[row]
        _, alone = layer(prefix[row : row + 1, :P])
        y_alone, alone = layer(chunk[row : row + 1, :L].detach(), state=alone)
        torch.testing.assert_close(y[row : row + 1, :L].detach(), y_alone, rtol=1e-10, atol=1e-10)
        row_state = TTTState(*(None if t is None else t[row : row + 1].detach() for t in state))
        _assert_states_close(row_state, alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_mask_that_is_not_right_padded_is_refused(cls):
    layer = cls(D, H, mini_batch_size=8)
    mask = torch.tensor([[True, False, True, True]])
    with pytest.raises(ValueError, match="right-padded"):
        layer(torch.randn(1, 4, D), mask=mask)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        layer(torch.randn(1, 4, D), mask=torch.ones(1, 4))


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("gate", [False, True], ids=["nogate", "gate"])
def test_dual_matches_naive_through_the_layer(cls, gate):
    """Outputs, every parameter gradient, the input gradient and the final state (float64),
    for a chunk that starts inside a mini-batch and has a padded row."""
    K = 16
    dual = _perturbed(cls, torch.float64, mini_batch_size=K, use_gate=gate)
    naive = _perturbed(cls, torch.float64, mini_batch_size=K, use_gate=gate, impl="naive")
    naive.load_state_dict(dual.state_dict())
    gen = torch.Generator().manual_seed(5)
    warmup = torch.randn(2, 9, D, dtype=torch.float64, generator=gen)
    x = torch.randn(2, 45, D, dtype=torch.float64, generator=gen)
    mask = torch.arange(45) < torch.tensor([[45], [30]])
    w = torch.randn(2, 45, D, dtype=torch.float64, generator=gen)
    results = []
    for layer in (dual, naive):
        xg = x.clone().requires_grad_()
        _, state = layer(warmup)
        y, state = layer(xg, state=state, mask=mask)
        loss = (y * w).sum() + sum((t * 0.5).sum() for t in state.weights())
        grads = torch.autograd.grad(loss, [xg] + list(layer.parameters()))
        results.append((y.detach(), state.detach(), grads))
    (y_d, s_d, g_d), (y_n, s_n, g_n) = results
    torch.testing.assert_close(y_d, y_n, rtol=1e-10, atol=1e-10)
    _assert_states_close(s_d, s_n, rtol=1e-10, atol=1e-10)
    names = ["input"] + [n for n, _ in dual.named_parameters()]
    for name, a, b in zip(names, g_d, g_n):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_checkpoint_groups_give_the_same_gradients_through_the_layer(cls):
    plain = _perturbed(cls, mini_batch_size=16)
    grouped = _perturbed(cls, mini_batch_size=16, checkpoint_group_size=2)
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 150, D)
    grads = []
    for layer in (plain, grouped):
        y, _ = layer(x)
        grads.append(torch.autograd.grad(y.pow(2).sum(), list(layer.parameters())))
    for (name, _), a, b in zip(plain.named_parameters(), *grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_bf16_model_keeps_the_inner_loop_in_float32(cls):
    layer = _perturbed(cls, mini_batch_size=16, use_gate=True).to(torch.bfloat16)
    assert layer.q_proj.weight.dtype == torch.bfloat16 and layer.post_norm.weight.dtype == torch.bfloat16
    for name, p in layer.inner_parameters():
        assert p.dtype == torch.float32, name
    seen = {}
    real_op = layer_module.ttt_dual

    def spy(xq, xk, xv, lr, token_eta, ln_w, ln_b, state, lengths, *rest, **kw):
        seen.update(xq=xq.dtype, xk=xk.dtype, xv=xv.dtype, lr=lr.dtype, token_eta=token_eta.dtype, W1=state.W1.dtype)
        return real_op(xq, xk, xv, lr, token_eta, ln_w, ln_b, state, lengths, *rest, **kw)

    x = torch.randn(2, 40, D, dtype=torch.bfloat16)
    with mock.patch.object(layer_module, "ttt_dual", spy):
        y, state = layer(x)
    assert y.dtype == torch.bfloat16
    assert set(seen.values()) == {torch.float32}, seen
    assert all(t.dtype == torch.float32 for t in state[:-1] if t is not None)
    # The inner loop's updates survive: the state is not the bf16-rounded initial weights.
    assert not torch.equal(state.W1[0], layer.W1.detach())


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_autocast_bf16_keeps_the_inner_loop_in_float32(cls):
    layer = _perturbed(cls, mini_batch_size=16)
    x = torch.randn(2, 40, D)
    seen = {}
    real_op = layer_module.ttt_dual

    def spy(xq, xk, xv, lr, token_eta, ln_w, ln_b, state, lengths, *rest, **kw):
        out = real_op(xq, xk, xv, lr, token_eta, ln_w, ln_b, state, lengths, *rest, **kw)
        seen.update(xq=xq.dtype, lr=lr.dtype, out=out[0].dtype, W1=out[1].W1.dtype, grad=out[1].W1_grad.dtype)
        return out

    with mock.patch.object(layer_module, "ttt_dual", spy), torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
    assert set(seen.values()) == {torch.float32}, seen
    y_fp32, state_fp32 = layer(x)
    # Only the projections ran in bf16: the state stays close to the float32 run.
    torch.testing.assert_close(state.W1, state_fp32.W1, rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_downcast_inner_parameter_is_named_in_the_error(cls):
    layer = cls(D, H, mini_batch_size=8)
    layer.ttt_norm_weight.data = layer.ttt_norm_weight.data.bfloat16()
    with pytest.raises(RuntimeError, match="ttt_norm_weight is torch.bfloat16"):
        layer(torch.randn(1, 8, D))


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_state_of_the_wrong_kind_or_size_is_refused(cls):
    layer = cls(D, H, mini_batch_size=8)
    other = (TTTMLP if cls is TTTLinear else TTTLinear)(D, H, mini_batch_size=8)
    with pytest.raises(ValueError, match="state is a TTT-"):
        layer(torch.randn(2, 8, D), state=other.init_state(2))
    with pytest.raises(ValueError, match="state is for 3 streams"):
        layer(torch.randn(2, 8, D), state=layer.init_state(3))


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_internal_chunking_gives_the_same_outputs_state_and_gradients(cls):
    """A layer that splits long inputs into chunks (padding crossing chunk borders) matches one
    that does not, on outputs, state and every gradient."""
    whole = _perturbed(cls, torch.float64, mini_batch_size=16, chunk_size=0, use_gate=True)
    chunked = _perturbed(cls, torch.float64, mini_batch_size=16, chunk_size=32, use_gate=True)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(3, 100, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mask = torch.arange(100) < torch.tensor([[100], [40], [5]])
    results = []
    for layer in (whole, chunked):
        xg = x.clone().requires_grad_()
        _, state = layer(x[:, :7])  # start inside a mini-batch
        y, state = layer(xg, state=state, mask=mask)
        grads = torch.autograd.grad((y * x).sum() + state.W1.sum(), [xg] + list(layer.parameters()))
        results.append((y.detach(), state.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    _assert_states_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_chunk_size_must_be_a_multiple_of_the_mini_batch():
    with pytest.raises(ValueError, match="chunk_size must be 0"):
        TTTLinear(D, H, mini_batch_size=16, chunk_size=40)
