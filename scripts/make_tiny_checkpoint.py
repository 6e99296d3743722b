"""Writes a tiny random Llama-Omni checkpoint in the real layout, for tests and the quickstart.

    python scripts/make_tiny_checkpoint.py OUTPUT_DIR [--seed 0] [--dtype bfloat16]

The model is ``llama_omni_tiny()`` (a few layers at width 128, the real interfaces). The
tokenizer for tiny runs comes with the data pipeline (issue 4) and is not written yet.
"""

import argparse

import torch

from components.checkpoint import save_llama_omni
from components.models import llama_omni_tiny


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--max-shard-mb", type=float, default=2.0, help="small, so that the tiny model has several shards")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = llama_omni_tiny().to(getattr(torch, args.dtype))
    save_llama_omni(model, args.output_dir, max_shard_bytes=int(args.max_shard_mb * 2**20))
    print(f"wrote a tiny Llama-Omni ({sum(p.numel() for p in model.parameters()):,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    main()
