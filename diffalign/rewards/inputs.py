"""Turning the samples a scorer receives into what its model expects: checked images, resampled audio."""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr
import torch
from PIL import Image
from torch import Tensor

from diffalign.rewards.base import Audio, Images

# Bicubic resizing overshoots a little; anything beyond this is a different value range, not overshoot.
_RANGE_TOLERANCE = 1e-3


def check_images(images: Images) -> Images:
    """Reject anything that is not ``[B,3,H,W]`` floats in [0,1] or a list of PIL images, naming the fix."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a [batch, 3, height, width] tensor, got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"image tensors must be floats in [0, 1], got {images.dtype}; divide uint8 by 255"
            )
        low, high = images.min().item(), images.max().item()
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"image tensors must lie in [0, 1], got values in [{low:.3f}, {high:.3f}]; "
                f"map VAE outputs in [-1, 1] with `(images + 1) / 2`"
            )
        return images
    if isinstance(images, (list, tuple)) and all(isinstance(image, Image.Image) for image in images):
        return [image.convert("RGB") for image in images]
    raise ValueError(
        f"images must be a float tensor [B,3,H,W] in [0, 1] or a list of PIL images, got {type(images)}"
    )


def pixel_values(image_processor: Any, images: Images) -> Tensor:
    """Run a transformers image processor on checked images; tensors keep their autograd graph.

    transformers 5 image processors are torch(vision)-based, so float tensors go through resize, crop and
    normalisation differentiably. They expect 0–255 inputs and apply their own rescaling (CLIP divides by 255,
    ALIGN maps to [-1, 1]), so [0, 1] tensors are scaled up rather than passed with rescaling turned off.
    """
    images = check_images(images)
    if isinstance(images, Tensor):
        images = images.float() * 255
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def to_pil(images: Images) -> list[Image.Image]:
    """PIL images, for backends that only take PIL (no gradient)."""
    images = check_images(images)
    if not isinstance(images, Tensor):
        return list(images)
    array = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(image) for image in array]


def resample(audio: Audio, sample_rate: int) -> list[np.ndarray]:
    """Each waveform as float32 numpy at ``sample_rate`` (soxr, high quality); not differentiable."""
    waveforms = audio.waveforms.detach().float().cpu().numpy()
    if audio.sample_rate == sample_rate:
        return list(waveforms)
    return [
        soxr.resample(waveform, audio.sample_rate, sample_rate).astype(np.float32) for waveform in waveforms
    ]
