"""TTT-Linear and TTT-MLP layers: projections, inner learning rate, gate, post-norm and state handling.

Paper: Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
https://arxiv.org/abs/2407.04620. Parameter names and shapes follow the reference
implementation (ttt-lm-pytorch, Transformer backbone: no conv, no shared Q/K), so its state
dicts load directly.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.ttt.ops.dual import ttt_dual
from components.ttt.ops.naive import ttt_naive
from components.ttt.state import TTTState

# Parameters of the inner loop: kept at float32 (or float64) whatever the model's dtype.
INNER_PARAMS = (
    "W1",
    "b1",
    "W2",
    "b2",
    "ttt_norm_weight",
    "ttt_norm_bias",
    "learnable_ttt_lr_weight",
    "learnable_ttt_lr_bias",
    "learnable_token_idx",
)
_OPS = {"dual": ttt_dual, "naive": ttt_naive}


def restore_float32(params) -> None:
    """Puts parameters (and gradients) that a module cast to bf16/fp16 back to float32.

    For ``_apply`` overrides: ``.to(torch.bfloat16)`` and friends cast the rest of a model,
    but the TTT inner loop's per-token updates (~1e-3) vanish in bf16 rounding.
    """
    for param in params:
        if param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            if param.grad is not None:
                param.grad.data = param.grad.data.float()


class _TTTBase(nn.Module):
    """Shared body of :class:`TTTLinear` and :class:`TTTMLP`; see those for the arguments."""

    inner_expansion: int = 1

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mini_batch_size: int = 64,
        base_lr: float = 1.0,
        rope_base: float = 10000.0,
        use_gate: bool = False,
        checkpoint_group_size: int = 0,
        chunk_size: int = 16384,
        impl: str = "dual",
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim={head_dim} must be even for RoPE")
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        if checkpoint_group_size < 0:
            raise ValueError(f"checkpoint_group_size must be >= 0 (0 = off), got {checkpoint_group_size}")
        if chunk_size < 0 or chunk_size % mini_batch_size != 0:
            raise ValueError(f"chunk_size must be 0 (off) or a multiple of mini_batch_size={mini_batch_size}, got {chunk_size}")
        if impl not in _OPS:
            raise ValueError(f"impl={impl!r}; expected one of {sorted(_OPS)}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.mini_batch_size = mini_batch_size
        self.base_lr = base_lr
        self.rope_base = rope_base
        self.use_gate = use_gate
        self.checkpoint_group_size = checkpoint_group_size
        self.chunk_size = chunk_size
        self.impl = impl

        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        if use_gate:
            self.g_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.post_norm = nn.LayerNorm(embed_dim, eps=1e-6)

        fp32 = dict(dtype=torch.float32)
        self.learnable_token_idx = nn.Parameter(torch.zeros(mini_batch_size, **fp32))
        self.learnable_ttt_lr_weight = nn.Parameter(torch.normal(0, 0.02, size=(num_heads, 1, embed_dim), **fp32))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(num_heads, 1, **fp32))
        self.ttt_norm_weight = nn.Parameter(torch.ones(num_heads, head_dim, **fp32))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(num_heads, head_dim, **fp32))
        inner = head_dim * self.inner_expansion
        self.W1 = nn.Parameter(torch.normal(0, 0.02, size=(num_heads, head_dim, inner), **fp32))
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, inner, **fp32))
        if self.inner_expansion > 1:
            self.W2 = nn.Parameter(torch.normal(0, 0.02, size=(num_heads, inner, head_dim), **fp32))
            self.b2 = nn.Parameter(torch.zeros(num_heads, 1, head_dim, **fp32))

    def inner_parameters(self):
        """``(name, parameter)`` of the parameters that the inner loop reads (kept float32)."""
        return [(name, getattr(self, name)) for name in INNER_PARAMS if hasattr(self, name)]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        restore_float32(p for _, p in self.inner_parameters())
        return self

    def _inner_dtype(self) -> torch.dtype:
        """The dtype of the inner loop; raises if an inner parameter was cast below float32."""
        dtype = self.W1.dtype
        for name, param in self.inner_parameters():
            if param.dtype not in (torch.float32, torch.float64) or param.dtype != dtype:
                raise RuntimeError(
                    f"{type(self).__name__}.{name} is {param.dtype}, but the TTT inner loop needs all of "
                    f"{[n for n, _ in self.inner_parameters()]} in float32 (W1 is {dtype}). Something cast it "
                    "(an FSDP MixedPrecisionPolicy without an fp32 policy for TTT modules, or a manual cast)."
                )
        return dtype

    def init_state(self, batch_size: int) -> TTTState:
        """A fresh state: the learned initial weights for each of ``batch_size`` streams.

        The weights are expanded views of the parameters, so gradients reach them.
        """
        expand = lambda p: p.unsqueeze(0).expand(batch_size, *p.shape)  # noqa: E731
        weights = tuple(expand(getattr(self, name)) for name in ("W1", "b1", "W2", "b2") if hasattr(self, name))
        grads = tuple(torch.zeros(batch_size, *w.shape[1:], dtype=w.dtype, device=w.device) for w in weights)
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.W1.device)
        return TTTState.from_parts(weights, grads, offset)

    def reset_rows(self, state: TTTState, rows: Tensor) -> TTTState:
        """``state`` with the streams where ``rows [B]`` (bool) is True started afresh.

        Fresh rows read the parameters (gradients reach them); the others keep their state.
        Call it inside forward (``reset=``): under FSDP the parameters are whole only there.
        """
        fresh = []
        for new, old in zip(self.init_state(state.batch_size), state):
            # rows [B] -> [B, 1, ...] against each field (W1 [B,H,f,F], ..., offset [B])
            fresh.append(None if old is None else torch.where(rows.view(-1, *[1] * (old.dim() - 1)), new, old))
        return TTTState(*fresh)

    def _check_inputs(self, x: Tensor, state: Optional[TTTState], mask: Optional[Tensor], reset: Optional[Tensor]) -> Tensor:
        """Validates the arguments of forward; returns the number of real tokens per row."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, T, {self.embed_dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if state is not None:
            if not isinstance(state, TTTState):
                raise TypeError(f"state must be a TTTState, got {type(state).__name__}")
            if state.batch_size != B:
                raise ValueError(f"state is for {state.batch_size} streams but x has batch size {B}")
            if state.is_mlp != (self.inner_expansion > 1):
                raise ValueError(f"state is a TTT-{'MLP' if state.is_mlp else 'Linear'} state, not for {type(self).__name__}")
        if reset is not None and (reset.shape != (B,) or reset.dtype != torch.bool):
            raise ValueError(f"reset must be a bool tensor of shape {(B,)}, got {reset.dtype} {tuple(reset.shape)}")
        if mask is None:
            return torch.full((B,), T, dtype=torch.long, device=x.device)
        if mask.shape != (B, T) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(B, T)}, got {mask.dtype} {tuple(mask.shape)}")
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError(
                "mask must be right-padded: in each row the real tokens (True) come first, then padding (False); "
                "a True follows a False in this mask"
            )
        return mask.sum(dim=1)

    def forward(
        self, x: Tensor, state: Optional[TTTState] = None, mask: Optional[Tensor] = None, reset: Optional[Tensor] = None
    ) -> Tuple[Tensor, TTTState]:
        """Reads a chunk of B streams, learning from it as it goes.

        Args:
            x: ``[B, T, D]`` hidden states, any T (padded to the mini-batch internally).
            state: the streams' state after the previous chunk; None starts fresh.
            mask: ``[B, T]`` bool, True for real tokens, right-padded. Padding changes neither
                the outputs of real tokens nor the state; its outputs are zero.
            reset: ``[B]`` bool: these streams start afresh instead of from ``state``.

        Returns:
            ``(y, state)``: y ``[B, T, D]`` in x's dtype; the state after each row's last real token.
        """
        lengths = self._check_inputs(x, state, mask, reset)
        dtype = self._inner_dtype()
        if state is None:
            state = self.init_state(x.shape[0])
        elif reset is not None:
            state = self.reset_rows(state, reset)
        T, C = x.shape[1], self.chunk_size
        if C == 0 or T <= C:
            return self._forward_chunk(x, state, mask, lengths, dtype)
        # Long inputs go through in chunks with the state carried (exact, by the streaming
        # contract): temporaries stay chunk-sized, which the allocator reuses instead of
        # mapping fresh pages for every full-length tensor.
        # split, not slicing: the backward of x[:, a:b] is a full-length zero tensor per chunk.
        outs = []
        for i, chunk in enumerate(x.split(C, dim=1)):
            start = i * C
            chunk_mask = None if mask is None else mask[:, start : start + C]
            chunk_lengths = (lengths - start).clamp(0, chunk.shape[1])
            y, state = self._forward_chunk(chunk, state, chunk_mask, chunk_lengths, dtype)
            outs.append(y)
        return torch.cat(outs, dim=1), state

    def prepare_input(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """``x`` in the projections' dtype with its padding zeroed (even NaN or inf there
        cannot reach a gradient). A bf16 model may keep its TTT layers wholly float32."""
        x = x.to(self.q_proj.weight.dtype)
        return x if mask is None else torch.where(mask.unsqueeze(-1), x, 0.0)

    def inner_inputs(self, x: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """What the inner loop reads, in ``dtype``, for ``x [B, T, D]`` from :meth:`prepare_input`.

        Returns:
            ``(xq, xk, xv, lr, token_eta)``: ``[B, T, H, f]`` each (before RoPE), each token's
            inner learning rate ``lr [B, T, H]``, the position factors ``token_eta [K]``.
        """
        H, f, K = self.num_heads, self.head_dim, self.mini_batch_size
        # [B,T,D] -> [B,T,H,f]; under autocast these matmuls run in the autocast dtype.
        xq, xk, xv = (proj(x).unflatten(-1, (H, f)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        with torch.autocast(device_type=x.device.type, enabled=False):
            # [B,T,D] . [H,1,D] -> [B,T,H]: each token's inner learning rate, per head
            lr_logits = torch.einsum("btd,hd->bth", x.to(dtype), self.learnable_ttt_lr_weight.squeeze(1))
            lr = self.base_lr * torch.sigmoid(lr_logits + self.learnable_ttt_lr_bias.view(H)) / f
            token_idx = 1.0 / torch.arange(1, K + 1, device=x.device, dtype=dtype)
            token_eta = torch.clamp_min(token_idx + self.learnable_token_idx, 0.0)  # [K]
        return xq.to(dtype), xk.to(dtype), xv.to(dtype), lr, token_eta

    def _forward_chunk(self, x: Tensor, state: TTTState, mask: Optional[Tensor], lengths: Tensor, dtype: torch.dtype):
        out_dtype, x = x.dtype, self.prepare_input(x, mask)  # computed in the projections' dtype, returned in x's
        xq, xk, xv, lr, token_eta = self.inner_inputs(x, dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            op_args = (xq, xk, xv, lr, token_eta, self.ttt_norm_weight, self.ttt_norm_bias, state, lengths, self.rope_base)
            if self.impl == "dual":
                out, state = ttt_dual(*op_args, checkpoint_group_size=self.checkpoint_group_size)
            else:
                out, state = ttt_naive(*op_args)
        y = self.post_norm(out.flatten(-2).to(x.dtype))  # [B,T,H,f] -> [B,T,D]
        if self.use_gate:
            y = F.gelu(self.g_proj(x), approximate="tanh") * y
        y = self.o_proj(y)
        if mask is not None:
            y = torch.where(mask.unsqueeze(-1), y, 0.0)
        return y.to(out_dtype), state


class TTTLinear(_TTTBase):
    """TTT-Linear: the hidden state is a linear model ``f(x) = x + LN(x W1 + b1)`` per head.

    Paper: https://arxiv.org/abs/2407.04620. The inner-loop parameters (see
    :data:`INNER_PARAMS`) stay float32 by design: ``module.to(torch.bfloat16)`` and friends
    cast the projections and the post-norm but not them, and the inner loop always runs in
    float32 (also under ``torch.autocast``). If one is cast anyway (e.g. by an FSDP
    mixed-precision policy), the next forward raises an error that names it.

    Args:
        embed_dim: model width D.
        num_heads: H; the head dim ``D / H`` is the size of each inner model.
        mini_batch_size: K tokens share one inner gradient step (dual form).
        base_lr: inner learning rate scale (reference: 1.0 for Linear, 0.1 for MLP).
        rope_base: RoPE base; positions restart at each mini-batch.
        use_gate: multiply the output by ``gelu_tanh(g_proj(x))`` before ``o_proj``.
        checkpoint_group_size: recompute the scan in backward in groups of this many
            mini-batches (0: store it).
        chunk_size: inputs longer than this many tokens are processed in chunks of it with
            the state carried; same result, smaller temporaries (0: one piece). On CPU,
            glibc maps every tensor over 32 MiB afresh (page faults on each use); at D=512
            16384 tokens keep per-token time flat from 4k to 64k (benchmarks/ttt_layer.py).
        impl: ``"dual"`` (fast) or ``"naive"`` (token-by-token reference, for tests).
    """


class TTTMLP(_TTTBase):
    """TTT-MLP: ``f(x) = x + LN(gelu_tanh(x W1 + b1) W2 + b2)`` per head, hidden width 4 * head_dim.

    Paper: https://arxiv.org/abs/2407.04620. Same arguments and precision policy as
    :class:`TTTLinear`; ``base_lr`` defaults to 0.1 as in the reference runs.
    """

    inner_expansion = 4

    def __init__(self, embed_dim: int, num_heads: int, mini_batch_size: int = 64, base_lr: float = 0.1, **kwargs):
        super().__init__(embed_dim, num_heads, mini_batch_size=mini_batch_size, base_lr=base_lr, **kwargs)
