"""Turns chosen decoder layers of a Llama-Omni into TTT layers (an adapter, like LoRA).

``replace`` swaps a layer's attention for a TTT layer; ``parallel`` keeps the attention and
adds a TTT branch gated per channel by ``tanh(alpha)`` (alpha = 0 reproduces the model
exactly). With ``init_from_attention``, the TTT layer's q/k/v/o projections start from the
attention's, grouped KV heads repeated. No RoPE permutation is needed for that copy:
torchtune's attention and the TTT layer (like ttt-lm-pytorch) both rotate interleaved pairs.
"""

from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from components.models.llama_omni import LlamaOmni
from components.ttt import TTTLinear, TTTMLP
from components.ttt.layer import restore_float32

TTT_TYPES = {"linear": TTTLinear, "mlp": TTTMLP}
MODES = ("replace", "parallel")


class TTTGate(nn.Module):
    """``tanh(alpha) * y`` with alpha per channel, kept float32 like the TTT inner parameters."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), float(init), dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        restore_float32([self.alpha])
        return self

    def forward(self, y: Tensor) -> Tensor:
        return torch.tanh(self.alpha).to(y.dtype) * y


def _expand_kv(weight: Tensor, num_kv_heads: int, num_heads: int) -> Tensor:
    """``[n_kv * hd, D]`` -> ``[n_h * hd, D]``: each KV head's rows repeated for its query heads."""
    head_dim = weight.shape[0] // num_kv_heads
    return weight.view(num_kv_heads, head_dim, -1).repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1, weight.shape[1])


def _check(model: LlamaOmni, layers: List[int], ttt_type: str, mode: str):
    n = len(model.decoder.layers)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the decoder has layers 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a layer twice: {layers}")
    if ttt_type not in TTT_TYPES:
        raise ValueError(f"ttt_type={ttt_type!r}; expected one of {sorted(TTT_TYPES)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {list(MODES)}")
    done = [i for i in layers if model.decoder.layers[i].ttt is not None]
    if done:
        raise ValueError(f"layers {done} are already TTT layers")


def convert_to_ttt(
    model: LlamaOmni,
    layers: Iterable[int],
    ttt_type: str = "linear",
    mode: str = "replace",
    mini_batch_size: int = 64,
    gate_init: float = 0.1,
    init_from_attention: bool = True,
    base_lr: Optional[float] = None,
    checkpoint_group_size: int = 0,
) -> LlamaOmni:
    """Converts ``layers`` of ``model`` in place and returns it; the settings are appended to
    ``model.config["ttt"]``.

    Args:
        layers: decoder layer ids, e.g. ``range(24, 32)``.
        ttt_type: ``"linear"`` (TTT-Linear) or ``"mlp"`` (TTT-MLP).
        mode: ``"replace"`` the attention, or add a gated TTT branch ``"parallel"`` to it.
        mini_batch_size: tokens per inner gradient step.
        gate_init: initial alpha of the parallel gate ``tanh(alpha)``.
        init_from_attention: start q/k/v/o from the attention's projections.
        base_lr: inner learning rate scale (default: 1.0 Linear, 0.1 MLP).
        checkpoint_group_size: see :class:`components.ttt.TTTLinear`.
    """
    layers = list(layers)
    _check(model, layers, ttt_type, mode)
    cls = TTT_TYPES[ttt_type]
    rope_base = float(model.config.get("rope_base", 10000.0))
    for i in layers:
        layer = model.decoder.layers[i]
        attn = layer.attn
        weight = attn.q_proj.weight
        kwargs = dict(mini_batch_size=mini_batch_size, rope_base=rope_base, checkpoint_group_size=checkpoint_group_size)
        if base_lr is not None:
            kwargs["base_lr"] = base_lr
        ttt = cls(attn.embed_dim, attn.num_heads, **kwargs).to(device=weight.device, dtype=weight.dtype)
        if init_from_attention:
            with torch.no_grad():
                ttt.q_proj.weight.copy_(attn.q_proj.weight)
                ttt.k_proj.weight.copy_(_expand_kv(attn.k_proj.weight, attn.num_kv_heads, attn.num_heads))
                ttt.v_proj.weight.copy_(_expand_kv(attn.v_proj.weight, attn.num_kv_heads, attn.num_heads))
                ttt.o_proj.weight.copy_(attn.output_proj.weight)
        layer.ttt = ttt
        if mode == "replace":
            layer.attn = None
        else:
            layer.ttt_gate = TTTGate(attn.embed_dim, gate_init).to(device=weight.device)
    # One entry per call, so that a checkpoint can replay every conversion exactly.
    model.config.setdefault("ttt", []).append(dict(
        layers=layers, ttt_type=ttt_type, mode=mode, mini_batch_size=mini_batch_size, gate_init=gate_init,
        init_from_attention=init_from_attention, base_lr=base_lr, checkpoint_group_size=checkpoint_group_size,
    ))
    return model


def converted_settings(model: LlamaOmni) -> Dict[int, dict]:
    """``{layer id: {ttt_type, mode, mini_batch_size, base_lr}}`` of the layers that are TTT
    layers already (read from the modules, e.g. after loading a converted checkpoint)."""
    settings = {}
    for i, layer in enumerate(model.decoder.layers):
        if layer.ttt is not None:
            ttt_type = next(name for name, cls in TTT_TYPES.items() if isinstance(layer.ttt, cls))
            mode = "parallel" if layer.ttt_gate is not None else "replace"
            settings[i] = dict(ttt_type=ttt_type, mode=mode, mini_batch_size=layer.ttt.mini_batch_size,
                               base_lr=layer.ttt.base_lr)
    return settings


def ttt_modules(model: LlamaOmni) -> List[nn.Module]:
    """The TTT layers and gates of a converted model (same as ``model.ttt_modules()``)."""
    return model.ttt_modules()


def ttt_parameters(model: LlamaOmni) -> List[nn.Parameter]:
    """Parameters owned by TTT layers and gates (same as ``model.ttt_parameters()``)."""
    return model.ttt_parameters()
