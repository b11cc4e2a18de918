"""What every diffusion method shares: the method interface and its registry, a latent pair batch, and the
per-sample denoising error.

A method is one module: a settings dataclass (its ``method.<name>:`` config section) and a
:class:`DiffusionMethod` subclass registered with ``@register_method("<name>", settings=<Settings>)``. The config's
``method.name`` choices and sections derive from the registry; the trainer calls only the hooks declared on
:class:`DiffusionMethod`. Preference methods (:class:`PreferenceMethod`) turn each batch into pairs and the pairs
into the loss core's :class:`PairScores`, which ``loss:`` turns into the loss; a policy-gradient method computes
its loss from rollouts itself (``training_loss``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.losses import LOSSES, LossConfig, PairScores
from diffalign.training import StepOutput
from diffalign.training.distributed import compute_loss_on_global_batch
from diffalign.training.loss_state import MarginBaseline

if TYPE_CHECKING:
    from diffalign.diffusion.config import DiffusionTrainConfig


@dataclass
class LatentPairBatch:
    """A batch of pairs in the denoiser's space: scaled latents, prompt embeddings, labels."""

    chosen_latents: Tensor  # [B, ...]
    rejected_latents: Tensor  # [B, ...]
    prompt_embeds: dict[str, Tensor]  # batch-first, [B, ...]
    label: Tensor | None = None  # P(chosen ≻ rejected); None = hard labels
    # Per-sample extras the family may read (e.g. SDXL sizes), already laid out for [chosen; rejected].
    extras: dict[str, Any] | None = None
    # One seed per pair for its noise and timestep; None draws them from the global RNG.
    noise_seeds: list[int] | None = None

    @property
    def size(self) -> int:
        return self.chosen_latents.shape[0]

    def both_latents(self) -> Tensor:
        return torch.cat([self.chosen_latents, self.rejected_latents])

    def both_prompt_embeds(self) -> dict[str, Tensor]:
        return {name: torch.cat([value, value]) for name, value in self.prompt_embeds.items()}


@dataclass
class TrainingContext:
    """What the recipe tells ``make_pairs`` about the micro-batch at hand."""

    step: int  # optimizer steps taken before this micro-batch
    seed: int  # the run's seed, for draws shared by every item and process (e.g. which checkpoint)
    noise_seeds: list[int]  # one per batch item: the root of every random stream of that item
    encode: Callable[[dict], LatentPairBatch]  # the offline path: stored media or cached latents → latents
    loss: LossConfig = field(default_factory=LossConfig)  # the run's `loss:` section
    reference_errors: Tensor | None = None  # the batch's precomputed reference errors (model.reference_cache)
    margin_baseline: MarginBaseline | None = None  # β-DPO's running margin, kept by the recipe
    # Backpropagates one part of the micro-batch's loss at once (`training.loop.backward_part`); None where a
    # method must return one differentiable loss (DeepSpeed). A method that uses it returns a StepOutput with
    # `backpropagated=True`.
    backward: Callable[[Tensor], None] | None = None


@dataclass
class TrainingData:
    """A method's own training data (online methods): the dataset, its collate function, statistics to log."""

    dataset: Dataset
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    stats: dict[str, Any]


class DiffusionMethod(ABC):
    """Turns a training batch into a loss, with the family, the policy and the reference.

    Class attributes declare what the method needs, checked when the config loads (before any model):
    ``requires`` the family capabilities it uses (see :class:`DiffusionFamily`; :meth:`requirements` adds those its
    settings need), ``supports_reference_cache`` whether its reference errors are a fixed function of the pair
    (``model.reference_cache``), ``scores_lengths`` whether its scores carry lengths (one unit per sample), which
    length-normalised losses need. ``selection_metric`` names an :meth:`evaluate` metric whose best value the
    training loop keeps in ``output_dir/best``.
    """

    name: ClassVar[str]  # set by register_method
    settings_class: ClassVar[type | None] = None
    requires: ClassVar[frozenset[str]] = frozenset()
    supports_reference_cache: ClassVar[bool] = False
    scores_lengths: ClassVar[bool] = False
    selection_metric: ClassVar[str | None] = None

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: Any = None
    ) -> None:
        self.family = family
        self.reference = reference
        self.settings = settings

    @classmethod  # noqa: B027 (a hook: most methods accept any config)
    def check_config(cls, config: DiffusionTrainConfig) -> None:
        """Refuse settings this method cannot train with (raise ``ValueError`` naming the key and the fix)."""

    @classmethod
    def requirements(cls, config: DiffusionTrainConfig) -> frozenset[str]:
        """The family capabilities this run needs: ``requires``, plus any that its settings add."""
        return cls.requires

    @classmethod
    def uses_reference(cls, config: DiffusionTrainConfig) -> bool:
        """Whether the loss compares the policy with the reference: by default, when a loss of ``loss.type`` does."""
        return any(LOSSES[name].needs_reference for name in config.loss.type)

    def training_data(self, config: DiffusionTrainConfig, accelerator: Any) -> TrainingData | None:
        """The method's own training data (prompts, subject images); None: the ``data:`` preference pairs."""
        return None

    @abstractmethod
    def training_loss(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> StepOutput:
        """The loss of one micro-batch (differentiable), its metrics and counts."""

    def evaluate(self, denoiser: nn.Module, step: int) -> dict[str, float]:
        """The method's own validation metrics (e.g. RPO's validation reward); the recipe adds eval samples."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Method state a resumed run needs (e.g. a checkpoint bank), saved with every training checkpoint."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (a hook: most methods have no state)
        """Restore what :meth:`extra_state` returned."""


class PreferenceMethod(DiffusionMethod):
    """A method whose loss is a preference loss of the core (``loss:``) on scores of chosen/rejected pairs."""

    def make_pairs(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> tuple[LatentPairBatch, dict[str, Tensor]]:
        """A collated batch → latent pairs; online methods generate (part of) them with the current policy."""
        return context.encode(batch), {}

    @abstractmethod
    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        """The core's scores for a batch of pairs, and diagnostics. ``reference_errors`` (``[2B]``, only for
        methods with ``supports_reference_cache``) replaces the reference's forward."""

    def training_loss(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> StepOutput:
        pairs, pair_metrics = self.make_pairs(denoiser, batch, context)
        scores, metrics = self.pair_scores(denoiser, pairs, reference_errors=context.reference_errors)
        if context.margin_baseline is not None:
            scores = context.margin_baseline.update(scores)
        # Batch-level losses (AOT, β-DPO) see the scores of every process's pairs, not just this process's.
        output = compute_loss_on_global_batch(scores, context.loss)
        return StepOutput(
            loss=output.loss,
            metrics={**output.metrics, **pair_metrics, **metrics},
            counts={"pairs": pairs.size},
        )


METHODS: dict[str, type[DiffusionMethod]] = {}


def register_method(
    name: str, settings: type | None = None
) -> Callable[[type[DiffusionMethod]], type[DiffusionMethod]]:
    """Register a method class under ``method.name: <name>``; ``settings`` is its ``method.<name>:`` dataclass."""

    def register(method_class: type[DiffusionMethod]) -> type[DiffusionMethod]:
        if name in METHODS:
            raise ValueError(
                f"method {name!r} is registered twice ({METHODS[name].__name__}, {method_class.__name__})"
            )
        method_class.name = name
        method_class.settings_class = settings
        METHODS[name] = method_class
        return method_class

    return register


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean over every non-batch dimension of the squared error, in fp32: one value per sample."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def denoising_error(
    family: DiffusionFamily,
    denoiser: nn.Module,
    noisy_latents: Tensor,
    timesteps: Tensor,
    target: Tensor,
    inputs: dict[str, Any],
) -> Tensor:
    """Per-sample squared error of the denoiser's prediction, weighted by the family's ``timesteps.weighting``."""
    prediction = family.predict(denoiser, noisy_latents, timesteps, inputs)
    errors = per_sample_mse(prediction, target)
    weights = family.error_weights(timesteps)
    return errors if weights is None else errors * weights.to(errors.device).float()


def pair_noise(family: DiffusionFamily, batch: LatentPairBatch) -> tuple[Tensor, Tensor]:
    """Noise ``[B, ...]`` and timesteps ``[B]`` for a batch of pairs (both members of a pair share them).

    With ``noise_seeds`` every pair draws from its own generator, so it gets the same noise and timestep in
    whatever batch, accumulation micro-batch or process it lands: those runs then equal one large-batch run.
    """
    latents = batch.chosen_latents
    if batch.noise_seeds is None:
        return torch.randn_like(latents), family.sample_timesteps(batch.size, latents.device)
    noises, timesteps = [], []
    for seed in batch.noise_seeds:
        generator = torch.Generator(latents.device).manual_seed(seed)
        noises.append(
            torch.randn(latents.shape[1:], generator=generator, device=latents.device, dtype=latents.dtype)
        )
        timesteps.append(family.sample_timesteps(1, latents.device, generator=generator))
    return torch.stack(noises), torch.cat(timesteps)
