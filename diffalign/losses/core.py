"""The preference-loss core: per-pair scores in, per-pair losses, implicit rewards and metrics out.

Every method in diffalign reduces to four numbers per pair: the policy's and the reference's log-likelihood
(or its surrogate) of the chosen and of the rejected sample. For LLMs these are summed completion log-probs;
for diffusion models they are ``-0.5 * per-sample mean squared denoising error``, which makes the core's β
the β of the official Diffusion-DPO code (β=5000 reproduces its loss exactly).

This module imports nothing from the rest of diffalign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PairScores:
    """Per-pair inputs of the core (all ``[B]``, any float dtype; maths runs in fp32).

    For unpaired losses (KTO, BCO, NPO) ``*_chosen`` holds the desirable samples and ``*_rejected`` the
    undesirable ones; the two may then have different lengths (either may be empty).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    # Probability that `chosen` is truly preferred (soft Bradley–Terry label); None means 1 for every pair.
    label: Tensor | None = None
    # Multiplies each pair's loss before the mean; None means 1.
    weight: Tensor | None = None
    # KTO's reference point z0 (a detached scalar estimated by the caller from mismatched pairs).
    kl_reference_point: Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None


@dataclass
class LossConfig:
    """The ``loss:`` section of a config. ``type`` may list several losses, combined with ``weights``."""

    type: list[str] = field(default_factory=lambda: ["sigmoid"])
    weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backpropagate
    per_pair: Tensor  # [B] unreduced (weighted sum over the configured loss terms)
    chosen_rewards: Tensor  # [B] β·(policy − reference), detached
    rejected_rewards: Tensor  # [B]
    metrics: dict[str, Tensor]  # detached scalars


LossFn = Callable[[PairScores, LossConfig], Tensor]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    description: str
    needs_reference: bool = True
    paired: bool = True
    needs_lengths: bool = False
    batch_level: bool = False


LOSSES: dict[str, LossSpec] = {}
