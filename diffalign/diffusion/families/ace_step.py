"""ACE-Step 1.5 (ACE-Step Team, arXiv 2602.00744; diffusers ``AceStepPipeline``): a DiT
(``AceStepTransformer1DModel``) on the 25 frames/s, 64-channel latents of an Oobleck VAE of 48 kHz stereo audio,
rectified-flow training (families/flow.py), conditioned through the pipeline's ``AceStepConditionEncoder``.

Latents are frames first, ``[B, T, 64]`` with ``T = ceil(seconds·25)``, as the transformer reads them; the VAE's
``[B, 64, T]`` map to them by a transpose alone (the pipeline decodes with no scale or shift). Training is ACE-Step's
own flow matching (``acestep/training/trainer.py``): ``x_t = t·ε + (1 − t)·x0``, target ``v = ε − x0``, the
transformer sees ``t`` in [0, 1] as ``timestep`` and ``timestep_r = t``. The scheduler's training grid has a single
level, so ``t`` is drawn directly from ``timesteps.density`` (logit-normal by default; ACE-Step's pre-training draws
logit-normal with mean −0.4: ``timesteps.logit_mean: -0.4``). ``model.audio_seconds`` sets the clip length of the
data and of samples (default: the pipeline's 60 s).

Conditioning is text-to-music as the pipeline does it without reference audio: the caption through the pipeline's
SFT prompt template (``_format_prompt``: text2music instruction, metadata with the clip's duration) and the full
Qwen3 text encoder; empty lyrics (in the template's lyric format) through its token embeddings; timbre from the
first 30 s of the condition encoder's ``silence_latent``; all packed by the condition encoder. The transformer's
cross-attention takes no padding mask, so padding tokens condition it, and the pipeline's ``encode_prompt`` pads
captions to the longest of its batch. A caption's embedding must not depend on its batch (the prompt cache keeps
one per caption), so :meth:`encode_prompts` tokenizes captions padded to ``model.max_text_length`` (the pipeline's
maximum, 256; ACE-Step's training preprocessing pads to 256 as well) and :meth:`denoiser_inputs` cuts the packed
sequence to the batch's longest caption: with the causal text encoder and right padding, that is exactly the
pipeline's conditioning of the same batch. An empty caption (caption dropout) becomes the learned
``null_condition_emb``, the model's unconditional input. The context latents are text2music's: the tiled
``silence_latent`` and a chunk mask of ones.

Sampling equals the stock pipeline on the same seeds: its schedule (``_get_timestep_schedule``, shift 3.0), Euler
steps, and for ``guidance_scale > 1`` on non-turbo checkpoints its APG guidance (diffusers' ``normalized_guidance``
with the pipeline's momentum −0.75, norm threshold 2.5, time-only norm, the null embedding as unconditional, over
all steps); turbo (guidance-distilled) checkpoints sample unguided, as the pipeline does. APG's momentum makes a
step's velocity depend on every earlier step, so a guided transition's log-prob cannot be recomputed on its own:
:meth:`transition_log_prob` (policy-gradient training) needs unguided trajectories. :meth:`decode` returns
the VAE's waveforms mixed to mono, without the pipeline's −1 dBFS peak normalisation (a playback level; rewards see
the model's own level, as for Stable Audio). Not supported: lyrics, reference audio, the cover/repaint/extract
tasks and audio codes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import AceStepPipeline, AutoencoderOobleck
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from torch import Tensor, nn

from diffalign.diffusion.audio import AudioDecoder
from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.diffusion.families.base import FamilyOptions, LatentNormalization
from diffalign.diffusion.families.flow import FlowMatchFamily, Transition
from diffalign.diffusion.timesteps import TimestepSettings, draw_fractions
from diffalign.rewards.base import Audio

COMPONENTS = ("vae", "text_encoder", "tokenizer", "condition_encoder")
DEFAULT_SECONDS = 60.0  # AceStepPipeline's default audio_duration
DEFAULT_TEXT_LENGTH = 256  # AceStepPipeline's max_text_length
SAMPLING_SHIFT = 3.0  # AceStepPipeline's default schedule shift
TIMBRE_SECONDS = 30  # the silence the pipeline's timbre encoder sees without reference audio


class FramesFirst(LatentNormalization):
    """The VAE's ``[..., C, T]`` ↔ the transformer's frames-first ``[..., T, C]`` (after the scale and shift), with
    or without a batch dimension (the latent cache maps one sample at a time)."""

    def to_latents(self, vae_latents: Tensor) -> Tensor:
        return super().to_latents(vae_latents).transpose(-2, -1)

    def from_latents(self, latents: Tensor) -> Tensor:
        return super().from_latents(latents.transpose(-2, -1))


class AceStepFamily(FlowMatchFamily):
    pipeline_class = AceStepPipeline
    capabilities = frozenset({"flow_matching"})  # APG's momentum ties each guided step to the earlier ones
    hub_pipeline_tag = "text-to-audio"
    denoiser_subfolder = "transformer"
    supported_options = frozenset({"max_text_length", "audio_seconds"})

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        overrides = {"vae": AutoencoderOobleck.from_pretrained(vae_path)} if vae_path else {}
        pipeline = AceStepPipeline.from_pretrained(pretrained_path, **overrides)
        if pipeline.tokenizer.padding_side != "right":
            raise ValueError(
                f"{pretrained_path}/tokenizer: padding_side {pipeline.tokenizer.padding_side!r}; ACE-Step captions "
                "are encoded padded on the right (set padding_side: right in tokenizer_config.json)"
            )
        for name in COMPONENTS:
            setattr(self, name, getattr(pipeline, name))
        self.denoiser = pipeline.transformer
        self._pipeline = pipeline  # its prompt formatting, schedule and text2music context

    @property
    def sample_rate(self) -> int:
        return self.vae.config.sampling_rate

    @property
    def num_frames(self) -> int:
        """Latent frames of a clip: ``ceil(seconds · frames per second)``, as the pipeline counts them."""
        return math.ceil(self.audio_seconds * self._pipeline.latents_per_second)

    @property
    def audio_seconds(self) -> float:
        return self.options.audio_seconds or DEFAULT_SECONDS

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "condition_encoder": self.condition_encoder}

    def build_pipeline(self, denoiser: nn.Module) -> AceStepPipeline:
        components = {name: getattr(self, name) for name in COMPONENTS}
        return AceStepPipeline(**components, transformer=denoiser, scheduler=self.noise_scheduler)

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """The condition encoder's packed ``encoder_hidden_states`` ``[B, L, D]`` and ``encoder_attention_mask``
        ``[B, L]`` (valid tokens first), each caption padded to ``max_text_length`` (see the module docstring)."""
        formatted = [self._pipeline._format_prompt(p, lyrics="", audio_duration=self.audio_seconds) for p in prompts]
        texts, lyrics = (list(column) for column in zip(*formatted, strict=True))
        device = self.text_encoder.device
        text_length = self.options.max_text_length or DEFAULT_TEXT_LENGTH
        text = self.tokenizer(texts, padding="max_length", truncation=True, max_length=text_length, return_tensors="pt")
        lyric = self.tokenizer(lyrics, padding="longest", truncation=True, max_length=2048, return_tensors="pt")
        text, lyric = text.to(device), lyric.to(device)
        # As the pipeline: no attention mask into the text encoder; lyrics through its token embeddings alone.
        text_states = self.text_encoder(input_ids=text.input_ids).last_hidden_state
        lyric_states = self.text_encoder.get_input_embeddings()(lyric.input_ids)
        silence = self.condition_encoder.silence_latent
        timbre_frames = math.ceil(TIMBRE_SECONDS * self._pipeline.latents_per_second)
        states, mask = self.condition_encoder(
            text_hidden_states=text_states,
            text_attention_mask=text.attention_mask.bool(),
            lyric_hidden_states=lyric_states,
            lyric_attention_mask=lyric.attention_mask.bool(),
            refer_audio_acoustic_hidden_states_packed=silence[:, :timbre_frames].expand(len(prompts), -1, -1),
            refer_audio_order_mask=torch.arange(len(prompts), device=device),
        )
        dropped = torch.tensor([prompt == "" for prompt in prompts], device=device)[:, None, None]
        states = torch.where(dropped, self.condition_encoder.null_condition_emb.to(states.dtype), states)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask.to(states.dtype)}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """The packed conditioning cut to the batch's longest caption, as the pipeline pads its batch."""
        # Counted as integers: a bf16 sum of more than 256 ones is rounded.
        length = int((prompt_embeds["encoder_attention_mask"] > 0).sum(dim=1).max())
        return {"encoder_hidden_states": prompt_embeds["encoder_hidden_states"][:, :length]}

    def context_latents(self, batch_size: int, num_frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """text2music's ``[B, T, 2C]``: the tiled silence latent, then a chunk mask of ones."""
        silence, _ = self._pipeline.prepare_src_latents(device, dtype, batch_size, latent_length=num_frames)
        channels = self.denoiser.config.audio_acoustic_hidden_dim
        chunk_mask = self._pipeline._build_chunk_mask("text2music", num_frames, batch_size, device, dtype, channels)
        return torch.cat([silence, chunk_mask], dim=-1)

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        """The velocity ``[B, T, C]`` at ``t`` = ``timesteps`` (in the latents' dtype, as the pipeline passes it)."""
        batch_size, num_frames, _ = noisy_latents.shape
        t = timesteps.to(noisy_latents.dtype)
        context = self.context_latents(batch_size, num_frames, noisy_latents.device, noisy_latents.dtype)
        return denoiser(
            hidden_states=noisy_latents,
            timestep=t,
            timestep_r=t,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            context_latents=context,
        ).sample

    # --- latents ------------------------------------------------------------------------------------------------
    def media_decoder(self, config: DiffusionDataConfig) -> AudioDecoder:
        """Waveforms at the VAE's rate and channels, ``num_frames`` VAE hops long."""
        hop = math.prod(self.vae.config.downsampling_ratios)
        return AudioDecoder(
            sample_rate=self.sample_rate, num_samples=self.num_frames * hop, channels=self.vae.config.audio_channels
        )

    @property
    def latent_normalization(self) -> LatentNormalization:
        return FramesFirst(scale=1.0)

    def decode(self, latents: Tensor) -> Audio:
        """Latents → the VAE's waveforms, mixed to mono (what audio rewards score). Differentiable."""
        return Audio(self.decode_to_vae_input(latents).mean(dim=1), self.sample_rate)

    # --- training -----------------------------------------------------------------------------------------------
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """``t`` ``[B]`` (fp32) in ``timesteps.noise_range``, from ``timesteps.density``."""
        return draw_fractions(self.timesteps, batch_size, device, generator, self.default_density)

    # --- sampling -----------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        return (self.num_frames, self.denoiser.config.audio_acoustic_hidden_dim)

    def schedule_arguments(self, num_inference_steps: int) -> dict[str, Any]:
        schedule = self._pipeline._get_timestep_schedule(num_inference_steps, shift=SAMPLING_SHIFT)
        return {"sigmas": schedule.tolist()}

    def sampling_inputs(self, prompts: list[str], guidance_scale: float) -> tuple[dict[str, Any], bool]:
        """Guided as the pipeline: the conditional inputs, then the null embedding in their shape, and the APG
        momentum that carries across this sampling run's steps."""
        inputs = self.denoiser_inputs(self.encode_prompts(list(prompts)), {})
        guided = guidance_scale > 1 and not self._pipeline.is_turbo
        if guided:
            conditional = inputs["encoder_hidden_states"]
            null = self.condition_encoder.null_condition_emb.to(conditional.dtype).expand_as(conditional)
            momentum = MomentumBuffer(momentum=-0.75)
            inputs = {"encoder_hidden_states": torch.cat([conditional, null]), "momentum": momentum}
        return inputs, guided

    def velocity(
        self,
        denoiser: nn.Module,
        latents: Tensor,
        sigma: Tensor,
        inputs: dict[str, Any],
        guided: bool,
        guidance_scale: float,
    ) -> Tensor:
        """The pipeline's APG over ``[conditional; null]`` where guided, else the conditional velocity."""
        if not guided:
            return super().velocity(denoiser, latents, sigma, inputs, guided, guidance_scale)
        prediction = self.predict(denoiser, torch.cat([latents, latents]), sigma.repeat(2), inputs).float()
        conditional, unconditional = prediction.chunk(2)
        return normalized_guidance(
            pred_cond=conditional,
            pred_uncond=unconditional,
            guidance_scale=guidance_scale - 1.0,
            momentum_buffer=inputs["momentum"],
            eta=0.0,
            norm_threshold=2.5,
            use_original_formulation=True,
            norm_dim=(1,),
        )

    def transition_log_prob(
        self,
        denoiser: nn.Module,
        latents: Tensor,
        next_latents: Tensor,
        sigma: Tensor,
        next_sigma: Tensor,
        sigma_cap: Tensor,
        inputs: dict[str, Any],
        guided: bool,
        guidance_scale: float,
        noise_level: float,
    ) -> Transition:
        if guided:
            raise ValueError(
                f"{self.pretrained_path}: ACE-Step's APG guidance carries momentum across the sampler's steps, so a "
                "single transition's log-prob cannot be recomputed; sample policy-gradient trajectories with "
                "guidance_scale <= 1 (or from a turbo checkpoint)"
            )
        return super().transition_log_prob(
            denoiser, latents, next_latents, sigma, next_sigma, sigma_cap, inputs, guided, guidance_scale, noise_level
        )
