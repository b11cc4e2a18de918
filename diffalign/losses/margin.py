"""Margin losses: functions of the (f-divergence-scored) margin ``Δ = s(h_w) − s(h_l)`` alone.

``h_w`` and ``h_l`` are the chosen and rejected log-ratios ``policy − reference``; with the default reverse KL,
``s(h) = h``. Formulas follow TRL's DPOTrainer (``loss_type``) and the papers cited per function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, register_loss
from diffalign.losses.transforms import divergence_scores


def soft_bradley_terry_loss(logits: Tensor, prob_chosen: Tensor | float = 1.0) -> Tensor:
    """Cross-entropy of a Bradley–Terry model against the probability that chosen ≻ rejected.

        L = −[ p·log σ(z) + (1 − p)·log σ(−z) ]  with  z = logits, p = prob_chosen

    p = 1 gives the DPO loss −log σ(z). Its gradient in z is σ(z) − p, zero at z = 0 when p = ½.
    """
    return -(prob_chosen * F.logsigmoid(logits) + (1.0 - prob_chosen) * F.logsigmoid(-logits))


def dpo_sigmoid_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    label: Tensor | None = None,
) -> Tensor:
    """DPO with conservative label smoothing and soft Bradley–Terry labels.

        Δ = h_w − h_l,   p′ = (1 − ε)·p + ε·(1 − p)
        L = −[ p′·log σ(βΔ) + (1 − p′)·log σ(−βΔ) ]

    p = 1, ε = 0 is DPO (Rafailov et al., arXiv 2305.18290). ε > 0 is cDPO, which assumes each label is
    flipped with probability ε: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ). A per-pair soft label p (the probability
    that chosen is preferred) is the soft Bradley–Terry loss of CREAM (arXiv 2410.12735) and λ-Harmonic RPO
    (arXiv 2407.12164); ε then smooths p as it smooths a hard label.

    For diffusion scores ``−0.5·MSE`` this is the Diffusion-DPO loss (Wallace et al., arXiv 2311.12908)
    −log σ(−½β·[(Lθ_w − Lref_w) − (Lθ_l − Lref_l)]).
    """
    prob_chosen = label if label is not None else torch.ones_like(chosen_logratios)
    prob_chosen = (1.0 - label_smoothing) * prob_chosen + label_smoothing * (1.0 - prob_chosen)
    return soft_bradley_terry_loss(beta * (chosen_logratios - rejected_logratios), prob_chosen)


def robust_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO, an unbiased estimate of the clean DPO loss under label-flip rate ε < ½.

        L = [ −(1 − ε)·log σ(βΔ) + ε·log σ(−βΔ) ] / (1 − 2ε)

    Chowdhury, Kini, Natarajan, "Provably Robust DPO", arXiv 2403.00409.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    epsilon = label_smoothing
    return (-(1.0 - epsilon) * F.logsigmoid(logits) + epsilon * F.logsigmoid(-logits)) / (1.0 - 2.0 * epsilon)


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """SLiC / RSO hinge loss with margin 1/β.

        L = max(0, 1 − βΔ)

    Zhao et al., SLiC-HF, arXiv 2305.10425; Liu et al., RSO, arXiv 2309.06657.
    """
    return F.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """IPO: squared distance of the margin to 1/(2β) (β is the paper's τ).

        L = ( h_w/|y_w| − h_l/|y_l| − 1/(2β) )²

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences", arXiv
    2310.12036. The per-token normalisation is TRL's (confirmed there with the authors); without lengths
    (diffusion scores) the plain margin h_w − h_l is used.
    """
    if chosen_lengths is not None and rejected_lengths is not None:
        chosen_logratios = chosen_logratios / chosen_lengths
        rejected_logratios = rejected_logratios / rejected_lengths
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


def exo_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, epsilon: float
) -> Tensor:
    """EXO (pairwise): reverse KL from the model's preference distribution to an ε-smoothed target.

        q_w = σ(βΔ),  q_l = σ(−βΔ)
        L = q_w·(log q_w − log(1 − ε)) + q_l·(log q_l − log ε)

    Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", arXiv 2402.00856, Eq. 16.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    return log_q_chosen.exp() * (log_q_chosen - math.log1p(-epsilon)) + log_q_rejected.exp() * (
        log_q_rejected - math.log(epsilon)
    )


def discopop_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, tau: float) -> Tensor:
    """DiscoPOP's log-ratio modulated loss: a σ(z/τ)-gated blend of the logistic and exponential losses.

        z = βΔ,  m = σ(z/τ)
        L = (1 − m)·(−log σ(z)) + m·exp(−z)

    Chris Lu et al., "Discovering Preference Optimization Algorithms with and for LLMs", arXiv 2406.08414.
    m·exp(−z) is computed as exp(log σ(z/τ) − z): the naive product is 0·inf = nan for very negative z.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    modulation = torch.sigmoid(logits / tau)
    return (1.0 - modulation) * -F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / tau) - logits)


def sigmoid_norm_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> Tensor:
    """Length-normalised DPO ("DPO w/ LN" in SimPO, arXiv 2405.14734; used by Tülu 3, arXiv 2411.15124).

    L = −log σ( β·(h_w/|y_w| − h_l/|y_l|) )
    """
    return -F.logsigmoid(beta * (chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths))


@register_loss(
    "sigmoid",
    "DPO −log σ(βΔ); label_smoothing gives cDPO, PairScores.label soft Bradley–Terry labels",
    uses_label=True,
    uses_f_divergence=True,
)
def _sigmoid(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return dpo_sigmoid_loss(chosen, rejected, config.beta, config.label_smoothing, scores.label)


@register_loss(
    "robust",
    "robust DPO: unbiased DPO under label-flip rate label_smoothing",
    uses_f_divergence=True,
)
def _robust(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return robust_dpo_loss(chosen, rejected, config.beta, config.label_smoothing)


@register_loss("hinge", "SLiC/RSO hinge max(0, 1 − βΔ)", uses_f_divergence=True)
def _hinge(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return hinge_loss(chosen, rejected, config.beta)


@register_loss(
    "ipo", "IPO (Δ − 1/(2β))², per-token log-ratios when lengths are given", uses_f_divergence=True
)
def _ipo(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return ipo_loss(chosen, rejected, config.beta, scores.chosen_lengths, scores.rejected_lengths)


@register_loss(
    "exo_pair",
    "EXO: reverse KL to an ε-smoothed preference (ε = label_smoothing > 0)",
    uses_f_divergence=True,
)
def _exo_pair(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return exo_pair_loss(chosen, rejected, config.beta, config.label_smoothing)


@register_loss(
    "discopop", "DiscoPOP: σ(βΔ/τ)-blend of logistic and exponential losses", uses_f_divergence=True
)
def _discopop(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return discopop_loss(chosen, rejected, config.beta, config.discopop_tau)


@register_loss(
    "sigmoid_norm",
    "length-normalised DPO −log σ(β(h_w/|y_w| − h_l/|y_l|))",
    needs_lengths=True,
    uses_f_divergence=True,
)
def _sigmoid_norm(scores: PairScores, config: LossConfig) -> Tensor:
    chosen, rejected = divergence_scores(scores, config)
    return sigmoid_norm_loss(chosen, rejected, scores.chosen_lengths, scores.rejected_lengths, config.beta)
