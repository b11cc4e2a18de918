"""The config of a diffusion preference run (``kind: diffusion``).

``method.name`` and its ``method.<name>:`` section come from the method registry (diffusion/methods/); each method
module defines its settings dataclass. The config refuses, before any model loads, a method or timestep setting
that the model family cannot serve (a family's ``capabilities`` against a method's ``requires``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffalign.config import require_at_least_one
from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.diffusion.families import DiffusionFamily, FamilyOptions, family_class
from diffalign.diffusion.families.base import ImageLatents
from diffalign.diffusion.methods import METHODS, DiffusionMethod
from diffalign.diffusion.timesteps import TimestepSettings
from diffalign.losses import LOSSES, LossConfig
from diffalign.training.config import OptimConfig, RunConfig
from diffalign.training.lora import LoraSettings


@dataclass
class DiffusionModelConfig:
    pretrained: str = "assets/toy-t2i"  # a diffusers pipeline directory (or a hub id while online)
    vae: str | None = None  # a replacement VAE directory, e.g. an fp16-safe SDXL VAE
    trainable: Literal["lora", "full"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # auto: adapters disabled for LoRA, a frozen copy for a full fine-tune.
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = "auto"
    offload_reference: bool = False
    channels_last: bool = False
    # torch.compile of the denoiser (and of a frozen-copy reference), in place: parameter names, checkpoints and
    # exported files are unchanged. The first steps pay for the compilation (minutes for SDXL).
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    compile_backend: str = (
        "inductor"  # any torch.compile backend; aot_eager traces without generating kernels
    )
    # Diffusion-DPO only: a folder where the reference errors of every pair are precomputed once (keyed by the
    # reference weights, data, seed and settings), so steps run no reference forward. This CHANGES THE ESTIMATOR:
    # each pair keeps the noise, timestep, latent sample, caption dropout and flip of its first visit for the
    # whole run instead of fresh draws per epoch (see diffusion/reference_cache.py). null: reference every step.
    reference_cache: str | None = None
    # Settings some families take (see families/base.py FamilyOptions); refused where the family ignores them.
    sample_resolution: int | None = None  # px of generated images; null: the model's native size
    max_text_length: int | None = None  # tokens of T5-style text encoders; null: the pipeline's default
    drop_text_encoders: list[str] = field(default_factory=list)  # e.g. [text_encoder_3]: SD3 without T5
    guidance: float = 3.5  # the guidance embedding of guidance-distilled models (FLUX.1-dev) in training
    audio_seconds: float | None = None  # clip length of training audio and samples (ACE-Step); null: the default
    # TR-DPO (TRL's sync_ref_model): every reference_sync_steps optimizer steps the loss's reference moves to
    # mixup_alpha·policy + (1 − mixup_alpha)·reference. It is a frozen copy of its own (the base model for
    # evaluation stays the initial one), so a full fine-tune holds three copies of the denoiser. null: fixed.
    reference_sync_steps: int | None = None
    reference_mixup_alpha: float = 0.6

    def family_options(self) -> FamilyOptions:
        return FamilyOptions(
            sample_resolution=self.sample_resolution,
            max_text_length=self.max_text_length,
            drop_text_encoders=tuple(self.drop_text_encoders),
            guidance=self.guidance,
            audio_seconds=self.audio_seconds,
        )

    def __post_init__(self) -> None:
        require_at_least_one(self, "model", ("sample_resolution", "max_text_length"), nullable=True)
        if self.audio_seconds is not None and not self.audio_seconds > 0:
            raise ValueError(f"model.audio_seconds must be > 0 or null, got {self.audio_seconds}")
        if self.trainable == "full" and self.reference == "adapter_disabled":
            raise ValueError(
                "model.reference: adapter_disabled needs model.trainable: lora; use frozen_copy (or auto) for full"
            )
        if self.reference_sync_steps is not None:
            if self.trainable != "full" or self.reference_cache is not None:
                raise ValueError(
                    "model.reference_sync_steps (TR-DPO) moves a frozen copy of the denoiser towards the policy: "
                    "it needs model.trainable: full and no model.reference_cache; or set it to null"
                )
            if self.reference_sync_steps < 1 or not 0.0 < self.reference_mixup_alpha <= 1.0:
                raise ValueError(
                    f"model.reference_sync_steps={self.reference_sync_steps} must be >= 1 and "
                    f"model.reference_mixup_alpha={self.reference_mixup_alpha} in (0, 1]"
                )


def _method_config_class() -> type:
    """``method:``: the registered method's name and one settings section per method that has settings."""
    fields: list[Any] = [("name", Literal[tuple(METHODS)], field(default="dpo"))]
    for name, method in METHODS.items():
        if method.settings_class is not None:
            fields.append((name, method.settings_class, field(default_factory=method.settings_class)))

    def settings(self: Any) -> Any:
        """The settings section of the chosen method (None for a method without settings)."""
        return getattr(self, self.name, None)

    return dataclasses.make_dataclass(
        "MethodConfig", fields, namespace={"settings": settings, "__module__": __name__}
    )


MethodConfig = _method_config_class()


@dataclass
class DiffusionEvalConfig:
    """Sampling from fixed prompts during and after training; with a reward, a base-vs-aligned win rate."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None  # one prompt per line; added to `prompts`
    max_prompts: int | None = None
    # Each prompt is sampled this many times (seeds seed, seed+1, ...): win rates over more than a few prompts.
    samples_per_prompt: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    reward: str | None = None  # a scorer name from diffalign.rewards, e.g. toy_t2i
    # More scorers, each reported as its mean base → aligned (`eval/<name>_base`, `eval/<name>_aligned`): what a
    # reward is made of (toy_t2i_centredness), or a second opinion on it.
    metrics: list[str] = field(default_factory=list)
    grid_prompts: int = 8  # how many prompts go into the before/after image grid


@dataclass
class DiffusionTrainConfig:
    kind: str = "diffusion"
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    timesteps: TimestepSettings = field(default_factory=TimestepSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: DiffusionEvalConfig = field(default_factory=DiffusionEvalConfig)

    def __post_init__(self) -> None:
        method = METHODS[self.method.name]
        if self.model.reference_cache is not None:
            # Other methods' reference inputs are no fixed function of the pair (DDIM inversion by the policy,
            # generated losers), so only theirs can be stored.
            if not method.supports_reference_cache:
                cached = sorted(
                    name for name, registered in METHODS.items() if registered.supports_reference_cache
                )
                raise ValueError(
                    f"model.reference_cache works with method.name: {cached} only, got {self.method.name!r}; "
                    "remove model.reference_cache"
                )
            if not any(LOSSES[name].needs_reference for name in self.loss.type):
                raise ValueError(
                    f"model.reference_cache is set but loss.type {self.loss.type} uses no reference; "
                    "remove model.reference_cache"
                )
        if self.data.streaming and self.model.reference_cache is not None and self.data.cache_dir is None:
            raise ValueError(
                "model.reference_cache stores one draw per pair of a dataset read by index; a stream without "
                "data.cache_dir has none. Add data.cache_dir (training then reads the cache by index), or remove "
                "model.reference_cache"
            )
        if self.data.streaming and self.data.cache_dir is None and self.run.dataloader_workers:
            raise ValueError(
                "data.streaming without data.cache_dir reads and decodes rows in the training process; set "
                "run.dataloader_workers: 0, or add data.cache_dir (training then reads the cache with workers)"
            )
        if not self.data.drop_ties and not any(LOSSES[name].uses_label for name in self.loss.type):
            raise ValueError(
                f"data.drop_ties is false, so ties (label 0.5) reach the loss, but loss.type {self.loss.type} "
                "ignores soft labels; keep data.drop_ties: true or use a loss that takes labels (e.g. sigmoid)"
            )
        self._check_score_inputs(method)
        method.check_config(self)
        # A local pipeline is checked now; a hub id once its model_index.json has been fetched (train()).
        if (Path(self.model.pretrained) / "model_index.json").is_file():
            check_family_support(self, family_class(self.model.pretrained))

    def _check_score_inputs(self, method: type[DiffusionMethod]) -> None:
        """Diffusion scores are one denoising error per sample: no per-token inputs, and lengths only where the
        method counts one unit per sample."""
        needed = self.loss.needed_inputs()
        if needed & {"token_logps", "token_kl", "token_vocab"}:
            raise ValueError(
                f"loss.type={self.loss.type} with ld_alpha={self.loss.ld_alpha}, use_weighting="
                f"{self.loss.use_weighting} needs per-token log-probs, which diffusion scores do not have (one "
                "denoising error per sample); use a loss on per-sample scores and leave the token options unset"
            )
        if "lengths" in needed and not method.scores_lengths:
            lengths = sorted(name for name in self.loss.type if LOSSES[name].needs_lengths)
            with_lengths = sorted(name for name, registered in METHODS.items() if registered.scores_lengths)
            raise ValueError(
                f"loss.type has {lengths}, which need completion lengths; method.name: {self.method.name} scores one "
                f"denoising error per sample without lengths (methods with lengths: {with_lengths}); use another loss"
            )

    @property
    def uses_reference(self) -> bool:
        """Whether the method's loss compares the policy with a reference (by default: a loss of ``loss.type``)."""
        return METHODS[self.method.name].uses_reference(self)


CAPABILITY_NEEDS = {
    "ddpm_schedule": "a discrete DDPM noise schedule",
    "unet_encoder": "a U-Net denoiser (conv_in, down_blocks, mid_block)",
    "flow_matching": "a flow-matching (rectified-flow) model",
    "stepwise_guidance": "guidance that depends on the current step alone (method.grpo.guidance_scale > 1 recomputes "
    "each guided step's log-prob on its own)",
}
WEIGHTING_NEEDS = {"min_snr": "ddpm_schedule", "sigma_sqrt": "flow_matching", "cosmap": "flow_matching"}


def check_family_support(config: DiffusionTrainConfig, family: type[DiffusionFamily]) -> None:
    """Refuse a method, option, ``timesteps.weighting`` or ``data.resolution`` ``family`` cannot take, naming both."""
    method = METHODS[config.method.name]
    missing = sorted(method.requires - family.capabilities)
    if missing:
        runnable = sorted(name for name, other in METHODS.items() if other.requires <= family.capabilities)
        fix = f"choose a method that runs on it ({', '.join(runnable)})"
    else:  # the method runs on this family, but not with these settings
        missing = sorted(method.requirements(config) - family.capabilities)
        fix = "change the setting named above"
    if missing:
        raise ValueError(
            f"method.name: {config.method.name!r} needs {' and '.join(CAPABILITY_NEEDS[c] for c in missing)}, "
            f"which {family.__name__} (model.pretrained: {config.model.pretrained}) does not have; {fix}"
        )
    options = config.model.family_options()
    unsupported = sorted(options.non_default() - family.supported_options)
    if unsupported:
        raise ValueError(
            f"model.{unsupported[0]} is set, but {family.__name__} (model.pretrained: {config.model.pretrained}) "
            f"does not use it; remove it (it takes: {sorted(family.supported_options) or 'none of these'})"
        )
    limit = family.max_text_length_limit
    if limit is not None and options.max_text_length is not None and options.max_text_length > limit:
        raise ValueError(
            f"model.max_text_length: {options.max_text_length} tokens is more than {family.__name__}'s pipeline "
            f"accepts ({limit}); set at most {limit}"
        )
    dropped = sorted(set(options.drop_text_encoders) - set(family.optional_text_encoders))
    if dropped:
        raise ValueError(
            f"model.drop_text_encoders: {family.__name__} cannot do without {dropped}; it can drop "
            f"{list(family.optional_text_encoders) or 'none of its text encoders'}"
        )
    # Audio families do not read data.resolution; the loaded VAE's own factor is checked again by media_decoder.
    if issubclass(family, ImageLatents) and config.data.resolution % family.resolution_multiple:
        raise ValueError(
            f"data.resolution: {config.data.resolution} px is not a multiple of {family.resolution_multiple}, "
            f"which {family.__name__} needs ({family.published_vae_factor} pixels per latent times its patching)"
        )
    needed = WEIGHTING_NEEDS.get(config.timesteps.weighting)
    if needed is not None and needed not in family.capabilities:
        raise ValueError(
            f"timesteps.weighting: {config.timesteps.weighting!r} needs {CAPABILITY_NEEDS[needed]}, which "
            f"{family.__name__} (model.pretrained: {config.model.pretrained}) does not have; use weighting: none"
        )
