"""Unpaired losses: desirable samples (``*_chosen``) and undesirable ones (``*_rejected``) scored separately.

The two sides may have different sizes. A loss returns ``[desirable losses, undesirable losses]``
concatenated (only the side it uses, for one-sided losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, log_ratios, register_loss


def kto_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    reference_point: Tensor | float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Kahneman–Tversky optimisation: each sample's value relative to the reference point z0.

        desirable:    λ_D·(1 − σ(β·(h − z0)))
        undesirable:  λ_U·(1 − σ(β·(z0 − h)))

    z0 is the detached batch estimate of KL(πθ ‖ πref), taken by the caller from mismatched prompt/completion
    pairs and clamped at 0 (Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv 2402.01306; TRL's KTOTrainer).
    """
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (chosen_logratios - reference_point)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (reference_point - rejected_logratios)))
    return torch.cat([desirable, undesirable])


def apo_zero_unpaired_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """APO-zero on unpaired samples: raise each desirable likelihood, lower each undesirable one.

        desirable:    λ_D·(1 − σ(β·h)),     undesirable:  λ_U·σ(β·h)

    D'Oosterlinck et al., arXiv 2408.06266, Eq. 7 unpaired; TRL's KTOTrainer ``loss_type="apo_zero_unpaired"``
    (no reference point z0).
    """
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * chosen_logratios))
    undesirable = undesirable_weight * torch.sigmoid(beta * rejected_logratios)
    return torch.cat([desirable, undesirable])


def npo_loss(rejected_logratios: Tensor, beta: float) -> Tensor:
    """Negative preference optimisation: push down the likelihood of undesirable samples, boundedly.

        L = (2/β)·log(1 + (πθ/πref)^β) = −(2/β)·log σ(−β·h)

    Zhang et al., "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
    arXiv 2404.05868. As β → 0 it tends to gradient ascent on the NLL, which it bounds.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * rejected_logratios)


@register_loss(
    "kto",
    "KTO: 1 − σ(β(h − z0)) on desirable, 1 − σ(β(z0 − h)) on undesirable samples (z0 = kl_reference_point)",
    paired=False,
)
def _kto(scores: PairScores, config: LossConfig) -> Tensor:
    reference_point = scores.kl_reference_point if scores.kl_reference_point is not None else 0.0
    return kto_loss(
        *log_ratios(scores),
        config.beta,
        reference_point,
        config.kto_desirable_weight,
        config.kto_undesirable_weight,
    )


@register_loss("npo", "NPO: −(2/β)·log σ(−βh) on the undesirable (rejected) samples only", paired=False)
def _npo(scores: PairScores, config: LossConfig) -> Tensor:
    _, rejected_logratios = log_ratios(scores)
    return npo_loss(rejected_logratios, config.beta)


@register_loss(
    "apo_zero_unpaired",
    "APO-zero unpaired: 1 − σ(βh) on desirable, σ(βh) on undesirable samples (KTO's class weights)",
    paired=False,
)
def _apo_zero_unpaired(scores: PairScores, config: LossConfig) -> Tensor:
    return apo_zero_unpaired_loss(
        *log_ratios(scores), config.beta, config.kto_desirable_weight, config.kto_undesirable_weight
    )
