"""Sequence-score options computed from per-token inputs: pure functions on ``[N, T]`` tensors.

They turn what an LLM trainer measures per token into the per-sequence quantities of TRL's DPOTrainer options
(``ld_alpha``, ``use_weighting``, ``rpo_alpha``) and of AlphaPO's reward shape (CPOTrainer's ``alpha``).
``mask`` is 1 on completion tokens and 0 elsewhere; every function is exact on right- or left-padded rows.

This module imports nothing from the rest of diffalign.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Bounds exp() of scaled log-likelihoods (AlphaPO on summed log-probs) in fp32.
MAX_EXPONENT = 40.0


def length_desensitised_logps(
    token_logps: Tensor, mask: Tensor, shared_lengths: Tensor, alpha: float
) -> Tensor:
    """LD-DPO's sequence log-likelihood: the tail beyond the shorter response of the pair counts α times.

        ℓ_LD(y) = Σ_{t ≤ l_p} log π(y_t | x, y_<t) + α·Σ_{t > l_p} log π(y_t | x, y_<t),   l_p = min(|y_w|, |y_l|)

    ``token_logps`` and ``mask`` are ``[N, T]``; ``shared_lengths`` ``[N]`` is l_p of each row's pair; t counts
    completion tokens. Liu et al., "LD-DPO: Length Desensitization in Direct Preference Optimization", arXiv
    2409.06411; TRL's DPOTrainer ``ld_alpha`` (applied to policy and reference alike).
    """
    position = mask.cumsum(dim=-1)
    in_shared_prefix = position <= shared_lengths.unsqueeze(-1)
    token_weight = torch.where(
        in_shared_prefix, torch.ones_like(token_logps), torch.full_like(token_logps, alpha)
    )
    return (token_logps * mask * token_weight).sum(dim=-1)


def wpo_log_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """log w(y) of WPO, the per-token geometric mean of the sequence's probability, aligned for the peakiness
    of each next-token distribution:

        log w(y) = (1/|y|)·Σ_t [ log πθ(y_t | x, y_<t) − log Σ_v πθ(v | x, y_<t)² ]

    Detached. Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv 2406.11827, Eq. 2;
    TRL's DPOTrainer ``use_weighting`` (no clamp, as the current TRL).
    """
    lengths = mask.sum(dim=-1).clamp(min=1.0)
    return (((token_logps - log_sum_sq_probs) * mask).sum(dim=-1) / lengths).detach()


def batch_token_mean_nll(policy_chosen: Tensor, chosen_lengths: Tensor | None) -> Tensor:
    """The negative log-likelihood of the chosen completions averaged over all their tokens in the batch:

        NLL = −Σ_i ℓθ(y_w,i) / Σ_i |y_w,i|      (−mean_i ℓθ(y_w,i) without lengths: ½·mean MSE for diffusion)

    It is the cross-entropy TRL computes on the chosen logits (``rpo_alpha`` in TRL ≤ 0.23, the ``sft`` loss
    type since), a scalar shared by every pair.
    """
    if chosen_lengths is None:
        return -policy_chosen.mean()
    return -policy_chosen.sum() / chosen_lengths.sum()


def alphapo_reward(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape r = (1 − p^(−α))/α with p = exp(ℓ): α → 0 gives ℓ itself.

    Gupta et al., "AlphaPO: Reward Shape Matters for LLM Alignment", arXiv 2501.03884; TRL's CPOTrainer
    ``alpha``. Written as −expm1(−α·ℓ)/α, with α·ℓ clamped to ±40 so that summed log-probs stay finite.
    """
    if alpha == 0.0:
        return logps
    exponent = torch.clamp(-alpha * logps, min=-MAX_EXPONENT, max=MAX_EXPONENT)
    return -torch.expm1(exponent) / alpha
