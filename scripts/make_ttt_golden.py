"""Writes golden fixtures for the TTT layers from the reference implementation.

The reference (test-time-training/ttt-lm-pytorch, one file, ttt.py) is not part of this
repository. Get its source, then run, from the repository root:

    python scripts/make_ttt_golden.py --reference /path/to/ttt.py

For each case it builds the reference TTTLinear / TTTMLP (Transformer backbone: no conv,
no shared Q/K), moves every parameter off its initial value, runs a batch whose length is
not a multiple of the mini-batch, and stores, in one safetensors file per case: the
parameters (``param.<name>``), the input, the output, the weights of a scalar loss
(``loss_weight``) and the gradients of that loss w.r.t. the input and every parameter
(``grad.input``, ``grad.<name>``). tests/components/ttt/test_golden.py loads them into
our layers.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CASES = {
    "linear": dict(ttt_layer_type="linear", use_gate=False, ttt_base_lr=1.0),
    "linear_gate": dict(ttt_layer_type="linear", use_gate=True, ttt_base_lr=1.0),
    "mlp": dict(ttt_layer_type="mlp", use_gate=False, ttt_base_lr=0.1),
    "mlp_gate": dict(ttt_layer_type="mlp", use_gate=True, ttt_base_lr=0.1),
}
SHAPE = dict(hidden_size=64, num_attention_heads=4, mini_batch_size=16, batch=2, seq_len=40, rope_theta=10000.0)


def _load_reference(path: Path):
    spec = importlib.util.spec_from_file_location("ttt_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_case(ref, name: str, settings: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    config = ref.TTTConfig(
        hidden_size=SHAPE["hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"],
        mini_batch_size=SHAPE["mini_batch_size"],
        rope_theta=SHAPE["rope_theta"],
        share_qk=False,
        pre_conv=False,
        **settings,
    )
    layer = (ref.TTTLinear if settings["ttt_layer_type"] == "linear" else ref.TTTMLP)(config, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.05 * torch.randn_like(param))
    B, T = SHAPE["batch"], SHAPE["seq_len"]
    x = torch.randn(B, T, SHAPE["hidden_size"], requires_grad=True)
    y = layer(x, position_ids=torch.arange(T).unsqueeze(0).expand(B, T))
    loss_weight = torch.randn_like(y)
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad((y * loss_weight).sum(), [x] + list(layer.parameters()))
    tensors = {f"param.{n}": p.detach() for n, p in layer.named_parameters()}
    tensors.update({"input": x.detach(), "output": y.detach(), "loss_weight": loss_weight})
    tensors["grad.input"] = grads[0]
    tensors.update({f"grad.{n}": g for n, g in zip(names, grads[1:])})
    return {k: v.contiguous() for k, v in tensors.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="path to ttt-lm-pytorch's ttt.py")
    parser.add_argument("--out", type=Path, default=Path("tests/components/ttt/golden"))
    args = parser.parse_args()
    ref = _load_reference(args.reference)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, (name, settings) in enumerate(CASES.items()):
        tensors = make_case(ref, name, settings, seed)
        metadata = {"case": name, "settings": json.dumps(settings), "shape": json.dumps(SHAPE)}
        save_file(tensors, args.out / f"{name}.safetensors", metadata=metadata)
        print(f"wrote {args.out / (name + '.safetensors')}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
