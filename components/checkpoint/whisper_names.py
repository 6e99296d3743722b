"""Speech-encoder parameter names: openai-whisper (Llama-Omni's checkpoints) <-> transformers.

Llama-Omni loads its encoder with the openai-whisper package, so its checkpoints name it
``conv1``, ``positional_embedding``, ``blocks.i.attn.query`` ...; transformers'
``WhisperEncoder`` names the same tensors ``conv1``, ``embed_positions.weight``,
``layers.i.self_attn.q_proj`` ... The key projection has no bias in both.
"""

import re

# (openai-whisper, transformers); "{i}" is the block index.
_BLOCK_NAMES = [
    ("attn.query", "self_attn.q_proj"),
    ("attn.key", "self_attn.k_proj"),
    ("attn.value", "self_attn.v_proj"),
    ("attn.out", "self_attn.out_proj"),
    ("attn_ln", "self_attn_layer_norm"),
    ("mlp.0", "fc1"),
    ("mlp.2", "fc2"),
    ("mlp_ln", "final_layer_norm"),
]
_TOP_NAMES = [
    ("conv1.weight", "conv1.weight"),
    ("conv1.bias", "conv1.bias"),
    ("conv2.weight", "conv2.weight"),
    ("conv2.bias", "conv2.bias"),
    ("positional_embedding", "embed_positions.weight"),
    ("ln_post.weight", "layer_norm.weight"),
    ("ln_post.bias", "layer_norm.bias"),
]
_OPENAI_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _convert(key: str, top: dict, block_re: re.Pattern, block: dict, prefix: str, source: str) -> str:
    if key in top:
        return top[key]
    match = block_re.match(key)
    if match and match.group(2) in block:
        index, module, kind = match.groups()
        return f"{prefix}.{index}.{block[module]}.{kind}"
    raise KeyError(f"{key!r} is not a Whisper encoder parameter name in {source} naming")


def openai_to_hf(key: str) -> str:
    """``blocks.3.attn.query.weight`` -> ``layers.3.self_attn.q_proj.weight``; raises KeyError on unknown names."""
    return _convert(key, dict(_TOP_NAMES), _OPENAI_BLOCK, dict(_BLOCK_NAMES), "layers", "openai-whisper")


def hf_to_openai(key: str) -> str:
    """The inverse of :func:`openai_to_hf`."""
    top = {hf: openai for openai, hf in _TOP_NAMES}
    block = {hf: openai for openai, hf in _BLOCK_NAMES}
    return _convert(key, top, _HF_BLOCK, block, "blocks", "transformers")
