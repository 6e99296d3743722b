"""One sink for training metrics: a torchtune metric logger plus a JSON-lines file."""

import json
import os
from numbers import Number
from typing import Mapping, Optional

import torch
from torch import Tensor


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _to_python(metrics: Mapping) -> dict:
    """Tensors to Python numbers with one sync; numbers pass through.

    Raises:
        TypeError: naming a value that is neither a number nor a one-element tensor.
    """
    tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
    bad = [k for k, v in metrics.items() if not (isinstance(v, Number) or (isinstance(v, Tensor) and v.numel() == 1))]
    if bad:
        raise TypeError(f"metrics {bad} are not numbers or one-element tensors")
    values = {}
    if tensors:
        device = next(iter(tensors.values())).device
        flat = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in tensors.values()]).tolist()
        values = dict(zip(tensors, flat))
    return {k: values.get(k, v) for k, v in metrics.items()}


class MetricsLogger:
    """Sends each ``log`` to a torchtune metric logger and appends it to ``<output_dir>/metrics.jsonl``.

    Only rank 0 writes (both sinks); other ranks' calls do nothing, since torchtune's
    ``DiskLogger`` would otherwise write one file per rank. The JSON file is opened in append
    mode, so a resumed run continues it, and flushed after each line. Non-finite values are
    written as ``NaN``/``Infinity`` (Python's ``json`` reads them back).

    Args:
        output_dir: where ``metrics.jsonl`` goes (created if missing).
        logger: a torchtune metric logger (``log_dict(payload, step)``, ``close()``), or None.
        rank: this process's rank (default: from ``torch.distributed``, else 0).
    """

    def __init__(self, output_dir: str, logger=None, rank: Optional[int] = None):
        self.rank = _rank() if rank is None else rank
        self.logger = logger if self.rank == 0 else None
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = None
        if self.rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping) -> None:
        """Writes ``{"step": step, **metrics}``; tensors become numbers (one sync for all).

        Raises:
            ValueError: if ``metrics`` has a key ``"step"``.
            TypeError: if a value is not a number or a one-element tensor.
        """
        if "step" in metrics:
            raise ValueError("metrics must not have a key 'step'; it is the step argument")
        if self.rank != 0:
            return
        payload = _to_python(metrics)
        if self.logger is not None:
            self.logger.log_dict(payload, step=step)
        self._file.write(json.dumps({"step": int(step), **payload}) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file and the wrapped logger; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
