"""Which noise levels training draws, and how each level's error is weighted (the ``timesteps:`` section).

Every family maps a draw ``u`` in [0, 1) to its own noise level (a DDPM timestep index, a flow σ, Stable Audio's
σ); the density of ``u`` and the per-sample loss weight are the knobs the diffusers training scripts expose:

- ``density``: ``uniform``; ``logit_normal`` (u = sigmoid(N(logit_mean, logit_std)), the SD3 paper's default,
  Esser et al., arXiv 2403.03206, §3.1); ``mode`` (the paper's mode sampling with heavy tails, ``mode_scale``).
  ``auto`` is the family's published default: uniform for DDPM and Stable Audio, logit-normal for flow families
  (as the SD3 training example and flow-model DPO do). Draws come from ``diffusers.training_utils``.
- ``noise_range``: the fraction [low, high] of the training schedule drawn from, 0 the clean end and 1 the noisy
  end (``t/T`` for DDPM families; the unshifted ``t/T`` of the flow schedule).
- ``weighting``: ``min_snr`` (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  arXiv 2303.09556: w = min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR + 1) for v targets, γ = ``snr_gamma``,
  as diffusers' text-to-image example); ``sigma_sqrt`` (w = σ⁻²) and ``cosmap`` (w = 2/(π(1 − 2σ + 2σ²))) for
  flow families, as ``compute_loss_weighting_for_sd3``. The weight multiplies a sample's denoising error, so a
  preference loss sees ``−½·w·error`` as its score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Density = Literal["auto", "uniform", "logit_normal", "mode"]
Weighting = Literal["none", "min_snr", "sigma_sqrt", "cosmap"]


@dataclass
class TimestepSettings:
    density: Density = "auto"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    noise_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    weighting: Weighting = "none"
    snr_gamma: float = 5.0

    def __post_init__(self) -> None:
        if len(self.noise_range) != 2 or not 0.0 <= self.noise_range[0] < self.noise_range[1] <= 1.0:
            raise ValueError(
                f"timesteps.noise_range must be [low, high] with 0 <= low < high <= 1, got {self.noise_range}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"timesteps.logit_std must be > 0, got {self.logit_std}")
        if not self.snr_gamma > 0:
            raise ValueError(f"timesteps.snr_gamma must be > 0, got {self.snr_gamma}")

    def is_default_uniform(self, default_density: str) -> bool:
        """Uniform over the whole schedule: the draw families make with a plain ``randint``/``rand``."""
        density = default_density if self.density == "auto" else self.density
        return density == "uniform" and self.noise_range == [0.0, 1.0]


def draw_fractions(
    settings: TimestepSettings,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None,
    default_density: str,
    noisy_first: bool = False,
) -> Tensor:
    """Noise fractions ``[batch_size]`` in [low, high) (fp32): ``low + (high − low)·u`` for ``u`` from the configured
    density, or with ``noisy_first`` ``high − (high − low)·u`` (the flow scripts index a descending schedule with
    u, so small u means much noise)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    density = default_density if settings.density == "auto" else settings.density
    u = compute_density_for_timestep_sampling(
        density,
        batch_size,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        device=device,
        generator=generator,
    )
    low, high = settings.noise_range
    fractions = high - (high - low) * u.float() if noisy_first else low + (high - low) * u.float()
    # Strictly below 1, so that a fraction times the schedule length is a valid index.
    return fractions.clamp(0.0, 1.0 - 1e-7)


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (arXiv 2303.09556) for ε or v targets."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def flow_weights(weighting: str, sigmas: Tensor) -> Tensor:
    """SD3's per-σ loss weights (``diffusers.training_utils.compute_loss_weighting_for_sd3``)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting, sigmas.float())
