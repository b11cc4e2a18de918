"""The AudioLDM/MusicLDM layout: latent diffusion on log-mel spectrograms with CLAP class-label conditioning.

MusicLDM (Chen et al., 2023, arXiv 2308.01546) and AudioLDM (Liu et al., 2023, arXiv 2301.12503) share one
layout in diffusers: an ``AutoencoderKL`` that treats the log-mel spectrogram ``[B, 1, frames, 64]`` as a
one-channel image, a ``UNet2DConditionModel`` whose only text input is a CLAP text embedding passed as
``class_labels`` (its cross-attention blocks get ``encoder_hidden_states=None`` and act as self-attention), a
``SpeechT5HifiGan`` vocoder back to 16 kHz audio and a DDIM scheduler with ε-prediction.

:class:`MelLatentFamily` holds what every mel family shares (AudioLDM2 too): loading the pipeline's components,
the audio decoder matching the vocoder's front-end, decoding latents to waveforms, and sampling through the
diffusers pipeline with prompt embeddings we compute ourselves (MusicLDM's own prompt path fails under
transformers 5, whose ``ClapModel.get_text_features`` returns a model output instead of a tensor).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, MusicLDMPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import ClapModel, SpeechT5HifiGan

from diffalign.diffusion.audio import AudioDecoder, MelSettings
from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.diffusion.families.base import FamilyOptions, ImageVAEFamily, with_adapter_support
from diffalign.diffusion.timesteps import TimestepSettings
from diffalign.rewards.base import Audio


class MelLatentFamily(ImageVAEFamily):
    """Latent diffusion on HiFi-GAN log-mel spectrograms (the AudioLDM lineage); DDPMFamily does the noising.

    Subclasses name their pipeline, its components besides the U-Net and the scheduler, the U-Net class, how
    prompts are encoded and how encoded prompts enter the U-Net and the pipeline.
    """

    hub_pipeline_tag = "text-to-audio"

    denoiser_class: type[nn.Module] = UNet2DConditionModel
    # Pipeline components besides the denoiser and the scheduler, held as attributes of the same names.
    component_names: tuple[str, ...]
    vae: AutoencoderKL
    vocoder: SpeechT5HifiGan
    sample_range = None  # log-mel is unbounded
    supported_options = frozenset()

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        overrides: dict[str, Any] = {
            "unet": with_adapter_support(self.denoiser_class).from_pretrained(pretrained_path, subfolder="unet")
        }
        if vae_path:
            overrides["vae"] = AutoencoderKL.from_pretrained(vae_path)
        pipeline = self.pipeline_class.from_pretrained(pretrained_path, **overrides)
        for name in self.component_names:
            setattr(self, name, getattr(pipeline, name))
        self.denoiser = pipeline.unet

    @property
    def sample_rate(self) -> int:
        return self.vocoder.config.sampling_rate

    def frozen_modules(self) -> dict[str, nn.Module]:
        components = {name: getattr(self, name) for name in self.component_names}
        return {name: module for name, module in components.items() if isinstance(module, nn.Module)}

    def build_pipeline(self, denoiser: nn.Module) -> Any:
        components = {name: getattr(self, name) for name in self.component_names}
        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        return self.pipeline_class(**components, unet=denoiser, scheduler=scheduler)

    # --- audio ------------------------------------------------------------------------------------------------
    def media_decoder(self, config: DiffusionDataConfig) -> AudioDecoder:
        """Mono clips at the vocoder's rate, as long as the pipeline's default output (the U-Net's ``sample_size``
        in latent frames, 10.24 s for the published models), as the vocoder's log-mel spectrogram."""
        hop_length = math.prod(self.vocoder.config.upsample_rates)
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        frames = self.denoiser.config.sample_size * vae_scale_factor
        mel = MelSettings(
            sample_rate=self.sample_rate,
            hop_length=hop_length,
            mel_bins=self.vocoder.config.model_in_dim,
            fmax=self.sample_rate / 2,
        )
        return AudioDecoder(sample_rate=self.sample_rate, num_samples=frames * hop_length, mel=mel)

    def decode(self, latents: Tensor) -> Audio:
        """Scaled latents → log-mel (VAE) → waveforms (vocoder). Differentiable."""
        mel = self.decode_to_vae_input(latents)
        waveforms = self.vocoder(mel.squeeze(1).to(self.vocoder.dtype))
        return Audio(waveforms.float(), self.sample_rate)

    @abstractmethod
    def embedding_inputs(self, prompt_embeds: dict[str, Tensor], negative_embeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """The pipeline's keyword arguments for prompts and the negative (empty) prompts, from encode_prompts."""

    def pipeline_prompt_inputs(self, prompts: list[str]) -> dict[str, Tensor]:
        return self.embedding_inputs(self.encode_prompts(prompts), self.encode_prompts([""] * len(prompts)))


class MusicLDMFamily(MelLatentFamily):
    """MusicLDM: the CLAP text embedding (``ClapModel``) is the U-Net's class label."""

    pipeline_class = MusicLDMPipeline
    component_names = ("vae", "text_encoder", "tokenizer", "feature_extractor", "vocoder")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """The L2-normalised CLAP text embedding ``[B, D]``, tokens padded as the pipeline pads them."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        if isinstance(self.text_encoder, ClapModel):
            features = self.text_encoder.get_text_features(tokens.input_ids, attention_mask=tokens.attention_mask)
            # transformers >= 5 returns a model output whose pooler_output is the normalised projection.
            embeds = features if isinstance(features, Tensor) else features.pooler_output
        else:  # AudioLDM's ClapTextModelWithProjection: its pipeline normalises text_embeds itself
            embeds = F.normalize(self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds, dim=-1)
        return {"class_labels": embeds}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {"encoder_hidden_states": None, "class_labels": prompt_embeds["class_labels"]}

    def embedding_inputs(self, prompt_embeds: dict[str, Tensor], negative_embeds: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "prompt_embeds": prompt_embeds["class_labels"],
            "negative_prompt_embeds": negative_embeds["class_labels"],
        }


class AudioLDMFamily(MusicLDMFamily):
    """AudioLDM: the MusicLDM layout with a ``ClapTextModelWithProjection`` text encoder."""

    pipeline_class = AudioLDMPipeline
    component_names = ("vae", "text_encoder", "tokenizer", "vocoder")
