"""Training utilities: precision (param groups, casts, fp32 guard), parallelism (activation
checkpointing, FSDP2), training checkpoints."""

from components.training.parallelize import parallelize
from components.training.precision import FP32Guard, cast_for_training, param_groups

__all__ = ["FP32Guard", "cast_for_training", "param_groups", "parallelize"]
