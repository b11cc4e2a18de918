"""Batch-level losses: they sort scores across the batch, so one pair's loss depends on the others.

Under data parallelism each process holds only its own shard: the trainers gather every process's scores
first (``diffalign.training.distributed.compute_loss_on_global_batch``), as the paper's behaviour needs (larger
batches give a better transport plan). This module itself stays pure.
"""

from __future__ import annotations

import torch
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
