"""Activation checkpointing and FSDP2 for Llama-Omni, applied from outside the model.

One function, :func:`parallelize`, in torchtitan's order: activation checkpointing first
(it wraps each decoder layer's forward), then FSDP2 (``fully_shard``) from the leaves up, so
every group is sharded before the group that contains it. Model code knows nothing of it.

FSDP2 groups: each TTT layer and each gate gets its own group with a float32
``MixedPrecisionPolicy`` (the inner loop's per-token updates vanish in bf16); each decoder
layer and the root (everything else) compute in ``param_dtype`` (bf16) and reduce
gradients in float32.
"""

import functools
from typing import Optional, Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full")


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: nn.Module, every_n: int) -> int:
    """Recomputes the activations of every ``every_n``-th decoder layer in backward.

    The layer's ``forward`` is wrapped in place (no wrapper module), so parameter and
    checkpoint names do not change. Returns how many layers were wrapped.
    """
    wrapped = 0
    for i, layer in enumerate(model.decoder.layers):
        if i % every_n == 0:
            layer.forward = functools.partial(_checkpointed, layer.forward)
            wrapped += 1
    return wrapped


def ac_every_n(activation_checkpointing: Union[str, int]) -> int:
    """``none`` -> 0, ``full`` -> 1, N -> N (every N-th layer); anything else is refused."""
    if activation_checkpointing in AC_MODES:
        return AC_MODES.index(activation_checkpointing)
    if isinstance(activation_checkpointing, int) and not isinstance(activation_checkpointing, bool) and activation_checkpointing >= 1:
        return activation_checkpointing
    raise ValueError(
        f"activation_checkpointing={activation_checkpointing!r}; expected 'none', 'full' or a positive "
        "integer N (checkpoint every N-th decoder layer)"
    )


def parallelize(
    model: nn.Module,
    activation_checkpointing: Union[str, int] = "none",
    fsdp: bool = False,
    mesh: Optional[DeviceMesh] = None,
    param_dtype: torch.dtype = torch.bfloat16,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Applies activation checkpointing, then FSDP2, to a :class:`LlamaOmni` (in place).

    Args:
        model: the model, converted to TTT already, on its device.
        activation_checkpointing: ``"none"``, ``"full"`` (every decoder layer) or N (every N-th).
        fsdp: shard parameters, gradients and optimizer state over ``mesh`` (FSDP2).
        mesh: the 1-D data-parallel device mesh (default: all ranks).
        param_dtype: compute dtype of everything but the TTT modules.
        reshard_after_forward: free gathered parameters after forward (re-gather in backward).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU.

    Returns:
        The model (its class swapped by ``fully_shard`` when ``fsdp``).
    """
    every_n = ac_every_n(activation_checkpointing)
    if every_n:
        checkpoint_layers(model, every_n)
    if not fsdp:
        return model
    common = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy()
    # No input casting outside the TTT modules: it would round the carried float32 TTT
    # states (passed through the root and every decoder layer) to bf16. The embeddings make
    # the hidden states bf16 anyway, and the speech encoder casts its features itself.
    base = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # The TTT modules' inputs are cast to float32 on entry; the decoder layer casts their
    # output back to the residual stream's dtype.
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in model.decoder.layers:
        for module in (layer.ttt, layer.ttt_gate):
            if module is not None:
                fully_shard(module, mp_policy=fp32, **common)
        fully_shard(layer, mp_policy=base, **common)
    # The root group holds the embeddings, final norm, LM head, speech encoder + projector
    # and speech generator. The speech modules run only for batches that hold speech (or
    # units), which differs between ranks: as groups of their own, one rank would all-gather
    # while another does not, and the collectives would mismatch.
    fully_shard(model, mp_policy=base, **{**common, "reshard_after_forward": False})
    return model
