"""The training dataset and its collation into one padded batch of prompt + completion rows.

A paired batch of B pairs has 2B rows, ``[prompt_i + chosen_i ; prompt_i + rejected_i]``, so that chosen and
rejected go through the model in one forward. An unpaired batch has B rows ``prompt_i + completion_i``,
followed (for KTO) by B rows ``prompt_i + mismatched_i``. ``completion_mask`` marks the completion tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffalign.llm.data import PairItem, UnpairedItem


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
        items = [self.items[i] for i in indices]
        prompts = [item.prompt_ids for item in items]
        if self.paired:
            completions = [item.chosen_ids for item in items] + [item.rejected_ids for item in items]
            prompts = prompts + prompts
        else:
            completions = [item.completion_ids for item in items]
            if self.with_mismatched:
                completions += [item.mismatched_ids for item in items]
                prompts = prompts + prompts
        batch = collate_rows(prompts, completions, self.pad_token_id, self.padding_side)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        if not self.paired:
            batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
        if self.reference_logps is not None:
            selected = self.reference_logps[batch["index"]]
            batch["reference_logps"] = torch.cat([selected[:, 0], selected[:, 1]])[: len(completions)]
        return batch
