"""A disk cache of reference-set statistics (mean and covariance of exemplar embeddings).

Embedding a large exemplar set costs far more than a training step's scoring, and the set does not change
during a run, so its Gaussian is saved as ``<cache_dir>/<key>.safetensors``. The key hashes the encoder's
identity (backend, weights source, checkpoint) and the exemplars' content; replacing weights in place under
the same path is not detected, so clear the cache when doing that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from diffalign.files import save_tensors_atomically
from diffalign.hashing import content_hash
from diffalign.rewards.base import Audio
from diffalign.rewards.embedding_metrics import GaussianStats, gaussian_stats
from diffalign.rewards.encoders import Encoder, embed_reference


def content_digest(exemplars: Any) -> str:
    """A content hash of a set: texts, a tensor, PIL images or :class:`Audio`."""
    return content_hash(*_content_chunks(exemplars))


def reference_stats(
    encoder: Encoder, exemplars: Any, cache_dir: str | Path | None = None, batch_size: int = 32
) -> GaussianStats:
    """The Gaussian of ``exemplars``' embeddings, read from ``cache_dir`` when computed before."""
    if cache_dir is None:
        return gaussian_stats(embed_reference(encoder, exemplars, batch_size))
    key = content_hash(encoder.identity, content_digest(exemplars))
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        return load_stats(path)
    stats = gaussian_stats(embed_reference(encoder, exemplars, batch_size))
    save_stats(stats, path, encoder.identity)
    return stats


def save_stats(stats: GaussianStats, path: str | Path, encoder_identity: str = "") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mean": stats.mean.detach().cpu().contiguous(), "cov": stats.cov.detach().cpu().contiguous()}
    save_tensors_atomically(tensors, path, {"count": str(stats.count), "encoder": encoder_identity})


def load_stats(path: str | Path) -> GaussianStats:
    try:
        with safe_open(str(path), framework="pt") as handle:
            count = int(handle.metadata()["count"])
            return GaussianStats(handle.get_tensor("mean"), handle.get_tensor("cov"), count)
    except Exception as error:  # a corrupt or foreign file: say which and how to recover
        raise ValueError(
            f"reference statistics file {path} is unreadable ({error}); delete it to recompute"
        ) from error


def _content_chunks(exemplars: Any) -> Sequence[bytes]:
    if isinstance(exemplars, Audio):
        return [str(exemplars.sample_rate).encode(), *_content_chunks(exemplars.waveforms)]
    if isinstance(exemplars, Tensor):
        tensor = exemplars.detach().cpu().contiguous()
        return [
            f"{tuple(tensor.shape)}{tensor.dtype}".encode(),
            tensor.flatten().view(torch.uint8).numpy().tobytes(),
        ]
    chunks = []
    for item in exemplars:
        if isinstance(item, str):
            chunks.append(b"text:" + item.encode())
        elif isinstance(item, Image.Image):
            chunks.append(f"image:{item.mode}:{item.size}".encode() + item.tobytes())
        else:
            raise TypeError(
                f"cannot hash exemplar of type {type(item).__name__}; pass texts, a tensor, PIL images or Audio"
            )
    return chunks
