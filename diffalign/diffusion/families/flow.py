"""What the rectified-flow families (SD3, FLUX.1, FLUX.2, Qwen-Image, SANA, ACE-Step) share: noising, the velocity
target, training σ, loss weights and an Euler sampler over the pipeline's inference schedule.

Training follows diffusers' SD3/FLUX training examples (``train_dreambooth_lora_sd3.py``, ``..._flux.py``):
``x_σ = (1 − σ)·x0 + σ·ε`` and the target ``v = ε − x0`` (Esser et al., "Scaling Rectified Flow Transformers",
arXiv 2403.03206). σ is the scheduler's training grid at index ``floor(u·T)``, ``u`` from ``timesteps.density``
(logit-normal by default, the paper's choice); with ``use_dynamic_shifting`` (FLUX) that grid is unshifted, as the
examples train. ``timesteps.weighting`` ``sigma_sqrt``/``cosmap`` weight each error as the SD3 example does.

Sampling is our own loop, so that online methods and evaluation see the same velocity the loss trains: the
pipeline's σ schedule (``scheduler.set_timesteps``, with the resolution-dependent shift μ where the scheduler
shifts dynamically), classifier-free guidance ``v_u + w·(v_c − v_u)`` where the family has an unconditional input,
and the scheduler's Euler step ``x ← x + (σ_next − σ)·v`` in fp32.

For policy-gradient methods :meth:`FlowMatchFamily.sample_trajectory` turns chosen steps of that ODE into the SDE
with the same marginals of Flow-GRPO (Liu et al., arXiv 2505.05470, eq. 9 and ``sde_step_with_logprob``), with
``σ_t = a·√(σ/(1 − σ))`` (``a`` = noise level; at σ = 1 the denominator takes the next grid point) and
Δ = σ_next − σ < 0:

    μ = x·(1 + σ_t²·Δ/(2σ)) + v·(1 + σ_t²·(1 − σ)/(2σ))·Δ,   s = σ_t·√(−Δ),   x_next = μ + s·z

and records each step's Gaussian log-density, averaged over the latent's elements as Flow-GRPO does (which keeps
ratios near 1). :meth:`FlowMatchFamily.transition_log_prob` recomputes it for a stored transition with the same
code, so with unchanged weights the training ratio is exactly 1.
"""

from __future__ import annotations

import copy
import itertools
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from diffalign.diffusion.families.base import DiffusionFamily, FamilyOptions
from diffalign.diffusion.timesteps import TimestepSettings, draw_fractions, flow_weights


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``[B]`` → ``[B, 1, ...]`` broadcastable against ``like``, in fp32."""
    return values.float().reshape(-1, *[1] * (like.ndim - 1))


def sde_step_distribution(
    latents: Tensor, velocity: Tensor, sigma: Tensor, next_sigma: Tensor, noise_level: float, sigma_cap: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (fp32; std ``[B, 1, ...]``) of Flow-GRPO's SDE step from σ to σ_next.

    ``sigma``, ``next_sigma`` ``[B]``; ``sigma_cap`` replaces σ in ``1 − σ`` where σ = 1 (the grid's next point).
    """
    x, v = latents.float(), velocity.float()
    s, s_next = per_sample(sigma, x), per_sample(next_sigma, x)
    delta = s_next - s
    bounded = torch.where(s >= 1, per_sample(sigma_cap, x), s)
    std_t = noise_level * torch.sqrt(s / (1 - bounded))
    mean = x * (1 + std_t**2 * delta / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * delta
    return mean, std_t * torch.sqrt(-delta)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(sample; mean, std²) per element, averaged over each sample's elements: ``[B]`` (fp32)."""
    log_density = -((sample.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, sample.ndim)))


@dataclass
class Trajectory:
    """A sampled denoising chain: ``latents`` ``[N, S + 1, ...]`` from the initial noise to the sample, the
    schedule ``sigmas`` ``[S + 1]``, which of the S steps were stochastic (``sde_steps`` ``[S]``) and the log-prob
    of each stochastic transition under the sampling policy (``log_probs`` ``[N, S]``, 0 on ODE steps)."""

    latents: Tensor
    sigmas: Tensor
    sde_steps: Tensor
    log_probs: Tensor

    @property
    def samples(self) -> Tensor:
        return self.latents[:, -1]


@dataclass
class Transition:
    """One SDE step recomputed under a denoiser: ``log p(next | latents)`` ``[B]`` and the Gaussian it comes
    from (``mean``, ``std`` ``[B, 1, ...]``, fp32), with the sampler's ``velocity``, for a KL to a reference."""

    log_prob: Tensor
    mean: Tensor
    std: Tensor
    velocity: Tensor


class FlowMatchFamily(DiffusionFamily):
    """Rectified-flow families: ``timesteps`` are σ in (0, 1], the denoiser predicts the velocity ``ε − x0``."""

    capabilities = frozenset({"flow_matching", "stepwise_guidance"})
    default_density: ClassVar[str] = "logit_normal"
    noise_scheduler: FlowMatchEulerDiscreteScheduler

    def __init__(
        self, pretrained_path: str, timesteps: TimestepSettings | None = None, options: FamilyOptions | None = None
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        self.noise_scheduler = self.load_noise_scheduler(pretrained_path)

    @classmethod
    def load_noise_scheduler(cls, pretrained_path: str) -> FlowMatchEulerDiscreteScheduler:
        """The Euler scheduler of the pipeline's ``scheduler/`` folder (SANA reads its DPM-Solver config's shift)."""
        return FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained_path, subfolder="scheduler")

    # --- training ---------------------------------------------------------------------------------------------
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """σ ``[B]`` (fp32) from the training grid at ``floor(u·T)`` (see the module docstring)."""
        count = len(self.noise_scheduler.sigmas)
        fractions = draw_fractions(self.timesteps, batch_size, device, generator, self.default_density, noisy_first=True)
        indices = ((1 - fractions) * count).long().clamp(max=count - 1)
        return self.noise_scheduler.sigmas.to(device=device, dtype=torch.float32)[indices]

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigma = per_sample(timesteps, latents)
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return noise.float() - latents.float()

    def error_weights(self, timesteps: Tensor) -> Tensor | None:
        if self.timesteps.weighting in ("sigma_sqrt", "cosmap"):
            return flow_weights(self.timesteps.weighting, timesteps)
        return super().error_weights(timesteps)

    # --- sampling ---------------------------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latents (no batch dimension) at the sampling size."""

    @abstractmethod
    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """Denoiser inputs for sampling ``prompts`` and whether they are guided: then they hold the unconditional
        (empty-prompt) inputs followed by the conditional ones, ``2N`` in all, for classifier-free guidance."""

    def inference_sigmas(self, num_inference_steps: int, device: torch.device) -> Tensor:
        """The pipeline's σ schedule for ``num_inference_steps`` steps, ending at 0 (fp32)."""
        scheduler = copy.deepcopy(self.noise_scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device, **self.schedule_arguments(num_inference_steps))
        return scheduler.sigmas.float()

    def schedule_arguments(self, num_inference_steps: int) -> dict[str, Any]:
        """Extra ``set_timesteps`` arguments (FLUX: its σ grid and the shift μ)."""
        return {}

    def velocity(
        self,
        denoiser: nn.Module,
        latents: Tensor,
        sigma: Tensor,
        inputs: dict[str, Any],
        guided: bool,
        guidance_scale: float,
    ) -> Tensor:
        """The sampler's velocity at σ ``[B]`` (fp32): :meth:`guide` over guided inputs, else the conditional
        prediction."""
        if not guided:
            return self.predict(denoiser, latents, sigma, inputs).float()
        prediction = self.predict(denoiser, torch.cat([latents, latents]), sigma.repeat(2), inputs).float()
        unconditional, conditional = prediction.chunk(2)
        return self.guide(unconditional, conditional, guidance_scale)

    def guide(self, unconditional: Tensor, conditional: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance ``v_u + w·(v_c − v_u)`` of two velocities (fp32)."""
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def sample(
        self,
        denoiser: nn.Module,
        prompts: list[str],
        generators: list[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> Tensor:
        trajectory = self.sample_trajectory(
            denoiser, prompts, generators, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
        )
        return trajectory.samples

    @torch.no_grad()
    def sample_trajectory(
        self,
        denoiser: nn.Module,
        prompts: list[str],
        generators: list[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        noise_level: float = 0.0,
        sde_steps: Tensor | None = None,
        initial_latents: Tensor | None = None,
    ) -> Trajectory:
        """The chain of ``sample`` with the steps marked in ``sde_steps`` (``[S]`` bool; default: none)
        stochastic at ``noise_level``; each sample's step noise comes from its own generator, after its
        initial noise. ``initial_latents`` ``[N, ...]`` start the chain instead of noise drawn from the
        generators (which then draw only the step noise)."""
        device = next(denoiser.parameters()).device
        dtype = next(denoiser.parameters()).dtype
        inputs, guided = self.sampling_inputs(prompts, guidance_scale)
        shape = self.latent_shape()
        if initial_latents is None:
            # Each sample's initial noise from its own generator, as diffusers' randn_tensor draws it.
            noise = [torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in generators]
            initial_latents = torch.stack(noise)
        latents = initial_latents.to(device, dtype)
        sigmas = self.inference_sigmas(num_inference_steps, device)
        stochastic = torch.zeros(len(sigmas) - 1, dtype=torch.bool) if sde_steps is None else sde_steps.cpu()
        chain, log_probs = [latents], torch.zeros(len(prompts), len(stochastic), device=device)
        for step, (sigma, next_sigma) in enumerate(itertools.pairwise(sigmas)):
            batch_sigma = sigma.expand(len(prompts))
            velocity = self.velocity(denoiser, latents, batch_sigma, inputs, guided, guidance_scale)
            if stochastic[step]:
                mean, std = sde_step_distribution(
                    latents, velocity, batch_sigma, next_sigma.expand(len(prompts)), noise_level, sigmas[1].expand(1)
                )
                step_noise = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators])
                latents = (mean + std * step_noise.to(device)).to(dtype)
                log_probs[:, step] = gaussian_log_prob(latents, mean, std)
            else:
                latents = (latents.float() + (next_sigma - sigma) * velocity).to(dtype)
            chain.append(latents)
        return Trajectory(torch.stack(chain, dim=1), sigmas, stochastic, log_probs)

    def transition_log_prob(
        self,
        denoiser: nn.Module,
        latents: Tensor,
        next_latents: Tensor,
        sigma: Tensor,
        next_sigma: Tensor,
        sigma_cap: Tensor,
        inputs: dict[str, Any],
        guided: bool,
        guidance_scale: float,
        noise_level: float,
    ) -> Transition:
        """One SDE step of a stored chain recomputed under ``denoiser`` (differentiable): its log-prob, mean, std
        and velocity; the same maths as :meth:`sample_trajectory`."""
        velocity = self.velocity(denoiser, latents, sigma, inputs, guided, guidance_scale)
        mean, std = sde_step_distribution(latents, velocity, sigma, next_sigma, noise_level, sigma_cap)
        return Transition(gaussian_log_prob(next_latents, mean, std), mean, std, velocity)


class GridFlowFamily(FlowMatchFamily):
    """Flow families whose transformer sees the VAE's latent grid itself (SD3 with its own 2×2 patch embedding,
    SANA): samples of ``model.sample_resolution`` px, by default the transformer's ``sample_size`` latents. The
    family provides ``vae_scale_factor`` (``ImageLatents``)."""

    def latent_shape(self) -> tuple[int, ...]:
        size = self.options.sample_resolution or self.denoiser.config.sample_size * self.vae_scale_factor
        return (self.denoiser.config.in_channels, size // self.vae_scale_factor, size // self.vae_scale_factor)


class PackedFlowFamily(FlowMatchFamily):
    """Flow families whose transformer takes 2×2 patches of the latents as tokens (FLUX.1, Qwen-Image): samples of
    ``model.sample_resolution`` px (default 1024, both pipelines' default: 128 latents × the VAE's 8) on the grid
    ``linspace(1, 1/N, N)`` shifted by μ for the packed sequence length (``calculate_shift``, the same in both
    pipelines). The family provides ``vae_scale_factor`` (``ImageLatents``)."""

    native_size: ClassVar[int] = 1024

    def latent_shape(self) -> tuple[int, ...]:
        size = (self.options.sample_resolution or self.native_size) // self.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, size, size)

    def schedule_arguments(self, num_inference_steps: int) -> dict[str, Any]:
        _, height, width = self.latent_shape()
        config = self.noise_scheduler.config
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), "mu": mu}
