"""The config of ``diffalign eval`` (``kind: eval``): which models, which prompts, how to sample, how to score."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.config import require_at_least_one
from diffalign.eval.prompts import PROMPT_PRESETS, PROMPT_SUFFIXES, PromptSetConfig
from diffalign.eval.scoring import ScoringConfig


@dataclass
class EvalModelConfig:
    # A diffusers pipeline directory or hub id; empty: the `model.pretrained` of the aligned run's config.yaml.
    base: str = ""
    # A LoRA directory (`pytorch_lora_weights.safetensors`), a denoiser directory (`config.json` + weights), a
    # pipeline directory (its denoiser sub-folder is used), a training output directory holding `final/`, or a
    # training checkpoint (`<output_dir>/checkpoints/step-N`, rebuilt from its config; its EMA with run.ema).
    aligned: str = ""
    vae: str | None = None  # a replacement VAE directory; empty: the run config's model.vae when there is one


@dataclass
class GenerationConfig:
    """Sampling settings shared by both models; sample i uses the generator seeded ``seed + i``."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5  # 7.5 for SD1.x as in the SePPO/Diffusion-DPO evaluations; 5.0 for SDXL
    seed: int = 0
    samples_per_prompt: int = 1
    batch_size: int = 8
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        require_at_least_one(self, "generation", ("num_inference_steps", "samples_per_prompt", "batch_size"))


@dataclass
class EvalScorerConfig(ScoringConfig):
    """A scorer of the report: ``{name: pickscore, options: {...}, reference: dir, label: pickscore_v1}``."""

    label: str | None = None  # the scorer's name in the report; default: its registered name

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class ReportConfig:
    output_dir: str = "outputs/eval"
    confidence: float = 0.95
    grid_prompts: int = 8  # prompts in the base/aligned image grid or spectrogram grid
    save_samples: bool = True  # every sample as PNG/WAV under samples/{base,aligned}/

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"report.confidence must lie in (0, 1), got {self.confidence}")
        if self.grid_prompts < 1:
            raise ValueError(f"report.grid_prompts must be >= 1, got {self.grid_prompts}")


@dataclass
class EvalConfig:
    kind: str = "eval"
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scorers: list[EvalScorerConfig] = field(default_factory=list)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if not self.model.aligned:
            raise ValueError(
                "model.aligned is empty; set it to a LoRA directory, a denoiser directory or a training output "
                "directory (with final/)"
            )
        if not self.prompts.source:
            raise ValueError(
                f"prompts.source is empty; set it to a prompt file ({', '.join(PROMPT_SUFFIXES)}) or a preset "
                f"({', '.join(PROMPT_PRESETS)})"
            )
        if not self.scorers:
            raise ValueError("scorers is empty; list at least one scorer, e.g. [{name: pickscore}]")
        keys = [scorer.key for scorer in self.scorers]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(
                f"scorers: {repeated[0]!r} appears twice; give each use of a scorer its own `label`"
            )
