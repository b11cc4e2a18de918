"""The config of a diffusion preference run (``kind: diffusion``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.losses import LossConfig
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
class MethodConfig:
    name: Literal["dpo", "inpo", "ncp"] = "dpo"
    inpo: InpoSettings = field(default_factory=InpoSettings)
    ncp: NcpSettings = field(default_factory=NcpSettings)


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
