"""Mixed precision as both trainers use it: frozen weights in the low-precision dtype, trained ones fp32 masters."""

from __future__ import annotations

import torch
from torch import nn


def mixed_precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights for accelerate's ``mixed_precision`` ("bf16", "fp16" or "no")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def upcast_trainable(model: nn.Module) -> None:
    """Keep every trainable parameter in fp32 (the optimizer's master weights) while frozen ones stay low-precision."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
