"""Preference pairs read as a stream (``data.streaming: true``): a hub dataset or local shards that are never
downloaded, converted or loaded whole.

Rows go through the checks of the loaded path as they arrive (caption, label, ties, missing or identical media),
with the same counted skips or errors naming the file and row; the global stream, its split across processes,
its sample ids and its exact resume are those of :mod:`diffalign.streaming`. Images are decoded only by the
process that trains on them, when it reads them: a stream has no up-front pass in which a corrupt image could be
found on every process alike, so one stops the run naming its row. The latent cache build (``data.cache_dir``)
decodes every image once and skips corrupt ones with ``data.skip_bad_rows``; training then reads the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from diffalign.diffusion.data import (
    SKIP_HINT,
    BadRowError,
    DiffusionDataConfig,
    PairRecord,
    check_caption,
    check_columns,
    check_label,
    decoded_pair_item,
    is_local_source,
    read_media_bytes,
    source_files,
)
from diffalign.diffusion.transforms import CorruptMediaError, MediaDecoder
from diffalign.streaming import (
    DroppedRow,
    RowLocation,
    RowStream,
    ShardedSource,
    read_rows,
    stream_files,
    stream_hub,
)

BUILDERS = {"parquet": "parquet", "arrow": "arrow", "jsonl": "json"}  # file kind → datasets' packaged builder


def open_pair_source(config: DiffusionDataConfig) -> ShardedSource:
    """``data.source`` as a ``datasets`` stream, one shard per file (or per data file of a hub dataset)."""
    if is_local_source(config):
        files, kind = source_files(config)
        source = stream_files(files, BUILDERS[kind])
    else:
        source = stream_hub(config.source, key="data.source", split=config.split)
    columns = source.dataset.column_names  # None for JSON, whose columns are known only once rows are read
    if columns is not None:
        check_columns(config.source, columns, config)
    return source


def check_pair_row(row: dict[str, Any], location: RowLocation, config: DiffusionDataConfig) -> PairRecord:
    """The :class:`PairRecord` of a raw row, winner first; raises :class:`BadRowError` or, for a dropped tie,
    :class:`DroppedRow`."""
    caption = check_caption(row.get(config.caption_column), config.caption_column)
    label_0 = (
        check_label(row.get(config.label_0_column), config.label_0_column) if config.label_0_column else 1.0
    )
    if label_0 == 0.5 and config.drop_ties:
        raise DroppedRow("ties_dropped")
    columns = (config.image_0_column, config.image_1_column)
    first, second = (read_media_bytes(row.get(column), location.base_dir, column) for column in columns)
    if first == second:
        raise BadRowError(
            "identical_pair",
            f"columns {columns[0]!r} and {columns[1]!r} hold identical data: nothing to prefer",
        )
    media = (second, first) if label_0 == 0.0 else (first, second)
    return PairRecord(caption, 0.5 if label_0 == 0.5 else 1.0, media, str(location))


class StreamedPairs(RowStream):
    """Decoded pairs from a stream: the items of :class:`~diffalign.diffusion.data.PreferencePairDataset`, with
    ``index`` the pair's position in its epoch of the global stream."""

    def __init__(self, config: DiffusionDataConfig, decoder: MediaDecoder, *, seed: int) -> None:
        super().__init__(
            open_pair_source(config),
            seed=seed,
            shuffle_buffer=config.shuffle_buffer,
            skip_bad_rows=config.skip_bad_rows,
        )
        self.config = config
        self.decoder = decoder

    def check_row(self, row: dict[str, Any], location: RowLocation) -> PairRecord:
        return check_pair_row(row, location, self.config)

    def make_item(self, record: PairRecord, *, epoch: int, position: int) -> dict[str, Any]:
        try:
            media = (self.decoder.load(record.media[0]), self.decoder.load(record.media[1]))
        except CorruptMediaError as error:
            raise ValueError(
                f"{record.location}: {error}. A streamed image is decoded only when it is trained on, so it cannot "
                "be skipped then; fix or remove the row, or build the latent cache (data.cache_dir), which skips "
                "corrupt images with data.skip_bad_rows: true"
            ) from None
        return decoded_pair_item(
            self.decoder,
            record.caption,
            record.label,
            media,
            self.seed,
            epoch,
            position,
            self.config.caption_dropout,
        )

    def skip_hint(self) -> str:
        return SKIP_HINT

    def records(self) -> Iterator[PairRecord | BadRowError]:
        """Every pair in stored order (shard after shard), for the latent cache build: a record, or the
        :class:`BadRowError` (naming the row) of a row that fails the checks; dropped ties are left out."""
        for shard in range(self.source.num_shards):
            name, base_dir = self.source.names[shard], self.source.base_dirs[shard]
            for number, row in enumerate(read_rows(self.source.shard(shard), name)):
                location = RowLocation(name, number, base_dir)
                try:
                    yield check_pair_row(row, location, self.config)
                except BadRowError as bad:
                    yield BadRowError(bad.reason, f"{location}: {bad}")
                except DroppedRow:
                    continue
