"""Training checkpoints: everything needed to resume a run exactly, written atomically.

A checkpoint is the folder ``<output_dir>/step_<N>/``:

- ``dcp/``: model and optimizer state through ``torch.distributed.checkpoint`` (each rank
  writes its shards; a plain model writes one file), so an 8B run never gathers on one rank;
- ``rank_<r>.pt``: what each rank owns alone: the sampler position, the carried
  conversation states of its slots, and its RNG states;
- ``trainer.pt``: the step, the scheduler and the recipe's counters (rank 0);
- ``meta.json``, written last: the step and world size.

Every rank writes into ``.step_<N>.tmp/``; after a barrier rank 0 renames it to
``step_<N>``, so a crash mid-save leaves only a temporary folder, which is ignored (and
removed by the next save), and the previous checkpoint stays usable. Pruning keeps the
newest ``keep_last_n`` up to the step just saved. Files are read with
``weights_only=True``: carried states are stored as plain dicts of tensors.
"""

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from components.models.attention import KVMemory
from components.models.llama_omni import OmniState
from components.ttt.state import TTTState

STEP_DIR = re.compile(r"^step_(\d+)$")


def state_to_dict(state: Optional[OmniState]) -> Optional[List[Dict[str, Any]]]:
    """An :class:`OmniState` as plain lists and dicts of tensors (loadable with ``weights_only``)."""
    if state is None:
        return None
    return [
        {"memory": None if m is None else dict(m._asdict()), "ttt": None if t is None else dict(t._asdict())}
        for m, t in state.layers
    ]


def state_from_dict(layers: Optional[List[Dict[str, Any]]], device: torch.device) -> Optional[OmniState]:
    """Inverse of :func:`state_to_dict`, on ``device``."""
    if layers is None:
        return None
    return OmniState(tuple(
        (
            None if layer["memory"] is None else KVMemory(**{k: v.to(device) for k, v in layer["memory"].items()}),
            None if layer["ttt"] is None else TTTState(**layer["ttt"]).to(device),
        )
        for layer in layers
    ))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class TrainingCheckpointer:
    """Saves, prunes, finds and loads the ``step_<N>`` checkpoints of one run.

    Args:
        output_dir: the run's folder.
        keep_last_n: complete checkpoints to keep (older ones are deleted after a save).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, output_dir: Path, keep_last_n: int, rank: int = 0, world_size: int = 1):
        if keep_last_n < 1:
            raise ValueError(f"checkpoint.keep_last_n must be >= 1, got {keep_last_n}")
        self.output_dir, self.keep_last_n = Path(output_dir), keep_last_n
        self.rank, self.world_size = rank, world_size

    def complete(self) -> List[Path]:
        """The complete checkpoints, oldest first."""
        if not self.output_dir.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir() if (m := STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found) if (p / "meta.json").exists()]

    @staticmethod
    def step_of(path: Path) -> int:
        """The step a complete checkpoint folder was saved at."""
        return json.loads((Path(path) / "meta.json").read_text())["step"]

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, model: nn.Module, optimizer, trainer: dict, own: dict) -> Path:
        """Writes ``step_<step>`` (all ranks call it).

        Args:
            trainer: rank 0's picklable dict (scheduler state, counters); the same on every rank.
            own: this rank's dict (sampler state, ``state_to_dict`` of its slots, ...).
        """
        final = self.output_dir / f"step_{step}"
        tmp = self.output_dir / f".step_{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "dcp")
        torch.save({**own, "rng": rng_state()}, tmp / f"rank_{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": self.world_size}))
            # A re-save of the same step moves the old folder aside first: at every moment
            # either the old or the new step_<step> is complete (or an earlier step is newest).
            replaced = self.output_dir / f".step_{step}.old"
            if final.exists():
                final.rename(replaced)
            tmp.rename(final)
            shutil.rmtree(replaced, ignore_errors=True)
            # Pruning keeps the newest up to this step; a newer step_<N> is never touched.
            earlier = [p for p in self.complete() if self.step_of(p) <= step]
            for old in earlier[: -self.keep_last_n]:
                shutil.rmtree(old)
            for stale in list(self.output_dir.glob(".step_*.tmp")) + list(self.output_dir.glob(".step_*.old")):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer) -> tuple:
        """Loads model and optimizer from ``path`` in place; returns ``(trainer, own)``.

        Raises:
            ValueError: the checkpoint was written by a different number of processes (the
                carried states and sampler positions belong to ranks).
        """
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was written by {meta['world_size']} processes, this run has {self.world_size}: "
                "the carried conversation states belong to ranks; resume with the same number of processes"
            )
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        own = torch.load(path / f"rank_{self.rank}.pt", weights_only=True)
        set_rng_state(own.pop("rng"))
        return trainer, own
