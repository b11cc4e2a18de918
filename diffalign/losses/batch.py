"""Batch-level losses: one pair's loss depends on the others (AOT sorts the batch's scores, β-DPO sets β from
the batch's mean margin).

Under data parallelism each process holds only its own shard: the trainers gather every process's scores
first (``diffalign.training.distributed.compute_loss_on_global_batch``), as the papers' behaviour needs (larger
batches give a better transport plan, a better estimate of the batch's margin). This module itself stays pure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, log_ratios, register_loss
from diffalign.losses.margin import soft_bradley_terry_loss


def aot_loss(upper: Tensor, lower: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Alignment via optimal transport: cDPO on the rank-matched difference of two sorted score sets.

        d = sort(upper) − sort(lower)
        L = −(1 − ε)·log σ(β·d) − ε·log σ(−β·d)

    Sorting makes the policy's distribution of ``upper`` first-order stochastically dominate that of
    ``lower``. Paired AOT uses upper = ℓθ_w − ℓθ_l and lower = ℓref_w − ℓref_l; unpaired AOT uses
    upper = h_w and lower = h_l. Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv 2406.05882.
    """
    sorted_upper, _ = torch.sort(upper)
    sorted_lower, _ = torch.sort(lower)
    return soft_bradley_terry_loss(beta * (sorted_upper - sorted_lower), 1.0 - label_smoothing)


@register_loss(
    "aot",
    "AOT (paired): cDPO on sorted policy margins minus sorted reference margins across the batch",
    batch_level=True,
)
def _aot(scores: PairScores, config: LossConfig) -> Tensor:
    return aot_loss(
        scores.policy_chosen - scores.policy_rejected,
        scores.ref_chosen - scores.ref_rejected,
        config.beta,
        config.label_smoothing,
    )


@register_loss(
    "aot_unpaired",
    "AOT (unpaired): cDPO on sorted chosen log-ratios minus sorted rejected log-ratios across the batch",
    batch_level=True,
)
def _aot_unpaired(scores: PairScores, config: LossConfig) -> Tensor:
    return aot_loss(*log_ratios(scores), config.beta, config.label_smoothing)


def beta_dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    alpha: float,
    margin_baseline: Tensor | float = 0.0,
) -> Tensor:
    """β-DPO: DPO with a batch-adaptive β that grows with how informative the batch's pairs are.

        M_i = h_w,i − h_l,i,   β_batch = max(β·[1 + α·(mean_i M_i − M0)], 10⁻³)   (detached)
        L_i = −log σ(β_batch·M_i)

    M0 is the running mean of the margins, kept by the caller (``diffalign.training.loss_state.MarginBaseline``). Wu et al., "β-DPO: Direct
    Preference Optimization with Dynamic β", NeurIPS 2024, arXiv 2407.08639 (official code
    junkangwu/beta-DPO, trainers.py). The paper's β-guided data filtering (a Gaussian-weighted random subset of
    the pairs) is not included: every pair of the batch is trained.
    """
    margins = chosen_logratios - rejected_logratios
    batch_beta = (beta * (1.0 + alpha * (margins.detach().mean() - margin_baseline))).clamp(min=1e-3)
    return -F.logsigmoid(batch_beta.detach() * margins)


@register_loss(
    "beta_dpo",
    "β-DPO: DPO with β_batch = β(1 + α(mean margin − M0)), M0 a running mean of the margins",
    batch_level=True,
)
def _beta_dpo(scores: PairScores, config: LossConfig) -> Tensor:
    baseline = scores.margin_baseline if scores.margin_baseline is not None else 0.0
    return beta_dpo_loss(*log_ratios(scores), config.beta, config.beta_dpo_alpha, baseline)
