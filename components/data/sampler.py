"""The stateful conversation sampler: conversations as streams of windows, one per batch slot.

Each of a rank's B slots reads one conversation window by window on consecutive steps
(window = the stage's max length), and takes the rank's next conversation when it is done,
flagging ``reset`` so that the recipe starts that slot's state afresh. Conversations are
shuffled per epoch from the seed and dealt to ranks disjointly; every rank runs the same
number of steps (a rank that runs out has idle slots), so collectives stay in step. The
position is ``(epoch, step)``: ``state_dict``/``load_state_dict`` resume exactly mid-epoch.
"""

import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch


class SlotWindow(NamedTuple):
    """What one batch slot reads at one step."""

    conversation: int  # index of the conversation in the dataset
    window: int  # which window of it, from 0
    reset: bool  # the slot starts this conversation here: reset its state first
    last: bool  # the conversation's last window


Step = List[Optional[SlotWindow]]  # one entry per slot; None: the slot is idle


class StatefulConversationSampler:
    """Schedules conversation windows onto ``batch_slots`` slots per rank.

    Args:
        lengths: tokens in each conversation's stream (all > 0).
        window: tokens per window (the stage's max sequence length).
        batch_slots: B, slots per rank.
        rank, world_size: this process and how many share the data.
        seed: shuffling seed; epoch e uses ``seed + e``.
        shuffle: shuffle conversations each epoch (else dataset order).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        window: int,
        batch_slots: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if window < 1 or batch_slots < 1:
            raise ValueError(f"window and batch_slots must be >= 1, got window={window}, batch_slots={batch_slots}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        empty = [i for i, n in enumerate(lengths) if n < 1]
        if empty:
            raise ValueError(f"conversations {empty[:10]} have no tokens")
        self.windows = [math.ceil(n / window) for n in lengths]
        self.window, self.batch_slots = window, batch_slots
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.step = 0, 0
        self._schedule_cache: Dict[int, List[Step]] = {}

    def _rank_conversations(self, epoch: int, rank: int) -> List[int]:
        n = len(self.windows)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        return order[rank :: self.world_size]

    def _rank_schedule(self, epoch: int, rank: int) -> List[Step]:
        """Greedy: a free slot takes the next conversation; slot 0 first."""
        queue = self._rank_conversations(epoch, rank)
        reading: List[Optional[List[int]]] = [None] * self.batch_slots  # [conversation, next window]
        steps, next_conversation = [], 0
        while True:
            step: Step = []
            for slot in range(self.batch_slots):
                if reading[slot] is None and next_conversation < len(queue):
                    reading[slot] = [queue[next_conversation], 0]
                    next_conversation += 1
                if reading[slot] is None:
                    step.append(None)
                    continue
                conversation, window = reading[slot]
                last = window == self.windows[conversation] - 1
                step.append(SlotWindow(conversation, window, window == 0, last))
                reading[slot] = None if last else [conversation, window + 1]
            if all(s is None for s in step):
                return steps
            steps.append(step)

    def schedule(self, epoch: Optional[int] = None) -> List[Step]:
        """This rank's steps in an epoch, padded with idle steps to the longest rank's."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._schedule_cache:
            per_rank = [self._rank_schedule(epoch, r) for r in range(self.world_size)]
            longest = max(len(s) for s in per_rank)
            mine = per_rank[self.rank]
            self._schedule_cache = {epoch: mine + [[None] * self.batch_slots] * (longest - len(mine))}
        return self._schedule_cache[epoch]

    def __len__(self) -> int:
        """Steps in the current epoch (the same on every rank)."""
        return len(self.schedule())

    def __iter__(self) -> Iterator[Step]:
        """The rest of the current epoch; afterwards the sampler stands at the next epoch's start."""
        steps = self.schedule()
        while self.step < len(steps):
            step = steps[self.step]
            self.step += 1
            yield step
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, world_size=self.world_size,
                    batch_slots=self.batch_slots, window=self.window, num_conversations=len(self.windows))

    def load_state_dict(self, state: dict) -> None:
        """Restores the position; refuses a state from a differently set-up sampler, naming the field."""
        for field in ("seed", "world_size", "batch_slots", "window", "num_conversations"):
            mine = self.state_dict()[field]
            if state.get(field) != mine:
                raise ValueError(f"sampler state has {field}={state.get(field)!r} but this sampler has {mine!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
