"""Finding NaN and inf in the loss, gradients, parameters and carried states, by name.

Each check is a cheap screen in the common case (a few fused reductions and one device
sync) and drills down only when something is off. The checks look at this rank's tensors
(the local shards under FSDP2); ranks must agree on the outcome (e.g. all-reduce a flag)
before acting on it. What to do (raise, or skip the step and reset the affected
conversations) is the recipe's policy.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


class NonFiniteError(RuntimeError):
    """Raised by the recipe when its policy for a :class:`NonFinite` finding is to stop.

    Args:
        found: the finding; the message is its sentence.
    """

    def __init__(self, found: "NonFinite"):
        super().__init__(str(found))
        self.found = found


@dataclass
class NonFinite:
    """A non-finite value found by one of the checks.

    Attributes:
        what: ``"loss"``, ``"gradient"``, ``"parameter"`` or ``"state"``.
        name: the tensor: a parameter name, ``layer{i}.ttt.W1``, ``layer{i}.attn.memory.k``, ``"loss"``.
        step: the training step.
        rows: batch rows affected (all rows when it cannot be narrowed down).
        conversation_ids: the conversations in those rows.
    """

    what: str
    name: str
    step: int
    rows: List[int] = field(default_factory=list)
    conversation_ids: list = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"non-finite {self.what} in {self.name} at step {self.step}: "
            f"batch rows {self.rows}, conversations {self.conversation_ids}"
        )


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _finding(what: str, name: str, step: int, rows: List[int], conversation_ids: Sequence) -> NonFinite:
    ids = list(conversation_ids)
    picked = [ids[r] for r in rows] if all(r < len(ids) for r in rows) else ids
    return NonFinite(what, name, int(step), rows, picked)


def check_loss(per_row_loss: Tensor, step: int, conversation_ids: Sequence) -> Optional[NonFinite]:
    """Rows whose loss is NaN or inf.

    Args:
        per_row_loss: ``[B]`` loss of each row (a 0-dim loss blames all rows).
        step: the training step.
        conversation_ids: ``B`` ids, the conversation in each row.

    Returns:
        The finding, or None when every row's loss is finite.
    """
    if bool(torch.isfinite(per_row_loss).all()):
        return None
    if per_row_loss.dim() == 0:
        rows = list(range(len(conversation_ids)))
    else:
        rows = (~torch.isfinite(per_row_loss)).nonzero().flatten().tolist()
    return _finding("loss", "loss", step, rows, conversation_ids)


def state_tensors(state) -> List[Tuple[str, Tensor]]:
    """``(name, tensor)`` for the float tensors of an :class:`components.models.OmniState`.

    Names are ``layer{i}.attn.memory.{field}`` (KVMemory) and ``layer{i}.ttt.{field}``
    (TTTState); None fields and non-float ones (offsets, validity flags) are left out.
    """
    found = []
    for i, layer_state in enumerate(state.layers):
        memory, ttt = layer_state if layer_state is not None else (None, None)
        for prefix, part in ((f"layer{i}.attn.memory", memory), (f"layer{i}.ttt", ttt)):
            if part is None:
                continue
            for name in part._fields:
                t = getattr(part, name)
                if isinstance(t, Tensor) and t.is_floating_point():
                    found.append((f"{prefix}.{name}", t))
    return found


def _row_norms(t: Tensor) -> Tensor:
    """``[B, ...] -> [B]`` float32 L2 norm of each row; non-finite when the row has NaN or inf
    (or, rarely, overflows: the drill-down rechecks with ``isfinite``)."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), dtype=torch.float32)


def check_states(state, step: int, conversation_ids: Sequence) -> Optional[NonFinite]:
    """Rows of a carried state with a NaN or inf in any tensor.

    Args:
        state: an :class:`components.models.OmniState` (None: nothing to check).
        step: the training step.
        conversation_ids: ``B`` ids, the conversation in each row.

    Returns:
        The first tensor found (in layer order), with the rows affected in any tensor; None
        when all is finite.
    """
    if state is None:
        return None
    tensors = [(name, _local(t)) for name, t in state_tensors(state)]
    if not tensors:
        return None
    norms = torch.stack([_row_norms(t) for _, t in tensors])  # [N,B]
    if bool(torch.isfinite(norms).all()):
        return None
    suspects = (~torch.isfinite(norms)).nonzero().tolist()  # [[tensor, row], ...]
    first, rows = None, set()
    for n, row in suspects:
        name, t = tensors[n]
        if not bool(torch.isfinite(t[row]).all()):
            first = name if first is None else first
            rows.add(row)
    if first is None:  # only overflowing norms
        return None
    return _finding("state", first, step, sorted(rows), conversation_ids)


def check_parameters(model: nn.Module, step: int, conversation_ids: Sequence, grads: bool = False) -> Optional[NonFinite]:
    """The first parameter (or gradient) of ``model`` holding a NaN or inf.

    One ``torch._foreach_norm`` over all tensors (fused on GPU) and one sync; the tensors
    whose norm is not finite are then rechecked with ``isfinite`` in ``named_parameters`` order.

    Args:
        model: the model.
        step: the training step.
        conversation_ids: the ids of the batch's rows (all are blamed).
        grads: check ``param.grad`` instead of the parameters (None grads are skipped).

    Returns:
        The finding, named by ``named_parameters()``, or None.
    """
    named = [(name, p.grad if grads else p) for name, p in model.named_parameters()]
    named = [(name, _local(t)) for name, t in named if t is not None]
    named = [(name, t) for name, t in named if t.numel() > 0]
    if not named:
        return None
    norms = torch.stack(torch._foreach_norm([t for _, t in named], dtype=torch.float32))  # [N]
    if bool(torch.isfinite(norms).all()):
        return None
    for n in (~torch.isfinite(norms)).nonzero().flatten().tolist():
        name, t = named[n]
        if not bool(torch.isfinite(t).all()):
            what = "gradient" if grads else "parameter"
            return _finding(what, name, step, list(range(len(conversation_ids))), conversation_ids)
    return None
