"""Prompt sets for evaluation: local files in common formats, and named presets of public benchmarks.

Local files: ``.txt`` (one prompt per line), ``.json`` (a list of strings or of records), ``.jsonl`` (one record
or string per line), ``.parquet``, ``.csv`` and ``.tsv`` (a column of prompts). A preset names the hub dataset
files a benchmark lives in; they are read through the hub cache, so offline a missing preset fails with the
file to download and where to point ``prompts.source`` instead.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from diffalign.config import ConfigError, LoadError, SourceNotFoundError
from diffalign.files import file_written_whole
from diffalign.hub import check_hub_repo, hub_offline

logger = logging.getLogger(__name__)

PROMPT_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".tsv")


@dataclass(frozen=True)
class PromptPreset:
    description: str
    repo_id: str  # a hub dataset repository
    files: tuple[str, ...]  # file names or glob patterns in the repository, read in this order
    column: str | None = None  # the prompt column of table files; None for lists of strings


PROMPT_PRESETS: dict[str, PromptPreset] = {
    # Sources: the SePPO evaluation (DwanZhang-AI/SePPO valid_scores.py) for Pick-a-Pic and PartiPrompts, the hpsv2
    # package (tgxs002/HPSv2) for its benchmark, google/dreambooth for DreamBench, google/MusicCaps for MusicCaps.
    "pickapic_validation": PromptPreset(
        "Pick-a-Pic v2 validation_unique captions (500)",
        "yuvalkirstain/pickapic_v2_no_images",
        ("data/validation_unique-*.parquet",),
        "caption",
    ),
    "partiprompts": PromptPreset(
        "PartiPrompts (1632)", "nateraw/parti-prompts", ("PartiPrompts.tsv",), "Prompt"
    ),
    "hpsv2": PromptPreset(
        "HPSv2 benchmark: anime, concept-art, paintings, photo (4 × 200)",
        "zhwang/HPDv2",
        tuple(f"benchmark/{style}.json" for style in ("anime", "concept-art", "paintings", "photo")),
    ),
    "dreambench": PromptPreset(
        "DreamBench: the 25 prompts of one subject (object or live list)",
        "google/dreambooth",
        ("dataset/prompts_and_classes.txt",),
    ),
    "musiccaps": PromptPreset(
        "MusicCaps captions (5521)", "google/MusicCaps", ("musiccaps-public.csv",), "caption"
    ),
}

# DreamBench subjects whose class is an animal take the "live subject" prompt list (Ruiz et al., 2023).
DREAMBENCH_LIVE_CLASSES = {"cat", "dog"}


@dataclass
class PromptSetConfig:
    """The ``prompts:`` section of an eval config."""

    # A local file (.txt one prompt per line, .json, .jsonl, .parquet, .csv, .tsv) or a preset name (PROMPT_PRESETS).
    source: str = ""
    column: str = "prompt"  # the prompt column of a table or of JSON records; presets bring their own
    max_prompts: int | None = None  # keep the first N prompts
    skip_empty: bool = False  # skip (count and log) rows without a prompt instead of failing
    subject: str | None = None  # dreambench: the subject folder, e.g. dog6
    unique_token: str = "sks"  # dreambench: the identifier the aligned model learned for the subject

    def __post_init__(self) -> None:
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(
                f"prompts.max_prompts must be >= 1 or null (all prompts), got {self.max_prompts}"
            )
        if self.source == "dreambench" and not self.subject:
            raise ValueError(
                "prompts.subject is empty; the dreambench preset needs a subject folder name, e.g. dog6"
            )


def load_prompt_set(config: PromptSetConfig) -> list[str]:
    """The prompts of a local file or a preset (see :data:`PROMPT_PRESETS`), in file order."""
    source = config.source
    if source in PROMPT_PRESETS:
        preset = PROMPT_PRESETS[source]
        files = preset_files(source)
        if source == "dreambench":
            prompts = dreambench_prompts(files[0], config.subject, config.unique_token)
        else:
            prompts = [
                p
                for path in files
                for p in read_prompts(path, preset.column or config.column, config.skip_empty)
            ]
    else:
        prompts = read_prompts(Path(source), config.column, config.skip_empty)
    if not prompts:
        raise ValueError(f"prompts.source {source!r} holds no prompt")
    return prompts[: config.max_prompts] if config.max_prompts else prompts


def read_prompts(
    path: Path, column: str = "prompt", skip_empty: bool = False, key: str = "prompts.source"
) -> list[str]:
    """Prompts of one local file; the format follows the suffix (see :data:`PROMPT_SUFFIXES`). ``key`` is the
    config key that names the file, for error messages."""
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        formats = ", ".join(PROMPT_SUFFIXES)
        if key == "prompts.source":
            raise ValueError(f"{key}: {path} is neither a preset ({', '.join(PROMPT_PRESETS)}) nor a prompt file ({formats})")
        raise ValueError(f"{key}: {path} is not a prompt file ({formats})")
    if not path.is_file():
        raise SourceNotFoundError(f"{key}: file {path} does not exist")
    prompts, skipped = [], 0
    for location, value in _rows(path, column):
        if isinstance(value, str) and value.strip():
            prompts.append(value.strip())
        elif skip_empty:
            skipped += 1
        else:
            raise ValueError(
                f"{path}, {location}: the prompt is missing, empty or not text ({value!r}); fix or remove the row, "
                "or set prompts.skip_empty: true to skip such rows"
            )
    if skipped:
        logger.warning("%s: skipped %d rows without a prompt", path, skipped)
    return prompts


def _rows(path: Path, column: str) -> list[tuple[str, Any]]:
    """(location for error messages, prompt value) of every row of a prompt file."""
    if path.suffix == ".txt":
        lines = path.read_text().splitlines()
        return [(f"line {number}", line) for number, line in enumerate(lines, start=1) if line.strip()]
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: expected a JSON list of prompts or of records, got {type(items).__name__}"
            )
        return [(f"item {index}", _field(item, column, path)) for index, item in enumerate(items)]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
                rows.append((f"line {number}", _field(item, column, path)))
        return rows
    if path.suffix == ".parquet":
        names = pq.read_schema(path).names
        if column not in names:
            raise _missing_column(path, column, names)
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
        return [(f"row {index}", value) for index, value in enumerate(values, start=1)]
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        if column not in (reader.fieldnames or []):
            raise _missing_column(path, column, reader.fieldnames or [])
        # Row numbers count the header as row 0, so row N is the file's line N + 1 for one-line rows.
        return [(f"row {index}", row[column]) for index, row in enumerate(reader, start=1)]


def _field(item: Any, column: str, path: Path) -> Any:
    if isinstance(item, dict):
        if column not in item:
            raise _missing_column(path, column, sorted(item))
        return item[column]
    return item


def _missing_column(path: Path, column: str, names: list[str]) -> ValueError:
    return ValueError(
        f"{path}: no prompt column {column!r}; the file has columns {list(names)}. Set prompts.column to the "
        "column that holds the prompts"
    )


def preset_files(name: str) -> list[Path]:
    """The local copies of a preset's files: from the hub cache, downloaded first when online."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    preset = PROMPT_PRESETS[name]
    offline = hub_offline()
    fix = (
        f"download {' and '.join(preset.files)} from the hub dataset {preset.repo_id} on a connected machine "
        f"(`hf download {preset.repo_id} --repo-type dataset --include '{preset.files[0]}' --local-dir DIR`), "
        f"place the file here and set prompts.source to its path"
        + (f" (prompts.column: {preset.column})" if preset.column else "")
    )
    reason = (
        f"HF_HUB_OFFLINE is set and it is not in the hub cache ({constants.HF_HUB_CACHE})"
        if offline
        else "the download failed"
    )
    if not offline:  # one bounded request first: an unreachable hub fails in seconds, not after retries
        try:
            check_hub_repo(preset.repo_id, "dataset", subject=f"prompts.source {name!r} ({preset.description})", fix=fix)
        except LoadError as error:
            raise SourceNotFoundError(str(error)) from None
    try:
        folder = Path(
            snapshot_download(
                preset.repo_id,
                repo_type="dataset",
                allow_patterns=list(preset.files),
                local_files_only=offline,
            )
        )
    except (LocalEntryNotFoundError, OSError) as error:
        detail = "" if offline else f" ({type(error).__name__}: {error})"
        raise SourceNotFoundError(
            f"prompts.source {name!r} ({preset.description}): {reason}{detail}; {fix}"
        ) from None
    files = []
    for pattern in preset.files:
        matches = sorted(folder.glob(pattern))
        if not matches:
            raise SourceNotFoundError(
                f"prompts.source {name!r}: the cached snapshot {folder} of {preset.repo_id} lacks {pattern}; {fix}"
            )
        files += matches
    return files


def dreambench_prompts(path: Path, subject: str, unique_token: str = "sks") -> list[str]:
    """The 25 DreamBench prompts of ``subject`` from the benchmark's ``prompts_and_classes.txt``.

    The file lists ``subject_name,class`` pairs, then an object and a live-subject prompt list of
    ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` templates (github.com/google/dreambooth).
    """
    text = path.read_text()
    classes = dict(re.findall(r"^([A-Za-z0-9_]+),([^,\n]+)$", text, flags=re.MULTILINE))
    classes.pop("subject_name", None)
    if subject not in classes:
        raise ValueError(
            f"prompts.subject: {subject!r} is not a DreamBench subject of {path}; choose one of {sorted(classes)}"
        )
    object_section, _, live_section = text.partition("Live Subject Prompts")
    template = re.compile(r"'([^']*)'\.format\(unique_token, class_token\)")
    class_token = classes[subject].strip()
    section = live_section if class_token in DREAMBENCH_LIVE_CLASSES else object_section
    templates = template.findall(section)
    if not templates:
        raise ValueError(
            f"{path}: no prompt template found for {subject!r}; is this DreamBench's prompts_and_classes.txt?"
        )
    return [template.format(unique_token, class_token) for template in templates]


def write_prompt_split(
    config: PromptSetConfig, output_dir: str | Path, heldout: int, seed: int = 0
) -> dict[str, int]:
    """Write ``train.txt`` and ``heldout.txt`` (one prompt per line, what training and eval configs read) from any
    prompt source :func:`load_prompt_set` reads: duplicates dropped, whitespace runs (newlines too) made one space,
    then a seeded shuffle puts ``heldout`` prompts in ``heldout.txt`` and the rest in ``train.txt``."""
    import random

    unique = list(dict.fromkeys(" ".join(prompt.split()) for prompt in load_prompt_set(config)))
    if not 0 <= heldout < len(unique):
        raise ConfigError(
            f"--heldout {heldout}: the source has {len(unique)} distinct prompts; hold out fewer so that some are left "
            "to train on"
        )
    random.Random(seed).shuffle(unique)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Both files are written before either replaces an earlier split: a failure midway never pairs a new
    # heldout.txt with an old train.txt (whose prompts could then overlap it).
    heldout_path, train_path = output / "heldout.txt", output / "train.txt"
    with file_written_whole(heldout_path) as heldout_file, file_written_whole(train_path) as train_file:
        heldout_file.write_text("".join(f"{prompt}\n" for prompt in unique[:heldout]))
        train_file.write_text("".join(f"{prompt}\n" for prompt in unique[heldout:]))
    return {"distinct_prompts": len(unique), "train": len(unique) - heldout, "heldout": heldout}
