"""f-divergence score transforms, applied to the log-ratios before a margin or pair loss.

f-DPO (Wang et al., "Beyond Reverse KL: Generalizing DPO with Diverse Divergence Constraints", arXiv 2309.16240)
replaces the log-ratio ``h = log πθ/πref`` by ``f′(u)`` with ``u = e^h``. We follow TRL's convention
(``f_divergence_type`` in its DPOTrainer), which drops constants that cancel in the margin:

    reverse_kl:        s(h) = h
    forward_kl:        s(h) = −exp(−h)                   (f′(u) = 1 − 1/u)
    js_divergence:     s(h) = log σ(h)                   (f′(u) = log(2u/(1+u)), log 2 dropped)
    alpha_divergence:  s(h) = exp((α−1)·h) / (α−1)       (f′(u) = (u^(α−1) − 1)/(α−1)); α = 1 is reverse KL
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, log_ratios

# exp(40) ≈ 2e17 keeps the squared losses (IPO, SPPO) of these scores and their gradients finite in fp32;
# log-ratios that far from 0 are meaningless anyway.
MAX_EXPONENT = 40.0


def f_divergence_score(logratios: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """Map log-ratios ``h`` to the f-divergence score ``s(h)`` (formulas in the module docstring)."""
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and alpha == 1.0):
        return logratios
    if divergence == "forward_kl":
        return -torch.exp(torch.clamp(-logratios, max=MAX_EXPONENT))
    if divergence == "js_divergence":
        return F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        exponent = torch.clamp((alpha - 1.0) * logratios, max=MAX_EXPONENT)
        return torch.exp(exponent) / (alpha - 1.0)
    raise ValueError(
        f"unknown f-divergence {divergence!r}; use reverse_kl, forward_kl, js_divergence or alpha_divergence"
    )


def divergence_scores(scores: PairScores, config: LossConfig) -> tuple[Tensor, Tensor]:
    """``(s(h_w), s(h_l))``: the chosen and rejected log-ratios under ``config.f_divergence``."""
    chosen_logratios, rejected_logratios = log_ratios(scores)
    return (
        f_divergence_score(chosen_logratios, config.f_divergence, config.alpha_divergence_coef),
        f_divergence_score(rejected_logratios, config.f_divergence, config.alpha_divergence_coef),
    )
