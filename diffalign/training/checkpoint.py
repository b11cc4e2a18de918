"""Training checkpoints: written atomically, pruned to the last N, restored exactly.

A checkpoint holds only what the run changes: the trainable parameters (a LoRA adapter is a few MB, a frozen
reference is never in it), the optimizer, the lr scheduler, the fp16 loss scaler, every process's RNG states
and the loop's position. It is written into ``step-N.tmp`` and renamed to ``step-N`` only when complete, so a
crash mid-write never leaves a half checkpoint that ``resume: latest`` would pick.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    if not checkpoint_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    checkpoint_root: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
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
    if is_main_process:
        save_file(trainable_state_dict(model), staging / "trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    process_index: int,
) -> tuple[LoopState, dict[str, Any] | None]:
    """Restore everything written by ``save_checkpoint``; returns the loop state and the recipe's extra state."""
    trainable = load_file(path / "trainable.safetensors")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != expected:
        missing, unexpected = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it written by a different config?"
        )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
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
