"""The scorer interface: a batch of samples (with prompts, and a reference set where the reward needs one) in,
one score per sample ``[B]`` — or one per set, a 0-dim tensor — out.

Samples are images (``[B,3,H,W]`` floats in [0,1], or a list of PIL images), audio (:class:`Audio`: waveforms
``[B,T]`` with their sample rate) or texts (a list of strings). Calling convention::

    scores = scorer(samples, prompts)                     # CLIP score, PickScore, CLAP score, ...
    scores = scorer(samples, prompts, reference=images)   # CLIP-I, DINO, λ-Harmonic, FAD
    reference = scorer.prepare_reference(images)          # embed a fixed reference set once ...
    scores = scorer(samples, prompts, reference=reference)  # ... and reuse it every step

Scores come back on the scorer's device in its dtype (see :meth:`Scorer.to`). Scorers are frozen modules but
keep the autograd graph where the backend is differentiable (reward backpropagation); wrap plain scoring in
``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

Modality = Literal["image", "audio", "text"]
Images = Tensor | Sequence[Image.Image]


@dataclass(frozen=True)
class Audio:
    """A batch of mono waveforms ``[B, T]`` (floats, nominally in [-1, 1]) sampled at ``sample_rate`` Hz."""

    waveforms: Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        if not isinstance(self.waveforms, Tensor) or self.waveforms.ndim != 2:
            shape = getattr(self.waveforms, "shape", type(self.waveforms).__name__)
            raise ValueError(f"Audio.waveforms must be a [batch, time] tensor of mono audio, got {shape}")
        if not self.waveforms.is_floating_point():
            raise ValueError(
                f"Audio.waveforms must be floating point in [-1, 1], got {self.waveforms.dtype}; "
                f"convert int16 PCM with `waveforms.float() / 32768`"
            )
        if (
            isinstance(self.sample_rate, bool)
            or not isinstance(self.sample_rate, int)
            or self.sample_rate <= 0
        ):
            raise ValueError(f"Audio.sample_rate must be a positive integer (Hz), got {self.sample_rate!r}")

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Audio:
        waveforms = self.waveforms[index]
        return Audio(waveforms if waveforms.ndim == 2 else waveforms[None], self.sample_rate)


Samples = Images | Audio | Sequence[str]


@dataclass(frozen=True)
class EmbeddedReference:
    """A reference set already passed through a scorer's encoder: ``[N, D]`` L2-normalised embeddings."""

    embeddings: Tensor


class Scorer(nn.Module):
    """Base class of every reward and metric in :mod:`diffalign.rewards`.

    Subclasses set ``modality``, ``higher_is_better`` and ``set_level`` (True when one score is returned per
    set), implement ``forward(samples, prompts=None, reference=None)`` and, if they take a reference set,
    ``prepare_reference``.
    """

    modality: Modality
    higher_is_better: bool = True
    set_level: bool = False

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # An empty buffer moves with `.to(...)`, so the output device and dtype follow the module, weights or not.
        self.register_buffer("_placement", torch.empty(0, device=device, dtype=dtype), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self._placement.dtype

    def prepare_reference(self, reference: Any) -> Any:
        """Embed (or summarise) a reference set once, for reuse across calls."""
        raise TypeError(f"{type(self).__name__} takes no reference set")

    def output(self, scores: Tensor) -> Tensor:
        """Scores on the scorer's device and in its dtype."""
        return scores.to(device=self.device, dtype=self.dtype)


def check_prompts(prompts: Sequence[str] | None, count: int, scorer: str) -> list[str]:
    if prompts is None:
        raise ValueError(f"{scorer} needs one prompt per sample, got prompts=None")
    if isinstance(prompts, str) or len(prompts) != count or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{scorer} needs a list of {count} prompt strings (one per sample), got {prompts!r}")
    return list(prompts)
