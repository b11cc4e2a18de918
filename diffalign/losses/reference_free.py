"""Reference-free losses: they compare the policy's own log-likelihoods, no reference model needed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, register_loss
from diffalign.losses.margin import dpo_sigmoid_loss, soft_bradley_terry_loss
from diffalign.losses.sequence import alphapo_reward

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
    alphapo_alpha: float = 0.0,
) -> Tensor:
    """SimPO: a Bradley–Terry loss on length-averaged log-probs with a target margin γ.

        z = β·(ℓθ_w/|y_w| − ℓθ_l/|y_l|) − γ
        L = −(1 − ε)·log σ(z) − ε·log σ(−z)

    Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734
    (ε as in TRL's CPOTrainer). With ``alphapo_alpha`` = α ≠ 0 the averaged log-probs pass through AlphaPO's
    reward shape r(ℓ̄) = (1 − e^(−α·ℓ̄))/α (``sequence.alphapo_reward``): TRL's ``loss_type="alphapo"``.
    """
    chosen = alphapo_reward(chosen_logps / chosen_lengths, alphapo_alpha)
    rejected = alphapo_reward(rejected_logps / rejected_lengths, alphapo_alpha)
    return soft_bradley_terry_loss(beta * (chosen - rejected) - gamma, 1.0 - label_smoothing)


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
    log_odds = average_log_odds(chosen_logps, chosen_lengths) - average_log_odds(
        rejected_logps, rejected_lengths
    )
    return -beta * F.logsigmoid(log_odds)


def average_log_odds(logps: Tensor, lengths: Tensor) -> Tensor:
    """log(p̄/(1 − p̄)) with p̄ = exp(ℓθ/|y|), the per-token geometric-mean probability."""
    average = torch.clamp(logps / lengths, max=MAX_AVERAGE_LOGP)
    return average - log1mexp(average)


@register_loss(
    "cpo",
    "CPO: DPO's sigmoid loss on policy log-probs −log σ(β(ℓθ_w − ℓθ_l)), no reference",
    needs_reference=False,
    uses_label=True,
)
def _cpo(scores: PairScores, config: LossConfig) -> Tensor:
    # Xu et al., "Contrastive Preference Optimization", arXiv 2401.08417; its NLL term is `sft`. AlphaPO's
    # reward shape applies to the summed log-probs, as in TRL's CPOTrainer.
    return dpo_sigmoid_loss(
        alphapo_reward(scores.policy_chosen, config.alphapo_alpha),
        alphapo_reward(scores.policy_rejected, config.alphapo_alpha),
        config.beta,
        config.label_smoothing,
        scores.label,
    )


@register_loss(
    "simpo",
    "SimPO: −log σ(β(ℓ̄θ_w − ℓ̄θ_l) − γ) on length-averaged log-probs, no reference (AlphaPO with alphapo_alpha)",
    needs_reference=False,
    needs_lengths=True,
    length_averaged_rewards=True,
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
        config.alphapo_alpha,
    )


@register_loss(
    "orpo",
    "ORPO odds-ratio term −β·log σ(log odds_w − log odds_l); use [orpo, sft] for ORPO",
    needs_reference=False,
    needs_lengths=True,
    length_averaged_rewards=True,
)
def _orpo(scores: PairScores, config: LossConfig) -> Tensor:
    return orpo_odds_ratio_loss(
        scores.policy_chosen,
        scores.policy_rejected,
        scores.chosen_lengths,
        scores.rejected_lengths,
        config.beta,
    )


def asft_alignment_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 1.0,
) -> Tensor:
    """ASFT's alignment term: a pointwise binary cross-entropy on each response's absolute likelihood.

        r(y) = log p̄(y) − log(1 − p̄(y)),   p̄ = exp(ℓθ(y)/|y|)
        L_align = −log σ(β·r(y_w)) − log σ(−β·r(y_l))        (β = 1: −log p̄(y_w) − log(1 − p̄(y_l)))

    Wang, Sun, Hua, Fang, "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood", arXiv 2409.10571,
    whose loss is L_SFT + λ·L_align with β = 1: ``type: [asft, sft]``, λ in ``loss.weights``. β ≠ 1 is the
    β-scaled form of Gorbatovski et al., "The Differences Between Direct Alignment Algorithms are a Blur", arXiv
    2502.01237.
    """
    return -F.logsigmoid(beta * average_log_odds(chosen_logps, chosen_lengths)) - F.logsigmoid(
        -beta * average_log_odds(rejected_logps, rejected_lengths)
    )


def simper_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """SimPER: raise the chosen response's inverse perplexity and lower the rejected one's; no hyperparameter.

        L = −exp(ℓθ(y_w)/|y_w|) + exp(ℓθ(y_l)/|y_l|)

    Xiao et al., "SimPER: A Minimalist Approach to Preference Alignment without Hyperparameters", ICLR 2025,
    arXiv 2502.00883 (official code tengxiao1/SimPER, scripts/simper_trainer.py). Average log-probs are
    clamped at 0, where a likelihood ends, so the exponentials stay ≤ 1.
    """
    chosen_average = torch.clamp(chosen_logps / chosen_lengths, max=0.0)
    rejected_average = torch.clamp(rejected_logps / rejected_lengths, max=0.0)
    return -torch.exp(chosen_average) + torch.exp(rejected_average)


@register_loss(
    "asft",
    "ASFT alignment term −log σ(β·r_w) − log σ(−β·r_l) on per-token log-odds; use [asft, sft] for ASFT",
    needs_reference=False,
    needs_lengths=True,
    length_averaged_rewards=True,
)
def _asft(scores: PairScores, config: LossConfig) -> Tensor:
    return asft_alignment_loss(
        scores.policy_chosen,
        scores.policy_rejected,
        scores.chosen_lengths,
        scores.rejected_lengths,
        config.beta,
    )


@register_loss(
    "simper",
    "SimPER: −exp(ℓ̄θ_w) + exp(ℓ̄θ_l), inverse perplexities, no reference and no β",
    needs_reference=False,
    needs_lengths=True,
    length_averaged_rewards=True,
)
def _simper(scores: PairScores, config: LossConfig) -> Tensor:
    return simper_loss(
        scores.policy_chosen, scores.policy_rejected, scores.chosen_lengths, scores.rejected_lengths
    )
