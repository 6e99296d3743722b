"""Which parts of Llama-Omni train: chosen by name in the config, decided by module ownership."""

from typing import Dict, Iterable, List

from torch import nn

PARTS = ("ttt", "gates", "decoder", "projector", "speech_generator", "speech_encoder")


def _parts(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    ttt = [p for layer in model.decoder.layers if layer.ttt is not None for p in layer.ttt.parameters()]
    gates = [p for layer in model.decoder.layers if layer.ttt_gate is not None for p in layer.ttt_gate.parameters()]
    owned = {id(p) for p in ttt + gates}
    return {
        "ttt": ttt,
        "gates": gates,
        "decoder": [p for p in model.decoder.parameters() if id(p) not in owned],
        "projector": list(model.speech.projector.parameters()),
        "speech_generator": list(model.speech_generator.parameters()),
        "speech_encoder": list(model.speech.encoder.parameters()),
    }


def set_trainable(model: nn.Module, parts: Iterable[str]) -> Dict[str, int]:
    """Trains exactly the listed parts of a :class:`LlamaOmni` and freezes the rest.

    Args:
        parts: names from :data:`PARTS` (``ttt``: TTT layers; ``gates``: their parallel-mode
            gates; ``decoder``: the rest of the language model; ``projector``; ``speech_generator``;
            ``speech_encoder``, frozen in Llama-Omni).

    Returns:
        Trainable parameter count per part.

    Raises:
        ValueError: an unknown part, or a part that has no parameters in this model (e.g.
            ``gates`` without parallel-mode layers), named.
    """
    parts = list(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"train: unknown parts {unknown}; choose among {list(PARTS)}")
    owned = _parts(model)
    empty = [p for p in parts if not owned[p]]
    if empty:
        raise ValueError(f"train: parts {empty} have no parameters in this model (no TTT layers or gates converted?)")
    model.requires_grad_(False)
    for part in parts:
        for param in owned[part]:
            param.requires_grad_(True)
    return {part: sum(p.numel() for p in owned[part]) for part in parts}
