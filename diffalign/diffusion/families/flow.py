"""What the rectified-flow families (SD3, FLUX, ACE-Step) share: noising, the velocity target, training σ, loss
weights and an Euler sampler over the pipeline's inference schedule.

Training follows diffusers' SD3/FLUX training examples (``train_dreambooth_lora_sd3.py``, ``..._flux.py``):
``x_σ = (1 − σ)·x0 + σ·ε`` and the target ``v = ε − x0`` (Esser et al., "Scaling Rectified Flow Transformers",
arXiv 2403.03206). σ is the scheduler's training grid at index ``floor(u·T)``, ``u`` from ``timesteps.density``
(logit-normal by default, the paper's choice); with ``use_dynamic_shifting`` (FLUX) that grid is unshifted, as the
examples train. ``timesteps.weighting`` ``sigma_sqrt``/``cosmap`` weight each error as the SD3 example does.

Sampling is our own loop, so that online methods and evaluation see the same velocity the loss trains: the
pipeline's σ schedule (``scheduler.set_timesteps``, with the resolution-dependent shift μ where the scheduler
shifts dynamically), classifier-free guidance ``v_u + w·(v_c − v_u)`` where the family has an unconditional input,
and the scheduler's Euler step ``x ← x + (σ_next − σ)·v`` in fp32.
"""

from __future__ import annotations

import copy
import itertools
from abc import abstractmethod
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from diffalign.diffusion.families.base import DiffusionFamily, FamilyOptions
from diffalign.diffusion.timesteps import TimestepSettings, draw_fractions, flow_weights


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``[B]`` → ``[B, 1, ...]`` broadcastable against ``like``, in fp32."""
    return values.float().reshape(-1, *[1] * (like.ndim - 1))


class FlowMatchFamily(DiffusionFamily):
    """Rectified-flow families: ``timesteps`` are σ in (0, 1], the denoiser predicts the velocity ``ε − x0``."""

    capabilities = frozenset({"flow_matching"})
    default_density: ClassVar[str] = "logit_normal"
    noise_scheduler: FlowMatchEulerDiscreteScheduler

    def __init__(
        self, pretrained_path: str, timesteps: TimestepSettings | None = None, options: FamilyOptions | None = None
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained_path, subfolder="scheduler")

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
        """The sampler's velocity at σ ``[B]`` (fp32): ``v_u + w·(v_c − v_u)`` over guided inputs, else the
        conditional prediction."""
        if not guided:
            return self.predict(denoiser, latents, sigma, inputs).float()
        prediction = self.predict(denoiser, torch.cat([latents, latents]), sigma.repeat(2), inputs).float()
        unconditional, conditional = prediction.chunk(2)
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
        device = next(denoiser.parameters()).device
        dtype = next(denoiser.parameters()).dtype
        inputs, guided = self.sampling_inputs(prompts, guidance_scale)
        # Each sample's initial noise from its own generator, as diffusers' randn_tensor draws it.
        noise = [torch.randn(self.latent_shape(), generator=g, device=g.device, dtype=dtype) for g in generators]
        latents = torch.stack(noise).to(device)
        sigmas = self.inference_sigmas(num_inference_steps, device)
        for sigma, next_sigma in itertools.pairwise(sigmas):
            velocity = self.velocity(denoiser, latents, sigma.expand(len(prompts)), inputs, guided, guidance_scale)
            latents = (latents.float() + (next_sigma - sigma) * velocity).to(dtype)
        return latents
