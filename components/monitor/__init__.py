"""Monitoring: TTT statistics, non-finite detection by name, and the metric sink."""

from components.monitor.metrics import MetricsLogger
from components.monitor.nonfinite import (
    NonFinite,
    NonFiniteError,
    check_loss,
    check_parameters,
    check_states,
    state_tensors,
)
from components.monitor.ttt_stats import (
    InnerInputs,
    TTTMonitor,
    inner_inputs,
    recon_loss,
    tensor_stats,
    token_recon_losses,
    ttt_layer_stats,
)

__all__ = [
    "InnerInputs",
    "MetricsLogger",
    "NonFinite",
    "NonFiniteError",
    "TTTMonitor",
    "check_loss",
    "check_parameters",
    "check_states",
    "inner_inputs",
    "recon_loss",
    "state_tensors",
    "tensor_stats",
    "token_recon_losses",
    "ttt_layer_stats",
]
