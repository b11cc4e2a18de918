"""Streamed training data: rows read shard by shard through ``datasets``, shuffled in windows, split across
processes, and resumed exactly.

**The global stream.** Epoch ``e`` reads the source's shards (its files, or a hub dataset's data files) in an
order drawn from ``(seed, e)``; each shard is cut into windows of ``shuffle_buffer`` consecutive rows and each
window is permuted by a generator drawn from ``(seed, e, shard, window)``. Every process reads the same global
stream and checks every row the same way, so every process knows which rows are valid. The valid rows are cut
into global batches of ``batch_size × processes`` and process ``r`` trains on the ``r``-th slice of each, as
:class:`~diffalign.training.sampler.ResumableBatchSampler` does (``datasets.distributed.split_dataset_by_node``
with ``strategy="examples"``, applied after the row checks, so a bad row never shifts one process's batches
against the others'). A run on one process with the same global batch therefore trains on the same rows in
every step. The rows that end an epoch without filling a global batch are dropped, as the sampler drops them.

**Sample ids.** The ``i``-th valid row placed in a global batch, counted from the start of the run, has sample
id ``i``, and its item randomness comes from ``(seed, epoch, position in the epoch)``: as in the map-style path,
every random draw of a sample is a function of (seed, sample id), and an id names one visit of one row.

**Exact resume.** A :class:`StreamPosition` (saved in every checkpoint) holds the epoch, the shard, the window,
the shard's ``datasets`` ``state_dict()`` where that window starts and how many rows of the permuted window were
read. A resumed run reloads the shard at that state, reads the window again (at most ``shuffle_buffer`` rows) and
continues with the next row. The position is one of the global stream, so a run may resume on another number of
processes. Windows are used rather than ``IterableDataset.shuffle``'s rolling buffer because a resumed
``datasets`` stream loses the content of its shuffle buffer (see ``IterableDataset.state_dict``).

Memory holds one window and one global batch of raw rows, whatever the size of the dataset.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class BadRow(ValueError):
    """A row that cannot be trained on (streamed or not, for either trainer); ``reason`` is the key its skip is
    counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DroppedRow(Exception):
    """A valid row the data settings leave out (a tie with ``drop_ties``): counted under ``reason``, never an
    error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ShardedSource:
    """A data source streamed by ``datasets``: ``dataset`` (an ``IterableDataset``) and one name per shard for
    messages (its file, or ``hub-id[split] shard i/n``), with the folder that relative media paths of the shard
    resolve against."""

    dataset: Any
    names: list[str]
    base_dirs: list[Path | None]

    def __post_init__(self) -> None:
        if len(self.names) != self.dataset.num_shards:
            raise RuntimeError(
                f"{len(self.names)} shard names for a dataset of {self.dataset.num_shards} shards"
            )

    @property
    def num_shards(self) -> int:
        return len(self.names)

    def shard(self, index: int) -> Any:
        return self.dataset.shard(self.num_shards, index, contiguous=True)


def stream_files(files: list[Path], builder: str) -> ShardedSource:
    """Local ``parquet``/``arrow``/``json`` files streamed by ``datasets``, one shard per file (files without rows,
    which ``datasets`` cannot stream, are left out by the caller)."""
    import datasets  # here: it takes seconds to import

    dataset = datasets.load_dataset(
        builder, data_files=[str(path) for path in files], split="train", streaming=True
    )
    if dataset.num_shards != len(files):
        raise RuntimeError(f"datasets made {dataset.num_shards} shards of {len(files)} files")
    return ShardedSource(
        dataset.decode(False), [str(path) for path in files], [path.parent for path in files]
    )


def stream_hub(
    dataset_id: str, *, key: str, split: str, subset: str | None = None, revision: str | None = None
) -> ShardedSource:
    """A hub dataset streamed by ``datasets`` (nothing is downloaded ahead), media left undecoded; a failure to
    reach it raises a :class:`~diffalign.config.LoadError` naming the config ``key``."""
    from diffalign.hub import loading

    what = f"dataset stream (subset {subset!r}, split {split!r})"
    with loading(key, dataset_id, what, repo_type="dataset", revision=revision):
        import datasets  # after the hub check: it takes seconds to import

        dataset = datasets.load_dataset(dataset_id, subset, split=split, revision=revision, streaming=True)
    count = dataset.num_shards
    names = [f"{dataset_id}[{split}] shard {index + 1}/{count}" for index in range(count)]
    return ShardedSource(dataset.decode(False), names, [None] * count)


@dataclass
class StreamPosition:
    """Where the global stream stands after a global batch; plain values, so it is stored as JSON."""

    epoch: int = 0
    shard: int = 0  # position in the epoch's shard order
    window: int = 0  # window within the shard
    window_start: dict | None = (
        None  # the shard's datasets state_dict where the window starts; None: its start
    )
    offset: int = 0  # rows of the permuted window already read
    epoch_rows: int = 0  # valid rows the epoch placed in global batches
    sample_id: int = 0  # valid rows the run placed in global batches: the next row's sample id
    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RowLocation:
    shard_name: str
    row: int  # 0-based within the shard
    base_dir: Path | None

    def __str__(self) -> str:
        return f"{self.shard_name}, row {self.row + 1}"


def _generator(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(words)))


class RowStream(abc.ABC):
    """A training set read as a stream; the loop recognises it and reads it with :meth:`batches`.

    A subclass checks each raw row (``check_row``: a record, or :class:`BadRow`) on every process and turns
    the records of its own slice into items (``make_item``).
    """

    def __init__(self, source: ShardedSource, *, seed: int, shuffle_buffer: int, skip_bad_rows: bool) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.source = source
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.skip_bad_rows = skip_bad_rows

    @abc.abstractmethod
    def check_row(self, row: dict[str, Any], location: RowLocation) -> Any:
        """The checked record of a raw row; raises :class:`BadRow`. Must not depend on the process."""

    @abc.abstractmethod
    def make_item(self, record: Any, *, epoch: int, position: int) -> Any:
        """The training item of a record, with its randomness drawn from (seed, epoch, position)."""

    def skip_hint(self) -> str:
        """What the error for a bad row tells the user to do."""
        return (
            "Fix or remove the row, or set the data section's skip option to skip bad rows (they are counted)"
        )

    def batches(
        self,
        batch_size: int,
        *,
        collate: Callable[[list[Any]], dict[str, Any]],
        process_index: int = 0,
        num_processes: int = 1,
        position: dict | None = None,
    ) -> StreamBatches:
        return StreamBatches(self, batch_size, collate, process_index, num_processes, position)

    # --- the global stream --------------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        return _generator(self.seed, epoch).permutation(self.source.num_shards).tolist()

    def raw_rows(self, position: StreamPosition) -> Iterator[tuple[dict[str, Any], RowLocation] | None]:
        """Raw rows from ``position`` on, forever; ``None`` marks the end of an epoch (``position`` still names
        the epoch that ended). Advances ``position`` as each row is handed out, so that it names the next row."""
        while True:
            order = self.shard_order(position.epoch)
            while position.shard < len(order):
                yield from self._shard_rows(order[position.shard], position)
                position.shard, position.window, position.window_start, position.offset = (
                    position.shard + 1,
                    0,
                    None,
                    0,
                )
            yield None
            position.epoch, position.shard, position.epoch_rows = position.epoch + 1, 0, 0

    def _shard_rows(
        self, shard: int, position: StreamPosition
    ) -> Iterator[tuple[dict[str, Any], RowLocation]]:
        dataset = self.source.shard(shard)
        if position.window_start is not None:
            dataset.load_state_dict(position.window_start)
        rows = read_rows(dataset, self.source.names[shard])
        name, base_dir = self.source.names[shard], self.source.base_dirs[shard]
        while True:
            window = [row for _, row in zip(range(self.shuffle_buffer), rows)]
            if not window:
                return
            next_start = dataset.state_dict()
            permutation = _generator(self.seed, position.epoch, shard, position.window).permutation(
                len(window)
            )
            while position.offset < len(window):
                number = int(permutation[position.offset])
                position.offset += 1
                yield (
                    window[number],
                    RowLocation(name, position.window * self.shuffle_buffer + number, base_dir),
                )
            position.window, position.window_start, position.offset = position.window + 1, next_start, 0


def read_rows(dataset: Any, name: str) -> Iterator[dict[str, Any]]:
    try:
        yield from dataset
    # `datasets` and the readers under it raise many types for a file they cannot parse.
    except Exception as error:
        raise ValueError(f"{name} cannot be read as a stream ({type(error).__name__}: {error})") from None


class StreamBatches:
    """This process's collated batches of a :class:`RowStream`, forever; ``position()`` is the state after the
    last batch handed out (the same on every process)."""

    def __init__(
        self,
        stream: RowStream,
        batch_size: int,
        collate: Callable[[list[Any]], dict[str, Any]],
        process_index: int,
        num_processes: int,
        position: dict | None,
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.collate = collate
        self.process_index = process_index
        self.global_batch = batch_size * num_processes
        self._position = StreamPosition(**position) if position else StreamPosition()
        self._reading = dataclasses.replace(self._position, skipped=dict(self._position.skipped))
        self._rows = stream.raw_rows(self._reading)

    def position(self) -> dict:
        return dataclasses.asdict(self._position)

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        records = self._global_batch()
        reading = self._reading
        first = reading.epoch_rows
        reading.epoch_rows += self.global_batch
        start_id = reading.sample_id
        reading.sample_id += self.global_batch
        self._position = dataclasses.replace(reading, skipped=dict(reading.skipped))
        mine = range(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
        items = [self.stream.make_item(records[k], epoch=reading.epoch, position=first + k) for k in mine]
        batch = self.collate(items)
        batch["sample_ids"] = [start_id + k for k in mine]
        return batch

    def _global_batch(self) -> list[Any]:
        """The records of the next global batch, all within one epoch."""
        records: list[Any] = []
        reading = self._reading
        while len(records) < self.global_batch:
            raw = next(self._rows)
            if raw is None:  # the epoch ended; its last rows cannot fill a global batch and are dropped
                if reading.epoch_rows == 0:
                    raise ValueError(self._too_small())
                records = []
                continue
            row, location = raw
            reading.rows_read += 1
            try:
                records.append(self.stream.check_row(row, location))
            except BadRow as bad:
                if not self.stream.skip_bad_rows:
                    raise ValueError(f"{location}: {bad}. {self.stream.skip_hint()}") from None
                reading.skipped[bad.reason] = reading.skipped.get(bad.reason, 0) + 1
            except DroppedRow as dropped:
                reading.skipped[dropped.reason] = reading.skipped.get(dropped.reason, 0) + 1
        return records

    def _too_small(self) -> str:
        return (
            f"the streamed data holds fewer valid rows than one global batch ({self.global_batch}: run.batch_size × "
            f"processes; {self._reading.rows_read} rows read, skipped {self._reading.skipped}); lower "
            "run.batch_size or add data"
        )
