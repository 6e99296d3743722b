"""openai-whisper names (Llama-Omni checkpoints) <-> transformers' WhisperEncoder names."""

import pytest
import torch

from components.checkpoint.whisper_names import hf_to_openai, openai_to_hf
from components.models import whisper_encoder


def _tiny(seed):
    torch.manual_seed(seed)
    return whisper_encoder(num_mel_bins=128, d_model=64, num_layers=2, num_heads=4, ffn_dim=128, max_source_positions=100)


def test_every_encoder_tensor_has_its_openai_name_and_back():
    names = list(_tiny(0).state_dict())
    openai = [hf_to_openai(n) for n in names]
    assert [openai_to_hf(n) for n in openai] == names
    assert "positional_embedding" in openai and "ln_post.weight" in openai
    assert {"blocks.1.attn.query.weight", "blocks.1.attn.query.bias", "blocks.1.attn.key.weight"} <= set(openai)
    assert "blocks.1.attn.key.bias" not in openai  # Whisper's key projection has no bias
    assert {"blocks.0.mlp.0.weight", "blocks.0.mlp.2.bias", "blocks.0.mlp_ln.weight", "blocks.0.attn_ln.bias"} <= set(openai)


def test_a_state_dict_in_openai_naming_loads_into_the_encoder():
    source, target = _tiny(0), _tiny(1)
    openai_state = {hf_to_openai(k): v for k, v in source.state_dict().items()}
    target.load_state_dict({openai_to_hf(k): v for k, v in openai_state.items()}, strict=True)
    features = torch.randn(1, 128, 200)
    torch.testing.assert_close(target(features).last_hidden_state, source(features).last_hidden_state)


@pytest.mark.parametrize("key", ["blocks.0.attn.rotary.weight", "decoder.blocks.0.attn.query.weight", "blocks.x.attn_ln.weight"])
def test_unknown_names_are_refused_by_name(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        openai_to_hf(key)
