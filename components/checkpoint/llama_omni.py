"""Load and save Llama-Omni in its HF layout: config.json, sharded safetensors and an index.

``load_llama_omni`` rebuilds the model the config describes on the meta device (converted to
TTT if the config says so), checks every key and shape of every shard before reading any
data, then streams shard by shard into the model: one copy of the weights, each tensor in
the dtype it was stored in. ``save_llama_omni`` writes the same layout, TTT tensors float32,
each file written to a temporary name and renamed, the config last.
"""

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.checkpoint.names import NameMap, hf_state_dict
from components.models import convert_to_ttt, llama_omni
from components.models.llama_omni import LlamaOmni

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Builder arguments of a checkpoint that does not record them (the released Llama-Omni):
# Whisper large-v3 and the projector's hidden width are fixed by its code, not its config.
_WHISPER_LARGE_V3 = dict(num_mel_bins=128, speech_encoder_layers=32, speech_encoder_heads=20,
                         speech_encoder_ffn_dim=5120, max_source_positions=1500, speech_projector_dim=2048)


def _names(builder: dict) -> NameMap:
    return NameMap(builder["num_heads"], builder["num_kv_heads"], builder["ctc_num_heads"])


def hf_config(model: LlamaOmni) -> dict:
    """config.json of a model: Llama-Omni's fields, plus ``ttt_omni`` (builder and conversions)."""
    c = model.config
    builder = {k: v for k, v in c.items() if k != "ttt"}
    return {
        "architectures": ["OmniSpeech2SLlamaForCausalLM"],
        "model_type": "omni_speech2s_llama",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["embed_dim"],
        "intermediate_size": c["intermediate_dim"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": c["num_kv_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": c["norm_eps"],
        "rope_theta": c["rope_base"],
        "rope_scaling": {"factor": float(c["rope_scale_factor"]), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": c["max_seq_len"],
        "tie_word_embeddings": False,
        "torch_dtype": str(model.decoder.tok_embeddings.weight.dtype).replace("torch.", ""),
        "speech_encoder": "whisper (weights in this checkpoint)",
        "speech_encoder_type": "whisper",
        "speech_encoder_ds_rate": c["speech_encoder_ds_rate"],
        "speech_encoder_hidden_size": c["speech_encoder_dim"],
        "speech_projector_type": "linear",
        "speech_normalize": False,
        "speech_generator_type": "ctc",
        "ctc_decoder_config": f"({c['ctc_num_layers']},{c['ctc_dim']},{c['ctc_num_heads']},{c['ctc_intermediate_dim']})",
        "ctc_upsample_factor": c["ctc_upsample_factor"],
        "ctc_loss_weight": 1.0,
        "unit_vocab_size": c["unit_vocab_size"],
        "tokenizer_model_max_length": 2048,
        "ttt_omni": {"builder": builder, "ttt": c.get("ttt", [])},
    }


def builder_from_config(config: dict, source: str = "config.json") -> Tuple[dict, List[dict]]:
    """``(builder kwargs, TTT conversions)`` from a config.json; KeyError names a missing field."""
    if "ttt_omni" in config:
        return dict(config["ttt_omni"]["builder"]), list(config["ttt_omni"]["ttt"])

    def need(field):
        if field not in config:
            raise KeyError(f"{source} has no {field!r}, which a Llama-Omni config needs")
        return config[field]

    ctc = [int(n) for n in str(need("ctc_decoder_config")).strip("()").split(",")]
    builder = dict(
        vocab_size=need("vocab_size"), num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
        num_kv_heads=config.get("num_key_value_heads", need("num_attention_heads")), embed_dim=need("hidden_size"),
        intermediate_dim=need("intermediate_size"), max_seq_len=need("max_position_embeddings"),
        rope_base=float(need("rope_theta")), rope_scale_factor=int((config.get("rope_scaling") or {}).get("factor", 8)),
        norm_eps=need("rms_norm_eps"), speech_encoder_dim=need("speech_encoder_hidden_size"),
        speech_encoder_ds_rate=need("speech_encoder_ds_rate"), ctc_num_layers=ctc[0], ctc_dim=ctc[1],
        ctc_num_heads=ctc[2], ctc_intermediate_dim=ctc[3], unit_vocab_size=need("unit_vocab_size"),
        ctc_upsample_factor=need("ctc_upsample_factor"), **_WHISPER_LARGE_V3,
    )
    return builder, []


def _shard_files(path: Path) -> List[Path]:
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE).exists():
        files = [path / SINGLE]
    else:
        raise FileNotFoundError(f"{path} has neither {INDEX} nor {SINGLE}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{path / INDEX} lists shards that do not exist: {missing}")
    return files


def _read_headers(files: Iterable[Path]) -> Dict[str, Tuple[Path, list]]:
    """HF key -> (file, shape), without reading tensor data."""
    found = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    found[key] = (file, list(f.get_slice(key).get_shape()))
        except Exception as error:  # safetensors raises its own error type for bad headers
            raise ValueError(f"checkpoint shard {file} cannot be read ({error}); is it truncated or corrupted?") from error
    return found


def _plan(model: LlamaOmni, names: NameMap, headers: dict) -> Dict[Path, List[tuple]]:
    """For each file, ``(internal key, HF key, transform)`` of what it holds; ValueError naming every bad key."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    plan, unexpected, wrong_shape, seen = {}, [], [], set()
    for hf_key, (file, shape) in headers.items():
        try:
            key, transform = names.from_hf(hf_key)
        except KeyError:
            unexpected.append(hf_key)
            continue
        if key not in expected:
            unexpected.append(hf_key)
        elif shape != expected[key]:
            wrong_shape.append(f"{hf_key}: {shape} in {file.name}, the model expects {expected[key]}")
            seen.add(key)
        else:
            plan.setdefault(file, []).append((key, hf_key, transform))
            seen.add(key)
    missing = [names.to_hf(k)[0] for k in expected if k not in seen]
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if wrong_shape:
        problems.append(f"keys of the wrong shape: {wrong_shape}")
    if problems:
        raise ValueError("the checkpoint does not fit the model its config describes; " + "; ".join(problems))
    return plan


def load_llama_omni(path: Union[str, Path]) -> LlamaOmni:
    """Rebuilds and loads the model stored at ``path`` (Llama-Omni HF layout)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist")
    builder, conversions = builder_from_config(json.loads(config_file.read_text()), str(config_file))
    with torch.device("meta"):
        model = llama_omni(**builder)
        for conversion in conversions:
            convert_to_ttt(model, **conversion)
    names = _names(builder)
    plan = _plan(model, names, _read_headers(_shard_files(path)))
    for file, keys in plan.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                shard = {}
                for key, hf_key, transform in keys:
                    tensor = f.get_tensor(hf_key)
                    shard[key] = tensor if transform is None else transform(tensor).contiguous()
        except Exception as error:
            raise ValueError(f"checkpoint shard {file} cannot be read ({error}); is it truncated or corrupted?") from error
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    for module in model.modules():  # buffers computed at build time (RoPE caches) were on meta
        if hasattr(module, "rope_init"):
            module.rope_init()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded after reading {path}: {left}")
    return model


def _atomic_write(write, target: Path):
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)


def save_llama_omni(
    model: LlamaOmni, path: Union[str, Path], max_shard_bytes: int = 5 * 2**30, state_dict: Optional[dict] = None
) -> None:
    """Writes ``model`` at ``path`` in the Llama-Omni HF layout (shards of at most ``max_shard_bytes``).

    ``state_dict`` replaces ``model.state_dict()``: a sharded (FSDP) model passes its gathered
    full state dict (``torch.distributed.checkpoint.state_dict.get_model_state_dict``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    builder = {k: v for k, v in model.config.items() if k != "ttt"}
    tensors = hf_state_dict(model.state_dict() if state_dict is None else state_dict, _names(builder))
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor.detach().cpu()
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_write(lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}), path / name)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write(lambda tmp: tmp.write_text(json.dumps(index, indent=2)), path / INDEX)
    _atomic_write(lambda tmp: tmp.write_text(json.dumps(hf_config(model), indent=2)), path / "config.json")
