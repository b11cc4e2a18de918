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
class MethodConfig:
    name: Literal["dpo"] = "dpo"


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
