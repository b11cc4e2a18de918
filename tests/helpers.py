"""Test data shared by the test modules (import as ``from helpers import ...``; tests/ is on the path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CAPTIONS = ["a red circle", "a blue square", "a small green circle", "a large red square"]


def random_png(rng: np.random.Generator) -> bytes:
    """A 20×18 RGB PNG of uniform noise: an odd size, so resizing and cropping paths are exercised."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (18, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_random_pairs(path: Path, count: int = 8, seed: int = 0) -> Path:
    """``count`` Pick-a-Pic-style rows (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) of random images, the four
    captions in turn and the preferred side alternating, in a parquet file."""
    rng = np.random.default_rng(seed)
    table = {
        "caption": [CAPTIONS[index % len(CAPTIONS)] for index in range(count)],
        "jpg_0": [random_png(rng) for _ in range(count)],
        "jpg_1": [random_png(rng) for _ in range(count)],
        "label_0": [1.0 - index % 2 for index in range(count)],
    }
    pq.write_table(pa.table(table), path)
    return path
