"""Training checkpoints: written atomically, pruned to the last N, restored exactly.

A checkpoint holds only what the run changes: the trainable parameters (a LoRA adapter is a few MB, a frozen
reference is never in it), the optimizer, the lr scheduler, the fp16 loss scaler, every process's RNG states
and the loop's position. It is written into ``step-N.tmp`` and renamed to ``step-N`` only when complete, so a
crash mid-write never leaves a half checkpoint that ``resume: latest`` would pick.

How the parameters and the optimizer state are written depends on the engine (a ``ModelState``):

- ``ReplicatedModelState`` (one process, DDP): every process holds everything; the main process writes
  ``trainable.safetensors`` and ``optimizer.pt``. Resumes on any number of processes.
- ``GatheredModelState`` (FSDP2): parameters and optimizer state are sharded DTensors; they are gathered into
  full tensors keyed by parameter name (``trainable.safetensors``, ``optimizer_by_name.pt``), so the run also
  resumes on any number of processes.
- ``DeepSpeedModelState`` (ZeRO-1/2/3): the optimizer state (and under ZeRO-3 the parameters) are partitioned
  inside DeepSpeed's engine, which writes its own per-process files (``deepspeed/``), frozen parameters
  excluded. DeepSpeed restores them on the same number of processes only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class LoopState:
    step: int = 0  # optimizer steps completed
    micro_step: int = 0  # batches consumed by this process's data stream
    nonfinite_steps: int = 0
    best_metric: float | None = None  # for recipes that keep the best checkpoint (early stopping)


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def read_trainable(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's trainable parameters, checked against the model's."""
    trainable = load_file(directory / "trainable.safetensors")
    expected = trainable_names(model)
    if set(trainable) != expected:
        missing, unexpected = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
        raise ValueError(
            f"checkpoint {directory} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it written by a different config?"
        )
    return trainable


def require_file(path: Path, engine: str) -> Path:
    if not path.exists():
        found = sorted(p.name for p in path.parent.iterdir())
        raise FileNotFoundError(
            f"checkpoint {path.parent} has no {path.name}, which a {engine} run needs (it has {found}); "
            "resume a run with the engine (accelerate config) that wrote the checkpoint"
        )
    return path


class ModelState(Protocol):
    """How one engine writes the trained parameters and the optimizer state into a checkpoint directory and
    reads them back. Every process calls both (saving may be collective); only the main process writes files
    that every process shares."""

    def save(self, directory: Path, is_main_process: bool) -> None: ...

    def load(self, directory: Path) -> None: ...


class ReplicatedModelState:
    """One process or DDP: every process holds the full parameters and optimizer state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model  # unwrapped: parameter names without DDP's "module." prefix
        self.optimizer = optimizer

    def save(self, directory: Path, is_main_process: bool) -> None:
        if is_main_process:
            save_file(trainable_state_dict(self.model), directory / "trainable.safetensors")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        trainable = read_trainable(directory, self.model)
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                parameters[name].copy_(value)
        optimizer_file = require_file(directory / "optimizer.pt", "single-process or DDP")
        self.optimizer.load_state_dict(torch.load(optimizer_file, weights_only=False))


class GatheredModelState:
    """FSDP2: sharded parameters and optimizer state, gathered into full tensors keyed by parameter name.

    Uses torch.distributed.checkpoint's state-dict API, which turns DTensor shards into full tensors (on the CPU
    of the main process) and full tensors back into this run's shards, whatever the number of processes.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model  # FSDP2 shards the module in place: its parameter names are the plain model's
        # The torch optimizer itself: the state-dict API may run a zero-learning-rate step to create the state
        # it loads into, which accelerate's wrapper would skip outside an accumulation boundary.
        self.optimizer = getattr(optimizer, "optimizer", optimizer)

    def save(self, directory: Path, is_main_process: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Collective: every process sends its shards; with cpu_offload only the main process receives them.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if is_main_process:
            names = trainable_names(self.model)
            trainable = {name: value.contiguous() for name, value in model_state.items() if name in names}
            save_file(trainable, directory / "trainable.safetensors")
            torch.save(optimizer_state, directory / "optimizer_by_name.pt")

    def load(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        trainable = read_trainable(directory, self.model)
        optimizer_file = require_file(directory / "optimizer_by_name.pt", "FSDP")
        optimizer_state = torch.load(optimizer_file, weights_only=False)
        # Every process reads the full tensors and keeps its own shards (strict=False: frozen weights are not
        # in the checkpoint and keep their pretrained values).
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, trainable, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)


class DeepSpeedModelState:
    """DeepSpeed ZeRO: the engine checkpoints its own partitions (``engine.save_checkpoint``)."""

    TAG = "deepspeed"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def save(self, directory: Path, is_main_process: bool) -> None:
        # Collective: every process writes its optimizer partition. Frozen parameters (a LoRA run's base model,
        # never a separate reference, which the engine does not hold) are left out.
        self.engine.save_checkpoint(
            str(directory), tag=self.TAG, exclude_frozen_parameters=True, save_latest=False
        )

    def load(self, directory: Path) -> None:
        require_file(directory / self.TAG, "DeepSpeed")
        # Not strict: the frozen parameters were not saved; the lr schedule is the loop's, restored separately.
        load_path, _ = self.engine.load_checkpoint(
            str(directory), tag=self.TAG, load_module_strict=False, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {directory / self.TAG}")


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    if not checkpoint_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    checkpoint_root: Path,
    *,
    model_state: ModelState,
    lr_scheduler: Any,
    scaler: Any,
    loop_state: LoopState,
    rng_state: dict[str, Any],
    process_index: int,
    is_main_process: bool,
    wait_for_everyone: Any,
    extra_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``checkpoint_root/step-N`` atomically; every process calls this (each saves its RNG state)."""
    final = checkpoint_root / f"step-{loop_state.step:07d}"
    staging = checkpoint_root / f"step-{loop_state.step:07d}.tmp"
    if is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    wait_for_everyone()
    torch.save(rng_state, staging / f"rng-{process_index}.pt")
    model_state.save(staging, is_main_process)
    if is_main_process:
        torch.save(lr_scheduler.state_dict(), staging / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), staging / "scaler.pt")
        if extra_state:
            torch.save(extra_state, staging / "extra.pt")
        (staging / "loop_state.json").write_text(json.dumps(asdict(loop_state)))
    wait_for_everyone()
    if is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if keep_last is not None:
            for old in list_checkpoints(checkpoint_root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone()
    return final


def resolve_resume(resume: str | None, checkpoint_root: Path) -> Path | None:
    """``latest`` → newest complete checkpoint (or None for a fresh run); a path must exist."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise FileNotFoundError(
            f"run.resume: {resume} is not a checkpoint (no loop_state.json); use 'latest' or a "
            f"{checkpoint_root}/step-N directory"
        )
    return path


def load_checkpoint(
    path: Path,
    *,
    model_state: ModelState,
    lr_scheduler: Any,
    scaler: Any,
    process_index: int,
) -> tuple[LoopState, dict[str, Any] | None]:
    """Restore everything written by ``save_checkpoint``; returns the loop state and the recipe's extra state.

    Every process calls it (loading sharded or partitioned state is collective).
    """
    model_state.load(path)
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng_file = path / f"rng-{process_index}.pt"
    if not rng_file.is_file():  # resuming on more processes than saved: fall back to rank 0's stream
        rng_file = path / "rng-0.pt"
    restore_rng_state(torch.load(rng_file, weights_only=False))
    extra = torch.load(path / "extra.pt", weights_only=False) if (path / "extra.pt").is_file() else None
    loop_state = LoopState(**json.loads((path / "loop_state.json").read_text()))
    return loop_state, extra
