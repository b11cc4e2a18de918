"""Stable Diffusion 3 / 3.5 (Esser et al., arXiv 2403.03206): an MMDiT (``SD3Transformer2DModel``) on 16-channel
VAE latents, rectified-flow training (families/flow.py), three text encoders.

Conditioning is the pipeline's own ``encode_prompt``: CLIP-L and CLIP-G penultimate states concatenated on
channels, zero-padded to T5's width and joined along the sequence with T5-XXL's states; pooled = both CLIPs'
projected pooled outputs. T5 is optional, as in diffusers: ``model.drop_text_encoders: [text_encoder_3]`` loads
the pipeline without it, and its states are zeros. The VAE maps with its ``scaling_factor`` *and*
``shift_factor`` (1.5305 and 0.0609 for SD3/3.5). The transformer takes the timestep as 1000·σ.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor, nn

from diffalign.diffusion.families.base import FamilyOptions, ImageLatents
from diffalign.diffusion.families.flow import GridFlowFamily
from diffalign.diffusion.timesteps import TimestepSettings

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class StableDiffusion3Family(ImageLatents, GridFlowFamily):
    pipeline_class = StableDiffusion3Pipeline
    denoiser_subfolder = "transformer"
    supported_options = frozenset({"sample_resolution", "max_text_length", "drop_text_encoders"})
    max_text_length_limit = 512
    optional_text_encoders = ("text_encoder_3",)
    resolution_multiple = 16  # the VAE's 8 times the transformer's 2×2 patches

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        overrides: dict[str, Any] = {
            "transformer": SD3Transformer2DModel.from_pretrained(pretrained_path, subfolder="transformer")
        }
        if vae_path:
            overrides["vae"] = AutoencoderKL.from_pretrained(vae_path)
        if "text_encoder_3" in self.options.drop_text_encoders:
            overrides.update(text_encoder_3=None, tokenizer_3=None)
        pipeline = StableDiffusion3Pipeline.from_pretrained(pretrained_path, **overrides)
        for name in (*TEXT_COMPONENTS, "vae"):
            setattr(self, name, getattr(pipeline, name))
        self.denoiser = pipeline.transformer
        self._prompt_pipeline = pipeline  # holds the components encode_prompt reads

    @property
    def max_text_length(self) -> int:
        return self.options.max_text_length or 256  # the pipeline's default

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def build_pipeline(self, denoiser: nn.Module) -> StableDiffusion3Pipeline:
        components = {name: getattr(self, name) for name in (*TEXT_COMPONENTS, "vae")}
        return StableDiffusion3Pipeline(**components, transformer=denoiser, scheduler=self.noise_scheduler)

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``prompt_embeds`` ``[B, 77 + T5 length, 4096]`` and ``pooled_prompt_embeds`` ``[B, 2048]``."""
        # The pipeline reads the transformer only for the width of absent T5 states; keep it the live denoiser.
        self._prompt_pipeline.transformer = self.denoiser
        prompt_embeds, _, pooled, _ = self._prompt_pipeline.encode_prompt(
            prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": prompt_embeds["prompt_embeds"],
            "pooled_projections": prompt_embeds["pooled_prompt_embeds"],
        }

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        return denoiser(hidden_states=noisy_latents, timestep=timesteps * 1000, **inputs).sample

    # --- sampling ---------------------------------------------------------------------------------------------
    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """Classifier-free guidance with the empty prompt as the unconditional input, as the pipeline does by
        default (``guidance_scale > 1``)."""
        guided = guidance_scale > 1
        embeds = self.encode_prompts(([""] * len(prompts) if guided else []) + list(prompts))
        return self.denoiser_inputs(embeds, {}), guided
