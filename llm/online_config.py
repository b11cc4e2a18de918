"""The config of an online LLM run (``kind: llm_online``): GRPO and its variants, RLOO, online DPO.

``method`` picks what a scored group becomes:

- ``grpo``: group-relative advantages (``advantages:``) and the clipped policy-gradient loss (``policy:``;
  ``loss_type`` grpo, bnpo, dr_grpo or dapo, ``importance_level: sequence`` for GSPO, ``epsilon_high`` for DAPO's
  clip-higher, ``beta`` for the k3 KL to the reference).
- ``rloo``: TRL's RLOOTrainer: leave-one-out advantages, the sequence-ratio loss (``policy.loss_type: rloo``) and
  its KL to the reference in the reward (``rloo.kl_beta``).
- ``online_dpo``: each group's best and worst completion become a pair for the pair losses of ``loss:``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.config import require_at_least_one
from diffalign.llm.config import LLMEvalConfig, LLMModelConfig, ReferenceConfig
from diffalign.llm.rewards import RewardConfig
from diffalign.losses import LOSSES, AdvantageConfig, LossConfig, PolicyGradientConfig
from diffalign.training.config import OptimConfig, RunConfig


@dataclass
class PromptDataConfig:
    """Training prompts: a ``prompt`` column (a string, or {role, content} messages rendered with the chat
    template) of a local JSONL/JSON/parquet file, a directory or a hub id."""

    path: str = "assets/toy-llm/data/prompts_train.jsonl"
    split: str = "train"
    subset: str | None = None
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    bad_rows: Literal["error", "skip"] = "error"  # a row without a prompt: stop naming it, or skip and count
    max_rows: int | None = None

    def __post_init__(self) -> None:
        require_at_least_one(self, "data", ("max_prompt_length", "max_rows"), nullable=True)


@dataclass
class VLLMConfig:
    """The engine of ``rollout.backend: vllm``: one per training process, on its GPU (``llm/vllm_sampler.py``)."""

    # The share of the GPU's memory the engine takes for its weights and KV cache; training has the rest
    # (TRL's vllm_gpu_memory_utilization, whose default this is).
    gpu_memory_utilization: float = 0.3
    # The longest prompt plus completion the engine plans its KV cache for; null: data.max_prompt_length +
    # rollout.max_new_tokens, or the model's own limit when prompts are not cut.
    max_model_len: int | None = None
    enforce_eager: bool = False  # true: no CUDA graphs (a faster start, slower decoding)

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.vllm.max_model_len must be >= 2 or null, got {self.max_model_len}")


@dataclass
class RolloutConfig:
    """How completions are sampled (TRL's GRPOConfig names in the comments)."""

    # transformers: the policy's own generate (any device); vllm: a colocated vLLM engine (CUDA GPUs, the
    # vllm extra; use_vllm with vllm_mode colocate), loaded with the policy's weights before every rollout.
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    group_size: int = 8  # G completions per prompt (num_generations)
    max_new_tokens: int = 256  # max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # Optimizer steps on each accumulation window's rollouts (num_iterations, GRPO's μ): with more than one, the
    # policy moves away from the sampling policy and the ratio's clipping matters. The loop's batches on the
    # reuse steps are not sampled from: every rollout draws fresh prompts.
    iterations: int = 1
    batch_size: int = 64  # rows per generate call of the transformers backend (vLLM schedules its own)

    def __post_init__(self) -> None:
        require_at_least_one(self, "rollout", ("group_size", "max_new_tokens", "iterations", "batch_size"))
        if self.group_size < 2:
            raise ValueError(
                f"rollout.group_size={self.group_size}: a group needs at least 2 completions (its baseline or "
                "its pair comes from the others)"
            )
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"rollout.top_p={self.top_p} must be in (0, 1] and rollout.top_k={self.top_k} >= 0"
            )


@dataclass
class RLOOConfig:
    # TRL's RLOOConfig.beta: r ← r − β·Σ_t (log π_old − log π_ref), the k1 KL estimate (needs a reference).
    kl_beta: float = 0.05

    def __post_init__(self) -> None:
        if self.kl_beta < 0:
            raise ValueError(f"rloo.kl_beta must be >= 0, got {self.kl_beta}")


@dataclass
class LLMOnlineTrainConfig:
    kind: str = "llm_online"
    method: Literal["grpo", "rloo", "online_dpo"] = "grpo"
    model: LLMModelConfig = field(default_factory=LLMModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    policy: PolicyGradientConfig = field(default_factory=PolicyGradientConfig)  # grpo, rloo
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)  # grpo, rloo
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # online_dpo
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's GRPO default
    run: RunConfig = field(default_factory=RunConfig)
    eval: LLMEvalConfig = field(default_factory=LLMEvalConfig)

    def __post_init__(self) -> None:
        if self.kind != "llm_online":
            raise ValueError(
                f"kind={self.kind!r} but this is the online LLM trainer's config; use kind: llm_online"
            )
        if not self.rewards:
            raise ValueError(
                "rewards is empty; list at least one, e.g. rewards: [{function: diffalign.toy.llm:toy_reward}]"
            )
        if self.advantages.reward_weights is not None:
            raise ValueError(
                "advantages.reward_weights: give each reward's weight in rewards[i].weight instead"
            )
        self._check_method()
        self._check_reference()

    def _check_method(self) -> None:
        loss_type, baseline = self.policy.loss_type, self.advantages.baseline
        if self.method == "grpo" and loss_type == "rloo":
            raise ValueError("policy.loss_type: rloo is RLOO's loss; use method: rloo")
        if self.method == "rloo" and (loss_type != "rloo" or baseline != "leave_one_out"):
            raise ValueError(
                "method: rloo (TRL's RLOOTrainer) takes policy.loss_type: rloo and advantages.baseline: "
                f"leave_one_out (got {loss_type!r} and {baseline!r}); set both, or use method: grpo"
            )
        if self.method == "online_dpo":
            unpaired = [name for name in self.loss.type if not LOSSES[name].paired]
            if unpaired:
                raise ValueError(
                    f"method: online_dpo makes pairs of each group's best and worst completion, but loss.type has "
                    f"unpaired losses {unpaired}; use paired losses (e.g. sigmoid, ipo)"
                )

    def _check_reference(self) -> None:
        if self.reference.strategy == "precomputed":
            raise ValueError(
                "reference.strategy: precomputed stores log-probs of fixed data, but online completions are new "
                "at every step; use frozen_copy or adapter_disabled (or auto)"
            )
        if self.reference.strategy == "adapter_disabled" and self.model.trainable != "lora":
            raise ValueError(
                "reference.strategy: adapter_disabled needs model.trainable: lora; use frozen_copy (or auto)"
            )
        if self.reference.sync_steps is not None:
            raise ValueError("reference.sync_steps is not yet supported by online methods; set it to null")

    @property
    def needs_reference(self) -> bool:
        if self.method == "grpo":
            return self.policy.beta > 0
        if self.method == "rloo":
            return self.rloo.kl_beta > 0
        return any(LOSSES[name].needs_reference for name in self.loss.type)

    @property
    def reference_strategy(self) -> str:
        """The resolved strategy; ``none`` when nothing needs a reference."""
        return self.reference.resolved(self.needs_reference, self.model.trainable)
