"""Token-level losses: they read per-token log-probs, masks and KLs (``PairScores.chosen_tokens`` /
``rejected_tokens``), which the LLM trainer computes when one of them is configured.

Every sum over tokens is weighted by ``TokenScores.token_weights``: the completion mask, or a SparsePO-style
token mask m(t) ∈ [0, 1] when the caller gives one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, TokenScores, register_loss


def token_logratio_and_kl(tokens: TokenScores) -> tuple[Tensor, Tensor]:
    """Σ_t m(t)·log πθ/πref(y_t) and the sequential KL Σ_t m(t)·KL(πref(·|y_<t) ‖ πθ(·|y_<t)), ``[N]`` each."""
    weights = tokens.token_weights
    return ((tokens.policy - tokens.reference) * weights).sum(dim=-1), (tokens.kl * weights).sum(dim=-1)


def tdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    beta: float,
    alpha: float | None = None,
) -> Tensor:
    """Token-level DPO: DPO's margin corrected by the difference of the two responses' sequential KLs.

        TDPO1 (α None):  z = (h_w − h_l) − (D_l − D_w)
        TDPO2:           z = (h_w − h_l) − α·(D_l − sg(D_w))
        L = −log σ(β·z)

    with h = Σ_t log πθ/πref(y_t) and D = Σ_t KL(πref(·|x, y_<t) ‖ πθ(·|x, y_<t)). Zeng et al., "Token-level
    Direct Preference Optimization", ICML 2024, arXiv 2404.11999 (official code
    Vance0124/Token-level-Direct-Preference-Optimization, trainers.py). With SparsePO-style token masks in the
    sums, TDPO1 is SparsePO's objective with one mask for rewards and KL (Christopoulou et al., "SparsePO:
    Controlling Preference Alignment of LLMs via Sparse Token Masks", arXiv 2410.05102).
    """
    margin = chosen_logratios - rejected_logratios
    if alpha is None:
        return -F.logsigmoid(beta * (margin - (rejected_kl - chosen_kl)))
    return -F.logsigmoid(beta * (margin - alpha * (rejected_kl - chosen_kl.detach())))


def _tdpo_inputs(scores: PairScores) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    chosen_logratios, chosen_kl = token_logratio_and_kl(scores.chosen_tokens)
    rejected_logratios, rejected_kl = token_logratio_and_kl(scores.rejected_tokens)
    return chosen_logratios, rejected_logratios, chosen_kl, rejected_kl


@register_loss(
    "tdpo1",
    "TDPO1: −log σ(β[(h_w − h_l) − (D_l − D_w)]), D the sequential token KL to the reference",
    needs_token_kl=True,
)
def _tdpo1(scores: PairScores, config: LossConfig) -> Tensor:
    return tdpo_loss(*_tdpo_inputs(scores), config.beta)


@register_loss(
    "tdpo2",
    "TDPO2: −log σ(β[(h_w − h_l) − α(D_l − sg(D_w))]), α = tdpo_alpha",
    needs_token_kl=True,
)
def _tdpo2(scores: PairScores, config: LossConfig) -> Tensor:
    return tdpo_loss(*_tdpo_inputs(scores), config.beta, config.tdpo_alpha)
