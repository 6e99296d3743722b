"""Activation checkpointing applied from outside the model, and the trainable-part choice."""

import socket

import pytest
import torch

from components.models import convert_to_ttt, llama_omni_tiny
from components.training.parallelize import ac_every_n, parallelize
from components.training.trainable import set_trainable


def _model():
    torch.manual_seed(0)
    return convert_to_ttt(llama_omni_tiny(), [1, 3], mode="parallel", mini_batch_size=16)


def test_activation_checkpointing_keeps_names_and_gradients():
    tokens = torch.randint(0, 512, (2, 40))
    plain, checkpointed = _model(), parallelize(_model(), activation_checkpointing=2)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    assert [i for i, layer in enumerate(checkpointed.decoder.layers) if "forward" in vars(layer)] == [0, 2]
    for model in (plain, checkpointed):
        model(tokens).logits.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_modes():
    assert (ac_every_n("none"), ac_every_n("full"), ac_every_n(3)) == (0, 1, 3)
    for bad in ("some", 0, -1, True):
        with pytest.raises(ValueError, match="activation_checkpointing="):
            ac_every_n(bad)


def test_trainable_parts_by_ownership():
    model = _model()
    counts = set_trainable(model, ["ttt", "gates"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.ttt_parameters()}
    assert counts["gates"] == 2 * 128
    set_trainable(model, ["decoder", "projector"])
    assert not any(p.requires_grad for p in model.ttt_parameters())
    assert all(p.requires_grad for p in model.speech.projector.parameters())
    assert not any(p.requires_grad for p in model.speech.encoder.parameters())
    with pytest.raises(ValueError, match=r"unknown parts \['adapters'\]"):
        set_trainable(model, ["ttt", "adapters"])
    with pytest.raises(ValueError, match=r"parts \['gates'\] have no parameters"):
        set_trainable(convert_to_ttt(llama_omni_tiny(), [1], mode="replace"), ["gates"])


def test_fsdp_keeps_carried_ttt_states_float32_in_a_bf16_model(monkeypatch):
    """One gloo process is enough for fully_shard's casting rules: the carried state reaches the
    TTT layer unchanged (not through bf16), states and TTT gradients stay float32."""
    import torch.distributed as dist

    from components.training import FP32Guard, cast_for_training

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as free:  # a port no other test run holds
        free.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(free.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = parallelize(cast_for_training(_model(), torch.bfloat16), fsdp=True, activation_checkpointing="full")
        FP32Guard(model).check()
        seen = []
        model.decoder.layers[3].ttt.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["state"]), with_kwargs=True)
        tokens = torch.randint(0, 512, (2, 32))
        first = model(tokens)
        second = model(tokens, state=first.state.detach())
        second.logits.float().sum().backward()
        carried = first.state.layers[3][1]
        assert all(t.dtype == torch.float32 for t in carried.weights() + carried.grads())
        for arrived, sent in zip(seen[1].weights() + seen[1].grads(), carried.weights() + carried.grads()):
            assert torch.equal(arrived, sent)  # not rounded to bf16 on the way through the root and layers
        assert all(t.dtype == torch.float32 for t in second.state.layers[3][1].weights())
        assert model.decoder.layers[3].ttt.q_proj.weight.grad.dtype == torch.float32
        FP32Guard(model).check()
    finally:
        dist.destroy_process_group()
