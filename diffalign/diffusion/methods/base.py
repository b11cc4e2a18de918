"""What every diffusion method shares: a latent pair batch and the per-sample denoising error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.diffusion.families import DiffusionFamily


@dataclass
class LatentPairBatch:
    """A batch of pairs in the denoiser's space: scaled latents, prompt embeddings, labels."""

    chosen_latents: Tensor  # [B, ...]
    rejected_latents: Tensor  # [B, ...]
    prompt_embeds: dict[str, Tensor]  # batch-first, [B, ...]
    label: Tensor | None = None  # P(chosen ≻ rejected); None = hard labels
    # Per-sample extras the family may read (e.g. SDXL sizes), already laid out for [chosen; rejected].
    extras: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return self.chosen_latents.shape[0]

    def both_latents(self) -> Tensor:
        return torch.cat([self.chosen_latents, self.rejected_latents])

    def both_prompt_embeds(self) -> dict[str, Tensor]:
        return {name: torch.cat([value, value]) for name, value in self.prompt_embeds.items()}


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean over every non-batch dimension of the squared error, in fp32: one value per sample."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def denoising_error(
    family: DiffusionFamily,
    denoiser: nn.Module,
    noisy_latents: Tensor,
    timesteps: Tensor,
    target: Tensor,
    inputs: dict[str, Any],
) -> Tensor:
    prediction = family.predict(denoiser, noisy_latents, timesteps, inputs)
    return per_sample_mse(prediction, target)
