"""Process group set-up that works with and without torchrun, on CPU (gloo) and GPU (nccl)."""

import os
from typing import Tuple

import torch
import torch.distributed as dist


def init_distributed(device: str) -> Tuple[int, int]:
    """Joins the process group when launched by torchrun; returns ``(rank, world_size)``.

    A plain ``python``/``tune run`` without torchrun flags is one process and needs no group.
    torchtune's own distributed recipes call ``init_process_group`` unconditionally and pick
    nccl, so they fail on CPU; here the backend follows the device.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``value`` reduced over ranks (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(value, op=op)
    return value
