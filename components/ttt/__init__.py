"""TTT layers (TTT-Linear, TTT-MLP), their typed state and the ops behind them."""

from components.ttt.layer import TTTLinear, TTTMLP
from components.ttt.state import TTTState

__all__ = ["TTTLinear", "TTTMLP", "TTTState"]
