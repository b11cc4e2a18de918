"""Which checkpoint a run resumes from, and whether its config still describes the run.

``run.resume: latest`` takes the newest complete checkpoint and, when one of its files cannot be read, falls back
to the one before (logged); a checkpoint named by path is used as given. Before any state is loaded the run's
config is compared with the one stored in the checkpoint: a change of anything but the run's length, paths and
cadences (``RESUMABLE_CHANGES``) or the split of the global batch over processes is refused unless ``run.allow_config_change`` is true, and then recorded in
``<run.output_dir>/config_changes.jsonl`` (the checkpoint keeps the config that produced its steps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffalign.config import ConfigError
from diffalign.provenance import PROVENANCE_KEY
from diffalign.training.checkpoint import (
    CONFIG_FILE,
    CorruptCheckpointError,
    list_checkpoints,
    read_loop_state,
)

logger = logging.getLogger("diffalign")

T = TypeVar("T")

GLOBAL_BATCH = "run.batch_size × processes"

# Keys a resumed run may change freely: they change how long it runs, where it writes and how often it logs,
# checkpoints or evaluates, never what a step computes.
RESUMABLE_CHANGES = frozenset(
    f"run.{key}"
    for key in (
        "max_steps",
        "output_dir",
        "resume",
        "allow_config_change",
        "log_every",
        "checkpoint_every",
        "keep_last_checkpoints",
        "eval_every",
        "trackers",
        "wandb_project",
        "run_name",
        "tags",
        "push_to_hub",
        "hub_repo_id",
        "hub_private",
        "progress_bar",
        "dataloader_workers",
        "pin_memory",
    )
)


def resume_candidates(resume: str | None, checkpoint_root: Path) -> list[Path]:
    """The checkpoints to try, best first: for ``latest`` every complete one, newest first (none: a fresh
    run); a path must be a checkpoint."""
    if resume is None:
        return []
    if resume == "latest":
        return list_checkpoints(checkpoint_root)[::-1]
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise FileNotFoundError(
            f"run.resume: {resume} is not a checkpoint (no loop_state.json); use 'latest' or a "
            f"{checkpoint_root}/step-N directory"
        )
    return [path]


def load_first_readable(candidates: list[Path], load: Callable[[Path], T]) -> tuple[Path, T]:
    """``load`` the first candidate that reads completely; the others are skipped with a warning."""
    for number, path in enumerate(candidates):
        try:
            return path, load(path)
        except CorruptCheckpointError as error:
            if number == len(candidates) - 1:
                raise
            logger.warning("%s; resuming from the previous checkpoint, %s, instead", error, candidates[number + 1])
    raise ValueError("no checkpoint to resume from")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], saved_processes: int = 1, current_processes: int = 1
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every dotted key that differs, resumable ones aside (and the
    saved ``provenance`` record, which is no setting)."""
    old = flatten({key: value for key, value in saved.items() if key != PROVENANCE_KEY})
    new = flatten({key: value for key, value in current.items() if key != PROVENANCE_KEY})
    # The batch per process may change with the number of processes as long as the global batch does not: the
    # data stream is laid out in global batches (training/sampler.py), so the run continues exactly.
    for flat, processes in ((old, saved_processes), (new, current_processes)):
        if "run.batch_size" in flat:
            flat[GLOBAL_BATCH] = flat.pop("run.batch_size") * processes
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)
    }


def verify_config(
    checkpoint: Path,
    current: dict[str, Any],
    *,
    num_processes: int,
    allow_change: bool,
    output_dir: Path,
    is_main_process: bool,
) -> None:
    """Refuse to resume ``checkpoint`` under a changed config (or record the change when it is allowed)."""
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        logger.warning("%s stores no config (an older checkpoint): the resumed config is not verified", checkpoint)
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{saved_file} cannot be read, the checkpoint is damaged ({error})") from None
    changes = config_changes(saved, current, read_loop_state(checkpoint).num_processes, num_processes)
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if not allow_change:
        raise ConfigError(
            f"run.resume: the config differs from the one that wrote {checkpoint} ({listed}). Resume with that "
            "config, or set run.allow_config_change: true to continue under the new one (both are recorded)"
        )
    logger.warning("resuming %s under a changed config (run.allow_config_change): %s", checkpoint, listed)
    if not is_main_process:
        return
    record = {
        "checkpoint": str(checkpoint),
        "changes": {key: {"checkpoint": old, "now": new} for key, (old, new) in changes.items()},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "config_changes.jsonl").open("a") as log:
        log.write(json.dumps(record) + "\n")
