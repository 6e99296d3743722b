"""Writes a tiny random Llama-Omni checkpoint in the real layout, for tests and the quickstart.

    python scripts/make_tiny_checkpoint.py OUTPUT_DIR [--seed 0] [--dtype bfloat16]

The model is ``llama_omni_tiny()`` (a few layers at width 128, the real interfaces); the
tokenizer is the tiny byte-level BPE of components/data/tiny_tokenizer.py (tokenizer.json,
the format of Llama-3.1's), with the same 512 ids as the model.
"""

import argparse

import torch

from components.checkpoint import save_llama_omni
from components.data.tiny_tokenizer import save_tiny_tokenizer
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
    save_tiny_tokenizer(args.output_dir, vocab_size=model.config["vocab_size"])
    print(f"wrote a tiny Llama-Omni ({sum(p.numel() for p in model.parameters()):,} parameters) and its tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
