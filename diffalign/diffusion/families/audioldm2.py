"""AudioLDM2 (Liu et al., 2024, arXiv 2308.05734): the mel layout with a language-model conditioning chain.

A prompt goes through CLAP (one pooled token) and T5 (a token sequence), a projection into GPT-2's space, and
GPT-2 generating 8 new hidden states (the "AudioMAE" sequence, ``max_new_tokens`` of the language model's
config). The ``AudioLDM2UNet2DConditionModel`` cross-attends to the generated states
(``encoder_hidden_states``) and to the T5 states (``encoder_hidden_states_1`` with their attention mask).

The chain, generation included, runs once per prompt in :meth:`AudioLDM2Family.encode_prompts`, which the latent
cache stores; a training step only reads the cached tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AudioLDM2Pipeline, AudioLDM2UNet2DConditionModel
from torch import Tensor
from transformers import T5EncoderModel

from diffalign.diffusion.families.base import FamilyOptions
from diffalign.diffusion.families.musicldm import MelLatentFamily
from diffalign.diffusion.timesteps import TimestepSettings

logger = logging.getLogger(__name__)


class AudioLDM2Family(MelLatentFamily):
    pipeline_class = AudioLDM2Pipeline
    denoiser_class = AudioLDM2UNet2DConditionModel
    component_names = (
        "vae",
        "text_encoder",
        "text_encoder_2",
        "projection_model",
        "language_model",
        "tokenizer",
        "tokenizer_2",
        "feature_extractor",
        "vocoder",
    )
    # T5 states are padded to one length so that cached prompts batch together; longer prompts are cut there.
    max_text_tokens = 128

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, vae_path, timesteps, options)
        if not isinstance(self.text_encoder_2, T5EncoderModel):
            raise ValueError(
                f"{pretrained_path}: text_encoder_2 is a {type(self.text_encoder_2).__name__}; only the text-to-audio "
                "AudioLDM2 checkpoints (T5EncoderModel) are supported, not the text-to-speech ones (VitsModel)"
            )

    @property
    def text_length(self) -> int:
        return min(self.tokenizer_2.model_max_length, self.max_text_tokens)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``prompt_embeds`` (T5) ``[B, text_length, D_t5]`` with its ``attention_mask``, and the GPT-2
        ``generated_prompt_embeds`` ``[B, 8, D_gpt2]``, by ``AudioLDM2Pipeline.encode_prompt``.

        Each prompt is encoded on its own: in a batch the pipeline pads T5's tokens to the longest prompt, which
        shifts GPT-2's positions and changes the generated states of the shorter prompts.
        """
        pipeline = self.build_pipeline(self.denoiser)
        length = self.text_length
        text_states, masks, generated = [], [], []
        for prompt in prompts:
            prompt_embeds, attention_mask, generated_embeds = pipeline.encode_prompt(
                prompt, self.text_encoder.device, num_waveforms_per_prompt=1, do_classifier_free_guidance=False
            )
            if prompt_embeds.shape[1] > length:
                logger.warning(
                    "AudioLDM2: prompt %r has %d T5 tokens; the U-Net sees the first %d",
                    prompt,
                    prompt_embeds.shape[1],
                    length,
                )
            padding = length - min(prompt_embeds.shape[1], length)
            text_states.append(F.pad(prompt_embeds[:, :length], (0, 0, 0, padding)))
            masks.append(F.pad(attention_mask[:, :length], (0, padding)))
            generated.append(generated_embeds)
        return {
            "prompt_embeds": torch.cat(text_states),
            "attention_mask": torch.cat(masks),
            "generated_prompt_embeds": torch.cat(generated),
        }

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        return {
            "encoder_hidden_states": prompt_embeds["generated_prompt_embeds"],
            "encoder_hidden_states_1": prompt_embeds["prompt_embeds"],
            "encoder_attention_mask_1": prompt_embeds["attention_mask"],
        }

    def embedding_inputs(self, prompt_embeds: dict[str, Tensor], negative_embeds: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "prompt_embeds": prompt_embeds["prompt_embeds"],
            "attention_mask": prompt_embeds["attention_mask"],
            "generated_prompt_embeds": prompt_embeds["generated_prompt_embeds"],
            "negative_prompt_embeds": negative_embeds["prompt_embeds"],
            "negative_attention_mask": negative_embeds["attention_mask"],
            "negative_generated_prompt_embeds": negative_embeds["generated_prompt_embeds"],
        }
