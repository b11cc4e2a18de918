"""Distribution-level scorers on any encoder: Fréchet distance to a reference set (FAD on CLAP by default) and
Vendi diversity. ``reduction`` picks one score per set, one per sample, or each sample's leave-one-out share
of the set score (see :mod:`diffalign.rewards.embedding_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.rewards.base import Samples
from diffalign.rewards.embedding_metrics import (
    GaussianStats,
    frechet_distance_to,
    leave_one_out,
    per_sample_frechet_distance,
    vendi_score,
)
from diffalign.rewards.encoders import Encoder, EncoderBackend, EncoderScorer, build_encoder
from diffalign.rewards.reference_stats import reference_stats
from diffalign.rewards.registry import register_scorer

FrechetReduction = Literal["set", "per_sample", "leave_one_out"]
VendiReduction = Literal["set", "leave_one_out"]


class FrechetScorer(EncoderScorer):
    """Fréchet distance of the samples' embeddings to a reference set's Gaussian; lower is better.

    - ``set``: one distance for the whole batch (full-set FAD), a 0-dim tensor;
    - ``per_sample``: each sample as a point mass against the reference (instance-to-distribution);
    - ``leave_one_out``: ``FD(batch) − FD(batch without i)`` per sample.

    The reference is samples of the encoder's modality, texts (exemplar captions for a CLAP encoder), or
    :class:`GaussianStats`; with ``cache_dir`` its statistics are computed once and kept on disk.
    """

    higher_is_better = False

    def __init__(
        self,
        encoder: Encoder,
        reduction: FrechetReduction = "set",
        eps: float = 1e-6,
        cache_dir: str | Path | None = None,
    ) -> None:
        if reduction not in FrechetReduction.__args__:
            raise ValueError(
                f"reduction: {reduction!r} is not allowed; choose one of {list(FrechetReduction.__args__)}"
            )
        super().__init__(encoder)
        self.reduction = reduction
        self.set_level = reduction == "set"
        self.eps = eps
        self.cache_dir = cache_dir

    def prepare_reference(self, reference: Any) -> GaussianStats:
        if isinstance(reference, GaussianStats):
            return reference
        if reference is None:
            raise ValueError(
                "FrechetScorer needs `reference`: reference samples, exemplar texts or GaussianStats"
            )
        return reference_stats(self.encoder, reference, self.cache_dir)

    def forward(
        self, samples: Samples, prompts: Sequence[str] | None = None, reference: Any = None
    ) -> Tensor:
        stats = self.prepare_reference(reference)
        embeddings = self.encoder.embed(samples)
        if self.reduction == "per_sample":
            return self.output(per_sample_frechet_distance(embeddings, stats, self.eps))
        set_distance = partial(frechet_distance_to, reference=stats, eps=self.eps)
        if self.reduction == "set":
            return self.output(set_distance(embeddings))
        return self.output(leave_one_out(set_distance, embeddings))


class VendiScorer(EncoderScorer):
    """Vendi diversity of the samples' embeddings (cosine kernel): per set, or leave-one-out per sample."""

    def __init__(self, encoder: Encoder, reduction: VendiReduction = "set") -> None:
        if reduction not in VendiReduction.__args__:
            raise ValueError(
                f"reduction: {reduction!r} is not allowed; choose one of {list(VendiReduction.__args__)}"
            )
        super().__init__(encoder)
        self.reduction = reduction
        self.set_level = reduction == "set"

    def forward(
        self, samples: Samples, prompts: Sequence[str] | None = None, reference: None = None
    ) -> Tensor:
        embeddings = self.encoder.embed(samples)
        if self.reduction == "set":
            return self.output(vendi_score(embeddings))
        return self.output(leave_one_out(vendi_score, embeddings))


@register_scorer("fad")
def fad(
    reduction: FrechetReduction = "set",
    encoder: EncoderBackend = "clap",
    model: str | None = "laion/clap-htsat-unfused",
    checkpoint: str | None = None,
    processor: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    eps: float = 1e-6,
    cache_dir: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FrechetScorer:
    """Fréchet Audio Distance (Kilgour et al., 2019) on CLAP embeddings by default; any encoder works
    (``encoder: clip`` gives a CLIP-feature FID)."""
    encoder_module = build_encoder(encoder, model, checkpoint, processor, device, dtype, encoder_options)
    return FrechetScorer(encoder_module, reduction, eps, cache_dir)


@register_scorer("vendi")
def vendi(
    reduction: VendiReduction = "set",
    encoder: EncoderBackend = "clap",
    model: str | None = "laion/clap-htsat-unfused",
    checkpoint: str | None = None,
    processor: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VendiScorer:
    """Vendi score (Friedman & Dieng, 2023) of a batch, on CLAP audio embeddings by default."""
    encoder_module = build_encoder(encoder, model, checkpoint, processor, device, dtype, encoder_options)
    return VendiScorer(encoder_module, reduction)
