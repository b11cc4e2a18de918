"""The supervised (negative log-likelihood) term on the chosen sample."""

from __future__ import annotations

from torch import Tensor

from diffalign.losses.core import LossConfig, PairScores, register_loss


def sft_loss(policy_chosen: Tensor, chosen_lengths: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of the chosen sample.

        L = −ℓθ(y_w) / |y_w|   (token-mean NLL, when lengths are given)
        L = −ℓθ(y_w)           (otherwise)

    For LLMs with lengths this is the per-sequence token-mean cross-entropy; TRL's ``sft`` term averages over
    all tokens of the batch instead, which is the same when the chosen lengths are equal. For diffusion scores
    ``−0.5·MSE`` it is ½·MSE of the chosen sample, the SFT loss of the Diffusion-DPO code up to that factor.
    Combined with ``sigmoid`` as ``type: [sigmoid, sft]`` it gives RPO-style DPO + NLL (Liu et al.,
    arXiv 2405.16436; Pang et al., arXiv 2404.19733).
    """
    if chosen_lengths is None:
        return -policy_chosen
    return -policy_chosen / chosen_lengths


@register_loss(
    "sft",
    "NLL on the chosen sample (token-mean with lengths; ½·MSE for diffusion)",
    needs_reference=False,
    paired=False,
    reads_sequence_scores=False,
)
def _sft(scores: PairScores, config: LossConfig) -> Tensor:
    return sft_loss(scores.policy_chosen, scores.chosen_lengths)
