"""The config of a diffusion preference run (``kind: diffusion``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.losses import LOSSES, LossConfig
from diffalign.training.config import OptimConfig, RunConfig


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank, as the diffusers example
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")


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
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"  # any torch.compile backend; aot_eager traces without generating kernels
    # Diffusion-DPO only: a folder where the reference errors of every pair are precomputed once (keyed by the
    # reference weights, data, seed and settings), so steps run no reference forward. This CHANGES THE ESTIMATOR:
    # each pair keeps the noise, timestep, latent sample, caption dropout and flip of its first visit for the
    # whole run instead of fresh draws per epoch (see diffusion/reference_cache.py). null: reference every step.
    reference_cache: str | None = None

    def __post_init__(self) -> None:
        if self.trainable == "full" and self.reference == "adapter_disabled":
            raise ValueError(
                "model.reference: adapter_disabled needs model.trainable: lora; use frozen_copy (or auto) for full"
            )


@dataclass
class InpoSettings:
    """DDIM-InPO (methods/inpo.py): how x_t* is obtained by DDIM inversion. Defaults: the official code."""

    inversion_steps: int = 10  # points of the DDIM inference grid (spacing T / steps)
    inversion_eta: float = 0.1  # jitter η·σ·N(0, I) after each inversion step; 0 = deterministic inversion
    # reference: the frozen pretrained model inverts; policy: the model being trained (the official code).
    inversion_model: Literal["reference", "policy"] = "reference"
    # false (official): x_t* lands on the largest grid point below t; true: one more step to t itself.
    invert_to_exact_timestep: bool = False

    def __post_init__(self) -> None:
        if self.inversion_steps < 1:
            raise ValueError(f"method.inpo.inversion_steps must be >= 1, got {self.inversion_steps}")
        if self.inversion_eta < 0:
            raise ValueError(f"method.inpo.inversion_eta must be >= 0, got {self.inversion_eta}")


@dataclass
class NcpSettings:
    """NCP (methods/ncp.py): errors in the frozen pretrained U-Net's feature space. Defaults: the official code."""

    encoder_output: Literal["down", "mid"] = "down"  # the last down block's output, or the mid block's
    concatenate_states: bool = False  # every state from conv_in on, concatenated
    normalize_states: bool = False  # scale concatenated states by (size of the last)/(own size)
    # The latent encoded for a prediction: one DDPM step to t−1 (encoded at t−1), or x̂0 at t=0 / a random t.
    encoded_latent: Literal["previous_step", "clean_at_zero", "clean_at_random_t"] = "previous_step"
    feature_error_weight: float = 1.0
    add_latent_error: bool = False  # error = latent MSE + weighted feature MSE (the official `--method both`)

    def __post_init__(self) -> None:
        if self.normalize_states and not self.concatenate_states:
            raise ValueError(
                "method.ncp.normalize_states: true only applies to concatenated states; "
                "set method.ncp.concatenate_states: true or normalize_states: false"
            )
        if not self.feature_error_weight > 0:
            raise ValueError(f"method.ncp.feature_error_weight must be > 0, got {self.feature_error_weight}")


@dataclass
class SeppoSettings:
    """SePPO/SSPO (methods/seppo.py): winners from the data, losers sampled by a past checkpoint."""

    num_inference_steps: int = 20  # DDIM steps of the reference samples
    guidance_scale: float = 7.5
    generation_batch_size: int = 16
    snapshot_every: int = 50  # the policy joins the checkpoint bank every N optimizer steps (and at step 0)
    bank_size: int = 8  # checkpoints kept (a uniform sample of all past ones)
    # uniform: a random past checkpoint each step (the paper's); latest / initial: its ablations.
    selection: Literal["uniform", "latest", "initial"] = "uniform"
    bank_dir: str | None = None  # None: CPU copies (saved in training checkpoints); a folder: safetensors files
    # When the anchor criterion judges the reference sample a winner: pull towards it (μ = −1) or drop it (μ = 0);
    # push: ignore the criterion (μ = 1: every reference sample is a loser), its ablation.
    likely_winner: Literal["pull", "no_push", "push"] = "pull"
    # Decode each reference sample and encode it again, as the data path encodes a stored loser, so the pair's two
    # members differ in content only, not in where their latents come from (family.reencode).
    reencode_samples: bool = True

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "generation_batch_size", "snapshot_every", "bank_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.seppo.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DragonSettings:
    """DRAGON (methods/dragon.py): on-policy generations scored by a reward, contrasted as positive/negative sets."""

    prompts_file: str | None = None  # training prompts, one per line
    prompts: list[str] = field(default_factory=list)
    samples_per_prompt: int = 2  # K generations per prompt, ranked by the reward
    # halves: the best ⌊K/2⌋ are positives and the worst ⌊K/2⌋ negatives, i-th best paired with i-th worst;
    # best_worst: one pair per prompt, its best vs its worst sample (TangoFlux's CRPO pairs, K = 5 there).
    pairing: Literal["halves", "best_worst"] = "halves"
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    generation_batch_size: int = 16
    reward: str = "clip_score"  # a scorer of diffalign.rewards (clip_score, clap_score, fad, vendi, toy_t2i, ...)
    reward_options: dict[str, Any] = field(default_factory=dict)  # the scorer's options (model, reduction, ...)
    # The reward's reference set: a text file (one exemplar per line) or a folder of images or audio files.
    exemplars: str | None = None

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"method.dragon.samples_per_prompt must be >= 2 (a positive and a negative per prompt), "
                f"got {self.samples_per_prompt}"
            )
        for name in ("num_inference_steps", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.dragon.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RpoSettings:
    """λ-Harmonic RPO (methods/rpo.py): subject images preferred over the pretrained model's generations."""

    subject_dir: str = ""  # subject images, optionally with prompts.json ("templates", "identifier", "images")
    templates: list[str] = field(default_factory=list)  # prompts with a [V] placeholder; default: prompts.json's
    identifier: str | None = None  # what replaces [V]; default: prompts.json's
    # The condition of the subject images; None: their pair's prompt. The official train.py: "a photo of [V] dog".
    reference_prompt: str | None = None
    negatives_per_prompt: int = 16
    sampling_steps: int = 50  # DDIM steps for the negatives and for validation
    guidance_scale: float = 7.5
    generation_batch_size: int = 16
    label_lambda: float = 0.0  # λ of the training labels (official: 0, text similarity only)
    label_sampling: Literal["soft", "bernoulli"] = "soft"  # bernoulli: hard labels ~ Bernoulli(p), as the official
    validation_lambda: float = 0.5  # λ_val of the early-stopping reward
    validation_images: int = 4  # per template
    reward_model: str = "kakaobrain/align-base"
    reward_encoder: Literal["clip", "open_clip"] = "clip"
    reward_options: dict[str, Any] = field(default_factory=dict)  # device, dtype, processor, checkpoint
    rescale_similarity: bool = True  # cosines mapped to (s + 1)/2 before the harmonic mean, as the official
    share_noise: bool = True  # one ε and t per pair; false: per image, as the official train.py

    def __post_init__(self) -> None:
        for name in ("label_lambda", "validation_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"method.rpo.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("negatives_per_prompt", "sampling_steps", "generation_batch_size", "validation_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"method.rpo.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class MethodConfig:
    name: Literal["dpo", "inpo", "ncp", "seppo", "dragon", "rpo"] = "dpo"
    inpo: InpoSettings = field(default_factory=InpoSettings)
    ncp: NcpSettings = field(default_factory=NcpSettings)
    seppo: SeppoSettings = field(default_factory=SeppoSettings)
    dragon: DragonSettings = field(default_factory=DragonSettings)
    rpo: RpoSettings = field(default_factory=RpoSettings)


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
    grid_prompts: int = 8  # how many prompts go into the before/after image grid


@dataclass
class DiffusionTrainConfig:
    kind: str = "diffusion"
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: DiffusionEvalConfig = field(default_factory=DiffusionEvalConfig)

    def __post_init__(self) -> None:
        if self.model.reference_cache is not None:
            # The other methods' reference inputs are no fixed function of the pair (DDIM inversion by the
            # policy, generated losers), so only Diffusion-DPO's reference errors can be stored.
            if self.method.name != "dpo":
                raise ValueError(
                    f"model.reference_cache works with method.name: dpo only, got {self.method.name!r}; "
                    "remove model.reference_cache"
                )
            if not any(LOSSES[name].needs_reference for name in self.loss.type):
                raise ValueError(
                    f"model.reference_cache is set but loss.type {self.loss.type} uses no reference; "
                    "remove model.reference_cache"
                )
