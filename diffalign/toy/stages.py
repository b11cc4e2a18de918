"""What the toy builders share: their settings' checks, timed stages, a random stream per stage, the learning-rate
schedule, the logging interval, the latents' scaling factor and the build record (timings, folder sizes)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def check_build_settings(settings: object, paired: tuple[str, ...], unit: str) -> None:
    """A toy build's dataclass settings: every int positive, the ``paired`` per-prompt counts even (samples are
    paired), and the caption and label fractions in [0, 0.5)."""
    for field in fields(settings):
        value = getattr(settings, field.name)
        if field.type == "int" and value < 1:
            raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
    for name in paired:
        if getattr(settings, name) % 2:
            raise ValueError(f"{name} must be even ({unit} are paired), got {getattr(settings, name)}")
    for name in ("empty_caption_fraction", "partial_caption_fraction", "tie_fraction", "label_flip_fraction"):
        if not 0 <= getattr(settings, name) < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5), got {getattr(settings, name)!r}")


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def log_interval(steps: int) -> int:
    """Log a training loop of ``steps`` steps about eight times."""
    return max(1, steps // 8)


def unit_variance_scaling_factor(latent_means: torch.Tensor, latent_stds: torch.Tensor, generator: torch.Generator) -> float:
    """The VAE ``scaling_factor`` that gives sampled latents unit variance, as the Stable Diffusion and LDM VAEs
    set theirs, so that the noise schedule sees the signal it was designed for."""
    latent_sample = latent_means + latent_stds * torch.randn(latent_means.shape, generator=generator)
    return round(1 / latent_sample.std().item(), 5)


class BuildStages:
    """The stages of one toy build: their timings (``timings``) and their random generators."""

    def __init__(self, label: str, seed: int) -> None:
        self.label = label
        self.seed = seed
        self.timings: dict[str, float] = {}

    def generator(self, offset: int) -> torch.Generator:
        """Stream ``offset`` of this build: every stage draws from its own, so that changing one stage's size
        leaves the other stages' data alone."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    @contextmanager
    def stage(self, name: str, init_seed: int | None = None) -> Iterator[None]:
        """Time the block as stage ``name``. ``init_seed`` seeds torch's global generator with seed + init_seed
        first, for the modules the stage creates (their initialisation draws from it)."""
        start = time.perf_counter()
        if init_seed is not None:
            torch.manual_seed(self.seed + init_seed)
        yield
        self.timings[name] = round(time.perf_counter() - start, 1)
        log.info("[%s] %s done in %.1fs", self.label, name, self.timings[name])


def directory_sizes(root: Path, names: Iterable[str]) -> dict[str, int]:
    """Bytes of every file under each folder ``root / name``."""
    return {
        name: sum(file.stat().st_size for file in (root / name).rglob("*") if file.is_file()) for name in names
    }


def write_build_info(
    output_dir: Path,
    stages: BuildStages,
    config: Any,
    folders: tuple[str, ...],
    quality: dict,
    **sections: Any,
) -> dict:
    """Write (and return) ``build_info.json``: the seed, the build ``config`` (a dataclass), the builder's own
    ``sections`` (sampling settings, latent factors), each stage's seconds, the bytes of each of ``folders``, the
    measured ``quality`` and torch's thread count."""
    info = {
        "seed": stages.seed,
        "config": asdict(config),
        **sections,
        "seconds": stages.timings,
        "bytes": directory_sizes(output_dir, folders),
        "quality": quality,
        "torch_threads": torch.get_num_threads(),
    }
    (output_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
