"""The narrow interface between a model family and everything else in the diffusion trainer.

A family knows four things about its models: how to encode a prompt into conditioning, how to noise a clean
latent, what the denoiser regresses (ε, v, flow velocity), and how to call the denoiser. Methods and the trainer
talk to a family only through this interface and never ask which family they have.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMScheduler
from diffusers.loaders.peft import PeftAdapterMixin
from torch import Tensor, nn

from diffalign.diffusion.data import DiffusionDataConfig, image_decoder
from diffalign.diffusion.transforms import MediaDecoder

if TYPE_CHECKING:
    from diffalign.rewards.base import Audio


@dataclass
class Posterior:
    """A diagonal-Gaussian VAE posterior; sampling keeps latents stochastic even when cached."""

    mean: Tensor
    std: Tensor

    def sample(self, seeds: list[int] | None = None) -> Tensor:
        """A latent per sample; with ``seeds`` sample i draws from a generator seeded ``seeds[i]``."""
        if seeds is None:
            noise = torch.randn_like(self.mean)
        else:
            noise = torch.stack(
                [
                    torch.randn(
                        self.mean.shape[1:],
                        generator=torch.Generator(self.mean.device).manual_seed(seed),
                        device=self.mean.device,
                        dtype=self.mean.dtype,
                    )
                    for seed in seeds
                ]
            )
        return self.mean + self.std * noise


@functools.cache
def with_adapter_support(model_class: type[nn.Module]) -> type[nn.Module]:
    """``model_class`` with diffusers' PEFT methods (``add_adapter``, ``disable_adapters``, ``load_lora_adapter``),
    which LoRA training and the adapter-disabled reference call; some denoisers (AudioLDM2's U-Net, Stable
    Audio's DiT) lack them. The subclass keeps the name and module of the stock class, so the configs it saves
    name the stock class and load without this package."""
    if issubclass(model_class, PeftAdapterMixin):
        return model_class
    return type(model_class.__name__, (model_class, PeftAdapterMixin), {"__module__": model_class.__module__})


class DiffusionFamily(ABC):
    """Components of one pretrained model plus the family's maths. ``denoiser`` is what gets trained."""

    denoiser: nn.Module
    vae: nn.Module  # latents of every family come from a VAE (AutoencoderKL, Oobleck)
    # Name of the denoiser's sub-folder in the pipeline directory ("unet" or "transformer").
    denoiser_subfolder: str = "unet"
    # The diffusers pipeline class whose `from_pretrained` reads this family.
    pipeline_class: Any

    def __init__(self, pretrained_path: str) -> None:
        self.pretrained_path = pretrained_path

    @classmethod
    def from_modules(cls, pretrained_path: str = "in-memory", **components: Any) -> DiffusionFamily:
        """The family around components already in memory (``denoiser=``, ``vae=``, ``noise_scheduler=``, ...),
        for benchmarks and tests that build models from a config instead of reading a pipeline directory."""
        family = cls.__new__(cls)
        family.pretrained_path = pretrained_path
        for name, component in components.items():
            setattr(family, name, component)
        return family

    # --- conditioning -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Encode prompts once; the result is cacheable (batch-first tensors, no model state)."""

    @abstractmethod
    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the denoiser call for a batch, from (possibly cached) prompt embeddings."""

    # --- latents ------------------------------------------------------------------------------------------------
    @abstractmethod
    def media_decoder(self, config: DiffusionDataConfig) -> MediaDecoder:
        """How stored pair members become the input of :meth:`encode` (image transforms, audio resampling)."""

    def encode(self, samples: Tensor) -> Posterior:
        """VAE posterior of raw samples (pixels in [-1, 1], or the family's audio features), unscaled."""
        distribution = self.vae.encode(samples.to(self.vae.dtype)).latent_dist
        return Posterior(mean=distribution.mean.float(), std=distribution.std.float())

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor | Audio:
        """Scaled latents back to what rewards score: images ``[B, 3, H, W]`` in [0, 1], or :class:`Audio`."""

    @property
    @abstractmethod
    def latent_scale(self) -> float:
        """The factor that maps VAE latents to the unit-variance space the denoiser was trained in."""

    # The range of stored media in the VAE's input space (pixels: [-1, 1]); None where unbounded (log-mel, waveform).
    sample_range: tuple[float, float] | None = None

    @torch.no_grad()
    def reencode(self, latents: Tensor, seeds: list[int] | None = None) -> Tensor:
        """Scaled latents as the data path makes them from the media that ``latents`` decode to: decoded by the
        VAE into its input space (pixels, log-mel or waveform), clamped to the media's range, encoded again and
        drawn from the posterior (sample ``i`` from a generator seeded ``seeds[i]``).

        Generated latents lie off the encoder's outputs; re-encoding them lets a generated sample stand in for
        stored media (SePPO's reference samples replace stored losers).
        """
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample.float()
        if self.sample_range is not None:
            decoded = decoded.clamp(*self.sample_range)
        return self.encode(decoded).sample(seeds) * self.latent_scale

    # --- noising and targets ------------------------------------------------------------------------------------
    @abstractmethod
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor: ...

    @abstractmethod
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor: ...

    @abstractmethod
    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor: ...

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        return denoiser(noisy_latents, timesteps, **inputs).sample

    @abstractmethod
    def build_pipeline(self, denoiser: nn.Module) -> Any:
        """The family's diffusers pipeline around ``denoiser`` (DDIM sampler), for sampling and export."""

    @torch.no_grad()
    def generate(
        self,
        denoiser: nn.Module,
        prompts: list[str],
        generators: list[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> Tensor | Audio:
        """One sample per prompt, prompt ``i`` drawn with ``generators[i]``: images ``[N, 3, H, W]`` in [0, 1]
        (CPU, fp32) by default; audio families return :class:`Audio`."""
        pipeline = self.build_pipeline(denoiser)
        pipeline.set_progress_bar_config(disable=True)
        output = pipeline(
            prompts,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="pt",
        )
        return output.images.float().cpu()

    # --- models the trainer moves, casts and freezes -------------------------------------------------------------
    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Everything except the denoiser (VAE, text encoders, vocoder); never trained, never saved."""

    def to(self, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> None:
        for name, module in self.frozen_modules().items():
            module.to(device, dtype=vae_dtype if (name == "vae" and vae_dtype is not None) else dtype)
        self.denoiser.to(device)


class DDPMFamily(DiffusionFamily):
    """Families trained with a discrete DDPM schedule (SD1.5, SDXL, MusicLDM, AudioLDM2): ε or v targets."""

    def __init__(self, pretrained_path: str) -> None:
        super().__init__(pretrained_path)
        # Whatever sampler the pipeline ships (DDIM, Euler, ...), training noise follows its DDPM schedule.
        self.noise_scheduler = DDPMScheduler.from_pretrained(pretrained_path, subfolder="scheduler")

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device, generator=generator)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(
            f"{self.pretrained_path}: scheduler prediction_type {self.prediction_type!r} is not supported; "
            "expected 'epsilon' or 'v_prediction'"
        )

    def alphas_cumprod(self, timesteps: Tensor) -> Tensor:
        return self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]


class ImageVAEFamily(DDPMFamily):
    """Latent image families with a diffusers ``AutoencoderKL``."""

    sample_range = (-1.0, 1.0)

    def media_decoder(self, config: DiffusionDataConfig) -> MediaDecoder:
        return image_decoder(config)

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)
