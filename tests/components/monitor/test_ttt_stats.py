"""TTTMonitor on tiny models, and the inner reconstruction loss against a hand-written float64 formula."""

import math

import pytest
import torch

from components.models import convert_to_ttt, llama_omni_tiny
from components.monitor import TTTMonitor, inner_inputs, recon_loss, tensor_stats, token_recon_losses, ttt_layer_stats
from components.ttt import TTTLinear, TTTMLP

STATS = ("mean", "std", "max_abs", "norm")


def _model(ttt_type, mode, seed=0):
    torch.manual_seed(seed)
    model = convert_to_ttt(llama_omni_tiny(), layers=[2, 3], ttt_type=ttt_type, mode=mode, mini_batch_size=16, gate_init=0.1)
    if mode == "parallel":
        with torch.no_grad():
            for layer in model.decoder.layers[2:]:
                layer.ttt_gate.alpha.normal_(0, 0.5)  # so that mean and max_abs differ
    return model


def _perturbed_layer(cls, dtype=torch.float64, seed=0, D=32, H=4, K=16):
    """A layer whose inner parameters are off their initial values (zeros, ones)."""
    torch.manual_seed(seed)
    layer = cls(D, H, mini_batch_size=K)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype)


@pytest.mark.parametrize("ttt_type", ["linear", "mlp"])
@pytest.mark.parametrize("mode", ["replace", "parallel"])
def test_metric_keys_present_and_finite(ttt_type, mode):
    model = _model(ttt_type, mode)
    monitor = TTTMonitor(model)
    tokens = torch.randint(0, 500, (2, 128))
    with monitor.capture():
        out = model(tokens)
    metrics = monitor.metrics()
    weights = ("W1", "b1", "W2", "b2") if ttt_type == "mlp" else ("W1", "b1")
    for i in (2, 3):
        expected = {f"ttt/layer{i}/{w}_{kind}/{s}" for w in weights for kind in ("init", "state") for s in STATS}
        expected |= {f"ttt/layer{i}/{k}" for k in ("recon_loss_before", "recon_loss_after", "eta/mean", "eta/max")}
        if mode == "parallel":
            expected |= {f"ttt/layer{i}/gate/mean", f"ttt/layer{i}/gate/max_abs"}
        assert expected == {k for k in metrics if k.startswith(f"ttt/layer{i}/")}
    assert not any(k.startswith(("ttt/layer0/", "ttt/layer1/")) for k in metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    layer = model.decoder.layers[2]
    for name, value in tensor_stats(layer.ttt.W1).items():
        assert metrics[f"ttt/layer2/W1_init/{name}"] == pytest.approx(value, rel=1e-5)
    for name, value in tensor_stats(out.state.layers[2][1].W1).items():
        assert metrics[f"ttt/layer2/W1_state/{name}"] == pytest.approx(value, rel=1e-5)
    if mode == "parallel":
        gate = torch.tanh(layer.ttt_gate.alpha)
        assert metrics["ttt/layer2/gate/mean"] == pytest.approx(gate.mean().item(), rel=1e-5)
        assert metrics["ttt/layer2/gate/max_abs"] == pytest.approx(gate.abs().max().item(), rel=1e-5)


def test_hooks_only_inside_capture():
    model = _model("linear", "parallel")
    monitor = TTTMonitor(model)
    modules = [m for layer in model.decoder.layers[2:] for m in (layer.ttt, layer.ttt_gate)]
    with monitor.capture():
        assert all(len(m._forward_hooks) == 1 for m in modules)
        with pytest.raises(RuntimeError, match="do not nest"):
            with monitor.capture():
                pass
        model(torch.randint(0, 500, (1, 16)))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
    with pytest.raises(ValueError):
        with monitor.capture():
            raise ValueError("the forward failed")
    assert all(not m._forward_hooks for m in modules)
    with pytest.raises(RuntimeError, match="no TTT layer ran"):
        monitor.metrics()  # the failed capture recorded nothing


def _hand_recon_loss(layer, x, weights, offset, mask):
    """float64, written from the paper's formulas without the package's RoPE or LN helpers."""
    B, T, _ = x.shape
    H, f, K = layer.num_heads, layer.head_dim, layer.mini_batch_size
    x = x.double() * mask.unsqueeze(-1)
    xk = (x @ layer.k_proj.weight.double().T).view(B, T, H, f)
    xv = (x @ layer.v_proj.weight.double().T).view(B, T, H, f)
    pos = ((offset.view(B, 1) + torch.arange(T)) % K).double()  # [B,T]
    freq = layer.rope_base ** (-torch.arange(0, f, 2, dtype=torch.float64) / f)  # [f/2]
    angle = (pos[..., None] * freq)[:, :, None, :]  # [B,T,1,f/2]
    a, b = xk[..., 0::2], xk[..., 1::2]
    rot = torch.empty_like(xk)
    rot[..., 0::2] = a * angle.cos() - b * angle.sin()
    rot[..., 1::2] = b * angle.cos() + a * angle.sin()
    W1, b1 = (w.double() for w in weights)  # [B,H,f,f], [B,H,1,f]
    z = torch.einsum("bthi,bhij->bthj", rot, W1) + b1[:, :, 0][:, None]  # [B,T,H,f]
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-6)
    pred = z * layer.ttt_norm_weight.double() + layer.ttt_norm_bias.double()
    err = ((pred - (xv - rot)) ** 2).mean(-1)  # [B,T,H]
    return (err * mask.unsqueeze(-1)).sum() / (mask.sum() * H)


@pytest.mark.parametrize("offset", [0, 5], ids=["offset0", "offset5"])
def test_recon_loss_matches_hand_formula(offset):
    layer = _perturbed_layer(TTTLinear)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 29:] = False
    state = None
    if offset:
        _, state = layer(torch.randn(2, offset, 32, dtype=torch.float64))
        assert state.offset.tolist() == [offset, offset]
    with torch.no_grad():
        _, state_out = layer(x, state=state, mask=mask)
        state_in = state if state is not None else layer.init_state(2)
        inputs = inner_inputs(layer, x, state_in.offset, mask)
        for weights in (state_in.weights(), state_out.weights()):
            ours = recon_loss(layer, inputs, weights)
            # rtol 1e-8, not 1e-12: the RoPE frequencies are float32 (as in the reference), ours float64.
            torch.testing.assert_close(ours, _hand_recon_loss(layer, x, weights, state_in.offset, mask), rtol=1e-8, atol=0)


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP], ids=lambda c: c.__name__)
def test_recon_loss_is_the_loss_the_layer_descends(cls):
    """One full mini-batch moves the weights by -token_eta[K-1] * grad of sum_t lr_t * (f/2) * error_t."""
    layer = _perturbed_layer(cls, K=8)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        _, state_out = layer(x)
        state_in = layer.init_state(2)
        inputs = inner_inputs(layer, x, state_in.offset)
    weights = [w.detach().clone().requires_grad_() for w in state_in.weights()]
    errors = token_recon_losses(layer, inputs, weights)  # [B,H,T]
    objective = (inputs.lr.transpose(1, 2) * errors).sum() * layer.head_dim / 2
    grads = torch.autograd.grad(objective, weights)
    eta_last = inputs.token_eta[0, -1]
    for w, g, moved in zip(weights, grads, state_out.weights()):
        torch.testing.assert_close(w - eta_last * g, moved, rtol=1e-9, atol=1e-12)


def test_eta_stats_match_hand_formula():
    layer = _perturbed_layer(TTTLinear)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    with torch.no_grad():
        _, state_out = layer(x)
        stats = ttt_layer_stats(layer, x, None, state_out)
    f, K = layer.head_dim, layer.mini_batch_size
    lr = layer.base_lr * torch.sigmoid(x @ layer.learnable_ttt_lr_weight[:, 0].T + layer.learnable_ttt_lr_bias[:, 0]) / f
    pos = torch.arange(20) % K
    token_eta = (1.0 / (pos + 1) + layer.learnable_token_idx[pos]).clamp_min(0)
    eta = lr * token_eta[None, :, None]  # [B,T,H]
    torch.testing.assert_close(stats["eta/mean"], eta.mean())
    torch.testing.assert_close(stats["eta/max"], eta.max())


def test_recon_loss_falls_on_a_repeated_sequence():
    torch.manual_seed(0)
    layer = TTTLinear(64, 4, mini_batch_size=16)
    x = torch.randn(2, 8, 64).repeat(1, 16, 1)  # [B,128,D]: 8 vectors over and over
    with torch.no_grad():
        _, state_out = layer(x)
        stats = ttt_layer_stats(layer, x, None, state_out)
    assert stats["recon_loss_after"] < 0.5 * stats["recon_loss_before"]


def test_recon_loss_falls_in_the_model():
    model = _model("linear", "replace")
    monitor = TTTMonitor(model)
    tokens = torch.randint(0, 500, (2, 8)).repeat(1, 16)
    with torch.no_grad(), monitor.capture():
        model(tokens)
    metrics = monitor.metrics()
    for i in (2, 3):
        assert metrics[f"ttt/layer{i}/recon_loss_after"] < metrics[f"ttt/layer{i}/recon_loss_before"]


def test_bf16_model_and_autocast_give_float32_statistics():
    model = _model("mlp", "parallel")
    monitor = TTTMonitor(model)
    tokens = torch.randint(0, 500, (2, 64))
    with torch.no_grad(), monitor.capture():
        model(tokens)
    reference = monitor.metrics()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), monitor.capture():
        model(tokens)
    autocast = monitor.metrics()
    model.to(torch.bfloat16)
    with torch.no_grad(), monitor.capture():
        model(tokens)
    bf16 = monitor.metrics()
    for key in ("ttt/layer2/recon_loss_before", "ttt/layer3/recon_loss_after", "ttt/layer3/eta/mean"):
        assert autocast[key] == pytest.approx(reference[key], rel=1e-2)
        assert bf16[key] == pytest.approx(reference[key], rel=1e-2)


def test_rows_that_reset_are_measured_from_the_fresh_state():
    """``recon_loss_before`` of a window whose rows all start new conversations is that of a
    fresh start, not of the forgotten state."""
    model = _model("linear", "replace")
    monitor = TTTMonitor(model)
    first, second = torch.randint(0, 500, (2, 70)), torch.randint(0, 500, (2, 64))
    with torch.no_grad():
        carried = model(first).state
        with monitor.capture():
            model(second)
        fresh = monitor.metrics()
        with monitor.capture():
            model(second, state=carried, reset=torch.tensor([True, True]))
        reset = monitor.metrics()
        with monitor.capture():
            model(second, state=carried)
        kept = monitor.metrics()
    for i in (2, 3):
        key = f"ttt/layer{i}/recon_loss_before"
        assert reset[key] == pytest.approx(fresh[key], rel=1e-6) and kept[key] != pytest.approx(fresh[key], rel=1e-3)
