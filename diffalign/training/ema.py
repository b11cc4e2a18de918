"""An exponential moving average of the trained weights (``run.ema``), on diffusers' ``EMAModel``.

Only the trained parameters are averaged (a LoRA's adapter weights, or the whole denoiser or LLM), by name, so
the same code serves LoRA and full fine-tunes of either trainer. ``EMAModel`` counts its updates and uses
``d_k = min(decay, k / (9 + k))`` for the k-th (``d_1 = 0``: the first update copies the weights). A checkpoint
stores the average as ``ema.safetensors`` (names as in ``trainable.safetensors``) with the update count in its
metadata, so a resumed run continues it exactly. Evaluation and export swap the average into the model for
their duration (:meth:`WeightAverage.applied`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open
from torch import Tensor, nn

from diffalign.training.checkpoint import ModelState, read_safetensors, write_safetensors
from diffalign.training.config import EMAConfig

logger = logging.getLogger("diffalign")

EMA_FILE = "ema.safetensors"


class WeightAverage:
    """The EMA of ``model``'s trainable parameters, updated after every ``config.every``-th optimizer step."""

    def __init__(self, model: nn.Module, config: EMAConfig) -> None:
        from diffusers.training_utils import EMAModel

        named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [parameter for _, parameter in named]
        self.every = config.every
        self.average = EMAModel(self.parameters, decay=config.decay, min_decay=0.0, update_after_step=0)

    def after_step(self, step: int) -> None:
        """Fold the weights after optimizer step ``step`` into the average, on the configured cadence."""
        if step % self.every == 0:
            self.average.step(self.parameters)

    @property
    def updates(self) -> int:
        return self.average.optimization_step

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.detach().cpu().contiguous() for name, value in zip(self.names, self.average.shadow_params)}

    def load_state_dict(self, averaged: dict[str, Tensor], updates: int) -> None:
        if set(averaged) != set(self.names):
            missing = sorted(set(self.names) - set(averaged))[:3]
            raise ValueError(f"the stored EMA does not match the trained parameters (missing {missing})")
        state = self.average.state_dict()
        state["shadow_params"] = [
            averaged[name].to(parameter.device, parameter.dtype, copy=True)
            for name, parameter in zip(self.names, self.parameters)
        ]
        state["optimization_step"] = updates
        self.average.load_state_dict(state)

    def save(self, path: Path) -> None:
        write_safetensors(self.state_dict(), path, metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        self.load_state_dict(read_safetensors(path), read_updates(path))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its trained weights again after it."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)


def read_updates(path: Path) -> int:
    with safe_open(str(path), framework="pt") as file:
        return int((file.metadata() or {}).get("updates", 0))


class WithAverage:
    """A :class:`ModelState` that also writes and restores the weight average beside the parameters."""

    def __init__(self, inner: ModelState, average: WeightAverage) -> None:
        self.inner = inner
        self.average = average

    def save(self, directory: Path, is_main_process: bool) -> None:
        self.inner.save(directory, is_main_process)
        if is_main_process:
            self.average.save(directory / EMA_FILE)

    def load(self, directory: Path) -> None:
        self.inner.load(directory)
        if (directory / EMA_FILE).is_file():
            self.average.load(directory / EMA_FILE)
            return
        # Only a run resumed under run.allow_config_change gets here (run.ema is part of the verified config).
        logger.warning("%s holds no %s: the weight average starts from its weights", directory, EMA_FILE)
        weights = {name: p.detach().clone() for name, p in zip(self.average.names, self.average.parameters)}
        self.average.load_state_dict(weights, updates=0)
