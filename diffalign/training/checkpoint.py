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

Every file is read back with ``torch.load(weights_only=True)`` or safetensors: tensors and plain Python
values only, so a crafted checkpoint cannot run code (NumPy's RNG state is stored as a tensor for that). A file
that cannot be read raises :class:`CorruptCheckpointError` naming it; a failed write (a full disk) raises
:class:`CheckpointWriteError` naming the file and the free space, and leaves no staging folder behind. Each
checkpoint also holds the run's resolved config (``config.yaml``), which a resume compares with its own.
DeepSpeed's own files are read by DeepSpeed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.files import free_space, respect_umask

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
CONFIG_FILE = "config.yaml"  # the resolved config of the run that wrote the checkpoint


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, damaged, or holding more than tensors and plain values."""


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (a full disk, a quota); the staging folder was removed."""


@dataclass
class LoopState:
    step: int = 0  # optimizer steps completed
    micro_step: int = 0  # batches consumed by this process's data stream
    nonfinite_steps: int = 0
    best_metric: float | None = None  # for recipes that keep the best checkpoint (early stopping)
    num_processes: int = 1  # of the run that wrote the checkpoint
    device: str = ""  # what it ran on ("NVIDIA H200", "CPU"), for the model card
    # Where a streamed training set stands (diffalign.streaming.StreamPosition); None for map-style data, whose
    # position is micro_step.
    data_position: dict | None = None


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG's state, as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def read_torch(path: Path) -> Any:
    """A ``torch.save`` file, read without running code: tensors and plain Python values only."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).splitlines()[0]
        raise CorruptCheckpointError(
            f"{path} holds more than tensors and plain values, so it was not loaded (it may be damaged or crafted "
            f"to run code; {first_line}); resume only from checkpoints this version of diffalign wrote"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CorruptCheckpointError(f"{path} cannot be read, the checkpoint is damaged ({error})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as error:
        raise CorruptCheckpointError(f"{path} cannot be read, the checkpoint is damaged ({error})") from None


def _write_failed(path: Path, error: BaseException) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not write {path} ({error}); {free_space(path)} free on its disk. Free some space (fewer "
        "checkpoints: run.keep_last_checkpoints) or point run.output_dir at another disk; the checkpoints "
        "already written are intact"
    )


def write_torch(value: Any, path: Path) -> None:
    try:
        torch.save(value, path)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError of its zip writer
        raise _write_failed(path, error) from error


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    try:
        save_file(tensors, path, metadata=metadata)
    except (OSError, SafetensorError) as error:
        raise _write_failed(path, error) from error


def write_text(text: str, path: Path) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise _write_failed(path, error) from error


def read_trainable(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's trainable parameters, checked against the model's."""
    trainable = read_safetensors(require_file(directory / "trainable.safetensors"))
    expected = trainable_names(model)
    if set(trainable) != expected:
        missing, unexpected = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
        raise ValueError(
            f"checkpoint {directory} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it written by a different config?"
        )
    return trainable


def require_file(path: Path, engine: str | None = None) -> Path:
    """``path``, which every checkpoint has (``engine`` None) or which one written under ``engine`` has."""
    if not path.exists():
        found = sorted(p.name for p in path.parent.iterdir())
        if engine is None:
            raise CorruptCheckpointError(f"checkpoint {path.parent} is incomplete: no {path.name} (has {found})")
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
            write_safetensors(trainable_state_dict(self.model), directory / "trainable.safetensors")
            write_torch(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        trainable = read_trainable(directory, self.model)
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                parameters[name].copy_(value)
        optimizer_file = require_file(directory / "optimizer.pt", "single-process or DDP")
        self.optimizer.load_state_dict(read_torch(optimizer_file))


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
            write_safetensors(trainable, directory / "trainable.safetensors")
            write_torch(optimizer_state, directory / "optimizer_by_name.pt")

    def load(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        trainable = read_trainable(directory, self.model)
        optimizer_file = require_file(directory / "optimizer_by_name.pt", "FSDP")
        optimizer_state = read_torch(optimizer_file)
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


def checkpoint_dir(checkpoint_root: Path, step: int) -> Path:
    return checkpoint_root / f"step-{step:07d}"


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
    config: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``checkpoint_root/step-N`` atomically; every process calls this (each saves its RNG state).

    ``config`` is the run's resolved config as a plain dict. On any error the staging folder is removed.
    """
    final = checkpoint_dir(checkpoint_root, loop_state.step)
    staging = final.with_name(final.name + ".tmp")
    try:
        if is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        wait_for_everyone()
        write_torch(rng_state, staging / f"rng-{process_index}.pt")
        model_state.save(staging, is_main_process)
        if is_main_process:
            write_torch(lr_scheduler.state_dict(), staging / "scheduler.pt")
            if scaler is not None:
                write_torch(scaler.state_dict(), staging / "scaler.pt")
            if extra_state:
                write_torch(extra_state, staging / "extra.pt")
            if config is not None:
                write_text(yaml.safe_dump(config, sort_keys=False), staging / CONFIG_FILE)
            write_text(json.dumps(asdict(loop_state)), staging / "loop_state.json")
        wait_for_everyone()
        if is_main_process:
            respect_umask(staging)  # every process's files are complete now
    except BaseException:
        if is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if keep_last is not None:
            for old in list_checkpoints(checkpoint_root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    wait_for_everyone()
    return final


def load_checkpoint(
    path: Path,
    *,
    model_state: ModelState,
    lr_scheduler: Any,
    scaler: Any,
    process_index: int,
) -> tuple[LoopState, dict[str, Any] | None]:
    """Restore everything written by ``save_checkpoint``; returns the loop state and the recipe's extra state.

    Every process calls it (loading sharded or partitioned state is collective). Raises
    :class:`CorruptCheckpointError` naming the file that cannot be read; what was restored before it is
    overwritten by the next complete load.
    """
    loop_state = read_loop_state(path)
    model_state.load(path)
    lr_scheduler.load_state_dict(read_torch(require_file(path / "scheduler.pt")))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(read_torch(path / "scaler.pt"))
    rng_file = path / f"rng-{process_index}.pt"
    if not rng_file.is_file():  # resuming on more processes than saved: fall back to rank 0's stream
        rng_file = require_file(path / "rng-0.pt")
    restore_rng_state(read_torch(rng_file))
    extra = read_torch(path / "extra.pt") if (path / "extra.pt").is_file() else None
    return loop_state, extra


def read_loop_state(path: Path) -> LoopState:
    state_file = require_file(path / "loop_state.json")
    try:
        return LoopState(**json.loads(state_file.read_text()))
    except (ValueError, TypeError) as error:
        raise CorruptCheckpointError(f"{state_file} cannot be read, the checkpoint is damaged ({error})") from None
