"""Config sections shared by every trainer: ``run:`` (the loop) and ``optim:`` (optimizer and schedule)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from diffalign.config import require_at_least_one


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor", "adamw_8bit"] = "adamw"
    lr: float = 1e-5
    # Official Diffusion-DPO: lr × per-device batch × accumulation × processes.
    scale_lr: bool = False
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # null: no clipping
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    # torch's fused AdamW kernel: "gpu" where the parameters live on a GPU, "always" on a CPU too (faster there,
    # and without the per-parameter loop's temporaries, each as large as the parameter), "never". Not the CPU
    # default: it rounds differently from that loop, which the toys' measured CPU runs used.
    fused: Literal["gpu", "always", "never"] = "gpu"

    def __post_init__(self) -> None:
        # Written so that NaN fails every check: NaN compares false with everything.
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be > 0 and finite, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"optim.weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"optim.eps must be > 0 and finite, got {self.eps}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        # A negative norm clips every gradient to a negative multiple of itself (gradient ascent); 0 zeroes it.
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"optim.max_grad_norm must be > 0, got {self.max_grad_norm}; use null for no clipping"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class EMAConfig:
    """An exponential moving average of the trained weights (diffusers' ``EMAModel``), updated after every
    ``every``-th optimizer step: for the k-th update ``ema ← d_k·ema + (1 − d_k)·θ`` with
    ``d_k = min(decay, k / (9 + k))`` for k ≥ 2 and ``d_1 = 0`` (the first update copies the weights). When on,
    evaluation, ``best/``, ``final/`` and ``diffalign export`` use the averaged weights."""

    decay: float = 0.9999
    every: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"run.ema.decay must be in [0, 1), got {self.decay}")
        if self.every < 1:
            raise ValueError(f"run.ema.every must be >= 1, got {self.every}")


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 1  # per device: pairs (diffusion) or pairs/examples (LLM)
    gradient_accumulation_steps: int = 1
    # bf16 on GPU by default; on a CPU-only machine "bf16"/"fp16" fall back to "no" (logged), loss maths is fp32 anyway.
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last_checkpoints: int = 3
    # "latest" resumes from the newest checkpoint in output_dir (if any); a path resumes from that checkpoint.
    resume: str | None = None
    # A resumed run refuses a config that differs from its checkpoint's in anything but the run's length, paths
    # and cadences (RESUMABLE_CHANGES); true resumes anyway and records the changes in config_changes.jsonl.
    allow_config_change: bool = False
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # The W&B project, the MLflow experiment and the TensorBoard folder under output_dir; null: "diffalign".
    wandb_project: str | None = None
    run_name: str | None = None  # the W&B / MLflow run's name; null: the tracker's own
    tags: list[str] = field(default_factory=list)  # W&B tags; MLflow tags (each set to "true")
    # The NaN/inf guard skips a non-finite step; after this many skipped steps the run stops (with a checkpoint).
    max_nonfinite_steps: int = 10
    # Run the recipe's evaluation (samples, validation reward) every N optimizer steps; 0 = only at the end.
    eval_every: int = 0
    dataloader_workers: int = 0
    pin_memory: bool = True
    progress_bar: bool = True
    # null: none. An average of the weights, used for evaluation and written to final/ instead of the raw ones.
    ema: EMAConfig | None = None
    # Upload final/ (weights, config.yaml, the model card README.md) to the Hugging Face Hub repository
    # hub_repo_id when training ends; needs network access and a token (`hf auth login` or HF_TOKEN).
    push_to_hub: bool = False
    hub_repo_id: str | None = None  # "user/name" or "org/name"; created if missing
    hub_private: bool = True  # a repository created by the push is private

    def __post_init__(self) -> None:
        counts = ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_every")
        require_at_least_one(self, "run", (*counts, "keep_last_checkpoints"))
        allowed_trackers = {"tensorboard", "wandb", "mlflow"}
        unknown = set(self.trackers) - allowed_trackers
        if unknown:
            raise ValueError(f"run.trackers: {sorted(unknown)} not supported; choose from {sorted(allowed_trackers)}")
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("run.push_to_hub is true but run.hub_repo_id is empty; set it to 'user/name'")
        if self.hub_repo_id is not None and self.hub_repo_id.count("/") != 1:
            raise ValueError(f"run.hub_repo_id must look like 'user/name', got {self.hub_repo_id!r}")
