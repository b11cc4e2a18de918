"""Qwen-Image (Qwen team, arXiv 2508.02324): a double-stream MMDiT (``QwenImageTransformer2DModel``) on 2×2-packed
16-channel latents of a video VAE, rectified-flow training (families/flow.py), Qwen2.5-VL-7B conditioning.

Training follows diffusers' ``train_dreambooth_lora_qwen_image.py``: latents ``z = (x − μ_c)/s_c`` with the VAE's
per-channel ``latents_mean`` and ``latents_std`` (no scalar scaling factor), σ uniform on the unshifted training
grid (the example's default weighting ``none``), the transformer given σ as its timestep with the packed image's
``img_shapes``, and the target ``ε − x0``.

The VAE (``AutoencoderKLQwenImage``) encodes videos ``[B, 3, T, H, W]``; an image is a single frame.
:class:`ImageFrameVAE` takes and returns images and ``[B, 16, h, w]`` latents, so that the latent cache,
re-encoding and decoding treat it as any image VAE; it keeps the stock class's name and module, and the stock
pipeline still reaches it with five-dimensional tensors.

Conditioning is the pipeline's: the caption inside its chat template (a system turn asking for a description of
the image), Qwen2.5-VL's last hidden states without the template's first 34 tokens, and a padding mask that the
transformer's joint attention honours. A caption's embedding must not depend on its batch (the prompt cache
keeps one per caption), so :meth:`QwenImageFamily.encode_prompts` pads every caption to ``model.max_text_length``
(the pipeline's default, 512) and :meth:`QwenImageFamily.denoiser_inputs` cuts the batch to its longest caption.
With the causal text encoder, right padding and masked attention, that is the pipeline's conditioning. The padding
is zero, so the latent cache stores only each caption's own tokens (a few dozen for a typical caption, not 512).

Sampling is the pipeline's: σ = ``linspace(1, 1/N, N)`` shifted by μ for the packed sequence length (exponential
time shift, then ``shift_terminal`` 0.02 from the published scheduler config), and its "true" classifier-free
guidance with the negative prompt " " of its docstring: ``c = v_u + w·(v_c − v_u)`` rescaled on every packed token
to the norm of the conditional velocity, ``v = c·‖v_c‖/‖c‖``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from torch import Tensor, nn

from diffalign.diffusion.families.base import (
    ChannelNormalization,
    ImageLatents,
    LatentNormalization,
    OneTextEncoderPipeline,
    cut_to_longest_caption,
)
from diffalign.diffusion.families.flow import PackedFlowFamily

DEFAULT_TEXT_LENGTH = 512  # QwenImagePipeline's default max_sequence_length
NEGATIVE_PROMPT = " "  # the pipeline guides only given a negative prompt; its docstring suggests " "


class ImageFrameVAE(AutoencoderKLQwenImage):
    """Qwen-Image's video VAE seen as an image VAE: pixels ``[B, 3, H, W]`` encode to a posterior over
    ``[B, 16, h, w]``, and such latents decode to pixels ``[B, 3, H, W]`` (one frame inside). Five-dimensional
    inputs, as the stock pipeline passes them, behave as in the stock class."""

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        if x.ndim != 4:
            return super().encode(x, return_dict=return_dict)
        parameters = super().encode(x.unsqueeze(2)).latent_dist.parameters.squeeze(2)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(parameters))

    def decode(self, z: Tensor, return_dict: bool = True, **kwargs: Any) -> DecoderOutput:
        if z.ndim != 4:
            return super().decode(z, return_dict=return_dict, **kwargs)
        return DecoderOutput(sample=super().decode(z.unsqueeze(2)).sample.squeeze(2))


# Saved configs and pipeline indexes name the stock class, so saved folders load without this package.
ImageFrameVAE.__name__ = ImageFrameVAE.__qualname__ = AutoencoderKLQwenImage.__name__
ImageFrameVAE.__module__ = AutoencoderKLQwenImage.__module__


class QwenImageFamily(ImageLatents, OneTextEncoderPipeline, PackedFlowFamily):
    pipeline_class = QwenImagePipeline
    denoiser_class = QwenImageTransformer2DModel
    vae_class = ImageFrameVAE
    default_text_length = DEFAULT_TEXT_LENGTH
    denoiser_subfolder = "transformer"
    default_density = "uniform"  # the Qwen-Image training example's default weighting scheme ("none")
    supported_options = frozenset({"sample_resolution", "max_text_length"})
    max_text_length_limit = 1024
    resolution_multiple = 16  # the VAE's 8 times the 2×2 packing

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)  # as QwenImagePipeline computes it

    @property
    def latent_normalization(self) -> LatentNormalization:
        config = self.vae.config
        return ChannelNormalization(1.0, 0.0, tuple(config.latents_mean), tuple(config.latents_std))

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``prompt_embeds`` ``[B, max_text_length, 3584]`` (zero after each caption) and ``prompt_embeds_mask``
        ``[B, max_text_length]``; see the module docstring for why every caption is padded to the same length."""
        pipeline = self._prompt_pipeline
        dropped, length = pipeline.prompt_template_encode_start_idx, self.max_text_length
        tokens = self.tokenizer(
            [pipeline.prompt_template_encode.format(prompt) for prompt in prompts],
            max_length=length + dropped,
            padding="longest",
            padding_side="right",
            truncation=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        output = self.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        )
        # Causal attention and right padding: a caption's states do not depend on how far its batch is padded,
        # so padding the states to max_text_length afterwards equals padding the tokens, at less compute.
        mask = tokens.attention_mask[:, dropped:]
        states = output.hidden_states[-1][:, dropped:] * mask.unsqueeze(-1).to(output.hidden_states[-1].dtype)
        missing = length - mask.shape[1]
        return {"prompt_embeds": F.pad(states, (0, 0, 0, missing)), "prompt_embeds_mask": F.pad(mask, (0, missing))}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """The conditioning cut to the batch's longest caption, as the pipeline pads its batch."""
        embeds, mask = cut_to_longest_caption(prompt_embeds["prompt_embeds"], prompt_embeds["prompt_embeds_mask"])
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        """The velocity ``[B, 16, h, w]``: latents packed into 2×2 tokens, the transformer run, the output unpacked."""
        batch, channels, height, width = noisy_latents.shape
        packed = QwenImagePipeline._pack_latents(noisy_latents, batch, channels, height, width)
        shapes = [[(1, height // 2, width // 2)]] * batch
        output = denoiser(hidden_states=packed, timestep=timesteps, img_shapes=shapes, **inputs).sample
        scale = self.vae_scale_factor
        return QwenImagePipeline._unpack_latents(output, height * scale, width * scale, scale).squeeze(2)

    # --- sampling ---------------------------------------------------------------------------------------------
    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """The negative prompt " " as the unconditional input when ``guidance_scale > 1``."""
        guided = guidance_scale > 1
        embeds = self.encode_prompts(([NEGATIVE_PROMPT] * len(prompts) if guided else []) + list(prompts))
        return self.denoiser_inputs(embeds, {}), guided

    def guide(self, unconditional: Tensor, conditional: Tensor, guidance_scale: float) -> Tensor:
        """The pipeline's guidance, rescaled token by token to the conditional velocity's norm."""
        combined = super().guide(unconditional, conditional, guidance_scale)
        return combined * token_norms(conditional) / token_norms(combined)


def token_norms(latents: Tensor) -> Tensor:
    """The norm over each 2×2 patch's ``4C`` values (one packed token), broadcast back to ``[B, C, h, w]``."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    norms = patches.pow(2).sum(dim=(1, 3, 5), keepdim=True).sqrt()
    return norms.expand_as(patches).reshape(batch, channels, height, width)
