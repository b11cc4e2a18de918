"""The preference-loss core: per-pair scores in, per-pair losses, implicit rewards and metrics out.

Every method in diffalign reduces to four numbers per pair: the policy's and the reference's log-likelihood
(or its surrogate) of the chosen and of the rejected sample. For LLMs these are summed completion log-probs;
for diffusion models they are ``-0.5 * per-sample mean squared denoising error``, which makes the core's β
the β of the official Diffusion-DPO code (β=5000 reproduces its loss exactly).

Each loss is a pure function on tensors (in ``margin.py``, ``pair.py``, ``batch.py``, ``unpaired.py``,
``reference_free.py``, ``sft.py``, ``token_level.py``), registered under its config name with an adapter that
maps ``(PairScores, LossConfig)`` to the function's arguments. ``compute_loss`` validates the inputs, applies the
sequence-score options (``ld_alpha``, ``use_weighting``, ``rpo_alpha``; ``sequence.py``), runs the configured
terms in fp32 and combines them.

Token-level inputs: a pair batch may carry, per side, the per-token log-probs and completion mask of the policy
and the reference (``TokenScores``), so that token-weighted losses (LD-DPO, WPO, TDPO, SparsePO-style token
masks) stay pure functions. LLM trainers fill them when a configured loss or option needs them; diffusion scores
are one number per sample and carry none (a loss that needs them is refused when the config loads).

The policy-gradient losses of online methods (GRPO and its variants) take per-element log-probs instead of
pairs: see ``policy_gradient.py``.

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

from diffalign.losses.sequence import (
    alphapo_reward,
    batch_token_mean_nll,
    length_desensitised_logps,
    wpo_log_weights,
)

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class TokenScores:
    """Per-token inputs of one side of a pair batch (``[N, T]``, the rows of ``PairScores.*_chosen`` or
    ``*_rejected`` in order). Position t holds the log-prob of completion token t given the tokens before it.
    """

    policy: Tensor  # log πθ(y_t | x, y_<t)
    mask: Tensor  # 1 on completion tokens, 0 on prompt and padding
    reference: Tensor | None = None  # log πref(y_t | x, y_<t)
    # KL(πref(·|x, y_<t) ‖ πθ(·|x, y_<t)) at each position, differentiable in θ (TDPO's sequential KL).
    kl: Tensor | None = None
    # log Σ_v πθ(v | x, y_<t)², detached (WPO's weight).
    log_sum_sq_probs: Tensor | None = None
    # SparsePO-style token masks m(t) in [0, 1] weighting each token's log-ratio and KL; None means ``mask``.
    weights: Tensor | None = None

    @property
    def token_weights(self) -> Tensor:
        return self.mask * self.weights if self.weights is not None else self.mask

    def to_float32(self) -> TokenScores:
        updates = {
            f.name: getattr(self, f.name).float()
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        return dataclasses.replace(self, **updates)


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
    # β-DPO's margin baseline M0 (a detached scalar running mean of the batch margins, kept by the caller).
    margin_baseline: Tensor | None = None
    # Per-token inputs of the chosen and the rejected rows (LLMs), for token-level losses and options.
    chosen_tokens: TokenScores | None = None
    rejected_tokens: TokenScores | None = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None

    @property
    def has_lengths(self) -> bool:
        return self.chosen_lengths is not None and self.rejected_lengths is not None

    @property
    def has_tokens(self) -> bool:
        return self.chosen_tokens is not None and self.rejected_tokens is not None


# Fields of PairScores that are not per-sample [B] tensors.
SCALAR_FIELDS = ("kl_reference_point", "margin_baseline")
TOKEN_FIELDS = ("chosen_tokens", "rejected_tokens")


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
    # AlphaPO's reward shape for cpo and simpo (TRL CPOTrainer's `alpha`); 0 keeps log-probs.
    alphapo_alpha: float = 0.0
    tdpo_alpha: float = 0.5  # TDPO2's weight of the sequential-KL difference
    dpop_lambda: float = 50.0  # DPO-Positive's penalty on a chosen likelihood below the reference's
    beta_dpo_alpha: float = 0.6  # β-DPO's scale of the margin deviation in β_batch
    # Sequence-score options of TRL's DPOTrainer, applied to every configured loss. LD-DPO: the weight of the
    # tokens past the shorter response of the pair; WPO: weigh each pair by w(y_w)·w(y_l) (both need per-token
    # log-probs); RPO: add α·NLL of the chosen completions, averaged over the batch's tokens.
    ld_alpha: float | None = None
    use_weighting: bool = False
    rpo_alpha: float | None = None

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
        self._validate_options()

    def _validate_options(self) -> None:
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(
                f"loss.ld_alpha={self.ld_alpha} must be in [0, 1] (LD-DPO), or null to turn it off"
            )
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"loss.rpo_alpha={self.rpo_alpha} must be >= 0, or null to turn it off")
        if self.alphapo_alpha != 0.0 and not {"cpo", "simpo"} & set(self.type):
            raise ValueError(
                f"loss.alphapo_alpha={self.alphapo_alpha} reshapes the rewards of cpo and simpo, but loss.type="
                f"{self.type} has neither; add one or leave loss.alphapo_alpha 0"
            )
        unpaired = [name for name in self.type if not LOSSES[name].paired and name != "sft"]
        if (self.ld_alpha is not None or self.use_weighting) and unpaired:
            raise ValueError(
                f"loss.ld_alpha and loss.use_weighting weigh the two completions of a pair, but loss.type has "
                f"unpaired losses {unpaired}; use paired losses or turn the options off"
            )
        if not self.tdpo_alpha >= 0 or not self.dpop_lambda >= 0:
            raise ValueError(
                f"loss.tdpo_alpha={self.tdpo_alpha} and loss.dpop_lambda={self.dpop_lambda} must be >= 0"
            )

    def needed_inputs(self) -> set[str]:
        """What the configured losses and options need beyond the policy's sequence scores: ``reference``,
        ``lengths`` (completion token counts), ``token_logps`` (per-token log-probs and masks), ``token_kl``
        (per-token KL to the reference) and ``token_vocab`` (WPO's log Σ_v πθ(v)² per token)."""
        specs = [LOSSES[name] for name in self.type]
        needed = set()
        if any(spec.needs_reference for spec in specs):
            needed.add("reference")
        if any(spec.needs_lengths for spec in specs):
            needed.add("lengths")
        if any(spec.needs_token_kl for spec in specs):
            needed |= {"token_logps", "token_kl"}
        if self.ld_alpha is not None:
            needed.add("token_logps")
        if self.use_weighting:
            needed |= {"token_logps", "token_vocab"}
        return needed

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
    # Per-token inputs with the per-token KL to the reference (TDPO).
    needs_token_kl: bool = False
    # The loss scores length-averaged log-probs, so its implicit rewards are β·ℓ/|y| (as TRL logs them).
    length_averaged_rewards: bool = False
    # The loss reads the sequence log-likelihoods (so LD-DPO's ld_alpha reweights them); sft reads the plain NLL.
    reads_sequence_scores: bool = True


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
    needs_token_kl: bool = False,
    length_averaged_rewards: bool = False,
    reads_sequence_scores: bool = True,
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
            needs_token_kl=needs_token_kl,
            length_averaged_rewards=length_averaged_rewards,
            reads_sequence_scores=reads_sequence_scores,
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

    ``per_pair = Σ_k weights[k] · loss_k (+ rpo_alpha·NLL)`` and ``loss = mean(weight · per_pair)``, which
    equals TRL's ``Σ_k weights[k] · mean(loss_k)`` when no per-pair weight is given; ``weight`` is
    ``scores.weight`` times WPO's ``w(y_w)·w(y_l)`` with ``use_weighting``. With ``ld_alpha`` the losses see
    LD-DPO's sequence log-likelihoods of policy and reference. Implicit rewards are ``β·(policy − reference)``
    (``β·policy`` without a reference; per token for losses on length-averaged log-probs, through AlphaPO's
    reward shape with ``alphapo_alpha``), detached.
    """
    config.validate()
    specs = [LOSSES[name] for name in config.type]
    _check_inputs(scores, specs, config)
    scores = _to_float32(scores)
    sequence_scores = length_desensitised(scores, config.ld_alpha) if config.ld_alpha is not None else scores

    terms = {
        spec.name: spec.fn(sequence_scores if spec.reads_sequence_scores else scores, config)
        for spec in specs
    }
    sizes = {name: term.shape[0] for name, term in terms.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"loss.type={config.type} gives terms of different sizes {sizes} (unpaired losses return "
            "[desirable, undesirable] concatenated); combine only losses that return one value per same sample"
        )
    per_pair = sum(w * term for w, term in zip(config.term_weights, terms.values(), strict=True))
    if per_pair.numel() == 0:
        raise ValueError("compute_loss got an empty batch: policy_chosen and policy_rejected are both empty")
    if config.rpo_alpha is not None:
        # RPO as TRL ≤ 0.23 adds it: one batch-level NLL of the chosen completions, shared by every pair.
        nll = batch_token_mean_nll(scores.policy_chosen, scores.chosen_lengths)
        terms["rpo_nll"] = nll.expand_as(per_pair)
        per_pair = per_pair + config.rpo_alpha * nll

    weight = _pair_weights(scores, config, per_pair)
    loss = (weight * per_pair).mean()
    chosen_rewards, rejected_rewards = implicit_rewards(sequence_scores, config, specs)

    metrics = {f"loss/{name}": (weight * term).mean().detach() for name, term in terms.items()}
    metrics.update(_reward_metrics(scores, chosen_rewards, rejected_rewards))
    if config.use_weighting:
        metrics["wpo_weight"] = weight.detach().mean()
    return LossOutput(
        loss=loss,
        per_pair=per_pair,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        metrics=metrics,
    )


def length_desensitised(scores: PairScores, alpha: float) -> PairScores:
    """``scores`` with LD-DPO's sequence log-likelihoods (``sequence.length_desensitised_logps``) of policy and
    reference in place of the plain sums; l_p counts the completion tokens of each pair's shorter response."""
    chosen, rejected = scores.chosen_tokens, scores.rejected_tokens
    shared = torch.minimum(chosen.mask.sum(dim=-1), rejected.mask.sum(dim=-1))
    updates = {
        "policy_chosen": length_desensitised_logps(chosen.policy, chosen.mask, shared, alpha),
        "policy_rejected": length_desensitised_logps(rejected.policy, rejected.mask, shared, alpha),
    }
    if scores.has_reference:
        updates["ref_chosen"] = length_desensitised_logps(chosen.reference, chosen.mask, shared, alpha)
        updates["ref_rejected"] = length_desensitised_logps(rejected.reference, rejected.mask, shared, alpha)
    return dataclasses.replace(scores, **updates)


def implicit_rewards(scores: PairScores, config: LossConfig, specs: list[LossSpec]) -> tuple[Tensor, Tensor]:
    """β·h of chosen and rejected, detached: h the log-ratio (the policy score without a reference), divided by
    the length when a configured loss scores length-averaged log-probs (SimPO, ORPO, as TRL logs them), through
    AlphaPO's reward shape when ``alphapo_alpha`` is set."""
    chosen, rejected = log_ratios(scores)
    if scores.has_lengths and any(spec.length_averaged_rewards for spec in specs):
        chosen, rejected = chosen / scores.chosen_lengths, rejected / scores.rejected_lengths
    chosen = alphapo_reward(chosen, config.alphapo_alpha)
    rejected = alphapo_reward(rejected, config.alphapo_alpha)
    return (config.beta * chosen).detach(), (config.beta * rejected).detach()


def _pair_weights(scores: PairScores, config: LossConfig, per_pair: Tensor) -> Tensor:
    pair_weight = scores.weight
    if pair_weight is not None and pair_weight.shape != per_pair.shape:
        raise ValueError(
            f"PairScores.weight has shape {tuple(pair_weight.shape)} but loss.type={config.type} gives "
            f"{tuple(per_pair.shape)} per-sample losses; give one weight per loss value"
        )
    weight = pair_weight if pair_weight is not None else torch.ones_like(per_pair)
    if config.use_weighting:
        chosen, rejected = scores.chosen_tokens, scores.rejected_tokens
        log_weight = wpo_log_weights(chosen.policy, chosen.log_sum_sq_probs, chosen.mask) + wpo_log_weights(
            rejected.policy, rejected.log_sum_sq_probs, rejected.mask
        )
        weight = weight * log_weight.exp()
    return weight


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
        if f.name not in TOKEN_FIELDS
        else getattr(scores, f.name).to_float32()
        for f in dataclasses.fields(scores)
        if getattr(scores, f.name) is not None
    }
    return dataclasses.replace(scores, **updates)


def _check_inputs(scores: PairScores, specs: list[LossSpec], config: LossConfig) -> None:
    _check_shapes(scores)
    _check_token_shapes(scores)
    _check_requirements(scores, specs, config)
    _check_token_requirements(scores, specs, config)


def _check_shapes(scores: PairScores) -> None:
    for f in dataclasses.fields(scores):
        value = getattr(scores, f.name)
        if value is None or f.name in SCALAR_FIELDS + TOKEN_FIELDS:
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


def _check_token_shapes(scores: PairScores) -> None:
    if (scores.chosen_tokens is None) != (scores.rejected_tokens is None):
        raise ValueError("PairScores has only one of chosen_tokens / rejected_tokens; give both or neither")
    for side in ("chosen", "rejected"):
        tokens = getattr(scores, f"{side}_tokens")
        if tokens is None:
            continue
        num_rows = getattr(scores, f"policy_{side}").shape[0]
        for f in dataclasses.fields(tokens):
            value = getattr(tokens, f.name)
            if value is not None and (value.ndim != 2 or value.shape != (num_rows, tokens.mask.shape[1])):
                raise ValueError(
                    f"PairScores.{side}_tokens.{f.name} has shape {tuple(value.shape)}; every per-token tensor of "
                    f"a side must be [rows, tokens] = [{num_rows}, {tokens.mask.shape[1]}] like its mask"
                )


def _check_token_requirements(scores: PairScores, specs: list[LossSpec], config: LossConfig) -> None:
    """The per-token inputs the configured losses and options need are there (LLM trainers compute them)."""
    needed = config.needed_inputs()
    missing = {
        "token_logps": not scores.has_tokens,
        "token_kl": scores.has_tokens
        and (scores.chosen_tokens.kl is None or scores.rejected_tokens.kl is None),
        "token_vocab": scores.has_tokens
        and (
            scores.chosen_tokens.log_sum_sq_probs is None or scores.rejected_tokens.log_sum_sq_probs is None
        ),
    }
    for key, is_missing in missing.items():
        if key in needed and is_missing:
            raise ValueError(
                f"loss.type={config.type} with ld_alpha={config.ld_alpha}, use_weighting={config.use_weighting} "
                f"needs per-token inputs ({key}: PairScores.chosen_tokens / rejected_tokens) that these scores lack; "
                "token-level losses and options run on LLM scores, which the LLM trainer computes per token"
            )
    reads_reference_tokens = config.ld_alpha is not None or any(spec.needs_token_kl for spec in specs)
    lacks_reference_tokens = scores.has_tokens and (
        scores.chosen_tokens.reference is None or scores.rejected_tokens.reference is None
    )
    if scores.has_reference and reads_reference_tokens and lacks_reference_tokens:
        raise ValueError(
            f"loss.type={config.type} (ld_alpha={config.ld_alpha}) reads the reference's per-token log-probs, "
            "but PairScores.chosen_tokens / rejected_tokens .reference is None; give them"
        )
