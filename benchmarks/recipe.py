"""The training recipe's own costs on the tiny model: throughput, monitoring, state carrying, memory.

    python -m benchmarks.recipe [--json] [--threads 2] [--windows 8192 16384 32768 65536]

1. Step (quickstart config: tiny model, bundled speech conversations, 2 slots x 256 tokens):
   tokens/s of a whole training step (forward + backward + optimizer); the time of the
   monitor's own work on a logged step (its forward hooks on the TTT layers and gates, then
   gathering the metrics) as a share of a step, per logged step and at the quickstart's
   interval (``monitor.log_every_n_steps``); the time to detach and check the carried
   conversation states, as a share of a step. Best of ``--repeats`` on the same batch, all
   in one process.
2. Memory: for each window size, a fresh process trains two steps (a fresh state, then a
   carried one) of one long text conversation with activation checkpointing and 2048-token
   attention windows; the peak RSS during training above the RSS before it (sampled every
   2 ms). Linear growth means the ratio per doubling of the window stays <= 2.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.ttt_layer import rss_bytes

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "conversations.json"


def _config(output_dir: str, *overrides: str):
    cfg = OmegaConf.load(ROOT / "configs" / "quickstart.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"output_dir={output_dir}", f"dataset.sources=[{SAMPLE}]",
                                                        *overrides]))


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _timed(fn, spent: list):
    """``fn`` that appends the seconds of each call to ``spent``."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return result
    return timed


def step_worker(repeats: int) -> dict:
    from components.data.dataset import collate
    from recipes.ttt_finetune_distributed import Accumulated, TTTFinetuneRecipeDistributed

    with tempfile.TemporaryDirectory() as tmp:
        recipe = TTTFinetuneRecipeDistributed(_config(tmp, "resume=none"))
        recipe.setup()
        step = recipe._next_step()
        while sum(s is not None for s in step) < len(step):  # a step with every slot reading
            step = recipe._next_step()
        batch = collate(step, recipe.dataset, recipe.cfg.window, pad_multiple=recipe.cfg.ttt.mini_batch_size)
        tokens, targets = int(batch.mask.sum()), int((batch.targets != -100).sum())
        scale = (1.0 / max(targets, 1), 0.0)

        def train_step():
            loss, ctc, _ = recipe._forward_backward(batch, capture=False, scale=scale)
            ids = batch.conversation_ids
            recipe._optimizer_step(Accumulated(loss, ctc, targets, 0, tokens, [], ids, ids, float(targets)))

        # The monitor's own work, timed where it happens (its forward hooks, then metrics()):
        # a difference of two whole-step timings would drown in the machine's noise.
        spent = []
        for name in ("_on_ttt", "_on_gate"):
            setattr(recipe.monitor, name, _timed(getattr(recipe.monitor, name), spent))

        def monitoring():
            spent.clear()
            recipe._forward_backward(batch, capture=True, scale=scale)
            start = time.perf_counter()
            recipe.monitor.metrics()
            return sum(spent) + time.perf_counter() - start

        train_step()  # warm-up
        step_s = _best(train_step, repeats)
        monitor_s = min(monitoring() for _ in range(repeats))
        recipe.timers["state_check"] = 0.0
        recipe._forward_backward(batch, capture=False, scale=scale)
        state_s = recipe.timers["state_check"]
        recipe.cleanup()
    monitor_share = monitor_s / step_s
    interval = recipe.cfg.monitor.log_every_n_steps
    return dict(tokens_per_step=tokens, step_s=step_s, tokens_per_s=tokens / step_s,
                monitor_share_per_logged_step=monitor_share, log_every_n_steps=interval,
                monitor_share_at_interval=monitor_share / interval, state_share=state_s / step_s)


def memory_worker(window: int, conversations: str) -> dict:
    from recipes.ttt_finetune_distributed import TTTFinetuneRecipeDistributed

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(tmp, f"dataset.sources=[{conversations}]", f"window={window}", "batch_slots=1", "max_steps=2",
                      "model.attention_window=2048", "model.memory_len=2048", "activation_checkpointing=full",
                      "ttt.checkpoint_group_size=16", "monitor.log_every_n_steps=1000", "resume=none",
                      "checkpoint.save_every_n_steps=1000")
        recipe = TTTFinetuneRecipeDistributed(cfg)
        recipe.setup()
        recipe.save_checkpoint = recipe.save_final_model = lambda: None  # measure training only
        before, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        recipe.train()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        recipe.cleanup()
    return dict(window=window, peak_above_start_mib=(peak[0] - before) / 2**20, seconds_two_steps=seconds)


def _spawn(args: list) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.recipe", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _long_conversation(path: Path, tokens: int) -> None:
    """One text-only memory conversation of at least ``tokens`` tokens (tiny tokenizer)."""
    from components.data.dataset import ConversationDataset
    from components.data.synthetic import write_text_conversations
    from components.data.tiny_tokenizer import tiny_chat_tokenizer

    write_text_conversations(path, count=1, small_talk_turns=tokens // 20)
    length = ConversationDataset([path], tiny_chat_tokenizer()).lengths[0]
    if length < tokens:
        raise RuntimeError(f"the synthetic conversation has {length} tokens, fewer than {tokens}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--conversations", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.step_worker:
        print(json.dumps(step_worker(args.repeats)))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.conversations)))
        return

    common = ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    result = dict(threads=args.threads, step=_spawn(["--step-worker", *common]), memory=[])
    with tempfile.TemporaryDirectory() as tmp:
        conversations = Path(tmp) / "long.json"
        _long_conversation(conversations, 2 * max(args.windows))
        for window in args.windows:
            result["memory"].append(_spawn(["--memory-worker", str(window), "--conversations", str(conversations), *common]))
    rows = result["memory"]
    for smaller, larger in zip(rows, rows[1:]):
        larger["growth_vs_previous"] = larger["peak_above_start_mib"] / max(smaller["peak_above_start_mib"], 1e-9)
        larger["window_ratio"] = larger["window"] / smaller["window"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    s = result["step"]
    print(f"step: {s['tokens_per_step']} tokens in {s['step_s'] * 1000:.1f} ms = {s['tokens_per_s']:.0f} tokens/s "
          f"({args.threads} threads)")
    print(f"monitoring: {100 * s['monitor_share_per_logged_step']:.2f}% of a step when logged, "
          f"{100 * s['monitor_share_at_interval']:.2f}% at log_every_n_steps={s['log_every_n_steps']}")
    print(f"state carrying (detach + non-finite check): {100 * s['state_share']:.2f}% of a step")
    for row in rows:
        growth = f", x{row['growth_vs_previous']:.2f} for x{row['window_ratio']:.0f} tokens" if "growth_vs_previous" in row else ""
        print(f"window {row['window']:>6}: peak {row['peak_above_start_mib']:.0f} MiB above start{growth} "
              f"({row['seconds_two_steps']:.1f} s for two steps)")


if __name__ == "__main__":
    main()
