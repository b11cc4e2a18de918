"""A resumable, shardable batch order, and the running sample ids that make per-sample randomness exact.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a resumed run can jump to any batch
without replaying data and without touching the global RNG. Each process takes its slice of every global batch.

The sampler yields *sample ids* ``epoch · N + i`` rather than plain indices ``i``: an id names one visit of one
item, so randomness derived from it (caption dropout, flips, diffusion noise and timesteps) is the same whether
the item is seen in a resumed run, in an accumulation micro-batch or on another process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        num_processes: int = 1,
        start_batch: int = 0,
    ) -> None:
        if dataset_size < batch_size * num_processes:
            raise ValueError(
                f"the dataset has {dataset_size} items, fewer than one global batch "
                f"({batch_size} per process × {num_processes} processes); lower run.batch_size or add data"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.num_processes = num_processes
        # Incomplete trailing batches are dropped so every process sees the same number of equal-size batches.
        self.batches_per_epoch = dataset_size // (batch_size * num_processes)
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        """Yields this process's batches of sample ids forever (epoch after epoch), from ``start_batch``."""
        batch = self.start_batch
        while True:
            epoch, position = divmod(batch, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            global_batch = self.batch_size * self.num_processes
            start = position * global_batch + self.process_index * self.batch_size
            yield (order[start : start + self.batch_size] + epoch * self.dataset_size).tolist()
            batch += 1

    def __len__(self) -> int:
        return self.batches_per_epoch


class SampleIdDataset(Dataset):
    """Reads ``dataset`` by sample id and returns ``(sample_id, item)``.

    A dataset whose items depend on the epoch sets ``reads_sample_ids = True`` and receives the id itself;
    any other dataset receives the plain index ``id mod N``.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        self.reads_sample_ids = getattr(dataset, "reads_sample_ids", False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, sample_id: int) -> tuple[int, Any]:
        return sample_id, self.dataset[sample_id if self.reads_sample_ids else sample_id % self.size]


def collate_with_sample_ids(collate: Callable[[list[Any]], dict[str, Any]]) -> Callable[[list[Any]], dict[str, Any]]:
    """Wrap a collate function so every batch also carries ``sample_ids`` (a list of ints, kept on the host)."""

    def collate_batch(items: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = collate([item for _, item in items])
        batch["sample_ids"] = [sample_id for sample_id, _ in items]
        return batch

    return collate_batch
