"""Fine-tunes Llama-Omni with TTT layers on long speech conversations, state carried across batches.

    tune run recipes/ttt_finetune_distributed --config configs/stage3.yaml
    tune run --nproc_per_node 8 recipes/ttt_finetune_distributed --config configs/stage3.yaml optimizer.lr=2e-5

Each rank reads ``batch_slots`` conversations at a time, window after window (the stateful
conversation sampler); each slot's conversation state (TTT fast weights and attention KV
memory) is carried from step to step, detached (truncated backpropagation through time), and
reset when the slot starts a new conversation. TTT modules train in float32 inside a bf16
model. Copy this file to customise it; the reusable parts live in ``components/``.

Order: ``__init__`` validates the config, ``setup`` builds model -> optimizer -> data ->
scheduler -> monitoring -> checkpoints (resuming if asked), ``train`` is the loop,
``save_checkpoint`` writes ``<output_dir>/step_<N>``, ``cleanup`` closes loggers.
"""

import contextlib
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchtune import config
from tqdm import tqdm

from components.checkpoint import load_llama_omni, save_llama_omni
from components.data.dataset import ConversationDataset, collate
from components.data.sampler import StatefulConversationSampler
from components.models import convert_to_ttt, converted_settings
from components.monitor import (
    MetricsLogger, NonFinite, NonFiniteError, TTTMonitor, check_loss, check_parameters, check_states,
)
from components.training import FP32Guard, cast_for_training, param_groups, parallelize
from components.training.checkpointing import TrainingCheckpointer, state_from_dict, state_to_dict
from components.training.config_schema import Component, ConfigError, Nullable, OneOf, validate_config
from components.training.distributed import all_reduce, init_distributed, is_distributed
from components.training.trainable import PARTS, set_trainable

# Every key this recipe reads; anything else in a config is refused before work starts.
SCHEMA = {
    "output_dir": str,
    "seed": int,
    "device": OneOf("cpu", "cuda"),
    "dtype": OneOf("bf16", "fp32"),
    "model": {
        "checkpoint_dir": Nullable(str),  # a Llama-Omni checkpoint, or null to build `builder` afresh
        "builder": Nullable(Component()),
        "attention_window": Nullable(int),
        "memory_len": int,
    },
    "ttt": {
        "layers": list,
        "ttt_type": OneOf("linear", "mlp"),
        "mode": OneOf("replace", "parallel"),
        "mini_batch_size": int,
        "base_lr": Nullable(float),
        "gate_init": float,
        "init_from_attention": bool,
        "checkpoint_group_size": int,
    },
    "train": list,
    "tokenizer": Component(),
    "dataset": {"sources": list, "trim_speech": bool, "on_bad_record": OneOf("raise", "skip")},
    "shuffle": bool,
    "window": int,
    "batch_slots": int,
    "epochs": int,
    "max_steps": int,
    "gradient_accumulation_steps": int,
    "clip_grad_norm": Nullable(float),
    "loss_chunk_size": int,
    "ctc_weight": float,
    "optimizer": Component(passed=("params",), required=("lr", "weight_decay")),
    "ttt_param_group": {"lr": float, "weight_decay": float},
    "lr_scheduler": Component(passed=("optimizer", "num_training_steps")),
    "parallelism": {"fsdp": bool, "reshard_after_forward": bool, "cpu_offload": bool},
    "activation_checkpointing": (int, OneOf("none", "full")),
    "monitor": {"log_every_n_steps": int, "on_nonfinite": OneOf("raise", "skip")},
    "metric_logger": Component(),
    "checkpoint": {"save_every_n_steps": int, "keep_last_n": int},
    "resume": str,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Accumulated(NamedTuple):
    """What the windows of one optimizer step left, on this rank."""

    loss_sum: float  # summed cross-entropy
    ctc_sum: float  # summed CTC loss of the unit targets
    target_tokens: int
    units: int  # target speech units
    tokens: int  # real tokens read
    problems: List[NonFinite]  # findings in states and losses
    conversation_ids: list  # of every row of every window
    last_ids: list  # of the rows of the last window: the conversations whose state is carried on
    learned: float  # target tokens + units of all ranks


def check_options(cfg: DictConfig) -> None:
    """Option combinations the schema cannot express, refused by key before any work."""
    validate_config(cfg, SCHEMA)
    if (cfg.model.checkpoint_dir is None) == (cfg.model.builder is None):
        raise ConfigError("set exactly one of model.checkpoint_dir (a Llama-Omni checkpoint) and model.builder")
    if not cfg.ttt.layers or not all(isinstance(i, int) and i >= 0 for i in cfg.ttt.layers):
        raise ConfigError(f"ttt.layers={list(cfg.ttt.layers)} must name decoder layers to convert (e.g. [24, ..., 31])")
    at_least = {"window": 1, "batch_slots": 1, "epochs": 1, "max_steps": 1, "gradient_accumulation_steps": 1,
                "loss_chunk_size": 1, "ttt.mini_batch_size": 1, "ttt.checkpoint_group_size": 0, "model.memory_len": 0,
                "monitor.log_every_n_steps": 1, "checkpoint.save_every_n_steps": 1, "checkpoint.keep_last_n": 1}
    if cfg.model.attention_window is not None:
        at_least["model.attention_window"] = 1
    for key, least in at_least.items():
        if OmegaConf.select(cfg, key) < least:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be >= {least}")
    K = cfg.ttt.mini_batch_size
    if cfg.window % K != 0:
        raise ConfigError(f"window={cfg.window} must be a positive multiple of ttt.mini_batch_size={K}: "
                          "a window that is not full would leave padding inside a carried conversation")
    if cfg.model.attention_window is not None and cfg.model.memory_len < cfg.model.attention_window - 1:
        raise ConfigError(f"model.memory_len={cfg.model.memory_len} < model.attention_window - 1: "
                          "tokens at the start of each window would see less than the window")
    unknown = [part for part in cfg.train if part not in PARTS]
    if unknown:
        raise ConfigError(f"train: unknown parts {unknown}; choose among {list(PARTS)}")
    if cfg.ctc_weight < 0:
        raise ConfigError(f"ctc_weight={cfg.ctc_weight} must be >= 0")
    if "speech_generator" in cfg.train and cfg.ctc_weight == 0:
        raise ConfigError("train: speech_generator learns only from the CTC loss; set ctc_weight > 0 "
                          "(and give the assistant turns unit targets) or leave it out of train")
    if cfg.parallelism.cpu_offload and cfg.device != "cuda":
        raise ConfigError("parallelism.cpu_offload=true needs device=cuda (the parameters are on the CPU already)")


class TTTFinetuneRecipeDistributed:
    """See the module docstring. Args: cfg: the parsed config (see configs/)."""

    def __init__(self, cfg: DictConfig):
        check_options(cfg)
        if cfg.resume not in ("auto", "none") and not (Path(cfg.resume) / "meta.json").exists():
            raise ConfigError(f"resume={cfg.resume!r}: expected 'auto', 'none' or a complete step_<N> folder")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no GPU is visible")
        self.cfg = cfg
        self.rank, self.world_size = init_distributed(cfg.device)
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self.output_dir = Path(cfg.output_dir)
        self.step = 0  # optimizer steps done
        self.skipped_steps = 0
        self.carried = None  # the slots' OmniState, detached; None before the first step
        self.pending_reset: Dict[int, str] = {}  # slot -> conversation to start afresh (policy `skip`)
        self.last_saved = -1  # step of the last checkpoint this run wrote or loaded
        self.metrics = None  # made in setup
        self.timers = dict(step=0.0, state_check=0.0)  # seconds, per step
        self.checkpointer = TrainingCheckpointer(self.output_dir, cfg.checkpoint.keep_last_n, self.rank,
                                                 self.world_size)
        self.resume_from = self._resume_point()

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = self._setup_model()
        self.guard = FP32Guard(self.model)
        groups = param_groups(self.model, cfg.optimizer.lr, cfg.optimizer.weight_decay,
                              cfg.ttt_param_group.lr, cfg.ttt_param_group.weight_decay)
        self.optimizer = config.instantiate(cfg.optimizer, groups)
        self.trainable = [p for g in groups for p in g["params"]]

        tokenizer = config.instantiate(cfg.tokenizer)
        self.dataset = ConversationDataset(list(cfg.dataset.sources), tokenizer, cfg.dataset.trim_speech,
                                           cfg.dataset.on_bad_record)
        if self.dataset.report.skipped:
            self.log(f"skipped {len(self.dataset.report.skipped)} bad records: {self.dataset.report.skipped}")
        if len(self.dataset) == 0:
            raise ValueError(f"dataset.sources {list(cfg.dataset.sources)} hold no usable conversation")
        if cfg.ctc_weight > 0:
            self._check_units()
        self.sampler = StatefulConversationSampler(self.dataset.lengths, cfg.window, cfg.batch_slots, self.rank,
                                                   self.world_size, cfg.seed, cfg.shuffle)
        self._steps = None  # iterator over the sampler's current epoch
        self.lr_scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer, num_training_steps=cfg.max_steps)

        self.monitor = TTTMonitor(self.model)
        self.metrics = MetricsLogger(self.output_dir, config.instantiate(cfg.metric_logger), rank=self.rank)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    def _resume_point(self) -> Optional[Path]:
        """The checkpoint to resume from (``resume: auto``: the newest in output_dir), decided before
        any work. A run that would save next to newer checkpoints of another trajectory
        (``none``, or an older step) is refused: ``auto`` would pick those up later."""
        latest, resume = self.checkpointer.latest(), self.cfg.resume
        resume_from = latest if resume == "auto" else None if resume == "none" else Path(resume)
        start = 0 if resume_from is None else self.checkpointer.step_of(resume_from)
        if latest is not None and self.checkpointer.step_of(latest) > start:
            raise ConfigError(f"resume={resume!r} starts at step {start} but output_dir holds {latest.name}; "
                              "use resume=auto, move those checkpoints away, or choose another output_dir")
        return resume_from

    def _check_units(self) -> None:
        """Unit targets must be ids of the speech generator's vocabulary (its blank is the next id)."""
        vocab = self.model.speech_generator.unit_vocab_size
        for stream in self.dataset.streams:
            for span in stream.unit_spans:
                bad = [u for u in span.units if not 0 <= u < vocab]
                if bad:
                    raise ValueError(f"conversation {stream.id}: unit targets {bad[:5]} are outside the speech "
                                     f"generator's units 0..{vocab - 1}")

    def _setup_model(self):
        cfg = self.cfg
        if cfg.model.checkpoint_dir is not None:
            model = load_llama_omni(cfg.model.checkpoint_dir)
        else:
            model = config.instantiate(cfg.model.builder)
        positions = cfg.window + cfg.model.memory_len  # attention positions count from the memory's start
        if positions > model.config["max_seq_len"]:
            raise ConfigError(f"window + model.memory_len = {positions} exceeds the model's max_seq_len "
                              f"({model.config['max_seq_len']}, the length of its RoPE tables)")
        model.decoder.set_attention_window(cfg.model.attention_window, cfg.model.memory_len)
        self._convert(model)
        counts = set_trainable(model, cfg.train)
        self.log(f"trainable parameters: {counts}")
        cast_for_training(model, self.dtype).to(self.device)
        fsdp = cfg.parallelism.fsdp and is_distributed()
        if cfg.parallelism.fsdp and not fsdp:
            self.log("parallelism.fsdp: one process, nothing to shard; running unsharded")
        if not cfg.parallelism.fsdp and self.world_size > 1:
            raise ConfigError("parallelism.fsdp=false with several processes: data parallelism here is FSDP2")
        return parallelize(model, cfg.activation_checkpointing, fsdp=fsdp, param_dtype=self.dtype,
                           reshard_after_forward=cfg.parallelism.reshard_after_forward,
                           cpu_offload=cfg.parallelism.cpu_offload)

    def _convert(self, model) -> None:
        """Converts ``ttt.layers``; layers a checkpoint converted already must match the config."""
        ttt, n = self.cfg.ttt, len(model.decoder.layers)
        if len(set(ttt.layers)) != len(ttt.layers) or max(ttt.layers) >= n:
            raise ConfigError(f"ttt.layers={list(ttt.layers)} must be distinct decoder layers of 0..{n - 1}")
        wanted = dict(ttt_type=ttt.ttt_type, mode=ttt.mode, mini_batch_size=ttt.mini_batch_size)
        if ttt.base_lr is not None:
            wanted["base_lr"] = ttt.base_lr
        for i, found in converted_settings(model).items():
            if i not in ttt.layers:
                raise ConfigError(f"model.checkpoint_dir has a TTT layer {i} that "
                                  f"ttt.layers={list(ttt.layers)} does not list")
            for key, value in wanted.items():
                if found[key] != value:
                    raise ConfigError(f"model.checkpoint_dir's layer {i} is a TTT layer with {key}={found[key]!r}, "
                                      f"but ttt.{key}={value!r}")
            model.decoder.layers[i].ttt.checkpoint_group_size = ttt.checkpoint_group_size  # a run-time knob
        todo = [i for i in ttt.layers if model.decoder.layers[i].ttt is None]
        if todo:
            convert_to_ttt(model, todo, ttt_type=ttt.ttt_type, mode=ttt.mode, mini_batch_size=ttt.mini_batch_size,
                           gate_init=ttt.gate_init, init_from_attention=ttt.init_from_attention,
                           base_lr=ttt.base_lr, checkpoint_group_size=ttt.checkpoint_group_size)

    # ----------------------------------------------------------------------------- train
    def _next_step(self):
        """The sampler's next step (one window or nothing per slot), or None when epochs are done."""
        while self.sampler.epoch < self.cfg.epochs:
            if self._steps is None:
                self._steps = iter(self.sampler)
            step = next(self._steps, None)
            if step is not None:
                return step
            self._steps = None
        return None

    def _on_device(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.to(self.device)

    def _forward_backward(self, batch, capture: bool, scale: Tuple[float, float]):
        """One window per slot: forward with the carried state, backward of the weighted loss.

        Args:
            batch: the collated window of every slot.
            capture: collect the TTT statistics of this forward (a logging step).
            scale: ``(per target token, per unit)`` factors that make the sum over all windows
                and ranks of this step the mean cross-entropy plus ``ctc_weight`` x the mean CTC loss.

        Returns:
            ``(summed cross-entropy, summed CTC loss, a NonFinite finding or None)``.
        """
        ids = batch.conversation_ids
        blamed = [cid is not None and self.pending_reset.get(slot) == cid for slot, cid in enumerate(ids)]
        reset = (batch.reset | torch.tensor(blamed)).to(self.device)
        self.pending_reset = {}
        on = self._on_device
        with self.monitor.capture() if capture else contextlib.nullcontext():
            out = self.model(on(batch.tokens), on(batch.speech), state=self.carried, mask=on(batch.mask),
                             speech_lengths=on(batch.speech_lengths), speech_starts=on(batch.speech_starts),
                             reset=reset, targets=on(batch.targets), loss_chunk_size=self.cfg.loss_chunk_size,
                             units=on(batch.units) if self.cfg.ctc_weight > 0 else None,
                             unit_turns=on(batch.unit_turns), ctc_reduction="sum")
        tic = time.perf_counter()
        step_number = self.step + 1  # the optimizer step being computed, as in the metrics
        found = check_states(out.state, step_number, ids) or check_loss(out.token_loss, step_number, ids)
        if found is None and out.ctc_loss is not None and not torch.isfinite(out.ctc_loss):
            rows = sorted(set(batch.unit_turns[:, 0].tolist()))
            found = NonFinite("loss", "ctc_loss", step_number, rows, [ids[r] for r in rows])
        self.carried = out.state.detach()
        self.timers["state_check"] += time.perf_counter() - tic
        loss_sum = out.token_loss.sum()
        ctc_sum = out.ctc_loss if out.ctc_loss is not None else loss_sum.new_zeros(())
        (loss_sum * scale[0] + ctc_sum * scale[1]).backward()
        return loss_sum.item(), ctc_sum.item(), found

    def _accumulate(self, capture: bool) -> Optional[Accumulated]:
        """Up to ``gradient_accumulation_steps`` windows per slot; None when the epochs are done."""
        steps = []
        while len(steps) < self.cfg.gradient_accumulation_steps:
            step = self._next_step()
            if step is None:
                break
            steps.append(step)
        if not steps:
            return None
        batches = [collate(step, self.dataset, self.cfg.window, pad_multiple=self.cfg.ttt.mini_batch_size)
                   for step in steps]
        targets = sum(int((b.targets != -100).sum()) for b in batches)
        units = 0
        if self.cfg.ctc_weight > 0:
            units = sum(0 if b.units is None else int((b.units != -100).sum()) for b in batches)
        # Normalisers over all ranks, known before any backward: FSDP averages gradients over
        # ranks, so each rank's share is multiplied by the world size.
        totals = all_reduce(torch.tensor([float(targets), float(units)], device=self.device)).tolist()
        scale = (self.world_size / max(totals[0], 1.0), self.cfg.ctc_weight * self.world_size / max(totals[1], 1.0))
        loss_sum = ctc_sum = 0.0
        problems, ids = [], []
        for micro, batch in enumerate(batches):
            loss, ctc, found = self._forward_backward(batch, capture=capture and micro == 0, scale=scale)
            loss_sum, ctc_sum, ids = loss_sum + loss, ctc_sum + ctc, ids + batch.conversation_ids
            problems += [found] if found is not None else []
        read = sum(int(b.mask.sum()) for b in batches)
        return Accumulated(loss_sum, ctc_sum, targets, units, read, problems, ids, batches[-1].conversation_ids,
                           totals[0] + totals[1])

    def train(self) -> None:
        cfg = self.cfg
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True)
        while self.step < cfg.max_steps:
            self.timers = dict(step=time.perf_counter(), state_check=0.0)
            logging = (self.step + 1) % cfg.monitor.log_every_n_steps == 0
            done = self._accumulate(capture=logging)
            if done is None:
                break  # every rank runs the same number of steps, so all stop here together
            ttt_metrics = self.monitor.metrics() if logging else {}
            stepped, grad_norm = self._optimizer_step(done)
            self.step += 1
            saving = self.step % cfg.checkpoint.save_every_n_steps == 0
            if logging or saving:
                self._check_parameters(done.conversation_ids)
            totals = all_reduce(torch.tensor([done.loss_sum, done.target_tokens, done.tokens, done.ctc_sum, done.units],
                                             dtype=torch.float64, device=self.device)).cpu().tolist()
            elapsed = time.perf_counter() - self.timers["step"]
            loss, tokens_per_second = totals[0] / max(totals[1], 1.0), totals[2] / elapsed
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
            if logging:
                self.metrics.log(self.step, {
                    "loss": loss, "grad_norm": grad_norm, "optimizer_stepped": float(stepped),
                    **{f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups},
                    "tokens": totals[2], "target_tokens": totals[1], "tokens_per_second": tokens_per_second,
                    "skipped_steps": self.skipped_steps, "data/skipped_records": len(self.dataset.report.skipped),
                    "ctc_loss": totals[3] / max(totals[4], 1.0), "units": totals[4],
                    "time/step_s": elapsed, "time/state_check_s": self.timers["state_check"], **ttt_metrics,
                })
            if saving:
                self.save_checkpoint()
        progress.close()
        if self.last_saved != self.step:
            self._check_parameters([])
            self.save_checkpoint()
        self.save_final_model()

    def _optimizer_step(self, done: Accumulated) -> tuple:
        """Checks the gradients (already the mean over all targets), steps or skips.

        The schedule follows the step count: it advances on skipped steps too.
        Returns ``(stepped, grad_norm)``.
        """
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        bad_grads = not torch.isfinite(grad_norm).item()  # the same on every rank: the norm is global
        # A rank that blamed conversations poisons every rank's gradients through the reduction:
        # the others must not blame their own rows for it.
        blamed = all_reduce(torch.tensor([float(bool(done.problems))], device=self.device)).item() > 0
        problems = list(done.problems)
        if bad_grads and not blamed:
            found = check_parameters(self.model, self.step + 1, done.conversation_ids, grads=True)
            if found is not None:
                problems.append(found)
        stepped = False
        if blamed or bad_grads:
            self._on_nonfinite(problems, done.last_ids)
        elif done.learned > 0:  # a step without targets has nothing to learn from
            self.guard.check(self.step + 1)
            self.optimizer.step()
            stepped = True
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped, grad_norm.item()

    def _check_parameters(self, conversation_ids: list) -> None:
        """Non-finite parameters cannot be skipped: stop under either policy (all ranks together)."""
        found = check_parameters(self.model, self.step, conversation_ids)
        if all_reduce(torch.tensor([float(found is not None)], device=self.device)).item() > 0:
            if found is not None:
                raise NonFiniteError(found)
            raise RuntimeError(f"another rank found non-finite parameters after step {self.step}; see its error")

    def _on_nonfinite(self, problems: List[NonFinite], last_ids: list) -> None:
        """``raise``: stop naming the first finding. ``skip``: count the step and start afresh the
        conversations blamed here (every slot's, when only gradients went non-finite), if they
        are still in their slot at the next step."""
        if self.cfg.monitor.on_nonfinite == "raise":
            if problems:
                raise NonFiniteError(problems[0])
            raise RuntimeError(f"another rank found non-finite values at step {self.step + 1}; see its error")
        self.skipped_steps += 1
        slots = self.cfg.batch_slots
        blamed = {(r % slots, cid) for found in problems if found.what != "gradient"
                  for r, cid in zip(found.rows, found.conversation_ids)}
        if any(found.what == "gradient" for found in problems):
            blamed |= set(enumerate(last_ids))
        self.pending_reset = {slot: cid for slot, cid in blamed if cid is not None}
        self.log(f"skipped step {self.step + 1} ({'; '.join(map(str, problems)) or 'found on another rank'}); "
                 f"starting afresh: {self.pending_reset}")

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        trainer = dict(step=self.step, scheduler=self.lr_scheduler.state_dict(), skipped_steps=self.skipped_steps)
        own = dict(sampler=self.sampler.state_dict(), states=state_to_dict(self.carried),
                   pending_reset=self.pending_reset)
        path = self.checkpointer.save(self.step, self.model, self.optimizer, trainer, own)
        self.last_saved = self.step
        self.log(f"saved {path}")

    def _load_checkpoint(self, path: Path) -> None:
        trainer, own = self.checkpointer.load(path, self.model, self.optimizer)
        self.step, self.skipped_steps = trainer["step"], trainer["skipped_steps"]
        self.lr_scheduler.load_state_dict(trainer["scheduler"])
        self.sampler.load_state_dict(own["sampler"])
        self.carried = state_from_dict(own["states"], self.device)
        self.pending_reset = own["pending_reset"]
        self.last_saved = self.step
        self.log(f"resumed from {path} at step {self.step}")

    def save_final_model(self) -> None:
        """The trained model in the Llama-Omni layout (TTT tensors float32) at ``<output_dir>/model``."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # a collective under FSDP; rank 0 gets it all
        if self.rank == 0:
            save_llama_omni(self.model, self.output_dir / "model", state_dict=state)
            self.log(f"saved the model in the Llama-Omni layout to {self.output_dir / 'model'}")

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if is_distributed():
            torch.distributed.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = TTTFinetuneRecipeDistributed(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
