"""The CTC speech generator against Llama-Omni's algorithm run with transformers' Llama layers.

The reference below restates ictnlp/LLaMA-Omni's ``SpeechGeneratorCTC.forward`` (uniform
upsampling, causal Llama layers with padding, CTC with the last index as blank, summed and
divided by the number of units) on ``transformers.LlamaDecoderLayer``; the weights go to our
torchtune layers through torchtune's own HF converter (which permutes q/k for RoPE).
"""

import pytest
import torch
import torch.nn.functional as F
from torchtune.models.convert_weights import hf_to_tune
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from components.models.speech_generator import CTCSpeechGenerator

DIM, HEADS, INTER, UNITS, FACTOR, LAYERS = 32, 4, 64, 10, 3, 2


def _hf_config():
    return LlamaConfig(
        hidden_size=DIM, num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=INTER,
        rms_norm_eps=1e-5, rope_theta=500_000.0, max_position_embeddings=16384,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        attn_implementation="eager",
    )


def _pair():
    torch.manual_seed(0)
    config = _hf_config()
    hf_layers = torch.nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(LAYERS)])
    with torch.no_grad():  # RMSNorm scales start at 1; move them so that a mix-up would show
        for p in hf_layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = CTCSpeechGenerator(DIM, num_layers=LAYERS, dim=DIM, num_heads=HEADS, intermediate_dim=INTER,
                              unit_vocab_size=UNITS, upsample_factor=FACTOR, max_seq_len=256)
    hf_state = {f"model.layers.{k}": v for k, v in hf_layers.state_dict().items()}
    tune_state = hf_to_tune(hf_state, num_heads=HEADS, num_kv_heads=HEADS, dim=DIM)
    ours.layers.load_state_dict({k[len("layers."):]: v for k, v in tune_state.items()}, strict=True)
    return config, hf_layers, ours


def _reference_loss(config, hf_layers, input_proj, output_proj, hidden, labels, units):
    """LLaMA-Omni's SpeechGeneratorCTC.forward, restated."""
    reps = [h[l != -100] for h, l in zip(hidden, labels)]
    src_lens = torch.tensor([len(r) for r in reps])
    tgt_lens = units.ne(-100).sum(-1)
    up_lens = torch.max(src_lens * FACTOR, tgt_lens)
    L = int(up_lens.max())
    padding = torch.arange(L).view(1, L) >= up_lens.view(-1, 1)
    index = (torch.arange(L).expand(len(reps), -1) / (up_lens / src_lens).view(-1, 1)).long().masked_fill(padding, 0)
    padded = torch.nn.utils.rnn.pad_sequence(reps, batch_first=True)
    x = torch.gather(padded, 1, index.unsqueeze(-1).expand(-1, -1, padded.shape[-1])).masked_fill(padding.unsqueeze(-1), 0)
    x = input_proj(x)
    position_ids = torch.arange(L).expand(len(reps), -1)
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool)) & ~padding.view(-1, 1, 1, L)
    mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
    rotary = LlamaRotaryEmbedding(config=config)
    cos_sin = rotary(x, position_ids)
    for layer in hf_layers:
        out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
        x = out[0] if isinstance(out, tuple) else out
    logits = output_proj(x)
    lprobs = F.log_softmax(logits.float(), dim=-1)
    targets = units.masked_select(units.ne(-100))
    loss = F.ctc_loss(lprobs.transpose(0, 1), targets, (~padding).sum(-1), tgt_lens, reduction="sum",
                      zero_infinity=True, blank=UNITS)
    return loss / tgt_lens.sum(), logits, ~padding


def _batch():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, DIM, generator=gen)
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100, -100], [-100, 1, 2, 3, 4, 5, 6]])
    # row 0: 3 states * 3 = 9 slots for 4 units; row 1: 6 * 3 = 18 < 20 units, so upsampled to 20
    units = torch.full((2, 20), -100)
    units[0, :4] = torch.tensor([1, 2, 3, 4])
    units[1] = torch.randint(0, UNITS, (20,), generator=gen)
    return hidden, labels, units


def test_loss_logits_and_gradients_match_llama_omni_on_transformers_layers():
    config, hf_layers, ours = _pair()
    hidden, labels, units = _batch()
    h_ours = hidden.clone().requires_grad_()
    h_ref = hidden.clone().requires_grad_()
    loss = ours(h_ours, labels, units)
    ref_loss, ref_logits, ref_valid = _reference_loss(config, hf_layers, ours.input_proj, ours.output_proj, h_ref, labels, units)
    # float32 (both RMSNorms compute in float32 whatever the input): tolerances to match
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    states = [h[l != -100] for h, l in zip(hidden, labels)]
    logits, valid = ours.logits(states, ref_valid.sum(-1))
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(logits[valid], ref_logits[valid].detach(), rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(loss, h_ours)
    (g_ref,) = torch.autograd.grad(ref_loss, h_ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)
    assert g_ours[0, 0].abs().sum() == 0  # prompt positions do not feed the generator


def test_the_generator_learns_a_unit_sequence():
    torch.manual_seed(0)
    gen = CTCSpeechGenerator(DIM, num_layers=1, dim=DIM, num_heads=HEADS, intermediate_dim=INTER,
                             unit_vocab_size=UNITS, upsample_factor=FACTOR, max_seq_len=64)
    hidden, labels, units = _batch()
    optimizer = torch.optim.Adam(gen.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = gen(hidden, labels, units)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first


def test_rows_without_response_tokens_are_refused():
    gen = CTCSpeechGenerator(DIM, num_layers=1, dim=DIM, num_heads=HEADS, intermediate_dim=INTER, unit_vocab_size=UNITS)
    with pytest.raises(ValueError, match="response tokens"):
        gen(torch.randn(1, 3, DIM), torch.full((1, 3), -100), torch.tensor([[1, 2]]))
