"""Advantages of a batch of scored groups, for the policy-gradient losses (``policy_gradient.py``).

An online method samples G outputs per prompt and scores each with one or more rewards. Rows are laid out
group by group, ``[prompt 0: sample 0..G−1, prompt 1: sample 0..G−1, ...]``, so ``rewards`` is ``[N]`` or
``[N, K]`` (K rewards, combined with ``AdvantageConfig.reward_weights``) with N = groups × G. Everything here is
a pure function; ``compute_advantages`` is the one entry point the trainers call.

Baselines and scales, as TRL's GRPOTrainer and RLOOTrainer compute them (std Bessel-corrected, ε = 1e-4):

    group_mean (GRPO):       A_i = (r_i − mean_g r) / (std_g r + ε)     scale "group"
                                   (r_i − mean_g r) / (std   r + ε)     scale "batch" (std over the whole batch)
                                    r_i − mean_g r                      scale "none"  (Dr. GRPO)
    leave_one_out (RLOO):    A_i = r_i − (Σ_{j∈g} r_j − r_i)/(G − 1)     scale "none"
                             A ← (A − mean A) / (std A + ε)              scale "batch" (RLOO's normalize_advantages)

Several rewards: ``sum_then_normalize`` weighs and sums them, then takes the advantage of the sum (TRL's
default); ``normalize_then_sum`` (GDPO) z-scores each reward within its group, sums them with their weights and
z-scores the sum over the batch. RLOO's KL penalty on the reward is ``kl_penalised_rewards``.

Flow-GRPO (Liu et al., arXiv 2505.05470, ``flow_grpo/stat_tracking.py``) computes the same group-mean advantages
with NumPy's population std (``unbiased_std: false``; its ``global_std`` is scale "batch") and clamps them to
±``adv_clip_max`` (``clip: 5``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

EPSILON = 1e-4  # TRL's


@dataclass
class AdvantageConfig:
    baseline: Literal["group_mean", "leave_one_out"] = "group_mean"
    scale: Literal["group", "batch", "none"] = "group"
    # One weight per reward column; None weighs every reward 1.
    reward_weights: list[float] | None = None
    aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    unbiased_std: bool = True  # Bessel-corrected std (TRL); false: the population std (Flow-GRPO's NumPy std)
    clip: float | None = None  # clamp advantages to ±clip (Flow-GRPO's adv_clip_max); None: no clamp

    def __post_init__(self) -> None:
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"advantages.clip must be > 0 or null (no clamp), got {self.clip}")
        if self.baseline == "leave_one_out" and self.scale == "group":
            raise ValueError(
                "advantages.scale: group divides by each group's std, which RLOO does not define; use "
                "advantages.scale: none (RLOO) or batch (RLOO's normalize_advantages)"
            )
        if self.aggregation == "normalize_then_sum" and self.baseline != "group_mean":
            raise ValueError(
                "advantages.aggregation: normalize_then_sum (GDPO) z-scores rewards within their group; use it "
                "with advantages.baseline: group_mean"
            )


def std_of(values: Tensor, dim: int | None = None, keepdim: bool = False, unbiased: bool = True) -> Tensor:
    """The Bessel-corrected standard deviation (TRL's ``nanstd`` without NaNs) or, with ``unbiased=False``, the
    population one (NumPy's default); 0 for a single value."""
    count = values.numel() if dim is None else values.shape[dim]
    if count < 2:
        return torch.zeros_like(values.mean(dim=dim, keepdim=keepdim) if dim is not None else values.mean())
    return values.std(dim=dim, keepdim=keepdim, unbiased=unbiased)


def grouped(values: Tensor, group_size: int) -> Tensor:
    """``[N, ...]`` → ``[N / G, G, ...]``, with a clear error when N is not a multiple of G."""
    if group_size < 1 or values.shape[0] % group_size != 0:
        raise ValueError(
            f"{values.shape[0]} rewards do not split into groups of {group_size}; give whole groups, laid out "
            "group by group"
        )
    return values.reshape(values.shape[0] // group_size, group_size, *values.shape[1:])


def group_mean_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", unbiased_std: bool = True
) -> Tensor:
    """GRPO's advantages ``[N]`` of one reward per row (table in the module docstring)."""
    groups = grouped(rewards.float(), group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = std_of(groups, dim=1, keepdim=True, unbiased=unbiased_std).expand_as(groups).reshape(-1)
        return advantages / (std + EPSILON)
    if scale == "batch":
        return advantages / (std_of(rewards.float(), unbiased=unbiased_std) + EPSILON)
    return advantages


def leave_one_out_advantages(
    rewards: Tensor, group_size: int, scale: str = "none", unbiased_std: bool = True
) -> Tensor:
    """RLOO's advantages ``[N]``: each reward minus the mean of the other G − 1 of its group (0 when G = 1).

    Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", arXiv 2402.14740; TRL's RLOOTrainer.
    """
    groups = grouped(rewards.float(), group_size)
    if group_size == 1:
        advantages = torch.zeros_like(rewards.float())
    else:
        baselines = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
        advantages = (groups - baselines).reshape(-1)
    if scale == "batch":
        return (advantages - advantages.mean()) / (std_of(advantages, unbiased=unbiased_std) + EPSILON)
    return advantages


def combine_rewards(rewards: Tensor, weights: list[float] | None) -> Tensor:
    """Σ_k w_k·r_k of ``[N, K]`` rewards (``[N]`` passes through)."""
    if rewards.ndim == 1:
        return rewards.float()
    weight = torch.ones(rewards.shape[1]) if weights is None else torch.tensor(weights, dtype=torch.float32)
    if weight.shape[0] != rewards.shape[1]:
        raise ValueError(
            f"advantages.reward_weights has {weight.shape[0]} weights for {rewards.shape[1]} rewards; give one "
            "weight per reward"
        )
    return (rewards.float() * weight.to(rewards.device)).sum(dim=1)


def compute_advantages(rewards: Tensor, group_size: int, config: AdvantageConfig) -> Tensor:
    """The advantage ``[N]`` of every row of ``rewards`` (``[N]`` or ``[N, K]``) under ``config``, clamped to
    ±``config.clip`` when set."""
    advantages = _advantages(rewards, group_size, config)
    return advantages if config.clip is None else advantages.clamp(-config.clip, config.clip)


def _advantages(rewards: Tensor, group_size: int, config: AdvantageConfig) -> Tensor:
    unbiased = config.unbiased_std
    if config.aggregation == "normalize_then_sum" and rewards.ndim == 2:
        groups = grouped(rewards.float(), group_size)
        standardised = (groups - groups.mean(dim=1, keepdim=True)) / (
            std_of(groups, dim=1, keepdim=True, unbiased=unbiased) + EPSILON
        )
        summed = combine_rewards(standardised.reshape(rewards.shape), config.reward_weights)
        return (summed - summed.mean()) / (std_of(summed, unbiased=unbiased) + EPSILON)
    total = combine_rewards(rewards, config.reward_weights)
    if config.baseline == "leave_one_out":
        return leave_one_out_advantages(total, group_size, config.scale, unbiased)
    return group_mean_advantages(total, group_size, config.scale, unbiased)


def kl_penalised_rewards(
    rewards: Tensor, old_logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """RLOO's reward with its KL penalty, the k1 estimate summed over each sequence's elements:

        r_i ← r_i − β·Σ_t m_{i,t}·(log π_old − log π_ref)

    (TRL's RLOOTrainer; it can be negative per element, unlike GRPO's k3 in the loss.)
    """
    return rewards.float() - beta * ((old_logps - ref_logps) * mask).sum(dim=-1)
