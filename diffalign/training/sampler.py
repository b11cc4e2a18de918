"""A resumable, shardable batch order.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a resumed run can jump to any batch
without replaying data and without touching the global RNG (which drives the noise in a diffusion step and must
match an uninterrupted run exactly). Each process takes every ``world_size``-th batch of the global order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
        """Yields this process's batches forever (epoch after epoch), starting at ``start_batch``."""
        batch = self.start_batch
        while True:
            epoch, position = divmod(batch, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            global_batch = self.batch_size * self.num_processes
            start = position * global_batch + self.process_index * self.batch_size
            yield order[start : start + self.batch_size].tolist()
            batch += 1

    def __len__(self) -> int:
        return self.batches_per_epoch
