"""The stateful conversation sampler: every window exactly once per epoch, in order, on one
slot on consecutive steps; disjoint ranks in lockstep; exact resume mid-epoch."""

import random
from collections import defaultdict

import pytest

from components.data.sampler import StatefulConversationSampler

LENGTHS = [random.Random(i).randint(1, 5000) for i in range(23)]
WINDOW = 1024


def _samplers(world_size, slots=3, seed=7):
    return [StatefulConversationSampler(LENGTHS, WINDOW, slots, rank=r, world_size=world_size, seed=seed)
            for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_once_per_epoch_in_order_on_one_slot(world_size):
    samplers = _samplers(world_size)
    steps = [list(s) for s in samplers]
    assert len({len(s) for s in steps}) == 1  # ranks in lockstep
    seen = defaultdict(list)  # conversation -> [(rank, slot, step, window, reset, last)]
    for rank, rank_steps in enumerate(steps):
        for t, step in enumerate(rank_steps):
            assert len(step) == 3
            for slot, item in enumerate(step):
                if item is not None:
                    seen[item.conversation].append((rank, slot, t, item.window, item.reset, item.last))
    assert sorted(seen) == list(range(len(LENGTHS)))  # none dropped, across ranks
    for conversation, reads in seen.items():
        expected_windows = -(-LENGTHS[conversation] // WINDOW)
        assert [r[3] for r in reads] == list(range(expected_windows))  # none repeated, in order
        assert len({(r[0], r[1]) for r in reads}) == 1  # one rank, one slot
        assert [r[2] for r in reads] == list(range(reads[0][2], reads[0][2] + expected_windows))  # consecutive
        assert [r[4] for r in reads] == [True] + [False] * (expected_windows - 1)
        assert [r[5] for r in reads] == [False] * (expected_windows - 1) + [True]


def test_ranks_get_disjoint_conversations():
    per_rank = [{i.conversation for step in s for i in step if i} for s in (list(x) for x in _samplers(3))]
    assert sum(len(c) for c in per_rank) == len(LENGTHS) and len(set().union(*per_rank)) == len(LENGTHS)


def test_epochs_reshuffle_from_the_seed():
    a, b = _samplers(1)[0], _samplers(1)[0]
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second = list(a)
    assert a.epoch == 2 and second != first_a
    other_seed = list(_samplers(1, seed=8)[0])
    assert other_seed != first_a


def test_resume_mid_epoch_continues_exactly():
    reference = _samplers(2)[1]
    uninterrupted = list(reference) + list(reference)  # two epochs
    first = _samplers(2)[1]
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = _samplers(2)[1]
    resumed.load_state_dict(state)
    assert head + list(resumed) + list(resumed) == uninterrupted


def test_a_state_from_another_setup_is_refused():
    state = _samplers(2)[0].state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this sampler has 1"):
        _samplers(1)[0].load_state_dict(state)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"conversations \[1\] have no tokens"):
        StatefulConversationSampler([5, 0], 4, 2)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        StatefulConversationSampler([5], 4, 2, rank=2, world_size=2)
