"""The loss core shared by the diffusion and LLM trainers: preference losses on pair scores (``core.py``) and
policy-gradient losses on per-element log-probs (``policy_gradient.py``, advantages in ``advantages.py``).

Importing this package registers every preference loss in ``LOSSES``.
"""

from diffalign.losses.advantages import AdvantageConfig, compute_advantages, kl_penalised_rewards
from diffalign.losses.batch import aot_loss, beta_dpo_loss
from diffalign.losses.core import (
    LOSSES,
    LossConfig,
    LossOutput,
    LossSpec,
    PairScores,
    TokenScores,
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
from diffalign.losses.pair import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cal_dpo_loss,
    dpo_positive_loss,
    nca_pair_loss,
    sppo_hard_loss,
)
from diffalign.losses.policy_gradient import (
    PolicyGradientConfig,
    PolicyGradientOutput,
    element_weight,
    policy_gradient_loss,
    sums_over_elements,
)
from diffalign.losses.reference_free import (
    asft_alignment_loss,
    log1mexp,
    orpo_odds_ratio_loss,
    simper_loss,
    simpo_loss,
)
from diffalign.losses.sft import sft_loss
from diffalign.losses.token_level import tdpo_loss
from diffalign.losses.transforms import divergence_scores, f_divergence_score
from diffalign.losses.unpaired import apo_zero_unpaired_loss, kto_loss, npo_loss

__all__ = [
    "LOSSES",
    "AdvantageConfig",
    "LossConfig",
    "LossOutput",
    "LossSpec",
    "PairScores",
    "PolicyGradientConfig",
    "PolicyGradientOutput",
    "TokenScores",
    "aot_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "apo_zero_unpaired_loss",
    "asft_alignment_loss",
    "bco_pair_loss",
    "beta_dpo_loss",
    "cal_dpo_loss",
    "compute_advantages",
    "compute_loss",
    "discopop_loss",
    "divergence_scores",
    "dpo_positive_loss",
    "dpo_sigmoid_loss",
    "element_weight",
    "exo_pair_loss",
    "f_divergence_score",
    "hinge_loss",
    "ipo_loss",
    "kl_penalised_rewards",
    "kto_loss",
    "list_losses",
    "log1mexp",
    "log_ratios",
    "nca_pair_loss",
    "npo_loss",
    "orpo_odds_ratio_loss",
    "policy_gradient_loss",
    "register_loss",
    "robust_dpo_loss",
    "sft_loss",
    "sigmoid_norm_loss",
    "simper_loss",
    "simpo_loss",
    "soft_bradley_terry_loss",
    "sppo_hard_loss",
    "sums_over_elements",
    "tdpo_loss",
]
