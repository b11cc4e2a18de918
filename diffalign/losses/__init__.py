"""The preference-loss core shared by the diffusion and LLM trainers (see ``core.py``)."""

from diffalign.losses.core import (
    LOSSES,
    LossConfig,
    LossOutput,
    LossSpec,
    PairScores,
    compute_loss,
    list_losses,
    log_ratios,
    register_loss,
)
from diffalign.losses.margin import (
    discopop_loss,
    dpo_sigmoid_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    sigmoid_norm_loss,
    soft_bradley_terry_loss,
)
from diffalign.losses.sft import sft_loss
from diffalign.losses.transforms import divergence_scores, f_divergence_score

__all__ = [
    "LOSSES",
    "LossConfig",
    "LossOutput",
    "LossSpec",
    "PairScores",
    "compute_loss",
    "discopop_loss",
    "divergence_scores",
    "dpo_sigmoid_loss",
    "exo_pair_loss",
    "f_divergence_score",
    "hinge_loss",
    "ipo_loss",
    "list_losses",
    "log_ratios",
    "register_loss",
    "robust_dpo_loss",
    "sft_loss",
    "sigmoid_norm_loss",
    "soft_bradley_terry_loss",
]
