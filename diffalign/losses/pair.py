"""Pair losses: functions of the chosen and rejected log-ratios separately, not only of their difference.

They push each likelihood in an absolute direction (chosen up, rejected down), which a pure margin loss does
not. ``s_w, s_l`` are the f-divergence scores of the log-ratios (``s(h) = h`` by default). Formulas follow
TRL's DPOTrainer and the papers cited per function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, log_ratios, register_loss
from diffalign.losses.transforms import divergence_scores


def nca_pair_loss(chosen_scores: Tensor, rejected_scores: Tensor, beta: float) -> Tensor:
    """Noise-contrastive alignment (pairwise).

        L = −log σ(β·s_w) − ½·log σ(−β·s_w) − ½·log σ(−β·s_l)

    Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", arXiv 2402.05369.
    """
    return (
        -F.logsigmoid(beta * chosen_scores)
        - 0.5 * F.logsigmoid(-beta * chosen_scores)
        - 0.5 * F.logsigmoid(-beta * rejected_scores)
    )


def bco_pair_loss(chosen_scores: Tensor, rejected_scores: Tensor, beta: float) -> Tensor:
    """Binary-classifier optimisation on pairs: chosen classified as good, rejected as bad.

        L = −log σ(β·s_w) − log σ(−β·s_l)

    Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", arXiv 2404.04656.
    As in current TRL, without the paper's running-mean reward shift δ.
    """
    return -F.logsigmoid(beta * chosen_scores) - F.logsigmoid(-beta * rejected_scores)


def sppo_hard_loss(chosen_scores: Tensor, rejected_scores: Tensor, beta: float) -> Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected): regress the scores onto ±1/(2β).

        L = (s_w − 1/(2β))² + (s_l + 1/(2β))²

    Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv 2405.00675.
    """
    target = 1.0 / (2.0 * beta)
    return (chosen_scores - target) ** 2 + (rejected_scores + target) ** 2


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Anchored preference optimisation, "zero" anchor: raise chosen and lower rejected likelihood.

        L = (1 − σ(β·h_w)) + σ(β·h_l)

    D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions", arXiv 2408.06266, Eq. 7.
    """
    return (1.0 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    beta: float,
) -> Tensor:
    """Anchored preference optimisation, "down" anchor: lower chosen likelihood, rejected more so.

        L = σ(β·h_w) + (1 − σ(β·(s_w − s_l)))

    D'Oosterlinck et al., arXiv 2408.06266, Eq. 8. The margin term uses the f-divergence scores, the anchor
    term the raw log-ratio, as TRL does.
    """
    return torch.sigmoid(beta * chosen_logratios) + (
        1.0 - torch.sigmoid(beta * (chosen_scores - rejected_scores))
    )


@register_loss("nca_pair", "NCA: −log σ(βs_w) − ½log σ(−βs_w) − ½log σ(−βs_l)", uses_f_divergence=True)
def _nca_pair(scores: PairScores, config: LossConfig) -> Tensor:
    return nca_pair_loss(*divergence_scores(scores, config), config.beta)


@register_loss("bco_pair", "BCO on pairs: −log σ(βs_w) − log σ(−βs_l)", uses_f_divergence=True)
def _bco_pair(scores: PairScores, config: LossConfig) -> Tensor:
    return bco_pair_loss(*divergence_scores(scores, config), config.beta)


@register_loss(
    "sppo_hard", "SPPO with hard labels: (s_w − 1/(2β))² + (s_l + 1/(2β))²", uses_f_divergence=True
)
def _sppo_hard(scores: PairScores, config: LossConfig) -> Tensor:
    return sppo_hard_loss(*divergence_scores(scores, config), config.beta)


@register_loss("apo_zero", "APO-zero: (1 − σ(βh_w)) + σ(βh_l), chosen up and rejected down")
def _apo_zero(scores: PairScores, config: LossConfig) -> Tensor:
    return apo_zero_loss(*log_ratios(scores), config.beta)


@register_loss("apo_down", "APO-down: σ(βh_w) + 1 − σ(βΔ), both down, rejected more", uses_f_divergence=True)
def _apo_down(scores: PairScores, config: LossConfig) -> Tensor:
    return apo_down_loss(*log_ratios(scores), *divergence_scores(scores, config), config.beta)


def dpo_positive_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, penalty: float
) -> Tensor:
    """DPO-Positive: DPO with a penalty whenever the chosen likelihood falls below the reference's.

        L = −log σ( β·[ h_w − h_l − λ·max(0, −h_w) ] )     (−h_w = log πref(y_w)/πθ(y_w))

    Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive", arXiv 2402.13228,
    Eq. 3 (λ = 50 there).
    """
    shortfall = torch.relu(-chosen_logratios)
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - penalty * shortfall))


def cal_dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Cal-DPO: a contrastive term on the raw log-ratios plus their calibration to the reward scale ±1/(2β).

        L = −log σ(h_w − h_l) + ½·[ (h_w − 1/(2β))² + (h_l + 1/(2β))² ]

    Xiao et al., "Cal-DPO: Calibrated Direct Preference Optimization for Language Model Alignment", NeurIPS
    2024, arXiv 2412.14516; the ½ and the unscaled margin are those of the official code (tengxiao1/Cal-DPO,
    scripts/dpo_trainer.py), whose batch-mean squared errors average to the per-pair form here.
    """
    target = 1.0 / (2.0 * beta)
    calibration = (chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2
    return -F.logsigmoid(chosen_logratios - rejected_logratios) + 0.5 * calibration


@register_loss(
    "dpop",
    "DPO-Positive: −log σ(β(Δ − λ·max(0, −h_w))), penalising a chosen likelihood below the reference's",
)
def _dpop(scores: PairScores, config: LossConfig) -> Tensor:
    return dpo_positive_loss(*log_ratios(scores), config.beta, config.dpop_lambda)


@register_loss("cal_dpo", "Cal-DPO: −log σ(h_w − h_l) + ½[(h_w − 1/(2β))² + (h_l + 1/(2β))²]")
def _cal_dpo(scores: PairScores, config: LossConfig) -> Tensor:
    return cal_dpo_loss(*log_ratios(scores), config.beta)
