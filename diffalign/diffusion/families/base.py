"""The narrow interface between a model family and everything else in the diffusion trainer.

A family knows its models' maths: how to encode a prompt into conditioning, how VAE latents map to the
denoiser's space and back (scale and shift), which noise levels training draws and how it weights them, how to
noise a clean latent, what the denoiser regresses (ε, v, flow velocity), how to call the denoiser, and how to
sample. Methods, the trainer, the latent cache and evaluation talk to a family only through this interface and
never ask which family they have; what some methods need beyond it, a family declares in ``capabilities``.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DDPMScheduler
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.autoencoders.vae import EncoderOutput
from torch import Tensor, nn

from diffalign.diffusion.data import DiffusionDataConfig, image_decoder
from diffalign.diffusion.timesteps import TimestepSettings, draw_fractions, min_snr_weights
from diffalign.diffusion.transforms import MediaDecoder

if TYPE_CHECKING:
    from diffalign.rewards.base import Audio


@dataclass(frozen=True)
class LatentNormalization:
    """VAE latents x ↔ the denoiser's latents z = (x − shift)·scale: diffusers' ``scaling_factor`` and
    ``shift_factor`` (the shift is 0 for SD1.5, SDXL and the audio VAEs; SD3 and FLUX VAEs have one)."""

    scale: float
    shift: float = 0.0

    @classmethod
    def of_vae(cls, vae: nn.Module) -> LatentNormalization:
        """The factors a diffusers VAE's config states (an absent or null shift is 0)."""
        return cls(float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0))

    def to_latents(self, vae_latents: Tensor) -> Tensor:
        return (vae_latents - self.shift) * self.scale

    def from_latents(self, latents: Tensor) -> Tensor:
        return latents / self.scale + self.shift


@dataclass(frozen=True)
class ChannelNormalization(LatentNormalization):
    """Per-channel ``z = (x − mean_c)/std_c`` on the channel axis of ``[C, h, w]`` or ``[B, C, h, w]`` latents (the
    inherited scalar ``scale`` and ``shift`` stay 1 and 0)."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @staticmethod
    def _per_channel(values: tuple[float, ...], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def to_latents(self, vae_latents: Tensor) -> Tensor:
        return (vae_latents - self._per_channel(self.mean, vae_latents)) / self._per_channel(self.std, vae_latents)

    def from_latents(self, latents: Tensor) -> Tensor:
        return latents * self._per_channel(self.std, latents) + self._per_channel(self.mean, latents)


@dataclass(frozen=True)
class FamilyOptions:
    """Model settings some families take (``model:`` keys of the same names); a family refuses the ones it cannot
    honour (``supported_options``) when the config loads.

    ``sample_resolution``: pixels of generated images (online methods, evaluation); None: the model's native size.
    ``max_text_length``: tokens of sequence text encoders (T5, Qwen2.5-VL, Gemma-2, Qwen3); None: the
    pipeline's default.
    ``drop_text_encoders``: optional text encoders left out (SD3's T5: its states become zeros, as diffusers does).
    ``guidance``: the guidance-embedding value of guidance-distilled models (FLUX.1-dev) during training.
    ``audio_seconds``: the clip length of training audio and of samples (ACE-Step); None: the pipeline's default.
    """

    sample_resolution: int | None = None
    max_text_length: int | None = None
    drop_text_encoders: tuple[str, ...] = ()
    guidance: float = 3.5
    audio_seconds: float | None = None

    def non_default(self) -> set[str]:
        defaults = FamilyOptions()
        return {name for name in self.__dataclass_fields__ if getattr(self, name) != getattr(defaults, name)}


# The options that change what encode_prompts returns: the text's token budget, and ACE-Step's clip length, which its
# prompt template states.
PROMPT_OPTIONS = ("max_text_length", "audio_seconds")


@torch.no_grad()
def vae_posterior(vae: nn.Module, samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std (fp32) of a diffusers VAE's diagonal-Gaussian posterior for ``samples`` in its input space
    (pixels in [-1, 1], or the family's audio features). A deterministic autoencoder (SANA's ``AutoencoderDC``,
    whose output is an ``EncoderOutput``) gives its encoding as the mean and std 0."""
    output = vae.encode(samples.to(vae.device, vae.dtype))
    if isinstance(output, EncoderOutput):
        return output.latent.float(), torch.zeros_like(output.latent, dtype=torch.float32)
    return output.latent_dist.mean.float(), output.latent_dist.std.float()


@dataclass
class Posterior:
    """A diagonal-Gaussian VAE posterior; sampling keeps latents stochastic even when cached."""

    mean: Tensor
    std: Tensor

    def sample(self, seeds: list[int] | None = None) -> Tensor:
        """A latent per sample; with ``seeds`` sample i draws from a generator seeded ``seeds[i]``."""
        if seeds is None:
            noise = torch.randn_like(self.mean)
        else:
            noise = torch.stack(
                [
                    torch.randn(
                        self.mean.shape[1:],
                        generator=torch.Generator(self.mean.device).manual_seed(seed),
                        device=self.mean.device,
                        dtype=self.mean.dtype,
                    )
                    for seed in seeds
                ]
            )
        return self.mean + self.std * noise


def cut_to_longest_caption(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded text states ``[B, L, D]`` and their mask ``[B, L]`` cut to the batch's longest caption: the same
    conditioning for a transformer that masks its text, at the batch's own length."""
    length = int((mask > 0).sum(dim=1).max())
    return embeds[:, :length], mask[:, :length]


@functools.cache
def with_adapter_support(model_class: type[nn.Module]) -> type[nn.Module]:
    """``model_class`` with diffusers' PEFT methods (``add_adapter``, ``disable_adapters``, ``load_lora_adapter``),
    which LoRA training and the adapter-disabled reference call; some denoisers (AudioLDM2's U-Net, Stable
    Audio's DiT) lack them. The subclass keeps the name and module of the stock class, so the configs it saves
    name the stock class and load without this package."""
    if issubclass(model_class, PeftAdapterMixin):
        return model_class
    return type(model_class.__name__, (model_class, PeftAdapterMixin), {"__module__": model_class.__module__})


class DiffusionFamily(ABC):
    """Components of one pretrained model plus the family's maths. ``denoiser`` is what gets trained.

    ``capabilities`` declares what some methods and settings need beyond this interface (the config refuses a
    method whose ``requires`` a family lacks, before any model loads): ``ddpm_schedule`` (a discrete ᾱ schedule:
    DDIM inversion, DDPM steps, SNR), ``unet_encoder`` (a U-Net's ``conv_in``/``down_blocks``/``mid_block``: NCP's
    feature space), ``flow_matching`` (rectified-flow noising, σ-weighted losses, SDE sampling with log-probs),
    ``stepwise_guidance`` (a guided sampling step depends on that step alone, so its log-prob can be recomputed).
    """

    denoiser: nn.Module
    vae: nn.Module  # latents of every family come from a VAE (AutoencoderKL, Oobleck)
    # Name of the denoiser's sub-folder in the pipeline directory ("unet" or "transformer").
    denoiser_subfolder: str = "unet"
    # The diffusers pipeline class whose `from_pretrained` reads this family.
    pipeline_class: Any
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # The Hub's task of the family's pipelines, for model cards.
    hub_pipeline_tag: ClassVar[str] = "text-to-image"
    # The timestep density that `timesteps.density: auto` means for this family.
    default_density: ClassVar[str] = "uniform"
    # The range of stored media in the VAE's input space (pixels: [-1, 1]); None where unbounded (log-mel, waveform).
    sample_range: tuple[float, float] | None = None
    # A VAE that overflows below fp32 (SDXL's stock VAE) runs in fp32 whatever the mixed precision.
    vae_needs_fp32: bool = False
    # The FamilyOptions this family honours; the text encoders it can do without.
    supported_options: ClassVar[frozenset[str]] = frozenset()
    optional_text_encoders: ClassVar[tuple[str, ...]] = ()
    # The most text tokens its pipeline accepts (its max_sequence_length check), for model.max_text_length.
    max_text_length_limit: ClassVar[int | None] = None

    def __init__(
        self, pretrained_path: str, timesteps: TimestepSettings | None = None, options: FamilyOptions | None = None
    ) -> None:
        self.pretrained_path = pretrained_path
        self.timesteps = timesteps or TimestepSettings()
        self.options = options or FamilyOptions()

    @classmethod
    def from_modules(
        cls,
        pretrained_path: str = "in-memory",
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
        **components: Any,
    ) -> DiffusionFamily:
        """The family around components already in memory (``denoiser=``, ``vae=``, ``noise_scheduler=``, ...),
        for benchmarks and tests that build models from a config instead of reading a pipeline directory."""
        family = cls.__new__(cls)
        family.pretrained_path = pretrained_path
        family.timesteps = timesteps or TimestepSettings()
        family.options = options or FamilyOptions()
        for name, component in components.items():
            setattr(family, name, component)
        return family

    # --- conditioning -------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Encode prompts once; the result is cacheable (batch-first tensors, no model state)."""

    @abstractmethod
    def denoiser_inputs(self, prompt_embeds: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the denoiser call for a batch, from (possibly cached) prompt embeddings."""

    def prompt_encoding_id(self) -> str:
        """The family and the options that reach :meth:`encode_prompts`: with the text encoders' fingerprint, what
        tells two prompt encodings apart in the latent cache's and the reference cache's keys. Options left unset
        add nothing, so keys made before they counted stay valid."""
        settings = {name: getattr(self.options, name) for name in PROMPT_OPTIONS}
        settings = {name: value for name, value in settings.items() if value is not None}
        return type(self).__name__ + (f":{json.dumps(settings, sort_keys=True)}" if settings else "")

    # --- latents ------------------------------------------------------------------------------------------------
    @abstractmethod
    def media_decoder(self, config: DiffusionDataConfig) -> MediaDecoder:
        """How stored pair members become the input of :meth:`encode` (image transforms, audio resampling)."""

    def encode(self, samples: Tensor) -> Posterior:
        """VAE posterior of raw samples (pixels in [-1, 1], or the family's audio features), in the VAE's space."""
        mean, std = vae_posterior(self.vae, samples)
        return Posterior(mean=mean, std=std)

    @property
    @abstractmethod
    def latent_normalization(self) -> LatentNormalization:
        """How VAE latents map to the unit-variance space the denoiser was trained in (scale and shift)."""

    def to_latents(self, vae_latents: Tensor) -> Tensor:
        """VAE latents (a posterior sample) → the denoiser's space: what training, the cache and sampling use."""
        return self.latent_normalization.to_latents(vae_latents)

    def from_latents(self, latents: Tensor) -> Tensor:
        """The denoiser's latents → the VAE's space, ready for its decoder."""
        return self.latent_normalization.from_latents(latents)

    def decode_to_vae_input(self, latents: Tensor) -> Tensor:
        """The denoiser's latents through the VAE decoder, in its input space (pixels, log-mel, waveform), fp32."""
        return self.vae.decode(self.from_latents(latents).to(self.vae.dtype)).sample.float()

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor | Audio:
        """Latents back to what rewards score: images ``[B, 3, H, W]`` in [0, 1], or :class:`Audio`."""

    @torch.no_grad()
    def reencode(self, latents: Tensor, seeds: list[int] | None = None) -> Tensor:
        """Latents as the data path makes them from the media that ``latents`` decode to: decoded by the VAE into
        its input space (pixels, log-mel or waveform), clamped to the media's range, encoded again and drawn from
        the posterior (sample ``i`` from a generator seeded ``seeds[i]``).

        Generated latents lie off the encoder's outputs; re-encoding them lets a generated sample stand in for
        stored media (SePPO's reference samples replace stored losers).
        """
        decoded = self.decode_to_vae_input(latents)
        if self.sample_range is not None:
            decoded = decoded.clamp(*self.sample_range)
        return self.to_latents(self.encode(decoded).sample(seeds))

    # --- noising and targets ------------------------------------------------------------------------------------
    @abstractmethod
    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Training noise levels ``[B]`` drawn as ``self.timesteps`` says (see diffusion/timesteps.py)."""

    @abstractmethod
    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor: ...

    @abstractmethod
    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor: ...

    def error_weights(self, timesteps: Tensor) -> Tensor | None:
        """Per-sample weights ``[B]`` of the denoising error (``timesteps.weighting``); None: unweighted."""
        if self.timesteps.weighting != "none":
            raise ValueError(
                f"timesteps.weighting: {self.timesteps.weighting!r} is not defined for {type(self).__name__}"
            )
        return None

    def predict(
        self, denoiser: nn.Module, noisy_latents: Tensor, timesteps: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        return denoiser(noisy_latents, timesteps, **inputs).sample

    # --- sampling -----------------------------------------------------------------------------------------------
    @abstractmethod
    def build_pipeline(self, denoiser: nn.Module) -> Any:
        """The family's diffusers pipeline around ``denoiser``, for sampling and export."""

    def pipeline_prompt_inputs(self, prompts: list[str]) -> dict[str, Any]:
        """The pipeline's keyword arguments for ``prompts`` (text by default; families whose pipelines take
        precomputed embeddings override this)."""
        return {"prompt": prompts}

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
        """Clean latents ``[N, ...]`` in the denoiser's space, one per prompt, prompt ``i`` drawn with
        ``generators[i]``. By default the family's diffusers pipeline with ``output_type="latent"``."""
        pipeline = self.build_pipeline(denoiser)
        pipeline.set_progress_bar_config(disable=True)
        output = pipeline(
            **self.pipeline_prompt_inputs(prompts),
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="latent",
        )
        return output[0]  # `images` or `audios`: with output_type="latent" the latents themselves

    @torch.no_grad()
    def generate(
        self,
        denoiser: nn.Module,
        prompts: list[str],
        generators: list[torch.Generator],
        *,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> Tensor | Audio:
        """Decoded samples on the CPU: images ``[N, 3, H, W]`` in [0, 1] (fp32), or :class:`Audio`."""
        latents = self.sample(
            denoiser, prompts, generators, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
        )
        decoded = self.decode(latents)
        if isinstance(decoded, Tensor):
            return decoded.float().cpu()
        return type(decoded)(decoded.waveforms.float().cpu(), decoded.sample_rate)

    # --- models the trainer moves, casts and freezes -------------------------------------------------------------
    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Everything except the denoiser (VAE, text encoders, vocoder); never trained, never saved."""

    def to(self, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> None:
        for name, module in self.frozen_modules().items():
            module.to(device, dtype=vae_dtype if (name == "vae" and vae_dtype is not None) else dtype)
        self.denoiser.to(device)


class DDPMFamily(DiffusionFamily):
    """Families trained with a discrete DDPM schedule (SD1.5, SDXL, MusicLDM, AudioLDM2): ε or v targets."""

    capabilities = frozenset({"ddpm_schedule", "unet_encoder"})

    def __init__(
        self, pretrained_path: str, timesteps: TimestepSettings | None = None, options: FamilyOptions | None = None
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)
        # Read once: pipelines built for sampling take their scheduler from it without touching the disk or hub.
        self.scheduler_config = DDPMScheduler.load_config(pretrained_path, subfolder="scheduler")
        # Whatever sampler the pipeline ships (DDIM, Euler, ...), training noise follows its DDPM schedule.
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def sample_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """Integer timesteps ``[B]``: ``floor(u·T)`` for ``u`` from the configured density and range."""
        count = self.num_train_timesteps
        if self.timesteps.density in ("auto", "uniform"):
            low, high = self.timesteps.noise_range
            return torch.randint(
                round(low * count), max(round(high * count), round(low * count) + 1), (batch_size,),
                device=device, generator=generator,
            )
        fractions = draw_fractions(self.timesteps, batch_size, device, generator, self.default_density)
        return (fractions * count).long()

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(
            f"{self.pretrained_path}: scheduler prediction_type {self.prediction_type!r} is not supported; "
            "expected 'epsilon' or 'v_prediction'"
        )

    def error_weights(self, timesteps: Tensor) -> Tensor | None:
        if self.timesteps.weighting != "min_snr":
            return super().error_weights(timesteps)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        return min_snr_weights(snr, self.timesteps.snr_gamma, self.prediction_type)

    def alphas_cumprod(self, timesteps: Tensor) -> Tensor:
        return self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]


class OneTextEncoderPipeline:
    """What families whose pipeline is one text encoder and its tokenizer, a VAE, a transformer and a scheduler
    share (Qwen-Image, SANA, FLUX.2 [klein]): loading them, the frozen modules, the pipeline around a trained
    denoiser and the text budget. ``_prompt_pipeline`` keeps the loaded pipeline, whose ``encode_prompt`` the
    family calls."""

    pipeline_class: ClassVar[Any]
    denoiser_class: ClassVar[type[nn.Module]]
    vae_class: ClassVar[type[nn.Module]]
    default_text_length: ClassVar[int]  # the pipeline's default max_sequence_length
    options: FamilyOptions
    noise_scheduler: Any

    def __init__(
        self,
        pretrained_path: str,
        vae_path: str | None = None,
        timesteps: TimestepSettings | None = None,
        options: FamilyOptions | None = None,
    ) -> None:
        super().__init__(pretrained_path, timesteps, options)  # type: ignore[call-arg]
        if vae_path:
            vae = self.vae_class.from_pretrained(vae_path)
        else:
            vae = self.vae_class.from_pretrained(pretrained_path, subfolder="vae")
        denoiser = self.denoiser_class.from_pretrained(pretrained_path, subfolder="transformer")
        self._prompt_pipeline = self.pipeline_class.from_pretrained(pretrained_path, transformer=denoiser, vae=vae)
        self.text_encoder, self.tokenizer = self._prompt_pipeline.text_encoder, self._prompt_pipeline.tokenizer
        self.vae, self.denoiser = self._prompt_pipeline.vae, self._prompt_pipeline.transformer

    @property
    def max_text_length(self) -> int:
        return self.options.max_text_length or self.default_text_length

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder}

    def build_pipeline(self, denoiser: nn.Module) -> Any:
        return self.pipeline_class(
            scheduler=self.noise_scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            transformer=denoiser,
            **self.pipeline_settings(),
        )

    def pipeline_settings(self) -> dict[str, Any]:
        """The pipeline's registered settings besides its components (FLUX.2 [klein]'s ``is_distilled``)."""
        return {}


class ImageLatents:
    """What latent image families share: a diffusers ``AutoencoderKL`` over pixels in [-1, 1]."""

    sample_range = (-1.0, 1.0)
    vae: nn.Module
    # Pixels per latent position the denoiser sees along each side (the VAE's factor times any patching), with the
    # published VAE: what the config checks before any model loads. A VAE of another factor (a tiny test model)
    # scales it by its own factor over the published one.
    resolution_multiple: ClassVar[int] = 8
    published_vae_factor: ClassVar[int] = 8

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def media_decoder(self, config: DiffusionDataConfig) -> MediaDecoder:
        multiple = self.vae_scale_factor * self.resolution_multiple // self.published_vae_factor
        if config.resolution % multiple:
            raise ValueError(
                f"data.resolution: {config.resolution} px is not a multiple of {multiple}, which "
                f"{type(self).__name__} needs (the VAE's factor {self.vae_scale_factor} times its patching)"
            )
        return image_decoder(config)

    @property
    def latent_normalization(self) -> LatentNormalization:
        return LatentNormalization.of_vae(self.vae)

    def decode(self, latents: Tensor) -> Tensor:
        return (self.decode_to_vae_input(latents) / 2 + 0.5).clamp(0, 1)


class ImageVAEFamily(ImageLatents, DDPMFamily):
    """Latent image families with a DDPM schedule (SD1.5, SDXL)."""

    supported_options = frozenset({"sample_resolution"})

    def pipeline_prompt_inputs(self, prompts: list[str]) -> dict[str, Any]:
        size = self.options.sample_resolution
        return {"prompt": prompts} if size is None else {"prompt": prompts, "height": size, "width": size}
