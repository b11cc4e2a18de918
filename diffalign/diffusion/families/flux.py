"""FLUX.1 (Black Forest Labs): a double/single-stream transformer (``FluxTransformer2DModel``) on 2×2-packed
16-channel VAE latents, rectified-flow training (families/flow.py), CLIP-L pooled + T5-XXL conditioning.

The family's latents are the VAE's ``[B, 16, h, w]`` (what the cache stores and the methods noise); ``predict``
packs them into the transformer's ``[B, h/2·w/2, 64]`` tokens with their latent image ids and unpacks the
velocity, as diffusers' FLUX training example does. Guidance-distilled checkpoints (FLUX.1-dev,
``guidance_embeds: true``) take the guidance scale as an input instead of classifier-free guidance: training
feeds ``model.guidance`` (3.5, the example's default), sampling the sampling guidance scale. The transformer takes
the timestep as σ; sampling shifts the schedule by the resolution-dependent μ (``calculate_shift``), as the
pipeline does. VAE factors: ``scaling_factor`` 0.3611 and ``shift_factor`` 0.1159 for FLUX.1.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn

from diffalign.diffusion.families.base import FamilyOptions, ImageLatents
from diffalign.diffusion.families.flow import PackedFlowFamily
from diffalign.diffusion.timesteps import TimestepSettings

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class FluxFamily(ImageLatents, PackedFlowFamily):
    pipeline_class = FluxPipeline
    denoiser_subfolder = "transformer"
    default_density = "uniform"  # the FLUX training example's default weighting scheme ("none")
    supported_options = frozenset({"sample_resolution", "max_text_length", "guidance"})
    max_text_length_limit = 512
    resolution_multiple = 16  # the VAE's 8 times the 2×2 packing

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        overrides: dict[str, Any] = {
            "transformer": FluxTransformer2DModel.from_pretrained(pretrained_path, subfolder="transformer")
        }
        if vae_path:
            overrides["vae"] = AutoencoderKL.from_pretrained(vae_path)
        pipeline = FluxPipeline.from_pretrained(pretrained_path, **overrides)
        for name in (*TEXT_COMPONENTS, "vae"):
            setattr(self, name, getattr(pipeline, name))
        self.denoiser = pipeline.transformer
        self._prompt_pipeline = pipeline

    @property
    def max_text_length(self) -> int:
        return self.options.max_text_length or 512  # the pipeline's default and maximum

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def build_pipeline(self, denoiser: nn.Module) -> FluxPipeline:
        components = {name: getattr(self, name) for name in (*TEXT_COMPONENTS, "vae")}
        return FluxPipeline(**components, transformer=denoiser, scheduler=self.noise_scheduler)

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """T5 ``prompt_embeds`` ``[B, L, 4096]`` and CLIP ``pooled_prompt_embeds`` ``[B, 768]``."""
        self._prompt_pipeline.transformer = self.denoiser
        prompt_embeds, pooled, _ = self._prompt_pipeline.encode_prompt(
            prompts, prompt_2=None, device=self.text_encoder.device, max_sequence_length=self.max_text_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return self._inputs(prompt_embeds, self.options.guidance)

    def _inputs(self, prompt_embeds: dict[str, Tensor], guidance: float) -> dict[str, Any]:
        states = prompt_embeds["prompt_embeds"]
        inputs = {
            "encoder_hidden_states": states,
            "pooled_projections": prompt_embeds["pooled_prompt_embeds"],
            "txt_ids": torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
        }
        if self.guidance_embedded:
            inputs["guidance"] = torch.full((states.shape[0],), guidance, device=states.device, dtype=torch.float32)
        return inputs

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        """The velocity ``[B, 16, h, w]``: latents packed into 2×2 tokens, the transformer run, the output unpacked."""
        batch, channels, height, width = noisy_latents.shape
        packed = FluxPipeline._pack_latents(noisy_latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, noisy_latents.device, noisy_latents.dtype
        )
        output = denoiser(hidden_states=packed, timestep=timesteps, img_ids=image_ids, **inputs).sample
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(output, height * scale, width * scale, scale)

    # --- sampling ---------------------------------------------------------------------------------------------
    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """No classifier-free guidance (the pipeline's default): the guidance scale enters as the embedding."""
        return self._inputs(self.encode_prompts(list(prompts)), guidance_scale), False
