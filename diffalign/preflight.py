"""Checks that run before any model loads: every path a run reads exists and has the columns it needs, and every
folder it writes is writable, so that a typo fails in seconds with the key to fix, not after minutes of loading.

Hub ids are checked, not fetched (:func:`diffalign.hub.check_source`: in the hub cache when offline, one bounded
request otherwise); the libraries download them when the run loads them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from diffalign.config import ConfigError, LoadError
from diffalign.hub import RepoType, check_push_possible, check_source

DATA_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".txt", ".csv", ".tsv"}


def require_writable(key: str, folder: str | Path) -> None:
    """``folder`` (created if missing) accepts a new file; raises naming ``key``."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"{key}: {path} is not writable ({error.strerror}); point {key} at a folder this user can write"
        ) from None


def require_output_dir(run: Any) -> None:
    """The run's folder is writable, and a push at the end is possible: refused before the folder is made."""
    if run.push_to_hub:
        check_push_possible(run.hub_repo_id)
    require_writable("run.output_dir", run.output_dir)


def require_path_or_hub_id(key: str, value: str, *, repo_type: RepoType = "model") -> None:
    """``value`` exists, or is a hub repository that can be had (:func:`diffalign.hub.check_source`: from the
    cache when offline, one bounded request otherwise); raises a one-line error naming ``key`` and the fix. A
    value with a data file's suffix must be an existing file."""
    if Path(value).suffix in DATA_SUFFIXES and not Path(value).expanduser().is_file():
        raise LoadError(
            f"{key}={value!r}: no such file; give an existing data file, a dataset directory or a hub id"
        )
    check_source(key, value, repo_type)


def _first_row_keys(path: Path) -> list[str]:
    """The columns of a parquet/arrow file (its schema) or of a JSONL file's first row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(path).names
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"{path} is not a readable parquet file ({error})") from None
    if path.suffix == ".arrow":
        import pyarrow as pa

        for opener in (pa.ipc.open_file, pa.ipc.open_stream):
            try:
                return opener(pa.memory_map(str(path))).schema.names
            except pa.ArrowInvalid:
                continue
        raise ConfigError(f"{path} is not a readable Arrow file")
    with path.open("rb") as lines:
        for raw in lines:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return []  # the data loader names the line and the problem
                return sorted(row) if isinstance(row, dict) else []
    return []


def require_scorers(eval_config: Any) -> None:
    """``eval.reward`` and every ``eval.metrics`` entry name a registered scorer: a typo there would otherwise
    surface at the first evaluation, after the training it was meant to judge."""
    from diffalign.rewards.registry import require_registered

    named = {f"eval.metrics[{index}]": name for index, name in enumerate(eval_config.metrics)}
    if eval_config.reward is not None:
        named["eval.reward"] = eval_config.reward
    for key, name in named.items():
        try:
            require_registered(key, name)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def preflight_diffusion(config: Any) -> None:
    """Paths, columns and output folders of a diffusion run (``DiffusionTrainConfig``)."""
    from diffalign.diffusion.data import check_columns, is_local_source, source_files
    from diffalign.diffusion.methods import METHODS
    from diffalign.diffusion.methods.base import DiffusionMethod

    model, data = config.model, config.data
    require_path_or_hub_id("model.pretrained", model.pretrained)
    if model.vae is not None:
        require_path_or_hub_id("model.vae", model.vae)
    reads_pairs = METHODS[config.method.name].training_data is DiffusionMethod.training_data
    if reads_pairs or data.source:
        local = is_local_source(data)  # raises LoadError naming data.source, as source_files does
        files = source_files(data)[0] if local else []
        if not local:
            check_source("data.source", data.source, "dataset")
        for path in files:
            columns = _first_row_keys(path)
            if columns or path.suffix != ".jsonl":
                try:
                    check_columns(str(path), columns, data)
                except ValueError as error:
                    raise ConfigError(str(error)) from None
    if data.cache_dir is not None:
        require_writable("data.cache_dir", data.cache_dir)
    if model.reference_cache is not None:
        require_writable("model.reference_cache", model.reference_cache)
    if config.eval.prompts_file is not None and not Path(config.eval.prompts_file).is_file():
        raise ConfigError(f"eval.prompts_file: {config.eval.prompts_file} does not exist")
    require_scorers(config.eval)
    require_output_dir(config.run)


def preflight_llm(config: Any) -> None:
    """Paths, the data's schema and output folders of an LLM run (``LLMTrainConfig``)."""
    from diffalign.llm.data import is_saved_dataset

    require_path_or_hub_id("model.pretrained", config.model.pretrained)
    data = config.data
    path = Path(data.path)
    require_path_or_hub_id("data.path", data.path, repo_type="dataset")
    if path.is_file() and path.suffix in (".jsonl", ".json", ".parquet") and data.schema == "auto":
        columns = set(_first_row_keys(path)) if path.suffix != ".json" else set()
        if columns and not (
            {"chosen", "rejected"} <= columns or {"prompt", "completion", "label"} <= columns
        ):
            from diffalign.llm.data import SCHEMA_HELP

            raise ConfigError(
                f"data.path: {path} has the columns {sorted(columns)}, which fit no schema; {SCHEMA_HELP}"
            )
    if path.is_dir() and not is_saved_dataset(path) and not any(path.iterdir()):
        raise ConfigError(f"data.path: {path} is an empty folder")
    if not data.streaming:
        require_writable("data.cache_dir", data.cache_dir)
    if config.reference_strategy == "precomputed":
        require_writable("reference.cache_dir", config.reference.cache_dir)
    if config.eval.prompts is not None:
        require_path_or_hub_id("eval.prompts", config.eval.prompts, repo_type="dataset")
    require_output_dir(config.run)
