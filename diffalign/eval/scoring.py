"""Scorers of a config built with their reference sets, and scoring a whole set of samples in batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffalign.eval.generation import Samples, sample_slice
from diffalign.eval.media import load_reference
from diffalign.hub import under_key
from diffalign.progress import progress
from diffalign.rewards import Audio, Scorer, ScorerConfig, build_scorer


@dataclass
class ScoringConfig(ScorerConfig):
    """A registered scorer with its options, the reference set it compares samples to, and a batch size."""

    # A folder of reference images or audio clips (CLIP-I, DINO, λ-Harmonic, FAD), or a prompt file of exemplar
    # texts (a CLAP FAD against captions).
    reference: str | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def takes_reference(scorer: Scorer) -> bool:
    """Scorers that compare samples to a reference set implement ``prepare_reference`` (rewards/base.py)."""
    return type(scorer).prepare_reference is not Scorer.prepare_reference


def build_with_reference(spec: ScoringConfig, device: str, where: str) -> tuple[Scorer, Any]:
    """The scorer of ``spec`` (on ``device`` unless its options say otherwise) and its prepared reference set."""
    with under_key(where):
        scorer = build_scorer(spec.name, **{"device": device, **spec.options}).eval()
    if spec.reference is None:
        if takes_reference(scorer):
            raise ValueError(
                f"{where}.reference is empty, but {spec.name} compares samples to a reference set; set it to a "
                "folder of reference images or audio clips, or a prompt file of exemplar texts"
            )
        return scorer, None
    if not takes_reference(scorer):
        raise ValueError(f"{where}.reference: {spec.name} takes no reference set; remove the key")
    with torch.no_grad():
        return scorer, scorer.prepare_reference(load_reference(spec.reference))


@torch.no_grad()
def score_samples(
    scorer: Scorer, samples: Samples, prompts: list[str], reference: Any = None, batch_size: int = 16
) -> Tensor:
    """Per-sample scores ``[N]`` (in batches) or, for a set-level scorer, one 0-dim score for the whole set."""
    if scorer.set_level:
        return scorer(_whole_set(samples), prompts, reference=reference).float().cpu()
    scores = [
        scorer(
            sample_slice(samples, start, start + batch_size),
            prompts[start : start + batch_size],
            reference=reference,
        )
        for start in progress(range(0, len(prompts), batch_size), desc=f"scoring ({type(scorer).__name__})", unit="batch")
    ]
    return torch.cat(scores).float().cpu()


def _whole_set(samples: Samples) -> list[Image.Image] | Audio:
    # PIL images rather than one float tensor: a float copy of every image of a large set would not fit in memory.
    if isinstance(samples, Audio):
        return samples
    return [Image.fromarray(array) for array in np.ascontiguousarray(samples.permute(0, 2, 3, 1).numpy())]
