"""Reference-free losses: they compare the policy's own log-likelihoods, no reference model needed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, register_loss
from diffalign.losses.margin import dpo_sigmoid_loss, soft_bradley_terry_loss

# A sequence of probability exactly 1 has infinite odds; keeping average log-probs below this keeps
# log(1 − p) and its gradient finite.
MAX_AVERAGE_LOGP = -1e-6


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate everywhere (Mächler, "Accurately Computing log(1 − exp(−|a|))", 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO: a Bradley–Terry loss on length-averaged log-probs with a target margin γ.

        z = β·(ℓθ_w/|y_w| − ℓθ_l/|y_l|) − γ
        L = −(1 − ε)·log σ(z) − ε·log σ(−z)

    Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734
    (ε as in TRL's CPOTrainer).
    """
    logits = beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - gamma
    return soft_bradley_terry_loss(logits, 1.0 - label_smoothing)


def orpo_odds_ratio_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> Tensor:
    """ORPO's odds-ratio term, scaled by β (the paper's λ); add ``sft`` for the full ORPO loss.

        p̄ = exp(ℓθ/|y|),   log odds(y) = log p̄ − log(1 − p̄)
        L_OR = −β·log σ( log odds(y_w) − log odds(y_l) )

    Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691:
    L = L_SFT + λ·L_OR. ``type: [orpo, sft]`` with weights [1, 1] reproduces TRL's ORPOTrainer, whose NLL
    averages over all tokens of the batch rather than per sequence (equal when the chosen lengths are equal).
    """
    chosen_average = torch.clamp(chosen_logps / chosen_lengths, max=MAX_AVERAGE_LOGP)
    rejected_average = torch.clamp(rejected_logps / rejected_lengths, max=MAX_AVERAGE_LOGP)
    log_odds = (chosen_average - rejected_average) - (log1mexp(chosen_average) - log1mexp(rejected_average))
    return -beta * F.logsigmoid(log_odds)


@register_loss(
    "cpo",
    "CPO: DPO's sigmoid loss on policy log-probs −log σ(β(ℓθ_w − ℓθ_l)), no reference",
    needs_reference=False,
    uses_label=True,
)
def _cpo(scores: PairScores, config: LossConfig) -> Tensor:
    # Xu et al., "Contrastive Preference Optimization", arXiv 2401.08417; its NLL term is `sft`.
    return dpo_sigmoid_loss(
        scores.policy_chosen, scores.policy_rejected, config.beta, config.label_smoothing, scores.label
    )


@register_loss(
    "simpo",
    "SimPO: −log σ(β(ℓ̄θ_w − ℓ̄θ_l) − γ) on length-averaged log-probs, no reference",
    needs_reference=False,
    needs_lengths=True,
)
def _simpo(scores: PairScores, config: LossConfig) -> Tensor:
    return simpo_loss(
        scores.policy_chosen,
        scores.policy_rejected,
        scores.chosen_lengths,
        scores.rejected_lengths,
        config.beta,
        config.simpo_gamma,
        config.label_smoothing,
    )


@register_loss(
    "orpo",
    "ORPO odds-ratio term −β·log σ(log odds_w − log odds_l); use [orpo, sft] for ORPO",
    needs_reference=False,
    needs_lengths=True,
)
def _orpo(scores: PairScores, config: LossConfig) -> Tensor:
    return orpo_odds_ratio_loss(
        scores.policy_chosen,
        scores.policy_rejected,
        scores.chosen_lengths,
        scores.rejected_lengths,
        config.beta,
    )
