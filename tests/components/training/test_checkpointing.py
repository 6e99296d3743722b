"""Training checkpoints: atomic step folders, pruning, exact round trip, carried states."""

import pytest
import torch

import components.training.checkpointing as checkpointing
from components.models import convert_to_ttt, llama_omni_tiny
from components.training.checkpointing import TrainingCheckpointer, state_from_dict, state_to_dict


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_prune_and_load_round_trip(tmp_path):
    model, optimizer = _trained()
    ckpt = TrainingCheckpointer(tmp_path, keep_last_n=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer, trainer={"step": step}, own={"sampler": {"step": step}})
    assert [p.name for p in ckpt.complete()] == ["step_2", "step_3"]
    fresh, fresh_optimizer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), None
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    trainer, own = ckpt.load(ckpt.latest(), fresh, fresh_optimizer)
    assert trainer == {"step": 3} and own == {"sampler": {"step": 3}}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_a_crash_mid_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    model, optimizer = _trained()
    ckpt = TrainingCheckpointer(tmp_path, keep_last_n=1)
    ckpt.save(1, model, optimizer, trainer={"step": 1}, own={})
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):
        if "rank_0" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(2, model, optimizer, trainer={"step": 2}, own={})
    monkeypatch.undo()
    assert ckpt.latest() == tmp_path / "step_1" and (tmp_path / ".step_2.tmp").exists()
    trainer, _ = ckpt.load(ckpt.latest(), model, optimizer)
    assert trainer == {"step": 1}
    ckpt.save(3, model, optimizer, trainer={"step": 3}, own={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]  # stale temporary and old step gone


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    model, optimizer = _trained()
    TrainingCheckpointer(tmp_path, keep_last_n=1).save(1, model, optimizer, trainer={}, own={})
    with pytest.raises(ValueError, match="written by 1 processes, this run has 2"):
        TrainingCheckpointer(tmp_path, keep_last_n=1, rank=0, world_size=2).load(tmp_path / "step_1", model, optimizer)


def test_carried_states_round_trip_through_weights_only_files(tmp_path):
    torch.manual_seed(0)
    model = convert_to_ttt(llama_omni_tiny(attention_window=32, memory_len=32), [1, 3], ttt_type="mlp", mode="parallel")
    with torch.no_grad():
        state = model(torch.randint(0, 512, (2, 50))).state
    torch.save(state_to_dict(state), tmp_path / "s.pt")
    back = state_from_dict(torch.load(tmp_path / "s.pt", weights_only=True), torch.device("cpu"))
    assert state_to_dict(None) is None and state_from_dict(None, torch.device("cpu")) is None
    for (m1, t1), (m2, t2) in zip(state.layers, back.layers):
        assert type(m1) is type(m2) and all(torch.equal(a, b) for a, b in zip(m1, m2))
        assert (t1 is None) == (t2 is None)
        if t1 is not None:
            assert type(t2).__name__ == "TTTState"
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(t1, t2))


def test_pruning_never_touches_newer_steps_and_a_resave_replaces_in_place(tmp_path):
    model, optimizer = _trained()
    ckpt = TrainingCheckpointer(tmp_path, keep_last_n=1)
    ckpt.save(9, model, optimizer, trainer={"step": 9}, own={})
    ckpt.save(4, model, optimizer, trainer={"step": 4}, own={})
    assert [p.name for p in ckpt.complete()] == ["step_4", "step_9"]
    ckpt.save(4, model, optimizer, trainer={"step": 44}, own={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_9"]
    assert ckpt.load(tmp_path / "step_4", model, optimizer)[0] == {"step": 44}
    assert ckpt.step_of(tmp_path / "step_9") == 9
