"""FP32 enforcement for TTT: optimizer groups by module ownership and a per-step dtype guard.

TTT layers and their gates train with their own learning rate and weight decay (the video
TTT work uses 10x the base rate); which parameters are TTT ones is decided by which modules
own them (``model.ttt_modules()``), never by matching names. The inner-loop parameters and
the gates must stay float32 while the rest of the model may be bf16: :class:`FP32Guard`
checks them (and their gradients) and names any that was downcast.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

from components.ttt.layer import INNER_PARAMS


def param_groups(model: nn.Module, lr: float, weight_decay: float, ttt_lr: float, ttt_weight_decay: float) -> List[Dict]:
    """Two optimizer groups of the trainable parameters: ``"ttt"`` and ``"base"`` (empty ones left out).

    Args:
        model: a :class:`components.models.LlamaOmni` (anything with ``ttt_modules()``).
        lr, weight_decay: for everything not owned by a TTT module.
        ttt_lr, ttt_weight_decay: for the TTT layers and gates.
    """
    ttt_ids = {id(p) for module in model.ttt_modules() for p in module.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    ttt = [p for p in trainable if id(p) in ttt_ids]
    base = [p for p in trainable if id(p) not in ttt_ids]
    groups = [
        dict(name="ttt", params=ttt, lr=ttt_lr, weight_decay=ttt_weight_decay),
        dict(name="base", params=base, lr=lr, weight_decay=weight_decay),
    ]
    return [g for g in groups if g["params"]]


def cast_for_training(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts the model to ``dtype`` but keeps its TTT layers and gates wholly float32 (in place).

    The inner-loop parameters stay float32 under any cast anyway; the TTT projections are
    kept float32 too, so that each TTT module has one dtype (one FSDP2 group, one policy).
    """
    model.to(dtype)
    for module in model.ttt_modules():
        module.float()
    return model


class FP32Guard:
    """Checks that TTT parameters (and their gradients) are float32.

    Watched: every TTT inner parameter and gate, and every other TTT parameter that is
    float32 when the guard is made (after :func:`cast_for_training`: all of them).

    Args:
        model: the converted model; the parameters to watch are found once, by ownership.
    """

    def __init__(self, model: nn.Module):
        owned = {}
        for module in model.ttt_modules():
            names = INNER_PARAMS if hasattr(module, "inner_parameters") else ("alpha",)
            for name in names:
                if hasattr(module, name):
                    owned[id(getattr(module, name))] = True
            owned.update((id(p), True) for p in module.parameters() if p.dtype == torch.float32)
        self.watched = [(name, p) for name, p in model.named_parameters() if id(p) in owned]

    def check(self, step: Optional[int] = None) -> None:
        """Raises a RuntimeError naming the first downcast parameter or gradient."""
        when = "" if step is None else f" at step {step}"
        for name, param in self.watched:
            if param.dtype != torch.float32:
                raise RuntimeError(
                    f"TTT parameter {name} is {param.dtype}{when}; it must stay float32 "
                    "(give TTT modules a float32 MixedPrecisionPolicy and do not cast them)"
                )
            if param.grad is not None and param.grad.dtype != torch.float32:
                raise RuntimeError(f"the gradient of TTT parameter {name} is {param.grad.dtype}{when}; it must be float32")
