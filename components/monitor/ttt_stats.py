"""What the TTT layers are doing: fast-weight statistics, inner reconstruction loss, inner
learning rates and gates, gathered on a logging step.

Paper: Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
https://arxiv.org/abs/2407.04620. The inner loss here is the one the layer descends
(components/ttt/ops/naive.py), so "after < before" says the layer learns from its window.
"""

import contextlib
import functools
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from components.ttt.ops.common import rope_angles, rope_rotate
from components.ttt.ops.naive import inner_model
from components.ttt.state import TTTState

WEIGHT_NAMES = ("W1", "b1", "W2", "b2")


def _stats(t: Tensor) -> Dict[str, Tensor]:
    """Mean, std (population), max-abs and L2 norm as 0-dim float32 tensors, without a sync."""
    t = t.detach().float()
    return {"mean": t.mean(), "std": t.std(correction=0), "max_abs": t.abs().amax(), "norm": torch.linalg.vector_norm(t)}


@torch.no_grad()
def tensor_stats(t: Tensor) -> Dict[str, float]:
    """Mean, std, max-abs and L2 norm of ``t``, computed in float32.

    The std is the population std (correction 0), so a one-element tensor gives 0, not NaN.

    Args:
        t: any floating tensor.

    Returns:
        ``{"mean", "std", "max_abs", "norm"}`` as Python floats.
    """
    stats = _stats(t)
    return dict(zip(stats, torch.stack(list(stats.values())).tolist()))


class InnerInputs(NamedTuple):
    """What the inner loop of a TTT layer sees for a window, float32 (the inner dtype).

    Attributes:
        xk: ``[B, H, T, f]`` keys after RoPE at their position inside the mini-batch.
        target: ``[B, H, T, f]`` reconstruction target ``XV - XK`` (XK rotated, as in the op).
        lr: ``[B, T, H]`` ``base_lr * sigmoid(x . w_lr + b_lr) / f``.
        token_eta: ``[B, T]`` ``clamp_min(1/(i+1) + learnable_token_idx[i], 0)`` at position i.
        real: ``[B, T]`` bool, True for real tokens.
    """

    xk: Tensor
    target: Tensor
    lr: Tensor
    token_eta: Tensor
    real: Tensor

    @property
    def eta(self) -> Tensor:
        """``[B, T, H]`` each token's inner learning rate ``lr * token_eta``."""
        return self.lr * self.token_eta.unsqueeze(-1)


def inner_inputs(layer: nn.Module, x: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> InnerInputs:
    """The keys, targets and learning rates that the layer's op reads for a window.

    The projections and learning rates come from the layer itself
    (:meth:`~components.ttt.layer._TTTBase.inner_inputs`); the RoPE, which the op applies,
    is repeated here at each token's position inside its mini-batch.

    Args:
        layer: a :class:`components.ttt.TTTLinear` or :class:`components.ttt.TTTMLP`.
        x: ``[B, T, D]`` the layer's input.
        offset: ``[B]`` int64, tokens each row had already seen of its current mini-batch
            when the window started (``state.offset`` of the state passed in).
        mask: ``[B, T]`` bool, True for real tokens (None: all real).

    Returns:
        The :class:`InnerInputs` of the window.
    """
    B, T, _ = x.shape
    f, K = layer.head_dim, layer.mini_batch_size
    dtype = layer.W1.dtype
    real = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask
    _, xk, xv, lr, token_eta = layer.inner_inputs(layer.prepare_input(x, real), dtype)  # [B,T,H,f]
    with torch.autocast(device_type=x.device.type, enabled=False):
        positions = (offset.view(B, 1) + torch.arange(T, device=x.device)) % K  # [B,T] inside the mini-batch
        angles = rope_angles(positions, f, layer.rope_base, dtype).unsqueeze(2)  # [B,T,1,f/2]
        xk = rope_rotate(xk, angles)
        target = xv - xk
        token_eta = token_eta[positions]  # [K] -> [B,T]
    return InnerInputs(xk.transpose(1, 2), target.transpose(1, 2), lr, token_eta, real)


def token_recon_losses(layer: nn.Module, inputs: InnerInputs, weights: Sequence[Tensor], chunk_size: int = 2048) -> Tensor:
    """Per-token, per-head inner reconstruction error ``mean_f (LN(Z(XK)) - (XV - XK))^2``.

    This is the op's per-token inner loss ``0.5 * sum_f (...)^2`` divided by ``f / 2``, so
    it does not scale with the head dim. Tokens go through in chunks of ``chunk_size`` to
    bound the temporaries (the MLP's hidden is ``[B, H, n, 4f]``).

    Args:
        layer: the TTT layer (its ``ttt_norm_weight``/``ttt_norm_bias`` are the LN).
        inputs: from :func:`inner_inputs`.
        weights: ``(W1, b1)`` or ``(W1, b1, W2, b2)``, each ``[B, H, ...]`` as in :class:`TTTState`.
        chunk_size: tokens per chunk.

    Returns:
        ``[B, H, T]`` errors, padding included (mask them with ``inputs.real``).
    """
    errors = []
    for xk, target in zip(inputs.xk.split(chunk_size, dim=2), inputs.target.split(chunk_size, dim=2)):
        pred = inner_model(xk, tuple(weights), layer.ttt_norm_weight, layer.ttt_norm_bias)  # LN(Z(xk))
        errors.append((pred - target).pow(2).mean(-1))  # [B,H,n,f] -> [B,H,n]
    return torch.cat(errors, dim=2)


def recon_loss(layer: nn.Module, inputs: InnerInputs, weights: Sequence[Tensor]) -> Tensor:
    """The inner reconstruction loss of a window at fixed fast weights.

    ``mean over real tokens t of all rows b and over heads h of
    mean_f (LN_h(Z(XK[b,h,t]; weights[b,h])) - (XV - XK)[b,h,t])^2``, with XK after RoPE at
    its position inside the mini-batch. The weights are a state's mini-batch-start weights
    (``state.W1`` etc.): the accumulators of an unfinished mini-batch are ignored, so for a
    state in the middle of a mini-batch this is the loss at the weights it started with.

    Args:
        layer: the TTT layer.
        inputs: from :func:`inner_inputs`.
        weights: :meth:`TTTState.weights` of the state to evaluate.

    Returns:
        A 0-dim float tensor (0 when the window has no real token).
    """
    errors = token_recon_losses(layer, inputs, weights)  # [B,H,T]
    real = inputs.real.unsqueeze(1)  # [B,1,T]
    return (errors * real).sum() / (real.sum() * errors.shape[1]).clamp_min(1)


def ttt_layer_stats(
    layer: nn.Module, x: Tensor, state_in: Optional[TTTState], state_out: TTTState, mask: Optional[Tensor] = None
) -> Dict[str, Tensor]:
    """Statistics of one TTT layer's forward over a window, as 0-dim tensors (no sync).

    Args:
        layer: the TTT layer.
        x: ``[B, T, D]`` its input.
        state_in: the state it was given (None: its fresh ``init_state``).
        state_out: the state it returned.
        mask: ``[B, T]`` bool, True for real tokens.

    Returns:
        ``{"W1_init/mean": ..., "W1_state/norm": ..., "recon_loss_before": ...,
        "recon_loss_after": ..., "eta/mean": ..., "eta/max": ...}``; see :class:`TTTMonitor`.
    """
    if state_in is None:
        state_in = layer.init_state(x.shape[0])
    out = {}
    for name, weight in zip(WEIGHT_NAMES, state_out.weights()):
        out.update({f"{name}_init/{k}": v for k, v in _stats(getattr(layer, name)).items()})
        out.update({f"{name}_state/{k}": v for k, v in _stats(weight).items()})
    inputs = inner_inputs(layer, x, state_in.offset, mask)
    out["recon_loss_before"] = recon_loss(layer, inputs, state_in.weights())
    out["recon_loss_after"] = recon_loss(layer, inputs, state_out.weights())
    real = inputs.real.unsqueeze(-1)  # [B,T,1]
    eta = inputs.eta * real  # [B,T,H]; eta >= 0, so zeroed padding does not change the max
    out["eta/mean"] = eta.sum() / (real.sum() * eta.shape[-1]).clamp_min(1)
    out["eta/max"] = eta.amax() if eta.numel() else eta.new_zeros(())
    return out


def _bind(layer: nn.Module, args: tuple, kwargs: dict) -> Tuple[Tensor, Optional[TTTState], Optional[Tensor]]:
    """``(x, state, mask)`` of a ``_TTTBase.forward`` call, positional or keyword; the state is
    the one the layer starts from (rows flagged by ``reset`` start afresh)."""
    bound = dict(zip(("x", "state", "mask", "reset"), args), **kwargs)
    state, reset = bound.get("state"), bound.get("reset")
    if state is not None and reset is not None:
        state = layer.reset_rows(state, reset)
    return bound["x"], state, bound.get("mask")


class TTTMonitor:
    """Collects TTT statistics from the forward passes run inside :meth:`capture`.

    For each converted decoder layer i, :meth:`metrics` gives (``S`` = mean, std, max_abs, norm):

    - ``ttt/layer{i}/{W1,b1[,W2,b2]}_init/S``: the learned initial fast weights (parameters);
    - ``ttt/layer{i}/{W1,...}_state/S``: the carried state's weights after the forward, all rows;
    - ``ttt/layer{i}/recon_loss_before`` / ``recon_loss_after``: :func:`recon_loss` of the
      window at the weights of the state passed in and of the state returned;
    - ``ttt/layer{i}/eta/{mean,max}``: each real token's inner learning rate (all heads);
    - ``ttt/layer{i}/gate/{mean,max_abs}``: ``tanh(alpha)`` of a parallel layer's gate.

    The statistics are computed inside the layers' forward hooks, under ``torch.no_grad``,
    and kept as device scalars: no input is held, and under FSDP2 the hooks (prepended, so
    they run before its post-forward reshard) see unsharded parameters. :meth:`metrics`
    syncs once. Extra cost per logging step: about the k/v projections of each TTT layer again.
    Outside :meth:`capture` no hook is registered. Run the backward outside the block: with
    activation checkpointing the recomputed forward would fire the hooks again.

    Args:
        model: a :class:`components.models.LlamaOmni` (or anything with ``decoder.layers``
            whose items may have ``ttt`` and ``ttt_gate``).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._records: Dict[int, Dict[str, Tensor]] = {}
        self._handles: List = []

    def _layers(self) -> List[Tuple[int, nn.Module]]:
        return [(i, layer) for i, layer in enumerate(self.model.decoder.layers) if getattr(layer, "ttt", None) is not None]

    @contextlib.contextmanager
    def capture(self) -> Iterator["TTTMonitor"]:
        """Registers the hooks for the duration of the block; forgets earlier records.

        If the model runs several times in the block, the last call of each layer counts.

        Raises:
            RuntimeError: if a capture is already active.
        """
        if self._handles:
            raise RuntimeError("TTTMonitor.capture() is already active; captures do not nest")
        self._records = {}
        try:
            for i, layer in self._layers():
                hook = functools.partial(self._on_ttt, i)
                self._handles.append(layer.ttt.register_forward_hook(hook, with_kwargs=True, prepend=True))
                if getattr(layer, "ttt_gate", None) is not None:
                    gate_hook = functools.partial(self._on_gate, i)
                    self._handles.append(layer.ttt_gate.register_forward_hook(gate_hook, prepend=True))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _on_ttt(self, index: int, layer: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        with torch.no_grad():
            x, state_in, mask = _bind(layer, args, kwargs)
            stats = ttt_layer_stats(layer, x.detach(), state_in, output[1], mask)
        self._records.setdefault(index, {}).update(stats)

    def _on_gate(self, index: int, gate: nn.Module, args: tuple, output: Tensor) -> None:
        with torch.no_grad():
            value = torch.tanh(gate.alpha.detach().float())
            stats = {"gate/mean": value.mean(), "gate/max_abs": value.abs().amax()}
        self._records.setdefault(index, {}).update(stats)

    def metrics(self) -> Dict[str, float]:
        """The statistics of the last capture as ``{"ttt/layer{i}/...": float}`` (one device sync).

        Raises:
            RuntimeError: if the model has TTT layers but none ran inside the last capture.
        """
        if not self._records:
            if self._layers():
                raise RuntimeError("no TTT layer ran inside TTTMonitor.capture(); call the model inside the `with` block")
            return {}
        keys, values = [], []
        for index in sorted(self._records):
            for name, value in self._records[index].items():
                keys.append(f"ttt/layer{index}/{name}")
                values.append(value)
        device = values[0].device
        return dict(zip(keys, torch.stack([v.to(device, torch.float32) for v in values]).tolist()))
