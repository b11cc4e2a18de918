"""Prompt files that every toy world ships next to its model, so that configs name prompt sets by path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "heldout")


def write_prompt_files(directory: Path, load_prompts: Callable[[str], list[str]]) -> None:
    """``train.txt`` and ``heldout.txt`` in ``directory``, one prompt per line, from a toy's ``load_prompts``.

    Configs read them as prompt sets (``eval.prompts_file``, ``method.dragon.prompts_file``); the text files,
    unlike the toy module, need no import and also serve tools outside this package.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        prompts = load_prompts(split)
        if any("\n" in prompt or not prompt.strip() for prompt in prompts):
            raise ValueError(f"{split} prompts must be non-empty single lines to be written one per line")
        (directory / f"{split}.txt").write_text("\n".join(prompts) + "\n")
