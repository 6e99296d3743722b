"""The ttt_finetune_distributed recipe on the tiny model and the bundled sample data, on CPU.

In-process runs build the recipe from the real configs plus overrides (as ``tune run`` does);
the launch-mode tests run the real ``tune`` command in a subprocess, single process and
``--nproc_per_node 2`` (FSDP2 over gloo).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from components.data.dataset import ConversationDataset, collate
from components.monitor import NonFiniteError
from components.training.config_schema import ConfigError
from recipes.ttt_finetune_distributed import TTTFinetuneRecipeDistributed, check_options

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = str(ROOT / "data" / "sample" / "conversations.json")
# Every conversation of the sample set fits one window of this size (the longest has 4741 tokens).
WHOLE = 4800


def _config(name: str, *overrides: str):
    cfg = OmegaConf.load(ROOT / "configs" / name)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def _quick(tmp_path, *overrides: str):
    """The quickstart config with a run folder in tmp_path and a logged line per step."""
    return _config("quickstart.yaml", f"output_dir={tmp_path}", f"dataset.sources=[{SAMPLE}]",
                   "monitor.log_every_n_steps=1", *overrides)


def _run(cfg) -> TTTFinetuneRecipeDistributed:
    recipe = TTTFinetuneRecipeDistributed(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def _metrics(output_dir) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _tune(args, cwd=ROOT, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(["tune", "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# ----------------------------------------------------------------------------- configs
def test_every_config_validates():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert {p.name for p in paths} >= {"quickstart.yaml", "stage1.yaml", "stage2.yaml", "stage3.yaml", "stage4.yaml"}
    for path in paths:
        check_options(OmegaConf.load(path))
        first = path.read_text().splitlines()[0]  # configs open with the command that runs them
        assert first.startswith("# tune run ") and f"--config configs/{path.relative_to(ROOT / 'configs')}" in first, path


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_step=3", r"unknown config key 'max_step': did you mean 'max_steps'"),
        ("optimizer.lrr=1e-3", r"unknown config key optimizer\.'lrr': did you mean optimizer\.'lr'"),
        ("monitor.on_nonfinite=ignore", r"monitor\.on_nonfinite='ignore'; expected one of \['raise', 'skip'\]"),
        ("window=100", r"window=100 must be a positive multiple of ttt\.mini_batch_size=64"),
        ("lr_scheduler.num_training_steps=5", r"lr_scheduler\.num_training_steps is set by the recipe"),
        ("model.checkpoint_dir=/x", r"set exactly one of model\.checkpoint_dir"),
        ("ttt.mini_batch_size=0", r"ttt\.mini_batch_size=0 must be >= 1"),
        ("ttt.layers=[]", r"ttt\.layers=\[\] must name decoder layers"),
        ("train=[ttt,speech_generator]", r"speech_generator learns only from the CTC loss; set ctc_weight > 0"),
    ],
)
def test_bad_configs_are_refused_by_key_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        check_options(_config("quickstart.yaml", override))


def test_a_removed_key_is_named():
    cfg = _config("quickstart.yaml")
    del cfg.monitor["log_every_n_steps"]
    with pytest.raises(ConfigError, match=r"config key monitor\.log_every_n_steps is missing"):
        check_options(cfg)
    cfg = _config("quickstart.yaml")
    del cfg.optimizer["lr"]  # optional for AdamW, but the recipe reads it for the base group
    with pytest.raises(ConfigError, match=r"config keys \['optimizer\.lr'\] are missing"):
        check_options(cfg)


# ----------------------------------------------------------------------------- training
def test_quickstart_loss_goes_down(tmp_path):
    _run(_quick(tmp_path, "max_steps=60"))
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 60 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "step_60" / "meta.json").exists()
    with safe_open(str(tmp_path / "model" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.2.ttt.W1").get_dtype() == "F32"


class _Crash(Exception):
    pass


@pytest.mark.parametrize("accumulation, crash_at, steps", [(1, 3, 6), (2, 9, 12)], ids=["plain", "accumulation-epoch"])
def test_resume_is_exact(tmp_path, monkeypatch, accumulation, crash_at, steps):
    """N steps in one go == a run that crashes right after saving step k, resumed with
    ``resume: auto``: identical losses and final weights. With 2 windows per step an epoch of
    the sample set ends at step 10, so the second case resumes before an epoch boundary."""
    overrides = (f"max_steps={steps}", f"checkpoint.save_every_n_steps={crash_at}", "lr_scheduler.num_warmup_steps=2",
                 f"gradient_accumulation_steps={accumulation}", "epochs=2")
    cfg = lambda out: _quick(out, *overrides)  # noqa: E731
    _run(cfg(tmp_path / "once"))
    save = TTTFinetuneRecipeDistributed.save_checkpoint

    def save_then_crash(self):
        save(self)
        if self.step == crash_at:
            raise _Crash()

    monkeypatch.setattr(TTTFinetuneRecipeDistributed, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        _run(cfg(tmp_path / "twice"))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "twice").glob("step_*")] == [f"step_{crash_at}"]
    _run(cfg(tmp_path / "twice"))
    once, twice = _metrics(tmp_path / "once"), _metrics(tmp_path / "twice")
    assert [m["step"] for m in twice] == list(range(1, steps + 1))
    assert [m["loss"] for m in twice] == [m["loss"] for m in once]
    with safe_open(str(tmp_path / "once" / "model" / "model-00001-of-00001.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "twice" / "model" / "model-00001-of-00001.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_state_carried_across_windows_gives_the_losses_of_one_long_window(tmp_path):
    """One conversation (4741 tokens, speech included) read in 256-token windows with the state
    carried, vs in one window; learning rates 0 so that only the forward differs."""
    frozen = ("optimizer.lr=0.0", "ttt_param_group.lr=0.0", "batch_slots=1", "shuffle=false", "epochs=1")
    conversation = _longest_only(tmp_path)
    _run(_quick(tmp_path / "windows", *frozen, f"dataset.sources=[{conversation}]", "window=256"))
    _run(_quick(tmp_path / "whole", *frozen, f"dataset.sources=[{conversation}]", f"window={WHOLE}"))
    windows, whole = _metrics(tmp_path / "windows"), _metrics(tmp_path / "whole")
    assert len(windows) == -(-4741 // 256) and len(whole) == 1
    summed = lambda ms: sum(m["loss"] * m["target_tokens"] for m in ms)  # noqa: E731
    assert sum(m["target_tokens"] for m in windows) == whole[0]["target_tokens"]
    assert summed(windows) == pytest.approx(summed(whole), rel=1e-5)


def _longest_only(tmp_path) -> Path:
    records = json.loads(Path(SAMPLE).read_text())
    longest = max(records, key=lambda r: len(r["conversation"]))
    for turn in longest["conversation"]:  # audio paths relative to the sample folder
        if turn.get("speech"):
            turn["speech"] = str(Path(SAMPLE).parent / turn["speech"])
    path = tmp_path / "longest.json"
    path.write_text(json.dumps([longest]))
    return path


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_in_one_conversations_speech_triggers_the_policy(tmp_path, monkeypatch, policy):
    records = json.loads(Path(SAMPLE).read_text())
    poisoned = records[0]["id"]
    features = ConversationDataset.features

    def nan_for_one(self, audio, piece):
        out = features(self, audio, piece)
        owners = {s.id for s in self.streams if any(span.audio == audio for span in s.speech)}
        return torch.full_like(out, float("nan")) if poisoned in owners else out

    monkeypatch.setattr(ConversationDataset, "features", nan_for_one)
    cfg = _quick(tmp_path, "max_steps=12", "shuffle=false", f"monitor.on_nonfinite={policy}")
    if policy == "raise":
        with pytest.raises(NonFiniteError, match=rf"non-finite state in layer0\.attn\.memory\.\w+ at step 1.*{poisoned}"):
            _run(cfg)
        return
    resets = []
    on_nonfinite = TTTFinetuneRecipeDistributed._on_nonfinite

    def recorded(self, problems, last_ids):
        on_nonfinite(self, problems, last_ids)
        resets.append(dict(self.pending_reset))

    monkeypatch.setattr(TTTFinetuneRecipeDistributed, "_on_nonfinite", recorded)
    recipe = _run(cfg)
    assert resets and all(set(r.values()) <= {poisoned} for r in resets)  # only the poisoned conversation restarts
    metrics = _metrics(tmp_path)
    skipped = [m for m in metrics if not m["optimizer_stepped"]]
    assert recipe.skipped_steps == len(skipped) >= 1 and metrics[-1]["skipped_steps"] == recipe.skipped_steps
    assert len(metrics) == 12 and all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics if m["optimizer_stepped"])
    for name, param in recipe.model.named_parameters():
        assert torch.isfinite(param).all(), name
    assert all(t is None or torch.isfinite(t).all() for layer in recipe.carried.layers for s in layer if s is not None
               for t in s if t is not None and t.is_floating_point())


# ----------------------------------------------------------------------------- launch modes
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(path)], check=True,
                   capture_output=True, cwd=ROOT)
    return path


def test_stage3_config_runs_through_tune_with_the_tiny_checkpoint(tmp_path, tiny_checkpoint):
    """The real stage-3 config, single process, with CLI overrides swapping in tiny things."""
    _tune(["recipes/ttt_finetune_distributed", "--config", "configs/stage3.yaml",
           f"model.checkpoint_dir={tiny_checkpoint}", f"tokenizer.path={tiny_checkpoint}",
           f"dataset.sources=[{SAMPLE}]", "dataset.trim_speech=true", "window=256", "model.attention_window=256",
           "model.memory_len=256", "ttt.layers=[2,3]", "device=cpu", "max_steps=3", f"output_dir={tmp_path}",
           "monitor.log_every_n_steps=1", "~optimizer.betas"])  # `~key` removes an optional argument
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "ttt/layer3/recon_loss_after" in metrics[0]
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "step_3" / "meta.json").exists()


def test_two_processes_fsdp_match_one_process(tmp_path):
    """FSDP2 over 2 gloo processes (1 slot each) vs 1 process with 2 slots, bf16 model with
    float32 TTT parameters. Without shuffling, the sample conversations pair up so that both
    runs read the same windows each step: states are carried across 256-token windows and
    slots reset at steps 3 and 6. Only even conversations have unit targets, so one rank runs
    the speech generator while the other does not (same collectives all the same)."""
    data = _with_units(tmp_path, every=2)
    common = ["--config", "configs/quickstart.yaml", f"dataset.sources=[{data}]", "shuffle=false", "max_steps=7",
              "dtype=bf16", "monitor.log_every_n_steps=1", "activation_checkpointing=full", "ctc_weight=0.5",
              "train=[ttt,gates,decoder,projector,speech_generator]"]
    _tune(["--nproc_per_node", "2", "recipes/ttt_finetune_distributed", *common, "batch_slots=1",
           f"output_dir={tmp_path / 'two'}"])
    _tune(["recipes/ttt_finetune_distributed", *common, "batch_slots=2", f"output_dir={tmp_path / 'one'}"])
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [m["target_tokens"] for m in two] == [m["target_tokens"] for m in one]
    assert [m["units"] for m in two] == [m["units"] for m in one] and sum(m["units"] for m in one) > 0
    # bf16 compute; float32 gradients reduced across ranks vs one process, so the weights drift
    # apart a little each step. Measured at most: 7e-5 relative (loss), 1.6e-3 (CTC, step 7).
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a["step"], a["loss"], b["loss"])
        assert a["ctc_loss"] == pytest.approx(b["ctc_loss"], rel=1e-2), (a["step"], a["ctc_loss"], b["ctc_loss"])
    # The gathered export keeps the sharded parameters' dtypes (the guard checks them each step).
    with safe_open(str(tmp_path / "two" / "model" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.3.ttt.W1").get_dtype() == "F32"
        assert f.get_slice("model.layers.3.ttt.q_proj.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.3.mlp.down_proj.weight").get_dtype() == "BF16"


def test_a_converted_checkpoint_continues_only_with_matching_ttt_settings(tmp_path):
    """Stage N starts from stage N-1's export: its TTT layers must be what the config says;
    run-time knobs (checkpoint_group_size) apply to them."""
    _run(_quick(tmp_path / "first", "max_steps=1"))
    exported = tmp_path / "first" / "model"
    follow = lambda *o: _quick(tmp_path / "second", f"model.checkpoint_dir={exported}", "model.builder=null", *o)  # noqa: E731
    with pytest.raises(ConfigError, match=r"layer 2 is a TTT layer with mode='parallel', but ttt\.mode='replace'"):
        _run(follow("ttt.mode=replace"))
    with pytest.raises(ConfigError, match=r"TTT layer 3 that ttt\.layers=\[2\] does not list"):
        _run(follow("ttt.layers=[2]"))
    recipe = _run(follow("max_steps=1", "ttt.checkpoint_group_size=2"))
    assert [layer.ttt.checkpoint_group_size for layer in recipe.model.decoder.layers[2:]] == [2, 2]
    assert len(recipe.model.config["ttt"]) == 1  # no empty conversion recorded


def test_a_fresh_start_next_to_newer_checkpoints_is_refused(tmp_path):
    _run(_quick(tmp_path, "max_steps=2", "checkpoint.save_every_n_steps=1"))
    with pytest.raises(ConfigError, match=r"resume='none' starts at step 0 but output_dir holds step_2"):
        _run(_quick(tmp_path, "max_steps=2", "resume=none"))
    with pytest.raises(ConfigError, match=r"starts at step 1 but output_dir holds step_2"):
        _run(_quick(tmp_path, "max_steps=3", f"resume={tmp_path / 'step_1'}"))


def _with_units(tmp_path, every: int = 1) -> Path:
    """The sample set with random unit targets on the answers of every ``every``-th conversation."""
    records = json.loads(Path(SAMPLE).read_text())
    generator = torch.Generator().manual_seed(0)
    for i, record in enumerate(records):
        for turn in record["conversation"]:
            if turn.get("speech"):
                turn["speech"] = str(Path(SAMPLE).parent / turn["speech"])
            if turn["from"] == "gpt" and i % every == 0:
                turn["unit"] = torch.randint(0, 1000, (12,), generator=generator).tolist()
    path = tmp_path / "with_units.json"
    path.write_text(json.dumps(records))
    return path


def test_the_speech_generator_trains_on_unit_targets(tmp_path):
    """Assistant turns with unit targets: with ctc_weight > 0 the CTC loss is reported and the
    generator (in `train`) learns."""
    data = _with_units(tmp_path)
    recipe = TTTFinetuneRecipeDistributed(_quick(tmp_path / "run", f"dataset.sources=[{data}]", "max_steps=8",
                                                 "ctc_weight=1.0", "train=[ttt,gates,speech_generator]"))
    recipe.setup()
    before = [p.detach().clone() for p in recipe.model.speech_generator.parameters()]
    recipe.train()
    recipe.cleanup()
    metrics = _metrics(tmp_path / "run")
    assert sum(m["units"] for m in metrics) > 0 and all(math.isfinite(m["ctc_loss"]) for m in metrics)
    assert any(m["ctc_loss"] > 0 for m in metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, recipe.model.speech_generator.parameters()))


@pytest.mark.parametrize("logger", ["WandBLogger", "TensorBoardLogger"])
def test_metrics_reach_wandb_offline_and_tensorboard(tmp_path, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    extra = ["metric_logger.mode=offline", "metric_logger.project=ttt-omni-test"] if logger == "WandBLogger" else []
    _run(_quick(tmp_path, "max_steps=2", f"metric_logger._component_=torchtune.training.metric_logging.{logger}", *extra))
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    if logger == "WandBLogger":
        assert any(p.suffix == ".wandb" for p in written), written
    else:
        assert any(p.name.startswith("events.out.tfevents") for p in written), written


def test_non_finite_parameters_stop_the_run_under_either_policy(tmp_path):
    recipe = TTTFinetuneRecipeDistributed(_quick(tmp_path, "max_steps=3", "monitor.on_nonfinite=skip"))
    recipe.setup()
    step = recipe.optimizer.step

    def step_then_overflow(*args, **kwargs):
        step(*args, **kwargs)
        recipe.model.decoder.layers[1].mlp.w1.weight.data[0, 0] = float("inf")

    recipe.optimizer.step = step_then_overflow
    with pytest.raises(NonFiniteError, match=r"decoder\.layers\.1\.mlp\.w1\.weight at step 1"):
        recipe.train()
    recipe.cleanup()


def test_accumulated_gradients_are_the_mean_over_all_target_tokens(tmp_path):
    """Two windows per optimizer step: the gradients the optimizer sees equal those of the summed
    cross-entropy of both windows (state carried, detached) divided by their target tokens."""
    overrides = ("max_steps=1", "gradient_accumulation_steps=2", "batch_slots=1", "shuffle=false", "clip_grad_norm=null")
    recipe = TTTFinetuneRecipeDistributed(_quick(tmp_path / "recipe", *overrides))
    recipe.setup()
    seen = {}

    def capture(*args, **kwargs):  # the first call; saving a checkpoint later steps with zero gradients
        if not seen:
            seen.update({n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None})

    recipe.optimizer.step = capture
    recipe.train()
    recipe.cleanup()

    reference = TTTFinetuneRecipeDistributed(_quick(tmp_path / "reference", *overrides))
    reference.setup()
    model, state, total, targets = reference.model, None, 0.0, 0
    for _ in range(2):
        batch = collate(reference._next_step(), reference.dataset, 256, pad_multiple=64)
        out = model(batch.tokens, batch.speech, state=state, mask=batch.mask, speech_lengths=batch.speech_lengths,
                    speech_starts=batch.speech_starts, reset=batch.reset, targets=batch.targets)
        total, targets, state = total + out.token_loss.sum(), targets + int((batch.targets != -100).sum()), out.state.detach()
    (total / targets).backward()
    reference.cleanup()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert seen.keys() == expected.keys() and len(seen) > 50
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
