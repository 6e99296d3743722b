"""Non-finite values are found in the right tensor, rows and conversations; finite ones are not flagged."""

from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from components.models import OmniState, convert_to_ttt, llama_omni_tiny
from components.monitor import NonFinite, NonFiniteError, check_loss, check_parameters, check_states, state_tensors

IDS = ["conv-a", "conv-b"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return convert_to_ttt(llama_omni_tiny(memory_len=8), layers=[2, 3], ttt_type="linear", mini_batch_size=16)


@pytest.fixture
def state(model):
    with torch.no_grad():
        return model(torch.randint(0, 500, (2, 20))).state


def test_loss():
    assert check_loss(torch.tensor([1.0, 2.0]), 3, IDS) is None
    found = check_loss(torch.tensor([1.0, float("nan"), float("inf")]), 7, ["a", "b", "c"])
    assert found == NonFinite("loss", "loss", 7, [1, 2], ["b", "c"])
    assert check_loss(torch.tensor(float("nan")), 7, IDS).rows == [0, 1]


def test_state_names_and_rows(state):
    names = [name for name, _ in state_tensors(state)]
    assert "layer0.attn.memory.k" in names and "layer3.ttt.W1" in names
    assert "layer3.ttt.offset" not in names and "layer3.ttt.W2" not in names
    assert check_states(state, 1, IDS) is None
    state.layers[3][1].W1[1, 0, 2, 3] = float("nan")
    assert check_states(state, 4, IDS) == NonFinite("state", "layer3.ttt.W1", 4, [1], ["conv-b"])
    state.layers[0][0].k[0, 1, 2, 3] = float("inf")
    found = check_states(state, 4, IDS)
    assert (found.name, found.rows, found.conversation_ids) == ("layer0.attn.memory.k", [0, 1], IDS)


def test_state_ignores_non_float_fields():
    class Memory(NamedTuple):
        k: Tensor
        v: Tensor
        valid: Tensor

    memory = Memory(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    state = OmniState(((memory, None), None))
    assert check_states(state, 0, IDS) is None
    memory.v[1, 0, 0, 0] = float("-inf")
    assert check_states(state, 0, IDS) == NonFinite("state", "layer0.attn.memory.v", 0, [1], ["conv-b"])


def test_parameters_and_gradients(model):
    assert check_parameters(model, 0, IDS) is None
    W1 = model.decoder.layers[2].ttt.W1
    with torch.no_grad():
        kept = W1[0, 0, 0].item()
        W1[0, 0, 0] = float("nan")
    try:
        assert check_parameters(model, 5, IDS) == NonFinite("parameter", "decoder.layers.2.ttt.W1", 5, [0, 1], IDS)
    finally:
        with torch.no_grad():
            W1[0, 0, 0] = kept

    model.zero_grad()
    model(torch.randint(0, 500, (2, 20))).logits.float().mean().backward()
    assert check_parameters(model, 6, IDS, grads=True) is None
    model.decoder.layers[3].ttt.learnable_token_idx.grad[2] = float("inf")
    found = check_parameters(model, 6, IDS, grads=True)
    assert (found.what, found.name) == ("gradient", "decoder.layers.3.ttt.learnable_token_idx")
    model.zero_grad()


def test_huge_but_finite_is_not_flagged():
    """A float32 norm of 1e30s overflows; the drill-down must see that the values are finite."""
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(1e30)
    assert check_parameters(layer, 0, IDS) is None
    memory = (torch.full((2, 1, 3, 4), 1e30), torch.zeros(2, 1, 3, 4))

    class Memory(NamedTuple):
        k: Tensor
        v: Tensor

    assert check_states(OmniState(((Memory(*memory), None),)), 0, IDS) is None


def test_message_names_everything():
    found = NonFinite("state", "layer3.ttt.W1", 12, [1], ["conv-b"])
    with pytest.raises(NonFiniteError, match=r"state in layer3\.ttt\.W1 at step 12.*\[1\].*conv-b") as info:
        raise NonFiniteError(found)
    assert info.value.found is found
