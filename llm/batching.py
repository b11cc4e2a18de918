"""The training dataset and its collation into one padded batch of prompt + completion rows.

A paired batch of B pairs has 2B rows, ``[prompt_i + chosen_i ; prompt_i + rejected_i]``, so that chosen and
rejected go through the model in one forward. An unpaired batch has B rows ``prompt_i + completion_i``,
followed (for KTO) by B rows ``prompt_i + mismatched_i``. ``completion_mask`` marks the completion tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.llm.config import LLMDataConfig
from diffalign.llm.data import PairItem, UnpairedItem, detect_schema, open_row_stream, tokenize_row
from diffalign.streaming import RowLocation, RowStream, read_rows


def pad(rows: list[list[int]], value: int, side: Literal["right", "left"]) -> Tensor:
    width = max(len(row) for row in rows)
    padded = [
        row + [value] * (width - len(row)) if side == "right" else [value] * (width - len(row)) + row
        for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


def collate_rows(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    padding_side: Literal["right", "left"],
) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``completion_mask`` of the rows ``prompts[i] + completions[i]``."""
    sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
    return {
        "input_ids": pad(sequences, pad_token_id, padding_side),
        "attention_mask": pad([[1] * len(s) for s in sequences], 0, padding_side),
        "completion_mask": pad(
            [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0, padding_side
        ),
    }


class PreferenceDataset(Dataset):
    """Tokenized items; ``__getitem__`` returns the index and ``collate`` builds the batch.

    ``reference_logps`` (``[N, 2]``: chosen and rejected, or completion and mismatched) is set when the
    reference log-probs were precomputed; batches then carry them as ``reference_logps``.
    """

    def __init__(
        self,
        items: list[PairItem] | list[UnpairedItem],
        *,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
        with_mismatched: bool = False,
    ) -> None:
        self.items = items
        self.paired = isinstance(items[0], PairItem)
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        # Unpaired only: add each item's (prompt, mismatched completion) row, for KTO's reference point.
        self.with_mismatched = with_mismatched and not self.paired
        self.reference_logps: Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, Tensor]:
        batch = collate_items(
            [self.items[i] for i in indices],
            indices,
            pad_token_id=self.pad_token_id,
            padding_side=self.padding_side,
            with_mismatched=self.with_mismatched,
        )
        if self.reference_logps is not None:
            selected = self.reference_logps[batch["index"]]
            rows = len(batch["input_ids"])
            batch["reference_logps"] = torch.cat([selected[:, 0], selected[:, 1]])[:rows]
        return batch


def collate_items(
    items: Sequence[PairItem | UnpairedItem],
    indices: list[int],
    *,
    pad_token_id: int,
    padding_side: Literal["right", "left"],
    with_mismatched: bool = False,
) -> dict[str, Tensor]:
    """The batch of ``items`` (``indices`` name them: dataset indices, or positions in a stream's epoch)."""
    prompts = [item.prompt_ids for item in items]
    if isinstance(items[0], PairItem):
        completions = [item.chosen_ids for item in items] + [item.rejected_ids for item in items]
        prompts = prompts + prompts
    else:
        completions = [item.completion_ids for item in items]
        if with_mismatched:
            completions += [item.mismatched_ids for item in items]
            prompts = prompts + prompts
    batch = collate_rows(prompts, completions, pad_token_id, padding_side)
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    if not isinstance(items[0], PairItem):
        batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
    return batch


class PreferenceStream(RowStream):
    """``data.streaming``: rows read, checked, tokenized and truncated as they arrive (every process checks every
    row, so that all agree on which are usable), batched as :class:`PreferenceDataset` batches them."""

    with_mismatched = False  # KTO's mismatched completions need the whole data in memory
    reference_logps = None  # so do precomputed reference log-probs

    def __init__(
        self,
        config: LLMDataConfig,
        tokenizer: Any,
        *,
        seed: int,
        pad_token_id: int,
        padding_side: Literal["right", "left"] = "right",
    ) -> None:
        source = open_row_stream(config)
        super().__init__(
            source, seed=seed, shuffle_buffer=config.shuffle_buffer, skip_bad_rows=config.bad_rows == "skip"
        )
        self.config, self.tokenizer = config, tokenizer
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        first = next(iter(read_rows(source.shard(0), source.names[0])), None)
        if first is None:
            raise ValueError(f"data.path={config.path!r} holds no rows; give a file of preference rows")
        self.schema = config.schema if config.schema != "auto" else detect_schema(first)
        self.paired = self.schema != "unpaired"

    def check_row(self, row: dict[str, Any], location: RowLocation) -> PairItem | UnpairedItem:
        return tokenize_row(row, self.schema, self.tokenizer, self.config).item(self.paired)

    def make_item(self, record: PairItem | UnpairedItem, *, epoch: int, position: int) -> tuple[int, Any]:
        return position, record

    def skip_hint(self) -> str:
        return "Fix the row, or set data.bad_rows: skip to skip such rows (they are counted and logged)"

    def collate(self, items: list[tuple[int, PairItem | UnpairedItem]]) -> dict[str, Tensor]:
        return collate_items(
            [record for _, record in items],
            [position for position, _ in items],
            pad_token_id=self.pad_token_id,
            padding_side=self.padding_side,
        )
