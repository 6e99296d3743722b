"""Our layers against fixtures produced by the reference implementation (ttt-lm-pytorch).

The fixtures come from scripts/make_ttt_golden.py: every parameter perturbed, a batch of
40 tokens with mini-batch 16 (two full mini-batches and a partial one), outputs and the
gradients of a weighted sum w.r.t. the input and every parameter. The reference state dict
loads with ``load_state_dict`` as it is.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from components.ttt import TTTLinear, TTTMLP

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.safetensors"))


def _load(case):
    with safe_open(GOLDEN / f"{case}.safetensors", framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["settings"]), json.loads(meta["shape"]), tensors


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_every_case_is_present():
    assert CASES == ["linear", "linear_gate", "mlp", "mlp_gate"]


@pytest.mark.parametrize("case", CASES)
def test_reference_state_dict_loads_and_matches_outputs_and_gradients(case):
    settings, shape, tensors = _load(case)
    cls = TTTLinear if settings["ttt_layer_type"] == "linear" else TTTMLP
    layer = cls(
        shape["hidden_size"],
        shape["num_attention_heads"],
        mini_batch_size=shape["mini_batch_size"],
        base_lr=settings["ttt_base_lr"],
        rope_base=shape["rope_theta"],
        use_gate=settings["use_gate"],
    )
    state_dict = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    layer.load_state_dict(state_dict, strict=True)

    x = tensors["input"].clone().requires_grad_()
    y, _ = layer(x)
    assert _relative_error(y.detach(), tensors["output"]) < 1e-5
    names = list(state_dict)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((y * tensors["loss_weight"]).sum(), [x] + [params[n] for n in names])
    assert _relative_error(grads[0], tensors["grad.input"]) < 1e-5, "input gradient"
    for name, grad in zip(names, grads[1:]):
        assert _relative_error(grad, tensors[f"grad.{name}"]) < 1e-5, f"gradient of {name}"
