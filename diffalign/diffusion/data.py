"""Preference pairs for diffusion models: the ``data:`` config, loading and validation, the training dataset.

Rows follow the Pick-a-Pic schema (Kirstain et al., 2023) used by Diffusion-DPO (Wallace et al., 2023): a
caption, two images and ``label_0``, the preference for the first image (1: it wins, 0: the second wins, 0.5: a
tie). Pairs are kept winner first. As in the official Diffusion-DPO code, ties are dropped by default; kept, they
carry the soft label 0.5 for the loss core.

Sources: a local parquet or arrow file, a glob or a directory of them (files named ``<split>-*`` or lying in a
``<split>/`` folder are picked when present, as in a hub dataset's layout), a JSONL index whose image paths are
relative to the index, or a hub dataset id. Images may be raw bytes, ``{"bytes": ..., "path": ...}`` dicts as
``datasets`` stores them, or file paths relative to the file that lists them.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.config import LoadError
from diffalign.diffusion.transforms import CorruptMediaError, ImageDecoder, MediaDecoder, draw_pair_randomness
from diffalign.progress import progress
from diffalign.streaming import BadRow as BadRowError

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "jsonl"}
SKIP_HINT = (
    "Fix or remove the row, or set data.skip_bad_rows: true to skip bad rows (they are counted and logged)"
)


@dataclass
class DiffusionDataConfig:
    """The ``data:`` section of a diffusion config. Defaults follow the official Diffusion-DPO SD1.5 launcher."""

    source: str = ""  # a parquet/arrow file, glob or directory, a JSONL index, or a hub dataset id
    split: str = "train"
    caption_column: str = "caption"
    image_0_column: str = "jpg_0"
    image_1_column: str = "jpg_1"
    # Preference of the first image (1, 0 or 0.5); null: the first image always wins (chosen/rejected columns).
    label_0_column: str | None = "label_0"
    resolution: int = 512  # 1024 for SDXL
    crop: Literal["center", "random"] = "center"
    random_flip: bool = True
    caption_dropout: float = 0.2  # probability of training on the empty prompt, as the official SD1.5 code
    drop_ties: bool = True
    skip_bad_rows: bool = False
    # An image whose longer side is more than this many times its shorter side is a bad row: resizing its shorter
    # side to data.resolution would make the longer one huge (a 1×3000 image: 1.5M pixels wide at 512).
    max_aspect_ratio: float = 4.0
    # Decode every image once while loading, so that corrupt rows fail (or are skipped) before training. With a
    # cache_dir the cache build decodes every image anyway and takes this role. Off, a bad image raises when read.
    verify_media: bool = True
    max_pairs: int | None = None  # keep the first N valid pairs
    # Read the source as a stream (diffusion/streamed_pairs.py): nothing is downloaded or converted ahead, memory
    # stays flat whatever the dataset's size, rows are checked as they arrive. Off: the source is loaded (memory-
    # mapped) and checked whole before training, which suits data that fits on the disk.
    streaming: bool = False
    shuffle_buffer: int = 1000  # rows per shuffle window of a stream (1: the stored order within each shard)
    cache_dir: str | None = None  # VAE posteriors and text embeddings, built once and reused
    vae_encode_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"data.resolution must be a positive number of pixels, got {self.resolution}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(
                f"data.caption_dropout must be a probability in [0, 1], got {self.caption_dropout}"
            )
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"data.max_aspect_ratio must be >= 1 (longer side / shorter side), got {self.max_aspect_ratio}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"data.max_pairs must be >= 1 or null (all pairs), got {self.max_pairs}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (rows per shuffle window), got {self.shuffle_buffer}")
        if self.streaming and self.max_pairs is not None:
            raise ValueError("data.max_pairs needs the whole source (data.streaming: false); remove one of them")
        if self.vae_encode_batch_size < 1:
            raise ValueError(f"data.vae_encode_batch_size must be >= 1, got {self.vae_encode_batch_size}")
        if self.crop == "random" and self.cache_dir is not None:
            raise ValueError(
                f"data.crop: 'random' cannot be combined with data.cache_dir ({self.cache_dir!r}): a cache stores one "
                "encoding per image, while random crops differ at every read. Use data.crop: center, or remove "
                "data.cache_dir"
            )


# --- source tables ---------------------------------------------------------------------------------------------


class _ArrowTable:
    """Rows of one or more parquet/arrow files (or a hub split), memory-mapped, with their file of origin."""

    def __init__(self, table: pa.Table, segments: list[tuple[str, Path | None, int]]) -> None:
        self.table = table
        self.segments = segments  # (file name, folder for relative image paths, row count) in row order
        self.starts = [0]
        for _, _, count in segments:
            self.starts.append(self.starts[-1] + count)
        if self.starts[-1] != table.num_rows:
            raise RuntimeError(
                f"row counts of {[name for name, _, _ in segments]} do not add up to the loaded table"
            )
        self.num_rows = table.num_rows
        self.column_names = table.column_names
        self.name = segments[0][0] if len(segments) == 1 else f"{segments[0][0]} (+{len(segments) - 1} files)"

    def _segment(self, row: int) -> tuple[int, int]:
        segment = bisect.bisect_right(self.starts, row) - 1
        return segment, row - self.starts[segment]

    def location(self, row: int) -> str:
        segment, local_row = self._segment(row)
        return f"{self.segments[segment][0]}, row {local_row + 1}"

    def base_dir(self, row: int) -> Path | None:
        return self.segments[self._segment(row)[0]][1]

    def values(self, column: str) -> list[Any]:
        return self.table.column(column).to_pylist()

    def value(self, column: str, row: int) -> Any:
        return self.table.column(column)[row].as_py()


class _JsonlTable:
    """Rows of a JSONL index, one JSON object per line; image paths resolve against the index's folder."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.rows: list[dict[str, Any]] = []
        self.line_numbers: list[int] = []
        for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}, line {line_number}: not UTF-8 text (byte {error.start + 1} is "
                    f"{raw[error.start]:#04x}); save the index as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line_number}: not valid JSON ({error}); each line of a JSONL index must be one "
                    "JSON object"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            self.rows.append(row)
            self.line_numbers.append(line_number)
        if not self.rows:
            raise ValueError(f"data.source: {path} holds no rows; each line must be one JSON object (a pair)")
        self.num_rows = len(self.rows)
        self.column_names = sorted({key for row in self.rows for key in row})
        self.folder = path.parent

    def location(self, row: int) -> str:
        return f"{self.name}, row {row + 1} (line {self.line_numbers[row]})"

    def base_dir(self, row: int) -> Path | None:
        return self.folder

    def values(self, column: str) -> list[Any]:
        return [row.get(column) for row in self.rows]

    def value(self, column: str, row: int) -> Any:
        return self.rows[row].get(column)


_Table = _ArrowTable | _JsonlTable


def _source_files(config: DiffusionDataConfig) -> list[Path]:
    source = config.source
    if any(char in source for char in "*?["):
        files = [Path(name) for name in sorted(glob.glob(source, recursive=True))]
        if not files:
            raise LoadError(f"data.source: no file matches the pattern {source!r}")
    elif Path(source).is_dir():
        files = sorted(path for path in Path(source).rglob("*") if path.suffix in TABLE_SUFFIXES)
        split = config.split
        in_split = [
            path
            for path in files
            if path.name.startswith(f"{split}-")
            or path.stem == split
            or split in path.relative_to(source).parts
        ]
        files = in_split or files
        if not files:
            raise LoadError(
                f"data.source: directory {source} holds no {'/'.join(TABLE_SUFFIXES)} file; point it at a folder of "
                "parquet or arrow files, or at a JSONL index"
            )
    else:
        files = [Path(source)]
    for path in files:
        if path.suffix not in TABLE_SUFFIXES:
            raise LoadError(f"data.source: {path} is not a {'/'.join(TABLE_SUFFIXES)} file")
        if not path.is_file():
            raise LoadError(f"data.source: file {path} does not exist")
    kinds = {TABLE_SUFFIXES[path.suffix] for path in files}
    if len(kinds) > 1:
        raise LoadError(f"data.source: {source} mixes {sorted(kinds)} files; point data.source at one kind")
    return files


def _read_arrow_file(path: Path) -> pa.Table:
    """An Arrow IPC file (random-access format) or stream (the format ``datasets`` writes), memory-mapped."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as error:
        raise LoadError(f"data.source: {path} is not a readable Arrow file ({error})") from None


def is_local_source(config: DiffusionDataConfig) -> bool:
    """Whether ``data.source`` names local files (a file, glob or directory) rather than a hub dataset id."""
    source = config.source
    if not source:
        raise LoadError(
            "data.source is empty; set it to a parquet/arrow file or directory, a JSONL index, or a hub dataset id"
        )
    return Path(source).suffix in TABLE_SUFFIXES or Path(source).exists() or any(c in source for c in "*?[")


def source_files(config: DiffusionDataConfig) -> tuple[list[Path], str]:
    """The local files of ``data.source`` that hold rows, and their kind (parquet, arrow or jsonl)."""
    files = _source_files(config)
    kind = TABLE_SUFFIXES[files[0].suffix]
    if kind == "parquet":
        counts = [_parquet_rows(path) for path in files]
        _require_rows(files, counts)
        # `datasets` fails on a file without rows, which has nothing to contribute anyway.
        files = [path for path, count in zip(files, counts) if count]
    return files, kind


def _load_tables(config: DiffusionDataConfig) -> list[_Table]:
    if not is_local_source(config):
        return [_load_hub_table(config.source, config.split)]
    files = _source_files(config)
    kind = TABLE_SUFFIXES[files[0].suffix]
    if kind == "jsonl":
        return [_JsonlTable(path) for path in files]
    if kind == "arrow":
        tables = [_read_arrow_file(path) for path in files]
        _require_rows(files, [table.num_rows for table in tables])
        segments = [(str(path), path.parent, table.num_rows) for path, table in zip(files, tables)]
        return [_ArrowTable(pa.concat_tables(tables, promote_options="default"), segments)]
    # Parquet is converted once to a memory-mapped arrow cache by `datasets`, so rows are read without loading
    # whole files into memory; the parquet footers give each file's row count for error messages.
    import datasets  # here, not at the top: it takes seconds to import, and every config load imports this module

    counts = [_parquet_rows(path) for path in files]
    _require_rows(files, counts)
    # `datasets` fails on a file without rows, which has nothing to contribute anyway.
    files, counts = zip(*[(path, count) for path, count in zip(files, counts) if count])
    dataset = datasets.Dataset.from_parquet([str(path) for path in files])
    segments = [(str(path), path.parent, count) for path, count in zip(files, counts)]
    return [_ArrowTable(dataset.data.table, segments)]


def _parquet_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except pa.ArrowException as error:
        raise ValueError(f"data.source: {path} is not a readable parquet file ({error})") from None


def _require_rows(files: Sequence[Path], counts: Sequence[int]) -> None:
    if not sum(counts):
        names = str(files[0]) if len(files) == 1 else f"the {len(files)} files of {files[0].parent}"
        raise ValueError(f"data.source: {names} holds no rows; point data.source at a file of preference pairs")


def _load_hub_table(dataset_id: str, split: str) -> _ArrowTable:
    from diffalign.hub import loading

    with loading("data.source", dataset_id, f"hub dataset (split {split!r})", repo_type="dataset"):
        import datasets

        dataset = datasets.load_dataset(dataset_id, split=split)
    # The raw arrow table: image columns stay bytes/path structs instead of being decoded by `datasets`.
    return _ArrowTable(dataset.data.table, [(f"{dataset_id}[{split}]", None, dataset.num_rows)])


# --- row validation --------------------------------------------------------------------------------------------


def check_columns(name: str, column_names: Sequence[str], config: DiffusionDataConfig) -> None:
    """Every configured column is among ``column_names`` (of the file or source ``name``)."""
    columns = [config.caption_column, config.image_0_column, config.image_1_column, config.label_0_column]
    for column in columns:
        if column is not None and column not in column_names:
            raise ValueError(
                f"{name}: column {column!r} not found (every row); the data has columns {list(column_names)}. "
                "Set data.caption_column, data.image_0_column, data.image_1_column and data.label_0_column to the "
                "columns that hold the caption, the two images and the first image's preference"
            )


def check_caption(value: Any, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(
            "missing_caption", f"the caption (column {column!r}) is missing or empty: {value!r}"
        )
    return value


def check_label(value: Any, column: str) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or math.isnan(value) or value not in (0, 0.5, 1):
        raise BadRowError(
            "bad_label",
            f"{column} is {value!r}; allowed values are 1 (first image preferred), 0 (second image preferred) and "
            "0.5 (tie)",
        )
    return float(value)


def read_media_bytes(value: Any, base_dir: Path | None, column: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        raise BadRowError("missing_image", f"the image (column {column!r}) is missing")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return path.read_bytes()
        except OSError as error:
            raise BadRowError(
                "missing_image",
                f"the image file {path} (column {column!r}) cannot be read ({error.strerror})",
            ) from None
    raise BadRowError(
        "missing_image",
        f"column {column!r} holds a {type(value).__name__}; expected image bytes, a {{'bytes': ...}} dict or a path",
    )


def _pair_bytes(table: _Table, row: int, columns: tuple[str, str]) -> tuple[bytes, bytes]:
    """The stored bytes of a row's two pair members, which must differ."""
    first, second = (read_media_bytes(table.value(column, row), table.base_dir(row), column) for column in columns)
    if first == second:
        raise BadRowError(
            "identical_pair", f"columns {columns[0]!r} and {columns[1]!r} hold identical data: nothing to prefer"
        )
    return first, second


@dataclass(frozen=True)
class PairRecord:
    """One checked pair, winner first, with its stored media: what a latent cache build reads."""

    caption: str
    label: float  # probability that the chosen member is preferred: 1, or 0.5 for a kept tie
    media: tuple[bytes, bytes]  # (chosen, rejected) as stored
    location: str  # file and row, for messages


class PreferencePairs:
    """The validated pairs of a data source, winner first. Images stay in the source tables until read.

    ``stats`` counts what loading did: rows read, pairs kept, ties dropped or kept, bad rows skipped (in total
    and per reason), for the trainer to log.
    """

    def __init__(self, config: DiffusionDataConfig, decoder: MediaDecoder) -> None:
        self.config = config
        self.tables = _load_tables(config)
        self.captions: list[str] = []
        # Probability that the chosen image is preferred: 1, or 0.5 for a kept tie.
        self.labels: list[float] = []
        self._rows: list[tuple[int, int, bool]] = []  # (table, row, swapped)
        skipped: Counter[str] = Counter()
        rows_read = ties_dropped = 0
        verify_media = config.verify_media and config.cache_dir is None
        for table_index, table in enumerate(self.tables):
            check_columns(table.name, table.column_names, config)
            captions = table.values(config.caption_column)
            labels = table.values(config.label_0_column) if config.label_0_column else None
            for row in progress(range(table.num_rows), desc=f"checking {Path(table.name).name}", unit="row"):
                if config.max_pairs is not None and len(self._rows) == config.max_pairs:
                    break
                rows_read += 1
                try:
                    caption = check_caption(captions[row], config.caption_column)
                    label_0 = check_label(labels[row], config.label_0_column) if labels is not None else 1.0
                    if label_0 == 0.5 and config.drop_ties:
                        ties_dropped += 1
                        continue
                    if verify_media:
                        for data in _pair_bytes(table, row, (config.image_0_column, config.image_1_column)):
                            self._decode(decoder, data)
                except BadRowError as bad:
                    if not config.skip_bad_rows:
                        raise ValueError(f"{table.location(row)}: {bad}. {SKIP_HINT}") from None
                    skipped[bad.reason] += 1
                    continue
                self.captions.append(caption)
                self.labels.append(0.5 if label_0 == 0.5 else 1.0)
                self._rows.append((table_index, row, label_0 == 0.0))
        self.stats = {
            "rows_read": rows_read,
            "pairs": len(self._rows),
            "ties_dropped": ties_dropped,
            "ties_kept": self.labels.count(0.5),
            "bad_rows_skipped": sum(skipped.values()),
            **{f"skipped_{reason}": count for reason, count in sorted(skipped.items())},
        }
        source = f"data.source {config.source!r}"
        logger.info("%s: %d pairs from %d rows, %d ties dropped", source, len(self), rows_read, ties_dropped)
        if skipped:
            logger.warning(
                "%s: skipped %d bad rows (%s)", source, sum(skipped.values()), dict(sorted(skipped.items()))
            )
        if not self._rows:
            raise ValueError(f"{source}: no usable pair among {rows_read} rows read ({self.stats})")

    @staticmethod
    def _decode(decoder: MediaDecoder, data: bytes) -> Any:
        try:
            return decoder.load(data)
        except CorruptMediaError as error:
            raise BadRowError(error.reason, str(error)) from None

    def __len__(self) -> int:
        return len(self._rows)

    def location(self, index: int) -> str:
        table_index, row, _ = self._rows[index]
        return self.tables[table_index].location(row)

    def media_bytes(self, index: int) -> tuple[bytes, bytes]:
        """The stored bytes of pair ``index``: (chosen, rejected). Raises :class:`BadRowError` naming the row."""
        table_index, row, swapped = self._rows[index]
        table = self.tables[table_index]
        columns = (self.config.image_0_column, self.config.image_1_column)
        try:
            first, second = _pair_bytes(table, row, columns)
        except BadRowError as bad:
            raise BadRowError(bad.reason, f"{table.location(row)}: {bad}") from None
        return (second, first) if swapped else (first, second)

    def records(self) -> Iterator[PairRecord | BadRowError]:
        """Every pair as a :class:`PairRecord`, or the :class:`BadRowError` of a pair whose media cannot be read."""
        for index in range(len(self)):
            try:
                media = self.media_bytes(index)
            except BadRowError as bad:
                yield bad
                continue
            yield PairRecord(self.captions[index], self.labels[index], media, self.location(index))

    def load_media(self, index: int, decoder: MediaDecoder) -> tuple[Any, Any]:
        """Pair ``index`` decoded: (chosen, rejected). Raises :class:`BadRowError` naming the row."""
        chosen, rejected = self.media_bytes(index)
        try:
            return self._decode(decoder, chosen), self._decode(decoder, rejected)
        except BadRowError as bad:
            raise BadRowError(bad.reason, f"{self.location(index)}: {bad}") from None


def load_preference_pairs(
    config: DiffusionDataConfig, decoder: MediaDecoder | None = None
) -> PreferencePairs:
    """Load and validate ``config.source``; ``decoder`` verifies images (default: the config's image transforms)."""
    return PreferencePairs(config, decoder or image_decoder(config))


def image_decoder(config: DiffusionDataConfig) -> ImageDecoder:
    return ImageDecoder(
        resolution=config.resolution,
        crop=config.crop,
        random_flip=config.random_flip,
        max_aspect_ratio=config.max_aspect_ratio,
    )


# --- datasets --------------------------------------------------------------------------------------------------


def split_index(index: int, size: int) -> tuple[int, int]:
    """Item ``index`` of a dataset of ``size`` pairs is pair ``index % size`` in epoch ``index // size``.

    Reading the dataset with a running counter (``epoch * size + position``) gives each epoch fresh caption
    dropout and flips while keeping every item a pure function of (seed, epoch, pair).
    """
    epoch, position = divmod(index, size)
    return position, epoch


class PreferencePairDataset(Dataset):
    """Decoded pairs: ``{"caption", "chosen_pixels", "rejected_pixels", "label", "index"}`` plus each image's
    ``original_size`` and ``crop_top_left`` (``chosen_original_size``, ...) for SDXL.

    Pixels are float ``[3, H, W]`` in [-1, 1]. With probability ``caption_dropout`` the caption is ``""``. All
    randomness of an item comes from (seed, epoch, pair index); see :func:`split_index` for the epoch.
    """

    # The training loop passes running sample ids (epoch · N + index), not plain indices.
    reads_sample_ids = True

    def __init__(
        self, pairs: PreferencePairs, decoder: MediaDecoder, *, caption_dropout: float = 0.0, seed: int = 0
    ) -> None:
        self.pairs = pairs
        self.decoder = decoder
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, epoch = split_index(index, len(self))
        media = self.pairs.load_media(index, self.decoder)
        caption, label = self.pairs.captions[index], self.pairs.labels[index]
        return decoded_pair_item(self.decoder, caption, label, media, self.seed, epoch, index, self.caption_dropout)


def decoded_pair_item(
    decoder: MediaDecoder,
    caption: str,
    label: float,
    media: tuple[Any, Any],
    seed: int,
    epoch: int,
    index: int,
    caption_dropout: float,
) -> dict[str, Any]:
    """The item of a decoded pair (chosen, rejected), its randomness drawn from (seed, epoch, index)."""
    _, drop_caption, augmentation = draw_pair_randomness(seed, epoch, index, caption_dropout, decoder)
    item: dict[str, Any] = {"caption": "" if drop_caption else caption, "label": label, "index": index}
    for role, member in zip(("chosen", "rejected"), media):
        decoded = decoder.transform(member, augmentation)
        item[f"{role}_{decoder.name}"] = decoded.values
        item.update({f"{role}_{key}": value for key, value in decoded.conditioning.items()})
    return item


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors stacked, floats to float32 and ints or int tuples to int64 tensors, strings to
    lists, nested dicts (prompt embeddings) collated the same way."""
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, dict):
            batch[key] = collate_pairs(values)
        elif isinstance(first, str):
            batch[key] = values
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(first, (int, tuple)):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            raise TypeError(f"collate_pairs: cannot batch {key!r} of type {type(first).__name__}")
    return batch
