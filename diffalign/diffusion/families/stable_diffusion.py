"""Stable Diffusion 1.x/2.x (one CLIP text encoder) and SDXL (two text encoders, pooled and size conditioning)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.diffusion.families.base import FamilyOptions, ImageVAEFamily
from diffalign.diffusion.timesteps import TimestepSettings


def _tokenize(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device) -> Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


class StableDiffusionFamily(ImageVAEFamily):
    pipeline_class = StableDiffusionPipeline

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        self.tokenizer = CLIPTokenizer.from_pretrained(pretrained_path, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(pretrained_path, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(vae_path or pretrained_path, subfolder=None if vae_path else "vae")
        self.denoiser = UNet2DConditionModel.from_pretrained(pretrained_path, subfolder="unet")

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder}

    def build_pipeline(self, denoiser: nn.Module) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=denoiser,
            scheduler=DDIMScheduler.from_config(self.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        input_ids = _tokenize(self.tokenizer, prompts, self.text_encoder.device)
        return {"prompt_embeds": self.text_encoder(input_ids)[0]}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": prompt_embeds["prompt_embeds"]}


class StableDiffusionXLFamily(ImageVAEFamily):
    pipeline_class = StableDiffusionXLPipeline

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        self.tokenizer = CLIPTokenizer.from_pretrained(pretrained_path, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(pretrained_path, subfolder="tokenizer_2")
        self.text_encoder = CLIPTextModel.from_pretrained(pretrained_path, subfolder="text_encoder")
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(pretrained_path, subfolder="text_encoder_2")
        self.vae = AutoencoderKL.from_pretrained(vae_path or pretrained_path, subfolder=None if vae_path else "vae")
        self.denoiser = UNet2DConditionModel.from_pretrained(pretrained_path, subfolder="unet")
        # SDXL's stock VAE overflows in fp16 (NaN latents); only a fix VAE such as sdxl-vae-fp16-fix may go below fp32.
        self.vae_needs_fp32 = vae_path is None

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def build_pipeline(self, denoiser: nn.Module) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=denoiser,
            scheduler=DDIMScheduler.from_config(self.scheduler_config),
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """SDXL conditioning: penultimate hidden states of both encoders, concatenated; pooled from the second."""
        hidden_states = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = encoder(_tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # text_embeds of the projection model (the last encoder)
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        embeds = prompt_embeds["prompt_embeds"]
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {
                "text_embeds": prompt_embeds["pooled_prompt_embeds"],
                "time_ids": self.time_ids(batch, embeds.shape[0], embeds.device, embeds.dtype),
            },
        }

    def time_ids(self, batch: dict[str, Any], batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``add_time_ids`` = original size + crop top-left + target size per sample (SDXL micro-conditioning).

        Without size information in the batch (sampling, or data without it) each image is its own uncropped
        original at the model's native resolution, as the SDXL pipeline assumes.
        """
        native = self.denoiser.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        default_size = torch.tensor([native, native], device=device).expand(batch_size, 2)
        original = batch.get("original_size", default_size)
        crop = batch.get("crop_top_left", torch.zeros(batch_size, 2, device=device))
        target = batch.get("target_size", default_size)
        parts = [torch.as_tensor(part, device=device).reshape(batch_size, 2) for part in (original, crop, target)]
        return torch.cat(parts, dim=1).to(dtype)
