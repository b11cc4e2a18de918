"""FLUX.2 [klein] (Black Forest Labs): a double/single-stream transformer (``Flux2Transformer2DModel``) on FLUX.2's
32-channel VAE latents patchified 2×2 into 128 channels, rectified-flow training (families/flow.py), Qwen3
conditioning, as ``Flux2KleinPipeline`` assembles them.

Latents follow diffusers' ``train_dreambooth_lora_flux2_klein.py``: the VAE's latents patchified 2×2 and normalised
by the VAE's own batch-norm statistics, ``z = (patchify(x) − running_mean)/√(running_var + eps)`` on each of the 128
channels; the family's latents are those ``[B, 128, h/2, w/2]`` grids and the transformer takes each position as a
token with the 4-D position id (0, row, column, 0). The example encodes with the posterior's mode; the family draws
from the posterior, as every family does, so that cached latents stay stochastic. σ is drawn uniformly from the
unshifted training grid (the example's default weighting "none"), and the transformer takes σ as its timestep.

Conditioning is the pipeline's ``encode_prompt``: each caption in Qwen3's chat template (a user turn, the generation
prompt, thinking off), padded to ``max_text_length`` tokens (512, the pipeline's default), the hidden states of
layers 9, 18 and 27 joined on channels. The transformer takes no text mask, so the padding's states are conditioning
too and are kept.

Sampling is the pipeline's: σ = linspace(1, 1/N, N) shifted by the empirical μ (``compute_empirical_mu``) of the token
count and N; the base models (``is_distilled: false``) guide against the empty prompt, the step-distilled ones not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import Tensor, nn

from diffalign.diffusion.families.base import (
    ChannelNormalization,
    FamilyOptions,
    ImageLatents,
    LatentNormalization,
    OneTextEncoderPipeline,
)
from diffalign.diffusion.families.flow import FlowMatchFamily
from diffalign.diffusion.timesteps import TimestepSettings

DEFAULT_TEXT_LENGTH = 512  # Flux2KleinPipeline's default max_sequence_length
NATIVE_SIZE = 1024  # the pipeline's default sample: 128 latents × the VAE's 8


def batched(transform: Callable[[Tensor], Tensor], latents: Tensor) -> Tensor:
    """``transform`` of ``[B, C, h, w]`` latents applied to one sample ``[C, h, w]`` as well (the latent cache
    normalises one sample at a time)."""
    return transform(latents.unsqueeze(0)).squeeze(0) if latents.ndim == 3 else transform(latents)


@dataclass(frozen=True)
class PatchedBatchNormalization(ChannelNormalization):
    """FLUX.2's latent map: the VAE's ``[.., 32, h, w]`` latents as 2×2 patches on ``[.., 128, h/2, w/2]``
    channels, each normalised by the batch-norm mean and std (``mean``, ``std``: 128 values)."""

    def to_latents(self, vae_latents: Tensor) -> Tensor:
        return super().to_latents(batched(Flux2KleinPipeline._patchify_latents, vae_latents))

    def from_latents(self, latents: Tensor) -> Tensor:
        return batched(Flux2KleinPipeline._unpatchify_latents, super().from_latents(latents))


class Flux2KleinFamily(ImageLatents, OneTextEncoderPipeline, FlowMatchFamily):
    pipeline_class = Flux2KleinPipeline
    denoiser_class = Flux2Transformer2DModel
    vae_class = AutoencoderKLFlux2
    default_text_length = DEFAULT_TEXT_LENGTH
    denoiser_subfolder = "transformer"
    default_density = "uniform"  # the klein training example's default weighting scheme ("none")
    supported_options = frozenset({"sample_resolution", "max_text_length"})
    resolution_multiple = 16  # the VAE's 8 times the 2×2 patches
    is_distilled = False  # a step-distilled checkpoint samples without guidance

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, vae_path, timesteps, options)
        self.is_distilled = bool(self._prompt_pipeline.config.is_distilled)

    @property
    def latent_normalization(self) -> LatentNormalization:
        batch_norm, eps = self.vae.bn, self.vae.config.batch_norm_eps
        std = torch.sqrt(batch_norm.running_var.float() + eps)
        return PatchedBatchNormalization(1.0, 0.0, tuple(batch_norm.running_mean.tolist()), tuple(std.tolist()))

    def pipeline_settings(self) -> dict[str, Any]:
        return {"is_distilled": self.is_distilled}

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``prompt_embeds`` ``[B, max_text_length, 3·hidden]``: three Qwen3 layers' states of each caption."""
        embeds, _ = self._prompt_pipeline.encode_prompt(
            prompts, device=self.text_encoder.device, max_sequence_length=self.max_text_length
        )
        return {"prompt_embeds": embeds}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        embeds = prompt_embeds["prompt_embeds"]
        text_ids = Flux2KleinPipeline._prepare_text_ids(embeds).to(embeds.device)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        """The velocity ``[B, 128, h, w]``: each latent position a token with its position id."""
        batch, channels, height, width = noisy_latents.shape
        tokens = noisy_latents.flatten(2).transpose(1, 2)
        image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy_latents).to(noisy_latents.device)
        output = denoiser(hidden_states=tokens, timestep=timesteps, img_ids=image_ids, guidance=None, **inputs)
        return output.sample.transpose(1, 2).reshape(batch, channels, height, width)

    # --- sampling ---------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        size = (self.options.sample_resolution or NATIVE_SIZE) // (self.vae_scale_factor * 2)
        return (self.denoiser.config.in_channels, size, size)

    def schedule_arguments(self, num_inference_steps: int) -> dict[str, Any]:
        _, height, width = self.latent_shape()
        return {
            "sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps),
            "mu": compute_empirical_mu(height * width, num_inference_steps),
        }

    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """Guidance against the empty prompt when ``guidance_scale > 1``, for base models only (the pipeline's
        ``do_classifier_free_guidance``)."""
        guided = guidance_scale > 1 and not self.is_distilled
        embeds = self.encode_prompts(([""] * len(prompts) if guided else []) + list(prompts))
        return self.denoiser_inputs(embeds, {}), guided
