"""Speed and memory of the TTT layers against a causal attention layer of the same width.

    python -m benchmarks.ttt_layer                  # table
    python -m benchmarks.ttt_layer --json           # one JSON object
    python -m benchmarks.ttt_layer --reference /path/to/ttt-lm-pytorch/ttt.py

Every measurement runs in its own subprocess (so that peak memory is that run's own) with
the same thread count. Shapes: batch 1, D=512, H=8 (head dim 64), mini-batch K=64, float32.
For each layer and length T: forward (no grad) and forward+backward tokens/s, achieved
GFLOP/s and its share of the machine's float32 matmul rate measured at the start of the
same run, and the peak resident memory of forward+backward above what the process held
before it (layer and input included in the baseline).

FLOPs per token (forward; backward counted as 2x forward), from shared/reference/ttt.md:
    projections q,k,v,o      8 D^2
    TTT-Linear inner loop    H (6 f^2 + 6 K f)
    TTT-MLP inner loop       H (56 f^2 + 30 K f)
    causal attention core    2 T D   (QK^T and PV, half of the square)

With --reference, the reference implementation (ttt-lm-pytorch, not in this repository) is
timed side by side with ours on the same shapes and weights, without checkpointing.
"""

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from components.ttt import TTTLinear, TTTMLP

D, H, K = 512, 8, 64
HEAD = D // H
TTT_LENGTHS = [1024, 4096, 16384, 65536]
ATTENTION_LENGTHS = [1024, 4096, 16384]


def _flops_per_token(kind: str, T: int) -> float:
    projections = 8 * D * D
    inner = {
        "TTTLinear": H * (6 * HEAD**2 + 6 * K * HEAD),
        "TTTMLP": H * (56 * HEAD**2 + 30 * K * HEAD),
        "reference:TTTLinear": H * (6 * HEAD**2 + 6 * K * HEAD),
        "reference:TTTMLP": H * (56 * HEAD**2 + 30 * K * HEAD),
        "attention": 2 * T * D,
    }[kind]
    return projections + inner


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CausalAttention(nn.Module):
    """q/k/v/o projections around torch's fused causal SDPA: the attention peer."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        # [B,T,D] -> [B,H,T,f]
        q, k, v = (p(x).view(B, T, H, HEAD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B,H,T,f]
        return (self.o_proj(y.transpose(1, 2).reshape(B, T, D)),)


def _build(kind: str, T: int, group: int, reference_path: str):
    torch.manual_seed(0)
    if kind == "attention":
        return CausalAttention(), lambda layer, x: layer(x)[0]
    ours = {"TTTLinear": TTTLinear, "TTTMLP": TTTMLP}
    if kind in ours:
        layer = ours[kind](D, H, mini_batch_size=K, checkpoint_group_size=group)
        return layer, lambda layer, x: layer(x)[0]
    spec = importlib.util.spec_from_file_location("ttt_reference", reference_path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    ttt_type = "linear" if kind.endswith("Linear") else "mlp"
    config = ref.TTTConfig(hidden_size=D, num_attention_heads=H, mini_batch_size=K, ttt_layer_type=ttt_type)
    layer = (ref.TTTLinear if ttt_type == "linear" else ref.TTTMLP)(config, layer_idx=0)
    positions = torch.arange(T).unsqueeze(0)
    return layer, lambda layer, x: layer(x, position_ids=positions)


def worker(kind: str, T: int, group: int, repeats: int, reference_path: str) -> dict:
    """Measures one (layer, T) in this process; prints one JSON line."""
    layer, run = _build(kind, T, group, reference_path)
    x = torch.randn(1, T, D, requires_grad=True)
    # Memory first, on a fresh process: the high-water mark of one forward+backward.
    baseline = rss_bytes()
    start = time.perf_counter()
    run(layer, x).sum().backward()
    first_step = time.perf_counter() - start
    peak = _peak_rss_bytes() - baseline

    def best_of(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def forward():
        with torch.no_grad():
            run(layer, x)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        run(layer, x).sum().backward()

    forward()
    fwd = best_of(forward)
    fwd_bwd = min(first_step, best_of(forward_backward))
    flops = _flops_per_token(kind, T) * T
    return dict(
        layer=kind, T=T, checkpoint_group_size=group if kind in ("TTTLinear", "TTTMLP") else None,
        fwd_s=fwd, fwd_bwd_s=fwd_bwd,
        fwd_tokens_per_s=T / fwd, fwd_bwd_tokens_per_s=T / fwd_bwd,
        fwd_gflops=flops / fwd / 1e9, fwd_bwd_gflops=3 * flops / fwd_bwd / 1e9,
        peak_fwd_bwd_bytes=peak,
    )


def matmul_rate(threads: int) -> float:
    """float32 GFLOP/s of a 2048^3 matmul on this machine, now."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def _spawn(kind, T, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.ttt_layer", "--worker", kind, str(T), "--threads", str(args.threads)]
    cmd += ["--checkpoint-group-size", str(args.checkpoint_group_size if kind in ("TTTLinear", "TTTMLP") else 0)]
    cmd += ["--repeats", str(args.repeats if T <= 16384 else 2)]
    if args.reference:
        cmd += ["--reference", args.reference]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} T={T} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reference_rows(args) -> list:
    """Ours and the reference at T=4096, same weights' shapes, no checkpointing."""
    rows = []
    saved = args.checkpoint_group_size
    args.checkpoint_group_size = 0
    for kind in ("TTTLinear", "TTTMLP"):
        ours = _spawn(kind, 4096, args)
        ref = _spawn(f"reference:{kind}", 4096, args)
        rows += [ours | {"versus": "reference"}, ref]
    args.checkpoint_group_size = saved
    return rows


def _summary(rows: list, rate: float) -> dict:
    def find(layer, T, versus=None):
        for r in rows:
            if r["layer"] == layer and r["T"] == T and r.get("versus") == versus:
                return r
        return None

    summary = {}
    for kind in ("TTTLinear", "TTTMLP"):
        at4k, at64k = find(kind, 4096), find(kind, 65536)
        if at4k and at64k:
            per_token = lambda r: r["fwd_bwd_s"] / r["T"]  # noqa: E731
            summary[f"{kind}_per_token_64k_over_4k"] = per_token(at64k) / per_token(at4k)
            summary[f"{kind}_peak_fwd_bwd_64k_GiB"] = at64k["peak_fwd_bwd_bytes"] / 2**30
        ref, ours = find(f"reference:{kind}", 4096), find(kind, 4096, "reference")
        if ref and ours:
            summary[f"{kind}_fwd_bwd_speedup_vs_reference_4k"] = ref["fwd_bwd_s"] / ours["fwd_bwd_s"]
    for T in ATTENTION_LENGTHS:
        ttt, att = find("TTTLinear", T), find("attention", T)
        if ttt and att:
            summary[f"TTTLinear_fwd_bwd_speedup_vs_attention_{T}"] = att["fwd_bwd_s"] / ttt["fwd_bwd_s"]
    summary["matmul_gflops"] = rate
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--checkpoint-group-size", type=int, default=16, help="for the TTT layers (0: off)")
    parser.add_argument("--lengths", type=int, nargs="*", default=TTT_LENGTHS)
    parser.add_argument("--reference", help="path to ttt-lm-pytorch's ttt.py, to time it side by side")
    parser.add_argument("--worker", nargs=2, metavar=("LAYER", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        kind, T = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(kind, T, args.checkpoint_group_size, args.repeats, args.reference)))
        return

    rate = matmul_rate(args.threads)
    rows = []
    for T in args.lengths:
        for kind in ("TTTLinear", "TTTMLP"):
            rows.append(_spawn(kind, T, args))
        if T in ATTENTION_LENGTHS:
            rows.append(_spawn("attention", T, args))
    if args.reference:
        rows += _reference_rows(args)
    for row in rows:
        row["fwd_bwd_share_of_matmul_rate"] = row["fwd_bwd_gflops"] / rate
    result = dict(threads=args.threads, shape=dict(D=D, H=H, K=K, batch=1, dtype="float32"), rows=rows)
    result["summary"] = _summary(rows, rate)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"float32 matmul: {rate:.0f} GFLOP/s on {args.threads} threads; D={D} H={H} K={K}, batch 1")
    header = f"{'layer':22} {'T':>6} {'ckpt':>4} {'fwd tok/s':>10} {'f+b tok/s':>10} {'f+b GFLOP/s':>11} {'%mm':>5} {'peak f+b':>9}"
    print(header)
    for r in rows:
        name = r["layer"] + (" (vs ref)" if r.get("versus") else "")
        ckpt = "-" if r["checkpoint_group_size"] is None else str(r["checkpoint_group_size"])
        print(
            f"{name:22} {r['T']:>6} {ckpt:>4} {r['fwd_tokens_per_s']:>10.0f} {r['fwd_bwd_tokens_per_s']:>10.0f} "
            f"{r['fwd_bwd_gflops']:>11.1f} {100 * r['fwd_bwd_share_of_matmul_rate']:>4.0f}% "
            f"{r['peak_fwd_bwd_bytes'] / 2**20:>7.0f}MB"
        )
    for key, value in result["summary"].items():
        print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
