"""Stable Audio Open (Evans et al., 2024, arXiv 2407.14358): a DiT on Oobleck VAE latents of the waveform,
v-prediction on a continuous noise level σ.

The maths is that of diffusers' ``CosineDPMSolverMultistepScheduler`` (EDM preconditioning, Karras et al., 2022,
with the cosine noise-level map). A clean latent ``x₀`` is noised to ``x_σ = x₀ + σ·ε``; the DiT sees
``c_in·x_σ`` with ``c_in = 1/√(σ² + σ_d²)`` at noise level ``t = atan(σ)·2/π``, and its output ``F`` gives the
denoised estimate ``x̂₀ = c_skip·x_σ + c_out·F`` with ``c_skip = σ_d²/(σ² + σ_d²)`` and
``c_out = −σ·σ_d/√(σ² + σ_d²)``. Solving ``x̂₀ = x₀`` for ``F`` gives the regression target, the v of Salimans &
Ho (2022)::

    v = (σ_d·ε − σ·x₀/σ_d) / √(σ² + σ_d²)

(with σ_d = 1 and σ = tan(πt/2) this is ``cos(πt/2)·ε − sin(πt/2)·x₀``, stable-audio-tools' "v" objective).
Training draws ``log σ`` uniformly between the scheduler's σ_min and σ_max: the continuous form of the
scheduler's training grid, which spaces its σ evenly in log between the same bounds.

Sampling (``sample``) is our own deterministic DDIM (first-order probability-flow ODE) on the scheduler's inference σ grid:
the scheduler's own SDE-DPM-Solver needs ``torchsde``, which is not a dependency.

Conditioning follows ``StableAudioPipeline``: T5 states through the projection model and masked, then the clip's
start and end in seconds through the projection model's number conditioners, appended as two cross-attention
tokens and concatenated into the global token; rotary positions span the global token and the latent frames.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderOobleck,
    DDPMScheduler,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableAudioProjectionModel,
)
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import Tensor, nn
from transformers import AutoTokenizer, T5EncoderModel

from diffalign.diffusion.audio import AudioDecoder
from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.diffusion.families.base import (
    DiffusionFamily,
    FamilyOptions,
    LatentNormalization,
    with_adapter_support,
)
from diffalign.diffusion.timesteps import TimestepSettings, draw_fractions
from diffalign.rewards.base import Audio


@dataclass(frozen=True)
class SigmaSchedule:
    """The noise levels of a ``CosineDPMSolverMultistepScheduler`` config (defaults: Stable Audio Open's)."""

    sigma_min: float = 0.3
    sigma_max: float = 500.0
    sigma_data: float = 1.0
    sigma_schedule: Literal["exponential", "karras"] = "exponential"
    rho: float = 7.0
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], source: str) -> SigmaSchedule:
        prediction_type = config.get("prediction_type", "v_prediction")
        if prediction_type != "v_prediction":
            raise ValueError(
                f"{source}: scheduler prediction_type {prediction_type!r} is not supported for Stable Audio; "
                "expected 'v_prediction'"
            )
        schedule = cls(**{key: config[key] for key in cls.__dataclass_fields__ if key in config})
        if schedule.sigma_schedule not in ("exponential", "karras"):
            raise ValueError(f"{source}: sigma_schedule {schedule.sigma_schedule!r} is not 'exponential' or 'karras'")
        if schedule.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"{source}: final_sigmas_type {schedule.final_sigmas_type!r} is not 'zero' or 'sigma_min'")
        return schedule

    def inference_sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's ``set_timesteps`` grid: ``num_steps`` levels from σ_max down to σ_min, then the final one."""
        if self.sigma_schedule == "exponential":
            sigmas = torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), num_steps).exp().flip(0)
        else:  # Karras et al. (2022), eq. 5
            ramp = torch.linspace(0, 1, num_steps)
            low, high = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            sigmas = (high + ramp * (low - high)) ** self.rho
        final = 0.0 if self.final_sigmas_type == "zero" else self.sigma_min
        return torch.cat([sigmas, torch.tensor([final])])


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``[B]`` → ``[B, 1, ...]`` broadcastable against ``like``, in fp32."""
    return values.float().reshape(-1, *[1] * (like.ndim - 1))


class StableAudioFamily(DiffusionFamily):
    pipeline_class = StableAudioPipeline
    hub_pipeline_tag = "text-to-audio"
    denoiser_subfolder = "transformer"

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        # Any scheduler class reads scheduler_config.json; the cosine scheduler's own class imports only with torchsde.
        self.scheduler_config = DDPMScheduler.load_config(pretrained_path, subfolder="scheduler")
        self.schedule = SigmaSchedule.from_scheduler_config(self.scheduler_config, f"{pretrained_path}/scheduler")
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained_path, subfolder="tokenizer")
        self.text_encoder = T5EncoderModel.from_pretrained(pretrained_path, subfolder="text_encoder")
        self.projection_model = StableAudioProjectionModel.from_pretrained(pretrained_path, subfolder="projection_model")
        self.vae = AutoencoderOobleck.from_pretrained(vae_path or pretrained_path, subfolder=None if vae_path else "vae")
        self.denoiser = with_adapter_support(StableAudioDiTModel).from_pretrained(
            pretrained_path, subfolder="transformer"
        )

    @property
    def sample_rate(self) -> int:
        return self.vae.config.sampling_rate

    @property
    def num_samples(self) -> int:
        """The waveform length of the DiT's ``sample_size`` latent frames (47.55 s for Stable Audio Open)."""
        return self.denoiser.config.sample_size * math.prod(self.vae.config.downsampling_ratios)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "projection_model": self.projection_model}

    def build_pipeline(self, denoiser: nn.Module) -> StableAudioPipeline:
        """The diffusers pipeline (for export; :meth:`generate` samples without it). Its scheduler needs torchsde."""
        from diffusers import CosineDPMSolverMultistepScheduler

        return StableAudioPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            projection_model=self.projection_model,
            tokenizer=self.tokenizer,
            transformer=denoiser,
            scheduler=CosineDPMSolverMultistepScheduler.from_config(self.scheduler_config),
        )

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Projected T5 states, zero at padding: ``[B, tokenizer max length, D]``."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.text_encoder.device)
        states = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        projected = self.projection_model(text_hidden_states=states).text_hidden_states
        return {"text_hidden_states": projected * tokens.attention_mask[..., None].to(projected.dtype)}

    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Text tokens + seconds tokens, the global token and the rotary positions. Each sample's seconds come from
        its ``audio_span`` (the real audio in the window); without one (sampling) the whole window."""
        text = prompt_embeds["text_hidden_states"]
        spans = batch.get("audio_span")
        if spans is None:
            spans = torch.tensor([[0, self.num_samples]]).expand(text.shape[0], 2)
        seconds = spans.to(text.device, torch.float32) / self.sample_rate
        duration = self.projection_model(start_seconds=seconds[:, 0], end_seconds=seconds[:, 1])
        start = duration.seconds_start_hidden_states.to(text.dtype)
        end = duration.seconds_end_hidden_states.to(text.dtype)
        config = self.denoiser.config
        rotary = get_1d_rotary_pos_embed(
            config.attention_head_dim // 2, config.sample_size + 1, use_real=True, repeat_interleave_real=False
        )
        return {
            "encoder_hidden_states": torch.cat([text, start, end], dim=1),
            "global_hidden_states": torch.cat([start, end], dim=2),
            "rotary_embedding": tuple(part.to(text.device) for part in rotary),
        }

    # --- latents ------------------------------------------------------------------------------------------------
    def media_decoder(self, config: DiffusionDataConfig) -> AudioDecoder:
        """Waveforms at the VAE's rate and channel count, as long as the DiT's window."""
        return AudioDecoder(
            sample_rate=self.sample_rate, num_samples=self.num_samples, channels=self.vae.config.audio_channels
        )

    @property
    def latent_normalization(self) -> LatentNormalization:
        """The pipeline decodes the DiT's latents as they are: the Oobleck VAE has no scaling factor."""
        return LatentNormalization(scale=1.0)

    def decode(self, latents: Tensor) -> Audio:
        """Latents → the VAE's waveforms, mixed to mono (what audio rewards score). Differentiable."""
        return Audio(self.decode_to_vae_input(latents).mean(dim=1), self.sample_rate)

    # --- noising and targets ------------------------------------------------------------------------------------
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Noise levels σ ``[B]`` (fp32): ``log σ`` at fraction ``u`` of [log σ_min, log σ_max], with ``u``
        uniform by default (log-uniform σ); they play the role of timesteps."""
        log_min, log_max = math.log(self.schedule.sigma_min), math.log(self.schedule.sigma_max)
        fractions = draw_fractions(self.timesteps, batch_size, device, generator, self.default_density)
        return torch.exp(log_min + (log_max - log_min) * fractions)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``x_σ = x₀ + σ·ε`` (``timesteps`` are σ)."""
        return (latents.float() + _per_sample(timesteps, latents) * noise.float()).to(latents.dtype)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``v = (σ_d·ε − σ·x₀/σ_d) / √(σ² + σ_d²)`` in fp32."""
        sigma, sigma_data = _per_sample(timesteps, latents), self.schedule.sigma_data
        return (sigma_data * noise.float() - sigma * latents.float() / sigma_data) / torch.sqrt(sigma**2 + sigma_data**2)

    def noise_level(self, sigmas: Tensor) -> Tensor:
        """The DiT's timestep input: ``atan(σ)·2/π`` in (0, 1)."""
        return sigmas.float().atan() * 2 / math.pi

    def predict(self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]) -> Tensor:
        """The DiT's v for ``x_σ`` at σ = ``timesteps``: it sees ``c_in·x_σ`` at noise level ``atan(σ)·2/π``."""
        sigma = _per_sample(timesteps, noisy_latents)
        scaled = (noisy_latents.float() / torch.sqrt(sigma**2 + self.schedule.sigma_data**2)).to(noisy_latents.dtype)
        return denoiser(scaled, self.noise_level(timesteps), **inputs).sample

    def denoised(self, noisy_latents: Tensor, prediction: Tensor, sigmas: Tensor) -> Tensor:
        """``x̂₀ = c_skip·x_σ + c_out·v`` in fp32."""
        sigma, sigma_data = _per_sample(sigmas, noisy_latents), self.schedule.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = -sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
        return c_skip * noisy_latents.float() + c_out * prediction.float()

    # --- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        denoiser: nn.Module,
        prompts: list[str],
        generators: list[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> Tensor:
        """Deterministic DDIM from ``σ_max·ε``: ``x ← x̂₀ + (σ_next/σ)·(x − x̂₀)`` over the inference σ grid.

        Classifier-free guidance as the pipeline without a negative prompt: the unconditional pass sees zeros in
        place of every cross-attention token and the same global token.
        """
        embeds = self.encode_prompts(prompts)
        inputs = self.denoiser_inputs(embeds, {})
        dtype, device = embeds["text_hidden_states"].dtype, embeds["text_hidden_states"].device
        guided = guidance_scale > 1.0
        if guided:
            text_tokens = inputs["encoder_hidden_states"]
            inputs = {
                **inputs,
                "encoder_hidden_states": torch.cat([torch.zeros_like(text_tokens), text_tokens]),
                "global_hidden_states": inputs["global_hidden_states"].repeat(2, 1, 1),
            }
        shape = (self.denoiser.config.in_channels, self.denoiser.config.sample_size)
        noise = [torch.randn(shape, generator=generator, device=generator.device) for generator in generators]
        sigmas = self.schedule.inference_sigmas(num_inference_steps).to(device)
        latents = torch.stack(noise).to(device) * sigmas[0]
        for sigma, next_sigma in itertools.pairwise(sigmas):
            batch_sigmas = sigma.expand(len(prompts))
            if guided:
                unconditional, conditional = self.predict(
                    denoiser, latents.repeat(2, 1, 1).to(dtype), batch_sigmas.repeat(2), inputs
                ).chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            else:
                prediction = self.predict(denoiser, latents.to(dtype), batch_sigmas, inputs)
            denoised = self.denoised(latents, prediction, batch_sigmas)
            latents = denoised + (next_sigma / sigma) * (latents - denoised)
        return latents
