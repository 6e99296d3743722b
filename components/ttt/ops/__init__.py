"""TTT math apart from the modules: the naive token-by-token reference and the dual form."""

from components.ttt.ops.dual import ttt_dual
from components.ttt.ops.naive import ttt_naive

__all__ = ["ttt_dual", "ttt_naive"]
