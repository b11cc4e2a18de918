"""``diffalign relabel``: new preference labels for an existing pair dataset from a scorer (AI feedback).

As the official Diffusion-DPO ``--choice_model`` option does at train time (Wallace et al., 2023,
github.com/SalesforceAIResearch/DiffusionDPO), the scorer decides which member of a pair wins; here the decision
is written once, to a new parquet file in the schema of the source, so any trainer reads it unchanged:

- ``pickapic`` (``caption, jpg_0, jpg_1, label_0[, label_1]``): ``label_0`` = 1 if ``s(jpg_0) − s(jpg_1) > m``,
  0 if it is ``< −m``, and 0.5 (a tie) within the margin ``m``; ``label_1 = 1 − label_0`` when present.
- ``audio_alpaca`` (``prompt, chosen, rejected``; declare-lab/audio-alpaca): the higher-scored clip becomes
  ``chosen``. The schema has no way to state a tie, so ties are dropped and counted.

For scorers where lower is better the comparison is reversed. Every other column is copied as it is. A summary
(``<output>.summary.json``) counts the new labels and their agreement with the old ones.
"""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml

from diffalign.config import ConfigError, apply_override, from_dict, to_dict
from diffalign.diffusion.data import BadRowError, read_media_bytes
from diffalign.eval.media import decode_audio, decode_image, images_as_batch
from diffalign.eval.scoring import ScoringConfig, build_with_reference
from diffalign.files import file_written_whole, write_text_whole
from diffalign.progress import progress
from diffalign.rewards import Audio, Scorer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairSchema:
    prompt: str
    first: str
    second: str
    label: str | None  # preference of `first` (1, 0, 0.5); None: `first` is always the preferred member
    complement: str | None  # a column holding 1 − label, kept consistent
    modality: Literal["image", "audio"]


SCHEMAS = {
    "pickapic": PairSchema("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image"),
    "audio_alpaca": PairSchema("prompt", "chosen", "rejected", None, None, "audio"),
}


@dataclass
class RelabelConfig:
    source: str = ""  # a parquet file, a directory of parquet files or a glob
    output: str = ""  # the new parquet file
    schema: Literal["pickapic", "audio_alpaca"] = "pickapic"
    scorer: ScoringConfig = field(default_factory=lambda: ScoringConfig(name="pickscore"))
    tie_margin: float = 0.0  # |s_0 − s_1| ≤ tie_margin is a tie
    device: str = "auto"  # auto: cuda when available, else cpu
    # Drop (count and log) rows with missing or unreadable media instead of failing.
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError(
                "source is empty; set it to a parquet file, a directory of parquet files or a glob"
            )
        if not self.output.endswith(".parquet"):
            raise ValueError(f"output must be a .parquet file path, got {self.output!r}")
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {self.tie_margin}")


def load_relabel_config(path: str | None, overrides: list[str]) -> RelabelConfig:
    """A relabel config from an optional YAML file and ``key=value`` overrides (``scorer.name=hpsv2``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(Path(path).read_text()) or {}
    for override in overrides:
        apply_override(raw, override)
    try:
        return from_dict(RelabelConfig, raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None


def preference_labels(
    first_scores: torch.Tensor, second_scores: torch.Tensor, tie_margin: float, higher_is_better: bool
) -> torch.Tensor:
    """``label_0`` per pair: 1 when the first member scores better by more than ``tie_margin``, 0 when the second
    does, 0.5 otherwise."""
    advantage = (first_scores - second_scores).double()
    if not higher_is_better:
        advantage = -advantage
    labels = torch.full_like(advantage, 0.5)
    labels[advantage > tie_margin] = 1.0
    labels[advantage < -tie_margin] = 0.0
    return labels


def relabel(config: RelabelConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Write ``config.output`` (the source with new labels) and its summary; ``scorer`` overrides
    ``config.scorer`` (for scorers built in code). Returns the summary."""
    schema = SCHEMAS[config.schema]
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    reference = None
    if scorer is None:
        scorer, reference = build_with_reference(config.scorer, device, where="scorer")
    if scorer.set_level:
        raise ValueError(
            f"scorer: {type(scorer).__name__} gives one score per set; relabelling needs one per sample"
        )
    output = Path(config.output)
    sources = _parquet_files(config.source)
    if output.resolve() in {path.resolve() for path in sources}:
        raise ValueError(f"output: {output} is one of the source files; write the new labels to another file")
    output.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    writer: pq.ParquetWriter | None = None
    bar = progress(total=sum(pq.ParquetFile(path).metadata.num_rows for path in sources), desc="relabelling", unit="pair")
    with file_written_whole(output) as staging:
        try:
            for path in sources:
                parquet = pq.ParquetFile(path)
                _check_columns(parquet.schema_arrow.names, schema, path)
                if writer is None:
                    writer = pq.ParquetWriter(staging, parquet.schema_arrow)
                elif parquet.schema_arrow.remove_metadata() != writer.schema.remove_metadata():
                    raise ValueError(
                        f"{path}: its columns differ from the first source file's; relabel one schema at a time"
                    )
                row = 0
                for batch in parquet.iter_batches(batch_size=config.scorer.batch_size):
                    table = pa.Table.from_batches([batch])
                    writer.write_table(
                        _relabel_batch(table, path, row, schema, scorer, reference, config, counts)
                    )
                    row += table.num_rows
                    bar.update(table.num_rows)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    summary = _summary(config, counts)
    summary_path = output.with_suffix(".summary.json")
    write_text_whole(summary_path, json.dumps(summary, indent=2))
    logger.info("relabelled %d pairs into %s (summary: %s)", summary["rows_written"], output, summary_path)
    return summary


def _parquet_files(source: str) -> list[Path]:
    if any(char in source for char in "*?["):
        files = sorted(Path(name) for name in glob.glob(source, recursive=True))
    elif Path(source).is_dir():
        files = sorted(Path(source).rglob("*.parquet"))
    else:
        files = [Path(source)]
    files = [path for path in files if path.suffix == ".parquet"]
    if not files or not all(path.is_file() for path in files):
        raise FileNotFoundError(
            f"source: no parquet file at {source!r}; give a parquet file, a directory of them or a glob"
        )
    return files


def _check_columns(names: list[str], schema: PairSchema, path: Path) -> None:
    required = [schema.prompt, schema.first, schema.second] + ([schema.label] if schema.label else [])
    missing = [column for column in required if column not in names]
    if missing:
        raise ValueError(
            f"{path}: column {missing[0]!r} not found; the file has columns {names}. A {schema.modality} pair schema "
            f"needs {required}; pick the schema that matches the data (schema: pickapic or audio_alpaca)"
        )


def _relabel_batch(
    table: pa.Table,
    path: Path,
    first_row: int,
    schema: PairSchema,
    scorer: Scorer,
    reference: Any,
    config: RelabelConfig,
    counts: Counter[str],
) -> pa.Table:
    """The rows of ``table`` (rows ``first_row...`` of ``path``) with their new labels."""
    counts["rows_read"] += table.num_rows
    table, prompts, pairs = _read_pairs(table, path, first_row, schema, config.skip_bad_rows, counts)
    if table.num_rows == 0:
        return table
    scores = _score_pairs(scorer, pairs, prompts, reference, schema.modality)
    labels = preference_labels(scores[:, 0], scores[:, 1], config.tie_margin, scorer.higher_is_better)
    old_labels = table.column(schema.label).to_pylist() if schema.label else [1.0] * table.num_rows
    _count_labels(old_labels, labels.tolist(), counts)
    if schema.label is None:
        table = _order_by_preference(table, labels, schema)
        counts["ties_dropped"] += int((labels == 0.5).sum())
    else:
        for column, values in ((schema.label, labels), (schema.complement, 1 - labels)):
            if column is not None and column in table.column_names:
                field = table.schema.field(column)
                new_values = pa.array(values.tolist()).cast(field.type)
                table = table.set_column(table.schema.get_field_index(column), field, new_values)
    counts["rows_written"] += table.num_rows
    return table


def _read_pairs(
    table: pa.Table, path: Path, first_row: int, schema: PairSchema, skip_bad_rows: bool, counts: Counter[str]
) -> tuple[pa.Table, list[str], list[list[Any]]]:
    """The readable rows of ``table`` with their prompts and decoded pair members; bad rows raise or are
    counted and dropped."""
    prompts, pairs, kept = [], [], []
    for offset, row in enumerate(table.select([schema.prompt, schema.first, schema.second]).to_pylist()):
        where = f"{path}, row {first_row + offset + 1}"
        try:
            prompt = row[schema.prompt]
            if not isinstance(prompt, str):
                raise BadRowError(
                    "missing_prompt", f"the prompt (column {schema.prompt!r}) is missing: {prompt!r}"
                )
            pair = [
                _decode(row[column], path.parent, column, schema.modality, where)
                for column in (schema.first, schema.second)
            ]
        except BadRowError as bad:
            if not skip_bad_rows:
                raise ValueError(
                    f"{where}: {bad}. Fix or remove the row, or set skip_bad_rows: true"
                ) from None
            counts[f"skipped_{bad.reason}"] += 1
            continue
        prompts.append(prompt)
        pairs.append(pair)
        kept.append(offset)
    return table.take(pa.array(kept, type=pa.int64())), prompts, pairs


def _order_by_preference(table: pa.Table, labels: torch.Tensor, schema: PairSchema) -> pa.Table:
    """A chosen/rejected schema: the preferred member goes first; ties, which it cannot state, are dropped."""
    swap = pa.array((labels == 0).tolist())
    first, second = table.column(schema.first), table.column(schema.second)
    for column, values in (
        (schema.first, pc.if_else(swap, second, first)),
        (schema.second, pc.if_else(swap, first, second)),
    ):
        table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), values)
    return table.filter(pa.array((labels != 0.5).tolist()))


def _decode(value: Any, folder: Path, column: str, modality: str, where: str) -> Any:
    data = read_media_bytes(value, folder, column)
    try:
        return decode_image(data, where) if modality == "image" else decode_audio(data, where)
    except ValueError as error:
        raise BadRowError("corrupt_media", f"column {column!r}: {error}") from None


@torch.no_grad()
def _score_pairs(
    scorer: Scorer, members: list[list[Any]], prompts: list[str], reference: Any, modality: str
) -> torch.Tensor:
    """Scores ``[B, 2]`` of both members of each pair."""
    if modality == "image":
        images = [pair[0] for pair in members] + [pair[1] for pair in members]
        scores = scorer(images_as_batch(images), prompts + prompts, reference=reference).float().cpu()
        return torch.stack(scores.chunk(2), dim=1)
    # Clips differ in length and a batch is one [B, T] tensor: each clip is scored on its own.
    return torch.tensor(
        [
            [
                scorer(Audio(torch.from_numpy(waveform)[None], rate), [prompt], reference=reference).item()
                for waveform, rate in pair
            ]
            for pair, prompt in zip(members, prompts)
        ]
    )


def _count_labels(old: list[Any], new: list[float], counts: Counter[str]) -> None:
    for old_label, new_label in zip(old, new):
        counts[{1.0: "new_first_preferred", 0.0: "new_second_preferred", 0.5: "new_ties"}[new_label]] += 1
        if old_label in (0, 1) and new_label != 0.5:
            counts["decisive_pairs"] += 1
            counts["agreeing_pairs"] += int(old_label == new_label)
        elif old_label == 0.5:
            counts["old_ties"] += 1


def _summary(config: RelabelConfig, counts: Counter[str]) -> dict[str, Any]:
    decisive = counts["decisive_pairs"]
    return {
        "source": config.source,
        "output": config.output,
        "schema": config.schema,
        "scorer": to_dict(config.scorer),
        "tie_margin": config.tie_margin,
        "rows_read": counts["rows_read"],
        "rows_written": counts["rows_written"],
        "bad_rows_skipped": sum(value for key, value in counts.items() if key.startswith("skipped_")),
        **{key: value for key, value in sorted(counts.items()) if key.startswith("skipped_")},
        "first_preferred": counts["new_first_preferred"],
        "second_preferred": counts["new_second_preferred"],
        "ties": counts["new_ties"],
        "ties_dropped": counts["ties_dropped"],
        "old_ties": counts["old_ties"],
        # Among pairs both the old and the new labels decide, the fraction where they pick the same member.
        "agreement": counts["agreeing_pairs"] / decisive if decisive else None,
        "decisive_pairs": decisive,
    }
