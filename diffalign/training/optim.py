"""Optimizers and learning-rate schedules from an ``OptimConfig``."""

from __future__ import annotations

import torch
from torch import nn

from diffalign.training.config import OptimConfig


def build_optimizer(parameters: list[nn.Parameter], config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if config.name == "adamw":
        on_gpu = all(p.is_cuda for p in parameters)
        return torch.optim.AdamW(
            parameters,
            lr=lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=config.fused == "always" or (config.fused == "gpu" and on_gpu),
        )
    if config.name == "adafactor":
        from transformers.optimization import Adafactor

        # The official SDXL Diffusion-DPO settings: a fixed lr, no relative step, clipping inside Adafactor.
        return Adafactor(
            parameters,
            lr=lr,
            weight_decay=config.weight_decay,
            clip_threshold=1.0,
            scale_parameter=False,
            relative_step=False,
        )
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("optim.name: adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit(
        parameters, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int):
    # transformers' schedules (diffusers' training examples use the same ones, copied from it).
    from transformers import get_scheduler

    return get_scheduler(
        config.scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=max_steps,
    )
