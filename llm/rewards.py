"""Rewards of sampled completions: Python functions and sequence-classification reward models, several weighted.

A reward scores a batch of (prompt, completion) and returns one float per row. ``rewards:`` in an online config
lists them, each with its weight; ``score_completions`` gives the ``[N, K]`` matrix the advantages combine.

- ``function: module:function`` is called as ``function(prompt_text, completion_text) -> float`` (the same
  signature as ``eval.reward``), with the rendered prompt and the decoded completion (special tokens removed).
  Every call runs with Python's, NumPy's and torch's global generators seeded from that row's seed, so a
  stochastic reward gives the same value in resumed and multi-process runs; the training RNG streams are left
  as they were.
- ``model: PATH`` is an ``AutoModelForSequenceClassification`` (its tokenizer in the same directory) scoring
  ``prompt + completion`` by its first logit, as TRL's reward models do: chat prompts get the reward tokenizer's
  chat template over the prompt messages plus an assistant message, plain prompts are concatenated.
"""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.config import LoadError
from diffalign.hub import loading
from diffalign.llm.data import Text
from diffalign.training.checkpoint import capture_rng_state, restore_rng_state


@dataclass
class RewardConfig:
    """One entry of ``rewards:``: a function or a model, and its weight in the summed reward."""

    function: str | None = None  # "module:function", e.g. diffalign.toy.llm:toy_reward
    model: str | None = None  # a local directory or hub id of a sequence-classification model
    weight: float = 1.0
    batch_size: int = 32  # rows per reward-model forward
    max_length: int | None = 1024  # reward-model tokens per row (longer texts keep their first tokens)

    def __post_init__(self) -> None:
        if (self.function is None) == (self.model is None):
            raise ValueError(
                "each entry of rewards needs exactly one of function (module:function) or model (a path)"
            )
        if self.function is not None and ":" not in self.function:
            raise ValueError(
                f"rewards function={self.function!r} must be 'module:function', e.g. diffalign.toy.llm:toy_reward"
            )
        if self.batch_size < 1:
            raise ValueError(f"rewards batch_size must be >= 1, got {self.batch_size}")

    @property
    def name(self) -> str:
        return (
            self.function.split(":")[-1]
            if self.function is not None
            else self.model.rstrip("/").split("/")[-1]
        )


def import_function(spec: str, key: str) -> Callable[..., Any]:
    """The function named by ``"module:function"``; ``key`` names the config entry in the error."""
    module_name, function_name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise LoadError(
            f"{key}={spec!r}: cannot import {function_name} from {module_name} ({error}); give an importable "
            "'module:function' taking (prompt, completion) and returning a float"
        ) from None


def seed_global_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """The global generators as they were before the context, whatever it draws or seeds."""
    saved = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(saved)


class RewardFunction:
    def __init__(self, spec: str, key: str = "rewards.function") -> None:
        self.function = import_function(spec, key)

    def __call__(
        self, prompts: list[Text], prompt_texts: list[str], completions: list[str], seeds: list[int]
    ) -> Tensor:
        values = []
        with preserved_global_rng():
            for prompt_text, completion, seed in zip(prompt_texts, completions, seeds, strict=True):
                seed_global_rng(seed)
                values.append(float(self.function(prompt_text, completion)))
        return torch.tensor(values)


class RewardModel:
    """A frozen sequence-classification model; the reward of a row is its first logit."""

    def __init__(
        self, config: RewardConfig, device: torch.device, dtype: torch.dtype, key: str = "rewards.model"
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        with loading(key, config.model, "reward tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with loading(key, config.model, "sequence-classification reward model"):
            self.model = AutoModelForSequenceClassification.from_pretrained(config.model, dtype=dtype)
        self.model.requires_grad_(False).eval().to(device)
        # The model finds each row's last token from the pad id (right padding).
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = config.batch_size
        self.max_length = config.max_length

    def texts(self, prompts: list[Text], prompt_texts: list[str], completions: list[str]) -> list[str]:
        texts = []
        for prompt, prompt_text, completion in zip(prompts, prompt_texts, completions, strict=True):
            if isinstance(prompt, list) and self.tokenizer.chat_template is not None:
                messages = [*prompt, {"role": "assistant", "content": completion}]
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(prompt_text + completion)
        return texts

    @torch.no_grad()
    def __call__(
        self, prompts: list[Text], prompt_texts: list[str], completions: list[str], seeds: list[int]
    ) -> Tensor:
        texts = self.texts(prompts, prompt_texts, completions)
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=False,
                return_tensors="pt",
            ).to(device)
            scores.append(self.model(**inputs).logits[:, 0].float().cpu())
        return torch.cat(scores)


Reward = RewardFunction | RewardModel


def load_rewards(configs: list[RewardConfig], device: torch.device, dtype: torch.dtype) -> list[Reward]:
    return [
        RewardFunction(config.function, f"rewards[{i}].function")
        if config.function is not None
        else RewardModel(config, device, dtype, f"rewards[{i}].model")
        for i, config in enumerate(configs)
    ]


def score_completions(
    rewards: list[Reward],
    prompts: list[Text],
    prompt_texts: list[str],
    completions: list[str],
    seeds: list[int],
) -> Tensor:
    """``[N, K]`` fp32: row i scored by each of the K rewards, on the CPU."""
    return torch.stack(
        [reward(prompts, prompt_texts, completions, seeds) for reward in rewards], dim=1
    ).float()
