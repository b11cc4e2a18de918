"""Clipped policy-gradient losses of online group methods: GRPO, Dr. GRPO, DAPO, GSPO and RLOO.

One function serves LLMs and diffusion models: an *element* is a completion token for an LLM and a denoising
step of an SDE sampler for a diffusion model (Flow-GRPO, DanceGRPO). A trainer samples a group of outputs per
prompt with the current policy, keeps the per-element log-probs of the sampling policy (``old_logps``), scores
the outputs and turns the rewards into advantages (``advantages.compute_advantages``), then calls

    policy_gradient_loss(new_logps, old_logps, advantages, mask, config, ref_logps=None, num_items=None)

with ``new_logps``, ``old_logps``, ``ref_logps`` and ``mask`` of shape ``[B, T]`` (``mask`` 1 on the elements
trained: completion tokens, or the denoising steps of the trained window) and ``advantages`` ``[B]`` (or
``[B, T]`` per element). It returns a ``PolicyGradientOutput``: the scalar loss to backpropagate, the
per-element losses and detached metrics (clip fractions, KL, ratio spread). Inputs may be any float dtype; the
maths runs in fp32.

With ρ the importance ratio of an element, π_old the sampling policy and A the advantage:

    token ratio (default):   ρ_{i,t} = exp(log πθ − log π_old)
    sequence ratio (GSPO):   ρ_i = exp( Σ_t m·(log πθ − log π_old) / Σ_t m ), shared by the sequence's elements
    clipped objective:       ℓ_{i,t} = −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)·A)     (ρ in the first term capped
                                                                                     at δ if ``delta`` is set)
    KL to the reference:     ℓ += β·k3,  k3 = e^(log πref − log πθ) − (log πref − log πθ) − 1 (× ρ, the bias
                             correction of TRL's ``use_bias_correction_kl``, on by default)

reduced by ``loss_type`` (TRL's GRPOTrainer ``loss_type``; Σ runs over the batch, m the mask):

    grpo     mean_i [ Σ_t m·ℓ / Σ_t m ]            (Shao et al., DeepSeekMath, arXiv 2402.03300)
    bnpo     Σ m·ℓ / Σ m                           (the batch's token mean)
    dr_grpo  Σ m·ℓ / (B · L_max)                   (Liu et al., "Understanding R1-Zero-Like Training", arXiv
                                                   2503.20783: no length normalisation; pair it with advantages
                                                   scale "none")
    dapo     Σ m·ℓ / num_items                     (Yu et al., DAPO, arXiv 2503.14476: decoupled ε_low/ε_high,
                                                   token-level mean; num_items = Σ m of this batch by default)
    rloo     mean_i −min(ρ_i A_i, clip(ρ_i)·A_i), ρ_i = exp(Σ_t m·(log πθ − log π_old))
                                                   (TRL's RLOOTrainer; its KL goes into the reward:
                                                   ``advantages.kl_penalised_rewards``)

GSPO is ``importance_level: sequence`` (Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071),
usually with ``loss_type: grpo``. Accumulation: the training loop divides each micro-batch's loss by the number of
accumulation steps, so TRL's DAPO normaliser over a whole accumulation window of P processes is
``num_items = (active elements of the window, all processes) / (P · accumulation steps)``.

This module imports nothing from the rest of diffalign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

PG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "rloo")


@dataclass
class PolicyGradientConfig:
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "rloo"] = "dapo"
    importance_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    epsilon_low: float = 0.2  # TRL's `epsilon`
    epsilon_high: float | None = None  # None: epsilon_low (DAPO recommends 0.28)
    delta: float | None = None  # cap of the unclipped ratio (two-sided clipping, INTELLECT-2)
    beta: float = 0.0  # weight of the k3 KL to the reference (needs ref_logps)
    kl_bias_correction: bool = True
    max_completion_length: int | None = None  # dr_grpo's L_max; None: the width T of the batch

    def __post_init__(self) -> None:
        if self.loss_type not in PG_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {list(PG_LOSS_TYPES)}")
        if self.importance_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_level={self.importance_level!r} must be 'token' or 'sequence' (GSPO)"
            )
        if not 0 <= self.epsilon_low < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(
                f"epsilon_low={self.epsilon_low} must be in [0, 1) and epsilon_high={self.epsilon_high} >= 0"
            )
        if self.delta is not None and self.delta <= 1:
            raise ValueError(f"delta={self.delta} must be > 1 (it caps ratios above 1 + epsilon_high)")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")
        if self.loss_type == "rloo" and (self.importance_level != "token" or self.beta != 0.0):
            raise ValueError(
                "loss_type rloo has its own sequence ratio and puts its KL into the reward "
                "(advantages.kl_penalised_rewards); leave importance_level token and beta 0"
            )

    @property
    def clip_high(self) -> float:
        return self.epsilon_high if self.epsilon_high is not None else self.epsilon_low


@dataclass
class PolicyGradientOutput:
    loss: Tensor  # scalar to backpropagate
    per_element: Tensor  # [B, T] (rloo: [B, 1]) unreduced losses, zero where masked
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached scalars


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(πθ ‖ πref) per element: e^(r) − r − 1, r = log πref − log πθ (≥ 0)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1.0


def importance_log_ratio(new_logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """log ρ: ``[B, T]`` per element, or ``[B, 1]`` GSPO's length-averaged sequence log-ratio."""
    log_ratio = new_logps - old_logps
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).unsqueeze(-1)


def clipped_surrogate(ratio: Tensor, advantages: Tensor, config: PolicyGradientConfig) -> Tensor:
    """−min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)·A), with ρ capped at δ in the first term when set."""
    clipped = torch.clamp(ratio, 1.0 - config.epsilon_low, 1.0 + config.clip_high)
    unclipped = torch.clamp(ratio, max=config.delta) if config.delta is not None else ratio
    return -torch.min(unclipped * advantages, clipped * advantages)


def policy_gradient_loss(
    new_logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyGradientConfig,
    *,
    ref_logps: Tensor | None = None,
    num_items: float | Tensor | None = None,
) -> PolicyGradientOutput:
    """The clipped policy-gradient loss of a batch (equations and reductions in the module docstring)."""
    _check_inputs(new_logps, old_logps, advantages, mask, ref_logps, config)
    new_logps, old_logps, mask = new_logps.float(), old_logps.float(), mask.float()
    advantages = advantages.float()
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1)
    if config.loss_type == "rloo":
        return _rloo_loss(new_logps, old_logps, advantages, mask, config)

    ratio = torch.exp(importance_log_ratio(new_logps, old_logps, mask, config.importance_level))
    per_element = clipped_surrogate(ratio, advantages, config).expand_as(mask)
    kl = None
    if config.beta != 0.0:
        kl = k3_kl(new_logps, ref_logps.float())
        if config.kl_bias_correction:
            kl = kl * ratio
        per_element = per_element + config.beta * kl
    per_element = per_element * mask
    loss = _reduce(per_element, mask, config, num_items)
    return PolicyGradientOutput(loss, per_element, _metrics(ratio, advantages, mask, kl, config))


def sums_over_elements(config: PolicyGradientConfig) -> bool:
    """Whether each element's loss depends on that element alone (a token-level ratio), so that the loss of a fully
    trained batch is a weighted sum over its elements; GSPO's and RLOO's sequence-level ratios couple them."""
    return config.importance_level == "token" and config.loss_type != "rloo"


def element_weight(config: PolicyGradientConfig, sequences: int, length: int) -> float:
    """The weight w of each element in the loss of ``sequences`` × ``length`` elements, all of them trained (an
    all-ones mask) and ``num_items`` left to its default: ``loss = w · Σ ℓ``. So a trainer may backpropagate
    ``w · Σ ℓ`` over a part of the elements at a time (Flow-GRPO: one denoising step of a batch of trajectories).
    Only where :func:`sums_over_elements`."""
    if not sums_over_elements(config):
        raise ValueError(
            f"loss_type={config.loss_type!r}, importance_level={config.importance_level!r}: a sequence-level ratio "
            "couples the elements of a sequence, so the loss is not a weighted sum over them"
        )
    if config.loss_type == "dr_grpo":
        return 1.0 / (sequences * (config.max_completion_length or length))
    return 1.0 / (sequences * length)


def _reduce(per_element: Tensor, mask: Tensor, config: PolicyGradientConfig, num_items) -> Tensor:
    if config.loss_type == "grpo":
        return (per_element.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()
    if config.loss_type == "bnpo":
        return per_element.sum() / mask.sum().clamp(min=1.0)
    if config.loss_type == "dr_grpo":
        max_length = config.max_completion_length or mask.shape[-1]
        return per_element.sum() / (mask.shape[0] * max_length)
    normaliser = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float32)
    return per_element.sum() / normaliser.clamp(min=1.0)


def _rloo_loss(
    new_logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, config: PolicyGradientConfig
) -> PolicyGradientOutput:
    ratio = torch.exp(((new_logps - old_logps) * mask).sum(dim=-1, keepdim=True))
    per_sequence = clipped_surrogate(ratio, advantages, config)
    sequence_mask = torch.ones_like(ratio)
    return PolicyGradientOutput(
        per_sequence.mean(), per_sequence, _metrics(ratio, advantages, sequence_mask, None, config)
    )


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return ((values * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def _metrics(
    ratio: Tensor, advantages: Tensor, mask: Tensor, kl: Tensor | None, config: PolicyGradientConfig
) -> dict[str, Tensor]:
    """Clip fractions as TRL logs them (low: ρ < 1 − ε_low with A < 0; high: ρ > 1 + ε_high with A > 0)."""
    low = ((ratio < 1.0 - config.epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1.0 + config.clip_high) & (advantages > 0)).float()
    # Sequence-level ratios (GSPO, RLOO) count once per sequence, as TRL's metrics do.
    element_mask = mask if low.shape == mask.shape else torch.ones_like(low)
    detached = ratio.detach().expand_as(low)[element_mask.bool()]
    if detached.numel() == 0:  # every element masked: nothing was trained, the ratio is 1 by definition
        detached = torch.ones(1, device=ratio.device)
    metrics = {
        "clip_ratio/low": _masked_mean(low, element_mask),
        "clip_ratio/high": _masked_mean(high, element_mask),
        "clip_ratio/region": _masked_mean(torch.maximum(low, high), element_mask),
        "ratio/mean": detached.mean(),
        "ratio/min": detached.min(),
        "ratio/max": detached.max(),
    }
    if kl is not None:
        metrics["kl"] = _masked_mean(kl.detach(), mask)
    return metrics


def _check_inputs(
    new_logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None,
    config: PolicyGradientConfig,
) -> None:
    if new_logps.ndim != 2:
        raise ValueError(f"new_logps must be [B, T] (batch, elements); got shape {tuple(new_logps.shape)}")
    for name, value in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps)):
        if value is not None and value.shape != new_logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but new_logps has {tuple(new_logps.shape)}; give one "
                "value per element"
            )
    if advantages.shape not in (new_logps.shape[:1], new_logps.shape):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; give one per sequence [{new_logps.shape[0]}] or "
            f"one per element {list(new_logps.shape)}"
        )
    if config.loss_type == "rloo" and advantages.ndim != 1:
        raise ValueError("loss_type rloo takes one advantage per sequence [B]")
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError(
            f"beta={config.beta} adds the KL to the reference, which needs ref_logps; give them or set beta 0"
        )
