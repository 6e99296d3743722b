"""Converting Llama-Omni layers to TTT: exactness of parallel mode at alpha=0, initialisation
from attention (grouped KV heads, RoPE pairing), state carrying, precision, errors."""

import pytest
import torch
from torchtune.modules import RotaryPositionalEmbeddings

from components.models import convert_to_ttt, llama_omni_tiny, ttt_modules, ttt_parameters
from components.models.llama_omni import OmniState
from components.ttt import TTTLinear, TTTMLP, TTTState
from components.ttt.ops.common import rope_angles, rope_rotate


def _tiny(**kwargs):
    torch.manual_seed(0)
    return llama_omni_tiny(**kwargs)


def _tokens(T=70, B=2):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("ttt_type", ["linear", "mlp"])
def test_parallel_with_zero_gate_reproduces_the_model_bitwise_and_training_moves_the_gates(ttt_type):
    model = _tiny()
    tokens = _tokens()
    before = model(tokens).logits
    convert_to_ttt(model, [1, 3], ttt_type=ttt_type, mode="parallel", gate_init=0.0, mini_batch_size=16)
    after = model(tokens)
    assert torch.equal(after.logits, before)
    optimizer = torch.optim.SGD(ttt_parameters(model), lr=0.1)
    after.logits.logsumexp(-1).mean().backward()
    optimizer.step()
    gates = [model.decoder.layers[i].ttt_gate.alpha for i in (1, 3)]
    assert all(g.abs().sum() > 0 for g in gates)
    assert not torch.equal(model(tokens).logits, before)


def test_replace_mode_swaps_attention_for_ttt():
    model = convert_to_ttt(_tiny(), [0, 2], ttt_type="mlp", mode="replace", mini_batch_size=16)
    layers = model.decoder.layers
    assert layers[0].attn is None and isinstance(layers[0].ttt, TTTMLP) and layers[0].ttt_gate is None
    assert layers[1].attn is not None and layers[1].ttt is None
    out = model(_tokens())
    assert isinstance(out.state.layers[0][1], TTTState) and out.state.layers[0][0] is None
    assert torch.isfinite(out.logits).all()
    assert model.config["ttt"] == [dict(layers=[0, 2], ttt_type="mlp", mode="replace", mini_batch_size=16, gate_init=0.1,
                                        init_from_attention=True, base_lr=None, checkpoint_group_size=0)]


def test_projections_start_from_the_attention_with_kv_heads_repeated():
    model = _tiny()
    attn = model.decoder.layers[1].attn
    q, k, v, o = (p.weight.detach().clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj))
    ttt = convert_to_ttt(model, [1]).decoder.layers[1].ttt
    head_dim, groups = 128 // 4, 4 // 2  # 4 query heads, 2 KV heads
    torch.testing.assert_close(ttt.q_proj.weight, q)
    torch.testing.assert_close(ttt.o_proj.weight, o)
    for h in range(4):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        kv_rows = slice((h // groups) * head_dim, (h // groups + 1) * head_dim)
        torch.testing.assert_close(ttt.k_proj.weight[rows], k[kv_rows])
        torch.testing.assert_close(ttt.v_proj.weight[rows], v[kv_rows])


def test_ttt_rope_pairs_dimensions_like_torchtune_attention():
    """So copied q/k projections need no permutation."""
    x = torch.randn(2, 16, 4, 32, dtype=torch.float64)
    positions = torch.arange(16).expand(2, -1)
    theirs = RotaryPositionalEmbeddings(32, max_seq_len=64, base=10000)(x, input_pos=positions)
    ours = rope_rotate(x, rope_angles(positions, 32, 10000.0, torch.float64).unsqueeze(2))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_converted_conversation_in_chunks_equals_one_call():
    """TTT layers carry their state and windowed attention its memory: chunks == one call."""
    model = convert_to_ttt(_tiny(attention_window=24, memory_len=24), [1, 2], mode="parallel", mini_batch_size=16).eval()
    tokens = _tokens(T=90, B=1)
    with torch.no_grad():
        whole = model(tokens).logits
        state, outs = None, []
        for start, end in ((0, 23), (23, 64), (64, 65), (65, 90)):
            out = model(tokens[:, start:end], state=state)
            state, outs = out.state, outs + [out.logits]
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-4, atol=1e-4)


def test_ttt_parameters_are_the_converted_modules_and_stay_float32_in_bf16():
    model = convert_to_ttt(_tiny(), [3], mode="parallel").to(torch.bfloat16)
    modules = ttt_modules(model)
    assert len(modules) == 2 and isinstance(modules[0], TTTLinear)
    owned = {id(p) for m in modules for p in m.parameters()}
    assert {id(p) for p in ttt_parameters(model)} == owned == {id(p) for p in model.ttt_parameters()}
    assert llama_omni_tiny().ttt_parameters() == []
    layer = model.decoder.layers[3]
    for name, p in layer.ttt.inner_parameters():
        assert p.dtype == torch.float32, name
    assert layer.ttt_gate.alpha.dtype == torch.float32
    assert layer.ttt.q_proj.weight.dtype == torch.bfloat16
    assert model(_tokens(T=20, B=1)).logits.dtype == torch.bfloat16


def test_bad_conversions_are_refused_by_name():
    model = _tiny()
    with pytest.raises(ValueError, match=r"layers \[4, 9\] do not exist: the decoder has layers 0..3"):
        convert_to_ttt(model, [1, 4, 9])
    with pytest.raises(ValueError, match="ttt_type='rnn'"):
        convert_to_ttt(model, [1], ttt_type="rnn")
    with pytest.raises(ValueError, match="mode='serial'"):
        convert_to_ttt(model, [1], mode="serial")
    with pytest.raises(ValueError, match="twice"):
        convert_to_ttt(model, [1, 1])
    convert_to_ttt(model, [1])
    with pytest.raises(ValueError, match=r"layers \[1\] are already TTT layers"):
        convert_to_ttt(model, [1, 2])


def test_slots_reset_mid_batch_forget_their_old_conversation_only():
    """Row 0 carries its state; row 1 ended with padding and poisoned state, then starts afresh:
    each row equals that row alone, and the fresh row's loss reaches the initial fast weights."""
    torch.manual_seed(0)
    model = convert_to_ttt(_tiny(attention_window=24, memory_len=24), [1, 2], mode="parallel", mini_batch_size=16)
    model.eval()
    a, b_old, b_new = (torch.randint(0, 512, (1, T)) for T in (70, 40, 30))
    first_tokens = torch.cat([a[:, :40], b_old])
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 33:] = False  # row 1's conversation ends with padding
    with torch.no_grad():
        first = model(first_tokens, mask=mask)
    poisoned = []
    for memory, ttt_state in first.state.layers:  # a NaN in the forgotten row must not leak
        poisoned.append((memory._replace(v=memory.v.index_fill(0, torch.tensor([1]), float("nan"))),
                         None if ttt_state is None else ttt_state._replace(W1=ttt_state.W1.index_fill(0, torch.tensor([1]), float("nan")))))
    second_tokens = torch.cat([a[:, 40:], b_new])
    out = model(second_tokens, state=OmniState(tuple(poisoned)), reset=torch.tensor([False, True]))
    with torch.no_grad():
        a_whole = model(a).logits[:, 40:]
        b_alone = model(b_new).logits
    torch.testing.assert_close(out.logits[:1], a_whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[1:], b_alone, rtol=1e-4, atol=1e-4)
    out.logits[1].sum().backward()
    ttt = model.decoder.layers[1].ttt
    assert ttt.W1.grad is not None and torch.isfinite(ttt.W1.grad).all() and ttt.W1.grad.abs().sum() > 0
