"""The preference-loss core: per-pair scores in, per-pair losses, implicit rewards and metrics out.

Every method in diffalign reduces to four numbers per pair: the policy's and the reference's log-likelihood
(or its surrogate) of the chosen and of the rejected sample. For LLMs these are summed completion log-probs;
for diffusion models they are ``-0.5 * per-sample mean squared denoising error``, which makes the core's β
the β of the official Diffusion-DPO code (β=5000 reproduces its loss exactly).

Each loss is a pure function on tensors (in ``margin.py``, ``pair.py``, ``batch.py``, ``unpaired.py``,
``reference_free.py``, ``sft.py``), registered under its config name with an adapter that maps
``(PairScores, LossConfig)`` to the function's arguments. ``compute_loss`` validates the inputs, runs the
configured terms in fp32 and combines them.

This module imports nothing from the rest of diffalign.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class PairScores:
    """Per-pair inputs of the core (all ``[B]``, any float dtype; maths runs in fp32).

    For unpaired losses (KTO, NPO) ``*_chosen`` holds the desirable samples and ``*_rejected`` the
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

    @property
    def has_lengths(self) -> bool:
        return self.chosen_lengths is not None and self.rejected_lengths is not None


@dataclass
class LossConfig:
    """The ``loss:`` section of a config. ``type`` may list several losses, combined with ``weights``."""

    type: list[str] = field(default_factory=lambda: ["sigmoid"])
    weights: list[float] | None = None
    beta: float = 0.1
    # cDPO/rDPO/AOT flip probability ε, and EXO's ε (which must then be > 0).
    label_smoothing: float = 0.0
    f_divergence: FDivergence = "reverse_kl"
    alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.type, str):  # `loss.type=sigmoid` on the command line means a one-term list
            self.type = [self.type]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the key, the bad value and what is allowed."""
        if not self.type:
            raise ValueError("loss.type is empty; give at least one loss name, e.g. [sigmoid]")
        unknown = [name for name in self.type if name not in LOSSES]
        if unknown:
            raise ValueError(
                f"loss.type has unknown loss name(s) {unknown}; registered losses are {sorted(LOSSES)}"
            )
        if len(set(self.type)) != len(self.type):
            raise ValueError(
                f"loss.type={self.type} repeats a loss; give each loss once and use loss.weights"
            )
        if self.weights is not None and len(self.weights) != len(self.type):
            raise ValueError(
                f"loss.weights={self.weights} has {len(self.weights)} entries but loss.type={self.type} has "
                f"{len(self.type)}; give one weight per loss or leave loss.weights unset (all 1)"
            )
        if self.weights is not None and not (
            all(weight >= 0 and math.isfinite(weight) for weight in self.weights) and sum(self.weights) > 0
        ):
            raise ValueError(
                f"loss.weights={self.weights} must be finite and >= 0, with at least one > 0"
            )
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"loss.beta={self.beta} must be > 0 and finite")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if "exo_pair" in self.type and self.label_smoothing == 0:
            raise ValueError(
                "loss.type includes exo_pair, which needs loss.label_smoothing > 0 (EXO uses 1e-3)"
            )
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"loss.f_divergence={self.f_divergence!r} is not one of {list(F_DIVERGENCES)}")
        if not self.discopop_tau > 0:
            raise ValueError(f"loss.discopop_tau={self.discopop_tau} must be > 0")
        if self.kto_desirable_weight < 0 or self.kto_undesirable_weight < 0:
            raise ValueError(
                f"loss.kto_desirable_weight={self.kto_desirable_weight} and loss.kto_undesirable_weight="
                f"{self.kto_undesirable_weight} must be >= 0"
            )

    @property
    def term_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.type)


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
    # Chosen and rejected must have the same size: the loss compares them pair by pair (or rank by rank).
    paired: bool = True
    needs_lengths: bool = False
    # The loss couples the samples of a batch (e.g. sorts them), so a per-pair weight has no meaning.
    batch_level: bool = False
    uses_label: bool = False
    uses_f_divergence: bool = False


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    description: str,
    *,
    needs_reference: bool = True,
    paired: bool = True,
    needs_lengths: bool = False,
    batch_level: bool = False,
    uses_label: bool = False,
    uses_f_divergence: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Register the decorated adapter ``(PairScores, LossConfig) -> per-sample losses`` under ``name``."""

    def decorator(adapter: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossSpec(
            name=name,
            fn=adapter,
            description=description,
            needs_reference=needs_reference,
            paired=paired,
            needs_lengths=needs_lengths,
            batch_level=batch_level,
            uses_label=uses_label,
            uses_f_divergence=uses_f_divergence,
        )
        return adapter

    return decorator


def list_losses() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered loss, in registration order."""
    return [(spec.name, spec.description) for spec in LOSSES.values()]


def log_ratios(scores: PairScores) -> tuple[Tensor, Tensor]:
    """``h = policy − reference`` for chosen and rejected (the policy alone when there is no reference).

    The difference is taken before any β is applied: diffusion scores differ from their reference by ~1e-4,
    and fp32 subtraction of such close numbers is exact, while β·policy − β·ref would not be.
    """
    if scores.has_reference:
        return scores.policy_chosen - scores.ref_chosen, scores.policy_rejected - scores.ref_rejected
    return scores.policy_chosen, scores.policy_rejected


def compute_loss(scores: PairScores, config: LossConfig) -> LossOutput:
    """Run every loss of ``config.type`` on ``scores`` in fp32 and combine them.

    ``per_pair = Σ_k weights[k] · loss_k`` and ``loss = mean(scores.weight · per_pair)``, which equals TRL's
    ``Σ_k weights[k] · mean(loss_k)`` when no per-pair weight is given. Implicit rewards are
    ``β·(policy − reference)`` (``β·policy`` without a reference), detached.
    """
    config.validate()
    specs = [LOSSES[name] for name in config.type]
    _check_inputs(scores, specs, config)
    scores = _to_float32(scores)

    terms = {spec.name: spec.fn(scores, config) for spec in specs}
    sizes = {name: term.shape[0] for name, term in terms.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"loss.type={config.type} gives terms of different sizes {sizes} (unpaired losses return "
            "[desirable, undesirable] concatenated); combine only losses that return one value per same sample"
        )
    per_pair = sum(w * term for w, term in zip(config.term_weights, terms.values(), strict=True))
    if per_pair.numel() == 0:
        raise ValueError("compute_loss got an empty batch: policy_chosen and policy_rejected are both empty")

    pair_weight = scores.weight
    if pair_weight is not None and pair_weight.shape != per_pair.shape:
        raise ValueError(
            f"PairScores.weight has shape {tuple(pair_weight.shape)} but loss.type={config.type} gives "
            f"{tuple(per_pair.shape)} per-sample losses; give one weight per loss value"
        )
    weight = pair_weight if pair_weight is not None else torch.ones_like(per_pair)
    loss = (weight * per_pair).mean()

    chosen_logratios, rejected_logratios = log_ratios(scores)
    chosen_rewards = (config.beta * chosen_logratios).detach()
    rejected_rewards = (config.beta * rejected_logratios).detach()

    metrics = {f"loss/{name}": (weight * term).mean().detach() for name, term in terms.items()}
    metrics.update(_reward_metrics(scores, chosen_rewards, rejected_rewards))
    return LossOutput(
        loss=loss,
        per_pair=per_pair,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        metrics=metrics,
    )


def _reward_metrics(
    scores: PairScores, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> dict[str, Tensor]:
    metrics = {}
    if chosen_rewards.numel() > 0:
        metrics["chosen_reward"] = chosen_rewards.mean()
        metrics["policy_chosen"] = scores.policy_chosen.detach().mean()
    if rejected_rewards.numel() > 0:
        metrics["rejected_reward"] = rejected_rewards.mean()
        metrics["policy_rejected"] = scores.policy_rejected.detach().mean()
    # Unpaired batches of different sizes have no pairs to compare.
    if chosen_rewards.shape == rejected_rewards.shape and chosen_rewards.numel() > 0:
        metrics["reward_accuracy"] = (chosen_rewards > rejected_rewards).float().mean()
        metrics["reward_margin"] = (chosen_rewards - rejected_rewards).mean()
    return metrics


def _to_float32(scores: PairScores) -> PairScores:
    updates = {
        f.name: getattr(scores, f.name).float()
        for f in dataclasses.fields(scores)
        if getattr(scores, f.name) is not None
    }
    return dataclasses.replace(scores, **updates)


def _check_inputs(scores: PairScores, specs: list[LossSpec], config: LossConfig) -> None:
    _check_shapes(scores)
    _check_requirements(scores, specs, config)


def _check_shapes(scores: PairScores) -> None:
    for f in dataclasses.fields(scores):
        value = getattr(scores, f.name)
        if value is None or f.name == "kl_reference_point":
            continue
        is_length = f.name.endswith("_lengths")  # token counts may be integer tensors
        if not isinstance(value, Tensor) or value.ndim != 1 or not (is_length or value.is_floating_point()):
            raise ValueError(
                f"PairScores.{f.name} must be a 1-D float tensor of shape [B]; got "
                f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))} {getattr(value, 'dtype', '')}"
            )

    num_chosen, num_rejected = scores.policy_chosen.shape[0], scores.policy_rejected.shape[0]
    for key, size, policy_key in (
        ("ref_chosen", num_chosen, "policy_chosen"),
        ("chosen_lengths", num_chosen, "policy_chosen"),
        ("ref_rejected", num_rejected, "policy_rejected"),
        ("rejected_lengths", num_rejected, "policy_rejected"),
    ):
        value = getattr(scores, key)
        if value is not None and value.shape[0] != size:
            raise ValueError(f"PairScores.{key} has {value.shape[0]} entries but {policy_key} has {size}")

    if (scores.ref_chosen is None) != (scores.ref_rejected is None):
        raise ValueError("PairScores has only one of ref_chosen / ref_rejected; give both or neither")
    if (scores.chosen_lengths is None) != (scores.rejected_lengths is None):
        raise ValueError("PairScores has only one of chosen_lengths / rejected_lengths; give both or neither")
    if scores.has_lengths and ((scores.chosen_lengths <= 0).any() or (scores.rejected_lengths <= 0).any()):
        raise ValueError("PairScores.chosen_lengths / rejected_lengths must be > 0 (completion token counts)")


def _check_requirements(scores: PairScores, specs: list[LossSpec], config: LossConfig) -> None:
    """Each configured loss gets what it needs, and every optional input given is used by some loss."""
    names = [spec.name for spec in specs]
    num_chosen, num_rejected = scores.policy_chosen.shape[0], scores.policy_rejected.shape[0]
    for spec in specs:
        if spec.needs_reference and not scores.has_reference:
            raise ValueError(
                f"loss {spec.name!r} needs reference scores but PairScores.ref_chosen/ref_rejected are None; "
                "score the pairs with a reference model (or precomputed reference log-probs), or use a "
                f"reference-free loss ({[s.name for s in LOSSES.values() if not s.needs_reference]})"
            )
        if spec.needs_lengths and not scores.has_lengths:
            raise ValueError(
                f"loss {spec.name!r} needs PairScores.chosen_lengths and rejected_lengths "
                "(completion token counts) but they are None"
            )
        if spec.paired and num_chosen != num_rejected:
            raise ValueError(
                f"loss {spec.name!r} is paired but got {num_chosen} chosen and {num_rejected} rejected "
                "scores; give one rejected per chosen sample"
            )
        if spec.batch_level and scores.weight is not None:
            raise ValueError(
                f"loss {spec.name!r} sorts scores across the batch, so a per-pair PairScores.weight has no "
                "meaning; leave weight None"
            )

    if scores.label is not None:
        if scores.label.shape[0] != num_chosen or num_chosen != num_rejected:
            raise ValueError(
                f"PairScores.label has {scores.label.shape[0]} entries; it needs one per pair "
                f"({num_chosen} chosen, {num_rejected} rejected)"
            )
        if ((scores.label < 0) | (scores.label > 1)).any():
            raise ValueError(
                "PairScores.label holds probabilities that chosen ≻ rejected; all must be in [0, 1]"
            )
        if not any(spec.uses_label for spec in specs):
            raise ValueError(
                f"PairScores.label is set but no loss in loss.type={names} uses soft labels; use one of "
                f"{[s.name for s in LOSSES.values() if s.uses_label]}"
            )
    if config.f_divergence != "reverse_kl" and not any(spec.uses_f_divergence for spec in specs):
        raise ValueError(
            f"loss.f_divergence={config.f_divergence!r} but no loss in loss.type={names} uses it; use one "
            f"of {[s.name for s in LOSSES.values() if s.uses_f_divergence]} or leave it 'reverse_kl'"
        )
