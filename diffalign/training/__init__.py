"""The loop, checkpoints and config sections shared by every trainer."""

from diffalign.training.config import OptimConfig, RunConfig
from diffalign.training.loop import StepOutput, make_accelerator, run_training

__all__ = ["OptimConfig", "RunConfig", "StepOutput", "make_accelerator", "run_training"]
