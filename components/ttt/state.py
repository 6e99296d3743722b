"""The typed state that a TTT layer carries from one chunk of a stream to the next."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class TTTState(NamedTuple):
    """The fast weights of one TTT layer for a batch of streams, as of the last token seen.

    A mini-batch of K tokens takes all its inner gradients at the weights it started
    with, so the state holds those starting weights plus the gradients accumulated by
    the tokens already seen in the current, unfinished mini-batch. ``W1_grad`` and
    friends are weighted by each token's inner learning rate (``ttt_lr_eta``) but not
    yet by the position factor ``token_eta``: the weights seen by the token at
    position i of the mini-batch are ``W1 - token_eta[i] * W1_grad_i``. When a
    mini-batch completes, the weights move by ``token_eta[K-1] * W1_grad`` and the
    accumulators are zero again; the accumulators of a row whose offset is 0 are ignored.

    All tensors are float32. ``W2``/``b2`` and their accumulators are ``None`` for
    TTT-Linear. Shapes (B streams, H heads, f head dim, F = f for Linear, 4f for MLP):

    Attributes:
        W1: ``[B, H, f, F]`` first inner weight at the start of the current mini-batch.
        b1: ``[B, H, 1, F]``.
        W2: ``[B, H, F, f]`` (MLP only).
        b2: ``[B, H, 1, f]`` (MLP only).
        W1_grad, b1_grad, W2_grad, b2_grad: accumulators, shaped like the weights.
        offset: ``[B]`` int64, tokens already seen in the current mini-batch (0..K-1).
    """

    W1: Tensor
    b1: Tensor
    W2: Optional[Tensor]
    b2: Optional[Tensor]
    W1_grad: Tensor
    b1_grad: Tensor
    W2_grad: Optional[Tensor]
    b2_grad: Optional[Tensor]
    offset: Tensor

    @property
    def batch_size(self) -> int:
        return self.W1.shape[0]

    @property
    def is_mlp(self) -> bool:
        return self.W2 is not None

    def weights(self) -> tuple:
        """The fast weights, ``(W1, b1)`` or ``(W1, b1, W2, b2)``."""
        return (self.W1, self.b1) if self.W2 is None else (self.W1, self.b1, self.W2, self.b2)

    def grads(self) -> tuple:
        """The accumulators, in the order of :meth:`weights`."""
        if self.W2 is None:
            return (self.W1_grad, self.b1_grad)
        return (self.W1_grad, self.b1_grad, self.W2_grad, self.b2_grad)

    @classmethod
    def from_parts(cls, weights: tuple, grads: tuple, offset: Tensor) -> "TTTState":
        """Builds a state from :meth:`weights`-ordered and :meth:`grads`-ordered tuples."""
        W1, b1, W2, b2 = (tuple(weights) + (None, None))[:4]
        G1, g1, G2, g2 = (tuple(grads) + (None, None))[:4]
        return cls(W1, b1, W2, b2, G1, g1, G2, g2, offset)

    def detach(self) -> "TTTState":
        """The same state cut from the autograd graph (truncated backprop through time)."""
        return TTTState(*(None if t is None else t.detach() for t in self))

    def to(self, device: torch.device) -> "TTTState":
        return TTTState(*(None if t is None else t.to(device) for t in self))
