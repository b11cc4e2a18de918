"""A training checkpoint read as a model: its run's config, its trained weights and what the run did.

``checkpoints/step-N`` holds the trained parameters under the names they have in memory
(``trainable.safetensors``), and, with ``run.ema``, their average (``ema.safetensors``); the average is what
``final/`` holds for such a run, so it is what a checkpoint stands for too unless the raw weights are asked for.
``diffalign export`` and ``diffalign eval`` read checkpoints through :func:`read_checkpoint_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from diffalign.model_card import TrainingSummary
from diffalign.provenance import PROVENANCE_KEY, with_provenance
from diffalign.training.checkpoint import (
    CONFIG_FILE,
    CorruptCheckpointError,
    LoopState,
    read_loop_state,
    read_safetensors,
)
from diffalign.training.ema import EMA_FILE

TRAINABLE_FILE = "trainable.safetensors"


def is_checkpoint(path: Path) -> bool:
    return (path / "loop_state.json").is_file()


@dataclass
class CheckpointModel:
    path: Path
    config: dict[str, Any]  # the run's config, local paths absolute, with its provenance
    state: LoopState
    weights: dict[str, Tensor]  # trained parameter name → value
    averaged: bool  # the weights are the run's EMA

    @property
    def settings(self) -> dict[str, Any]:
        """The config without its provenance: what the trainer's config class reads."""
        return {key: value for key, value in self.config.items() if key != PROVENANCE_KEY}

    def summary(self) -> TrainingSummary:
        """The run at this step, with the evaluation it logged at this step (``metrics.jsonl``), if any."""
        return TrainingSummary(
            self.state.step, self.state.num_processes, self.state.device or "unknown", self.evaluation()
        )

    def evaluation(self) -> dict[str, float]:
        log = self.path.parent.parent / "metrics.jsonl"  # <run.output_dir>/checkpoints/step-N
        if not log.is_file():
            return {}
        found: dict[str, float] = {}
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("step") == self.state.step:
                found.update({key: value for key, value in record.items() if key.startswith("eval/")})
        return found


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The config of the run that wrote checkpoint ``path``, local paths absolute, with its provenance."""
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a training checkpoint (no loop_state.json); give a checkpoints/step-N folder")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} stores no {CONFIG_FILE} (a checkpoint of an older version): its model cannot be rebuilt"
        )
    try:
        return with_provenance(yaml.safe_load(config_file.read_text()))
    except yaml.YAMLError as error:
        raise CorruptCheckpointError(f"{config_file} cannot be read, the checkpoint is damaged ({error})") from None


def read_checkpoint_model(path: Path, raw_weights: bool = False) -> CheckpointModel:
    """The model of checkpoint ``path``: the EMA weights when the run kept an average (unless ``raw_weights``)."""
    config = read_checkpoint_config(path)
    averaged = bool((config.get("run") or {}).get("ema")) and not raw_weights
    weights_file = path / (EMA_FILE if averaged else TRAINABLE_FILE)
    if not weights_file.is_file():
        if (path / "deepspeed").is_dir():
            raise FileNotFoundError(
                f"{path} was written under DeepSpeed, whose weights only DeepSpeed reads; turn it into "
                f"{TRAINABLE_FILE} with DeepSpeed's zero_to_fp32.py, or export the run's final/ folder"
            )
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: no {weights_file.name}")
    return CheckpointModel(path, config, read_loop_state(path), read_safetensors(weights_file), averaged)


def assign_weights(model: nn.Module, weights: dict[str, Tensor], source: Path) -> nn.Module:
    """Copy ``weights`` into ``model``'s trainable parameters (the names must match exactly); returns ``model``
    frozen, in eval mode."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(weights):
        missing, unexpected = sorted(set(parameters) - set(weights)), sorted(set(weights) - set(parameters))
        raise ValueError(
            f"{source} does not match the model its config builds (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was the config.yaml beside the weights edited?"
        )
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)
    return model.requires_grad_(False).eval()
