"""Training prompts of an online run: read, checked, tokenized and truncated, and their collation.

A batch of B prompts is what one micro-batch samples its B·G completions for; the prompts stay unpadded
token lists (the rollout pads them on the left for ``generate``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from diffalign.llm.data import Text, read_rows, tokenize_prompt
from diffalign.llm.evaluate import render_prompt
from diffalign.llm.online_config import PromptDataConfig

logger = logging.getLogger("diffalign")


@dataclass
class PromptItem:
    prompt: Text  # as in the data: a string or chat messages (reward models re-render messages)
    prompt_text: str  # rendered with the chat template: what reward functions read
    prompt_ids: list[int]


def _prompt(row: Any) -> Text:
    """The row's prompt, or a one-line reason it has none."""
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)
    ):
        return prompt
    raise ValueError("no 'prompt' field holding a non-empty string or a list of {role, content} messages")


def load_prompt_items(config: PromptDataConfig, tokenizer: Any) -> list[PromptItem]:
    rows = read_rows(config.path, config.split, config.subset)
    items, skipped, truncated = [], 0, 0
    for number, row in enumerate(rows, start=1):
        if config.max_rows is not None and len(items) >= config.max_rows:
            break
        try:
            prompt = _prompt(row)
        except ValueError as error:
            if config.bad_rows == "error":
                raise ValueError(
                    f"data.path={config.path!r}, row {number}: {error}. Fix the row, or set data.bad_rows: skip "
                    "to skip such rows (they are counted and logged)"
                ) from None
            skipped += 1
            continue
        prompt_ids = tokenize_prompt(tokenizer, prompt)
        if config.max_prompt_length is not None and len(prompt_ids) > config.max_prompt_length:
            prompt_ids = prompt_ids[-config.max_prompt_length :]
            truncated += 1
        items.append(PromptItem(prompt, render_prompt(tokenizer, prompt), prompt_ids))
    if not items:
        raise ValueError(f"data.path={config.path!r}: no usable prompts ({skipped} rows without one skipped)")
    logger.info(
        "training prompts: %d from %s; %d rows without a prompt skipped, %d prompts truncated to their last "
        "data.max_prompt_length tokens",
        len(items),
        config.path,
        skipped,
        truncated,
    )
    return items


class PromptDataset(Dataset):
    def __init__(self, items: list[PromptItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, Any]:
        items = [self.items[i] for i in indices]
        return {
            "index": torch.tensor(indices, dtype=torch.long),
            "prompts": [item.prompt for item in items],
            "prompt_texts": [item.prompt_text for item in items],
            "prompt_ids": [item.prompt_ids for item in items],
        }
