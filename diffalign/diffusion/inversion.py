"""DDIM inversion of clean latents, and the DDIM sampling it inverts.

DDIM (Song, Meng, Ermon, "Denoising Diffusion Implicit Models", arXiv 2010.02502, Eq. 12 with σ = 0) moves a
latent between noise levels ᾱ_a and ᾱ_b through the model's estimates of the clean latent and the noise:

    x̂0 = (x_a − √(1−ᾱ_a)·ε̂) / √ᾱ_a,      x_b = √ᾱ_b·x̂0 + √(1−ᾱ_b)·ε̂

Sampling walks the inference grid down (ᾱ_b > ᾱ_a, ε̂ = ε_θ(x_a, a)); inversion walks it up from the clean
latent (level −1), evaluating the model at the level it is heading to, ε̂ = ε_θ(x_a, b), as diffusers'
``DDIMInverseScheduler`` and the InPO code do (the usual approximation: x_b is not known yet). With a model
whose ε̂ does not depend on its input the two walks are exact inverses.

The first inversion step reads the clean latent as a sample at ᾱ_start. diffusers' ``DDIMInverseScheduler``
takes it from the scheduler config: ᾱ_start = 1 with ``set_alpha_to_one: true`` (its default), and
ᾱ_start = alphas_cumprod[0] with ``set_alpha_to_one: false``, which is Stable Diffusion's config (0.99915 for
SD1.5) and so what the official InPO code, building its inverse scheduler from SD1.5's, starts from
(:func:`inversion_start_alpha`). ᾱ_start = 1, the DDIM paper's clean level, is the other choice.

Every function is batched with a timestep per sample, so one call inverts latents to different levels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

# The model as inversion and sampling call it: (latents at some level, timesteps [N]) → raw output.
Predictor = Callable[[Tensor, Tensor], Tensor]

CLEAN = -1  # the level of a clean latent, ᾱ = 1


def inversion_grid(scheduler_config: dict, num_steps: int) -> Tensor:
    """The ascending DDIM inference timesteps of a scheduler config, e.g. [1, 101, …, 901] for SD with 10 steps.

    These are the timesteps the family's DDIM pipeline samples at (its ``timestep_spacing`` and
    ``steps_offset``), so a latent inverted along them can be sampled back along them.
    """
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.flip(0).long()


def inversion_start_alpha(scheduler_config: dict) -> float:
    """ᾱ of the clean latent at the first inversion step, as diffusers' ``DDIMInverseScheduler`` built from
    ``scheduler_config`` has it: alphas_cumprod[0] when the config sets ``set_alpha_to_one: false``, else 1."""
    return float(DDIMInverseScheduler.from_config(scheduler_config).initial_alpha_cumprod)


def alpha_at(alphas_cumprod: Tensor, levels: Tensor) -> Tensor:
    """ᾱ ``[N]`` in fp32 at integer levels ``[N]``; the ``CLEAN`` level (−1) has ᾱ = 1."""
    alphas_cumprod = alphas_cumprod.to(levels.device, torch.float32)
    return torch.where(
        levels < 0, torch.ones_like(levels, dtype=torch.float32), alphas_cumprod[levels.clamp(min=0)]
    )


def split_prediction(
    model_output: Tensor, sample: Tensor, alpha: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """The clean latent x̂0 and noise ε̂ that a model output implies for ``sample`` at level ``alpha`` (ᾱ).

    ε-prediction: x̂0 = (x − √(1−ᾱ)·ε̂)/√ᾱ.  v-prediction (Salimans & Ho, arXiv 2202.00512):
    x̂0 = √ᾱ·x − √(1−ᾱ)·v,  ε̂ = √ᾱ·v + √(1−ᾱ)·x.
    """
    if prediction_type == "epsilon":
        epsilon = model_output
        return (sample - (1 - alpha).sqrt() * epsilon) / alpha.sqrt(), epsilon
    if prediction_type == "v_prediction":
        clean = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        return clean, alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    raise ValueError(
        f"prediction_type {prediction_type!r} is not supported; expected 'epsilon' or 'v_prediction'"
    )


def ddim_step(
    sample: Tensor, model_output: Tensor, alpha_from: Tensor, alpha_to: Tensor, prediction_type: str
) -> Tensor:
    """One deterministic DDIM move of ``sample`` from level ᾱ_from to ᾱ_to (either direction), in fp32."""
    clean, epsilon = split_prediction(model_output.float(), sample.float(), alpha_from, prediction_type)
    return alpha_to.sqrt() * clean + (1 - alpha_to).sqrt() * epsilon


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def _inversion_path(grid: Tensor, timesteps: Tensor, exact_timestep: bool) -> tuple[Tensor, Tensor]:
    """Levels ``[S, N]`` each sample visits in turn, and which of them are real steps (a prefix per sample).

    Sample n visits the grid points below its timestep, then (``exact_timestep``) the timestep itself.
    """
    levels = grid.to(timesteps.device)[:, None].expand(-1, timesteps.shape[0]).clone()
    active = levels < timesteps[None]
    if exact_timestep:
        columns = torch.arange(timesteps.shape[0], device=timesteps.device)
        levels = torch.cat([levels, timesteps[None]])
        active = torch.cat([active, torch.zeros_like(active[:1])])
        num_grid_steps = active.sum(dim=0)
        levels[num_grid_steps, columns] = timesteps
        active[num_grid_steps, columns] = True
    return levels, active


def jitter_std(alphas_cumprod: Tensor, levels: Tensor, spacing: int) -> Tensor:
    """σ of the η=1 DDIM sampler when it lands on ``levels`` from one grid spacing above (clamped to T−1).

        σ² = (1−ᾱ_t)/(1−ᾱ_{t+Δ}) · (1 − ᾱ_{t+Δ}/ᾱ_t)

    The InPO code adds η·σ·N(0, I) after each inversion step with this σ (``DDIMScheduler._get_variance``
    between the level reached and one spacing above); at the top of the schedule it indexes past the last
    timestep, where we clamp.
    """
    above = (levels + spacing).clamp(max=alphas_cumprod.shape[0] - 1)
    alpha, alpha_above = alpha_at(alphas_cumprod, levels), alpha_at(alphas_cumprod, above)
    return ((1 - alpha) / (1 - alpha_above) * (1 - alpha_above / alpha)).clamp(min=0).sqrt()


@torch.no_grad()
def ddim_invert(
    latents: Tensor,
    predict: Predictor,
    alphas_cumprod: Tensor,
    grid: Tensor,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    exact_timestep: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    start_alpha: float = 1.0,
) -> Tensor:
    """Invert clean ``latents`` ``[N, …]`` up the DDIM ``grid`` (ascending timesteps) towards ``timesteps`` ``[N]``.

    Each sample takes one step per grid point strictly below its timestep, so it lands on the largest such
    point (and stays clean if there is none); with ``exact_timestep`` a last step takes it from there to its
    timestep itself. The first step reads the clean latent as a sample at ᾱ = ``start_alpha`` (module
    docstring; :func:`inversion_start_alpha` gives diffusers' value for a scheduler config). After every step,
    ``eta > 0`` adds η·σ·N(0, I) (σ from :func:`jitter_std`), drawn from ``generator`` (one per sample for
    per-sample reproducibility, as in diffusers pipelines).

    The model sees latents in the caller's dtype; the DDIM arithmetic runs in fp32. Returns the caller's dtype.
    """
    levels, active = _inversion_path(grid, timesteps, exact_timestep)
    spacing = alphas_cumprod.shape[0] // grid.shape[0]
    sample = latents.float()
    current = torch.full_like(timesteps, CLEAN)
    for step_levels, step_active in zip(levels, active):
        if not step_active.any():
            break
        model_output = predict(sample.to(latents.dtype), step_levels)
        alpha_from = alpha_at(alphas_cumprod, current)
        alpha_from = _per_sample(
            torch.where(current < 0, torch.full_like(alpha_from, start_alpha), alpha_from), sample
        )
        alpha_to = _per_sample(alpha_at(alphas_cumprod, step_levels), sample)
        stepped = ddim_step(sample, model_output, alpha_from, alpha_to, prediction_type)
        if eta > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            stepped = (
                stepped + eta * _per_sample(jitter_std(alphas_cumprod, step_levels, spacing), sample) * noise
            )
        sample = torch.where(_per_sample(step_active, sample), stepped, sample)
        current = torch.where(step_active, step_levels, current)
    return sample.to(latents.dtype)


@torch.no_grad()
def ddim_sample(
    latents: Tensor,
    predict: Predictor,
    alphas_cumprod: Tensor,
    grid: Tensor,
    start_timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
) -> Tensor:
    """Deterministic DDIM sampling (η = 0) of ``latents`` at levels ``start_timesteps`` down to clean latents.

    Each sample steps from its start level to every grid point below it, then to the clean level, with the
    model evaluated at the level it leaves: the walk that :func:`ddim_invert` reverses.
    """
    sample = latents.float()
    current = start_timesteps.clone()
    targets = [*grid.flip(0).tolist(), CLEAN]
    for target in targets:
        step_active = current > target
        if not step_active.any():
            continue
        model_output = predict(sample.to(latents.dtype), current.clamp(min=0))
        alpha_from = _per_sample(alpha_at(alphas_cumprod, current), sample)
        alpha_to = _per_sample(alpha_at(alphas_cumprod, torch.full_like(current, target)), sample)
        stepped = ddim_step(sample, model_output, alpha_from, alpha_to, prediction_type)
        sample = torch.where(_per_sample(step_active, sample), stepped, sample)
        current = torch.where(step_active, torch.full_like(current, target), current)
    return sample.to(latents.dtype)
