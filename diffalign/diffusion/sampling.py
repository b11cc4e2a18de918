"""Sampling for evaluation: the same prompts and seeds for every model, so differences are the models'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from diffalign.diffusion.families import DiffusionFamily


@torch.no_grad()
def generate_images(
    family: DiffusionFamily,
    denoiser: nn.Module,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 16,
) -> Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1]; prompt ``i`` always uses the generator seeded ``seed + i``."""
    pipeline = family.build_pipeline(denoiser)
    pipeline.set_progress_bar_config(disable=True)
    device = next(denoiser.parameters()).device
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        output = pipeline(
            chunk,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="pt",
        )
        images.append(output.images.float().cpu())
    return torch.cat(images)


def save_image_grid(rows: list[Tensor], path: Path, scale: int = 4) -> None:
    """Save rows of ``[N, 3, H, W]`` images in [0, 1] as one PNG (row r, column n), upscaled for viewing."""
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def win_rate(aligned_scores: Tensor, base_scores: Tensor) -> float:
    """Fraction of prompts where the aligned sample scores higher; ties count one half."""
    wins = (aligned_scores > base_scores).float() + 0.5 * (aligned_scores == base_scores).float()
    return wins.mean().item()
