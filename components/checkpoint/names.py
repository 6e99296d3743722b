"""Parameter names: this project's modules <-> the Llama-Omni HF checkpoint layout.

Decoder and generator layers are torchtune modules here and HF Llama layers in the
checkpoint; HF stores q/k rows per head as two halves (rotate-half RoPE) where torchtune
interleaves them, so q/k weights are permuted on the way (as torchtune's own converter
does). The encoder uses openai-whisper names (see whisper_names.py). TTT layers and gates
keep their names under ``model.layers.N.``.
"""

import re
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor

from components.checkpoint.whisper_names import hf_to_openai, openai_to_hf

# torchtune layer suffix <-> HF Llama layer suffix
_LAYER_NAMES = [
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.output_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.w1.weight", "mlp.gate_proj.weight"),
    ("mlp.w3.weight", "mlp.up_proj.weight"),
    ("mlp.w2.weight", "mlp.down_proj.weight"),
    ("sa_norm.scale", "input_layernorm.weight"),
    ("mlp_norm.scale", "post_attention_layernorm.weight"),
]
_TOP_NAMES = [
    ("decoder.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.norm.scale", "model.norm.weight"),
    ("decoder.output.weight", "lm_head.weight"),
]
_INTERNAL_LAYER = re.compile(r"^(decoder|speech_generator)\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^(model|speech_generator)\.layers\.(\d+)\.(.+)$")
_TTT = ("ttt.", "ttt_gate.")


def hf_to_interleaved(weight: Tensor, num_heads: int) -> Tensor:
    """q/k rows of each head from HF's ``[half 1; half 2]`` order to torchtune's interleaved pairs."""
    out_dim, dim = weight.shape
    head_dim = out_dim // num_heads
    return weight.view(num_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_dim, dim)


def interleaved_to_hf(weight: Tensor, num_heads: int) -> Tensor:
    """The inverse of :func:`hf_to_interleaved`."""
    out_dim, dim = weight.shape
    head_dim = out_dim // num_heads
    return weight.view(num_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


class NameMap:
    """Maps names (and q/k layouts) both ways for one model's head counts.

    Args:
        num_heads, num_kv_heads: the decoder's attention heads.
        ctc_num_heads: the speech generator's heads.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, ctc_num_heads: int):
        self.heads = {("decoder", "q"): num_heads, ("decoder", "k"): num_kv_heads,
                      ("speech_generator", "q"): ctc_num_heads, ("speech_generator", "k"): ctc_num_heads}

    def _qk_heads(self, stack: str, internal_suffix: str) -> Optional[int]:
        for proj in ("q", "k"):
            if internal_suffix == f"attn.{proj}_proj.weight":
                return self.heads[(stack, proj)]
        return None

    def to_hf(self, key: str) -> Tuple[str, Optional[Callable[[Tensor], Tensor]]]:
        """Internal name -> ``(HF name, transform of the tensor or None)``; KeyError if unknown."""
        top = dict(_TOP_NAMES)
        if key in top:
            return top[key], None
        if key.startswith("speech.encoder."):
            return "model.speech_encoder." + hf_to_openai(key[len("speech.encoder."):]), None
        if key.startswith("speech.projector.linear"):
            return "model.speech_projector." + key[len("speech.projector."):], None
        if key.startswith(("speech_generator.input_proj.", "speech_generator.output_proj.")):
            return key, None
        match = _INTERNAL_LAYER.match(key)
        if match:
            stack, index, suffix = match.groups()
            prefix = "model" if stack == "decoder" else stack
            if stack == "decoder" and suffix.startswith(_TTT):
                return f"model.layers.{index}.{suffix}", None
            names = dict(_LAYER_NAMES)
            if suffix in names:
                heads = self._qk_heads(stack, suffix)
                transform = None if heads is None else (lambda t, h=heads: interleaved_to_hf(t, h))
                return f"{prefix}.layers.{index}.{names[suffix]}", transform
        raise KeyError(f"{key!r} has no place in the Llama-Omni checkpoint layout")

    def from_hf(self, key: str) -> Tuple[str, Optional[Callable[[Tensor], Tensor]]]:
        """HF name -> ``(internal name, transform)``; KeyError naming the key if unknown."""
        top = {hf: internal for internal, hf in _TOP_NAMES}
        if key in top:
            return top[key], None
        if key.startswith("model.speech_encoder."):
            return "speech.encoder." + openai_to_hf(key[len("model.speech_encoder."):]), None
        if key.startswith("model.speech_projector.linear"):
            return "speech." + key[len("model.speech_"):], None
        if key.startswith(("speech_generator.input_proj.", "speech_generator.output_proj.")):
            return key, None
        match = _HF_LAYER.match(key)
        if match:
            stack, index, suffix = match.groups()
            internal_stack = "decoder" if stack == "model" else stack
            if stack == "model" and suffix.startswith(_TTT):
                return f"decoder.layers.{index}.{suffix}", None
            names = {hf: internal for internal, hf in _LAYER_NAMES}
            if suffix in names:
                heads = self._qk_heads(internal_stack, names[suffix])
                transform = None if heads is None else (lambda t, h=heads: hf_to_interleaved(t, h))
                return f"{internal_stack}.layers.{index}.{names[suffix]}", transform
        raise KeyError(f"{key!r} is not a Llama-Omni checkpoint key")


def hf_state_dict(model_state: Dict[str, Tensor], names: NameMap) -> Dict[str, Tensor]:
    """A model's state dict in the checkpoint's names and layouts (tensors contiguous)."""
    out = {}
    for key, tensor in model_state.items():
        hf_key, transform = names.to_hf(key)
        out[hf_key] = (tensor if transform is None else transform(tensor)).contiguous()
    return out
