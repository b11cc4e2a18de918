"""SANA (Xie et al., arXiv 2410.10629): a linear-attention DiT (``SanaTransformer2DModel``) on the 32-channel latents
of a 32× deep-compression autoencoder (``AutoencoderDC``), rectified-flow training (families/flow.py), Gemma-2-2B-it
conditioning.

Latents are ``z = x·scaling_factor`` (0.41407, no shift) of the DC-AE's encoding, which is deterministic: it has no
posterior, so its posterior has zero width (``base.vae_posterior``) and a cached draw is the encoding itself. The
transformer's patch size is 1, so each latent position is a token (32 pixels a side).

Training follows SANA's own training configs (NVlabs/Sana ``configs/sana_config``): σ from the training grid
shifted by ``flow_shift`` (3.0; 6.0 for the 4K model), drawn logit-normal (mean 0, std 1, the flow families'
default), and the caption after the "complex human instruction" (``chi_prompt`` there, the pipeline's default
``complex_human_instruction``); the transformer takes the timestep as 1000·σ·``timestep_scale`` (1). diffusers'
DreamBooth example (``train_dreambooth_lora_sana.py``) trains otherwise: it reads the published
DPM-Solver config into a ``FlowMatchEulerDiscreteScheduler``, which drops ``flow_shift`` (σ unshifted), draws σ
uniformly and leaves the instruction out; ``timesteps.density: uniform`` draws uniformly here, on the shifted grid.

Conditioning is the pipeline's ``encode_prompt``: the lower-cased caption after the instruction, Gemma's last
hidden states padded on the right, of which the first (BOS) position and the last ``max_text_length − 1`` (300 in
all by default) are kept, with their mask. The padded positions' states are set to zero: the transformer's
cross-attention masks them, so nothing it computes changes, and the latent cache then stores only each caption's
own tokens. :meth:`SanaFamily.denoiser_inputs` cuts a batch to its longest caption, as Qwen-Image's does.

Sampling: the published scheduler is DPM-Solver++ (2nd order) on σ shifted by ``flow_shift``. The family samples
with Euler steps on ``FlowMatchEulerDiscreteScheduler``'s grid with the same shift (what ``SanaPipeline`` computes
given that scheduler, and what the SDE of policy-gradient methods is built on), guided against the empty prompt
encoded without the instruction, as the pipeline guides.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from torch import Tensor, nn

from diffalign.diffusion.families.base import (
    ImageLatents,
    OneTextEncoderPipeline,
    cut_to_longest_caption,
)
from diffalign.diffusion.families.flow import GridFlowFamily

DEFAULT_TEXT_LENGTH = 300  # SanaPipeline's default max_sequence_length
# The pipeline's default instruction, read from its signature so that it follows diffusers.
COMPLEX_HUMAN_INSTRUCTION: list[str] = inspect.signature(SanaPipeline.__call__).parameters[
    "complex_human_instruction"
].default


def flow_match_scheduler(config: dict[str, Any]) -> FlowMatchEulerDiscreteScheduler:
    """The Euler scheduler of a SANA scheduler config: a ``FlowMatchEulerDiscreteScheduler`` config as it is, the
    published flow DPM-Solver config (``use_flow_sigmas``) with its ``flow_shift`` as the shift."""
    if "flow_shift" not in config:
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config["flow_shift"]
    )


class SanaFamily(ImageLatents, OneTextEncoderPipeline, GridFlowFamily):
    pipeline_class = SanaPipeline
    denoiser_class = SanaTransformer2DModel
    vae_class = AutoencoderDC
    default_text_length = DEFAULT_TEXT_LENGTH
    denoiser_subfolder = "transformer"
    supported_options = frozenset({"sample_resolution", "max_text_length"})
    published_vae_factor = 32  # DC-AE f32
    resolution_multiple = 32  # the DC-AE's 32 pixels per latent, patch size 1

    @classmethod
    def load_noise_scheduler(cls, pretrained_path: str) -> FlowMatchEulerDiscreteScheduler:
        return flow_match_scheduler(FlowMatchEulerDiscreteScheduler.load_config(pretrained_path, subfolder="scheduler"))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)  # as SanaPipeline computes it

    # --- conditioning -----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``prompt_embeds`` ``[B, max_text_length, 2304]`` (zero where masked) and ``prompt_attention_mask``
        ``[B, max_text_length]`` of the captions after the complex human instruction."""
        return self._encode(prompts, COMPLEX_HUMAN_INSTRUCTION)

    @torch.no_grad()
    def _encode(self, prompts: list[str], instruction: list[str] | None) -> dict[str, Tensor]:
        embeds, mask, _, _ = self._prompt_pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.text_encoder.device,
            max_sequence_length=self.max_text_length,
            complex_human_instruction=instruction,
        )
        return {"prompt_embeds": embeds * mask.unsqueeze(-1).to(embeds.dtype), "prompt_attention_mask": mask}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        embeds, mask = cut_to_longest_caption(prompt_embeds["prompt_embeds"], prompt_embeds["prompt_attention_mask"])
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        timestep = timesteps * 1000 * self.denoiser.config.timestep_scale
        return denoiser(hidden_states=noisy_latents, timestep=timestep, **inputs).sample

    # --- sampling ---------------------------------------------------------------------------------------------
    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """Classifier-free guidance (``guidance_scale > 1``) against the empty prompt without the instruction."""
        guided = guidance_scale > 1
        embeds = self.encode_prompts(list(prompts))
        if guided:
            empty = self._encode([""] * len(prompts), None)
            embeds = {key: torch.cat([empty[key], embeds[key]]) for key in embeds}
        return self.denoiser_inputs(embeds, {}), guided
