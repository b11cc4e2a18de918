"""The preference-loss core shared by the diffusion and LLM trainers (see ``core.py``).

Importing this package registers every loss in ``LOSSES``.
"""

from diffalign.losses.batch import aot_loss
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
from diffalign.losses.pair import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from diffalign.losses.reference_free import log1mexp, orpo_odds_ratio_loss, simpo_loss
from diffalign.losses.sft import sft_loss
from diffalign.losses.transforms import divergence_scores, f_divergence_score
from diffalign.losses.unpaired import kto_loss, npo_loss

__all__ = [
    "LOSSES",
    "LossConfig",
    "LossOutput",
    "LossSpec",
    "PairScores",
    "aot_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "compute_loss",
    "discopop_loss",
    "divergence_scores",
    "dpo_sigmoid_loss",
    "exo_pair_loss",
    "f_divergence_score",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "list_losses",
    "log1mexp",
    "log_ratios",
    "nca_pair_loss",
    "npo_loss",
    "orpo_odds_ratio_loss",
    "register_loss",
    "robust_dpo_loss",
    "sft_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "soft_bradley_terry_loss",
    "sppo_hard_loss",
]
