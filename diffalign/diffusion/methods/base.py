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
    # One seed per pair for its noise and timestep; None draws them from the global RNG.
    noise_seeds: list[int] | None = None

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


def pair_noise(family: DiffusionFamily, batch: LatentPairBatch) -> tuple[Tensor, Tensor]:
    """Noise ``[B, ...]`` and timesteps ``[B]`` for a batch of pairs (both members of a pair share them).

    With ``noise_seeds`` every pair draws from its own generator, so it gets the same noise and timestep in
    whatever batch, accumulation micro-batch or process it lands: those runs then equal one large-batch run.
    """
    latents = batch.chosen_latents
    if batch.noise_seeds is None:
        return torch.randn_like(latents), family.sample_timesteps(batch.size, latents.device)
    noises, timesteps = [], []
    for seed in batch.noise_seeds:
        generator = torch.Generator(latents.device).manual_seed(seed)
        noises.append(torch.randn(latents.shape[1:], generator=generator, device=latents.device, dtype=latents.dtype))
        timesteps.append(family.sample_timesteps(1, latents.device, generator=generator))
    return torch.stack(noises), torch.cat(timesteps)
