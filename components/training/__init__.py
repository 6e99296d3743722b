"""Training utilities: precision (param groups, fp32 guard); sharding, checkpointing and state
carrying come with the recipe (issue 5)."""

from components.training.precision import FP32Guard, param_groups

__all__ = ["FP32Guard", "param_groups"]
