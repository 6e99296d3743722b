"""Llama-Omni checkpoints: the HF layout, round trips, conversions, and refusals by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import tune_to_hf

from components.checkpoint import load_llama_omni, save_llama_omni
from components.checkpoint.llama_omni import builder_from_config
from components.models import convert_to_ttt, llama_omni, llama_omni_tiny

REPO = Path(__file__).resolve().parents[3]


def _converted(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return convert_to_ttt(llama_omni_tiny(), [1, 3], ttt_type="mlp", mode="parallel", mini_batch_size=16).to(dtype)


def _all_tensors(path):
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_round_trip_is_bitwise_with_dtypes_and_ttt_in_float32(tmp_path):
    model = _converted()
    save_llama_omni(model, tmp_path / "a", max_shard_bytes=1_000_000)
    assert len(list((tmp_path / "a").glob("model-*-of-*.safetensors"))) > 1
    loaded = load_llama_omni(tmp_path / "a")
    _assert_same_state(model, loaded)
    save_llama_omni(loaded, tmp_path / "b", max_shard_bytes=1_000_000)
    for file in (tmp_path / "a").iterdir():
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name
    _assert_same_state(model, load_llama_omni(tmp_path / "b"))
    tensors = _all_tensors(tmp_path / "a")
    assert tensors["model.layers.1.ttt.W1"].dtype == torch.float32
    assert tensors["model.layers.1.ttt_gate.alpha"].dtype == torch.float32
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert not loaded.speech.encoder.conv1.weight.requires_grad


def test_loaded_model_computes_the_same_logits(tmp_path):
    model = _converted(torch.float32)
    save_llama_omni(model, tmp_path)
    tokens = torch.randint(0, 512, (2, 40))
    assert torch.equal(load_llama_omni(tmp_path)(tokens).logits, model(tokens).logits)


def test_layout_and_config_are_llama_omnis(tmp_path):
    save_llama_omni(_converted(), tmp_path)
    keys = set(_all_tensors(tmp_path))
    for key in [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.speech_encoder.conv1.weight", "model.speech_encoder.positional_embedding",
        "model.speech_encoder.blocks.1.attn.query.weight", "model.speech_encoder.blocks.1.mlp.0.weight",
        "model.speech_encoder.ln_post.weight", "model.speech_projector.linear1.weight",
        "model.speech_projector.linear2.bias", "speech_generator.input_proj.weight",
        "speech_generator.layers.1.self_attn.k_proj.weight", "speech_generator.output_proj.bias",
    ]:
        assert key in keys, key
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "omni_speech2s_llama" and config["speech_projector_type"] == "linear"
    assert config["ctc_decoder_config"] == "(2,64,4,128)" and config["speech_encoder_ds_rate"] == 5
    assert config["ttt_omni"]["ttt"][0]["layers"] == [1, 3]


def test_decoder_tensors_match_torchtunes_own_hf_conversion(tmp_path):
    model = _converted(torch.float32)
    save_llama_omni(model, tmp_path)
    ours = _all_tensors(tmp_path)
    decoder = {k: v for k, v in model.decoder.state_dict().items() if ".ttt" not in k}
    theirs = tune_to_hf(decoder, num_heads=4, num_kv_heads=2, dim=128)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


def test_released_config_without_our_fields_describes_the_8b_model():
    released = {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "rope_type": "llama3"},
        "speech_encoder_hidden_size": 1280, "speech_encoder_ds_rate": 5, "ctc_decoder_config": "(2,4096,32,11008)",
        "ctc_upsample_factor": 25, "unit_vocab_size": 1000, "model_type": "omni_speech2s_llama",
    }
    builder, conversions = builder_from_config(released)
    with torch.device("meta"):
        model = llama_omni(**builder)
    assert conversions == [] and sum(p.numel() for p in model.parameters()) == 9_114_381_289
    with pytest.raises(KeyError, match="'unit_vocab_size'"):
        builder_from_config({k: v for k, v in released.items() if k != "unit_vocab_size"})


def _rewrite_shard_holding(path, key, change):
    for file in path.glob("*.safetensors"):
        tensors = load_file(str(file))
        if key in tensors:
            change(tensors)
            save_file(tensors, str(file), metadata={"format": "pt"})
            return file
    raise AssertionError(key)


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    save_llama_omni(_converted(), tmp_path, max_shard_bytes=1_000_000)
    _rewrite_shard_holding(tmp_path, "model.layers.2.mlp.up_proj.weight", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    _rewrite_shard_holding(tmp_path, "lm_head.weight", lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    _rewrite_shard_holding(tmp_path, "model.norm.weight", lambda t: t.update({"model.norm.weight": torch.zeros(7)}))
    with pytest.raises(ValueError) as error:
        load_llama_omni(tmp_path)
    message = str(error.value)
    assert "missing keys: ['model.layers.2.mlp.up_proj.weight']" in message
    assert "unexpected keys: ['model.layers.0.extra.weight']" in message
    assert "model.norm.weight: [7]" in message and "expects [128]" in message


def test_a_truncated_shard_is_reported_by_file_name(tmp_path):
    save_llama_omni(_converted(), tmp_path, max_shard_bytes=1_000_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard.name + ".*truncated or corrupted"):
        load_llama_omni(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama_omni(tmp_path)
    save_llama_omni(_converted(), tmp_path, max_shard_bytes=1_000_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_llama_omni(tmp_path)


def test_make_tiny_checkpoint_script_writes_a_loadable_checkpoint(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), str(tmp_path)], check=True, cwd=REPO)
    model = load_llama_omni(tmp_path)
    assert model.decoder.tok_embeddings.weight.dtype == torch.bfloat16
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
