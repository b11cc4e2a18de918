"""The loop, checkpoints and config sections shared by every trainer."""

from diffalign.training.config import OptimConfig, RunConfig
from diffalign.training.loop import Recipe, StepOutput, make_accelerator, run_training

__all__ = ["OptimConfig", "Recipe", "RunConfig", "StepOutput", "make_accelerator", "run_training"]
