"""Optimizer groups by ownership and the float32 guard on a converted bf16 model."""

import pytest
import torch

from components.models import convert_to_ttt, llama_omni_tiny
from components.training import FP32Guard, cast_for_training, param_groups


def _model():
    torch.manual_seed(0)
    return convert_to_ttt(llama_omni_tiny(), [1, 3], mode="parallel").to(torch.bfloat16)


def test_groups_split_trainable_parameters_by_ownership():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, lr=2e-5, weight_decay=0.01, ttt_lr=2e-4, ttt_weight_decay=0.0)}
    ttt, base = groups["ttt"]["params"], groups["base"]["params"]
    assert {id(p) for p in ttt} == {id(p) for p in model.ttt_parameters()}
    assert not {id(p) for p in ttt} & {id(p) for p in base}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in ttt} | {id(p) for p in base} == trainable
    assert not any(id(p) in trainable for p in model.speech.encoder.parameters())  # frozen encoder left out
    assert groups["ttt"]["lr"] == 2e-4 and groups["base"]["weight_decay"] == 0.01
    # the TTT layer's own q_proj is in the TTT group although its name looks like attention's
    assert any(p is model.decoder.layers[1].ttt.q_proj.weight for p in ttt)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, 0.0, 1e-2, 0.0))
    assert len(optimizer.param_groups) == 2


def test_guard_passes_then_names_a_downcast_parameter_and_gradient():
    model = _model()
    guard = FP32Guard(model)
    assert len(guard.watched) == 2 * 8  # 7 inner parameters of TTT-Linear + the gate, two layers
    guard.check(step=0)
    model.decoder.layers[3].ttt.W1.data = model.decoder.layers[3].ttt.W1.data.bfloat16()
    with pytest.raises(RuntimeError, match=r"decoder\.layers\.3\.ttt\.W1 is torch\.bfloat16 at step 7"):
        guard.check(step=7)
    model = _model()
    guard = FP32Guard(model)
    gate = model.decoder.layers[1].ttt_gate.alpha
    gate.grad_dtype = None  # torch refuses a gradient of another dtype unless told to accept one
    gate.grad = torch.zeros_like(gate, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"gradient of TTT parameter decoder\.layers\.1\.ttt_gate\.alpha"):
        guard.check()


def test_cast_for_training_keeps_ttt_modules_wholly_float32_and_the_guard_watches_them():
    torch.manual_seed(0)
    model = cast_for_training(convert_to_ttt(llama_omni_tiny(), [1, 3], mode="parallel"), torch.bfloat16)
    ttt = {id(p) for p in model.ttt_parameters()}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if id(p) in ttt else torch.bfloat16), name
    guard = FP32Guard(model)
    assert {id(p) for _, p in guard.watched} == ttt
    out = model(torch.randint(0, 512, (2, 40)))
    assert out.logits.dtype == torch.bfloat16 and out.hidden.dtype == torch.bfloat16
    out.logits.float().sum().backward()
    guard.check(step=1)
    model.decoder.layers[1].ttt.o_proj.weight.data = model.decoder.layers[1].ttt.o_proj.weight.data.bfloat16()
    with pytest.raises(RuntimeError, match=r"decoder\.layers\.1\.ttt\.o_proj\.weight is torch\.bfloat16"):
        guard.check()
