"""Held-out evaluation: sample completions for fixed prompts and compare base and aligned under a reward."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffalign.config import LoadError
from diffalign.eval.statistics import win_rate
from diffalign.llm.batching import pad
from diffalign.llm.config import LLMEvalConfig
from diffalign.llm.data import Text, read_rows, tokenize_prompt
from diffalign.progress import progress

Reward = Callable[[str, str], float]

__all__ = [
    "generate_completions", "load_eval_prompts", "load_reward", "prompt_label", "render_prompt", "score", "win_rate"
]


def load_eval_prompts(config: LLMEvalConfig) -> list[Text]:
    """The ``prompt`` column of ``eval.prompts`` (first ``eval.max_prompts``), each repeated
    ``eval.samples_per_prompt`` times."""
    rows = read_rows(config.prompts, key="eval.prompts")
    prompts = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"eval.prompts={config.prompts!r}, row {number}: no 'prompt' field")
        prompts.append(row["prompt"])
    if config.max_prompts is not None:
        prompts = prompts[: config.max_prompts]
    return [prompt for prompt in prompts for _ in range(config.samples_per_prompt)]


def load_reward(spec: str) -> Reward:
    """The function named by ``"module:function"``."""
    module_name, function_name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise LoadError(
            f"eval.reward={spec!r}: cannot import {function_name} from {module_name} ({error}); give an importable "
            "'module:function' taking (prompt, completion) and returning a float"
        ) from None


def prompt_label(prompt: Text) -> str:
    """A prompt as a person reads it in a report: a conversation's last message, or the text itself."""
    if isinstance(prompt, list):
        return str(prompt[-1].get("content", "")) if prompt else ""
    return prompt


def render_prompt(tokenizer: Any, prompt: Text) -> str:
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_completions(
    model: nn.Module, tokenizer: Any, prompts: list[Text], config: LLMEvalConfig
) -> list[str]:
    """One sampled completion per prompt (special tokens removed); reproducible from ``eval.seed``.

    Prompts are tokenized exactly as in training and left-padded, so that generation continues each prompt.
    """
    device = next(model.parameters()).device
    completions = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for start in progress(range(0, len(prompts), config.batch_size), desc="generating", unit="batch"):
            prompt_ids = [
                tokenize_prompt(tokenizer, prompt) for prompt in prompts[start : start + config.batch_size]
            ]
            input_ids = pad(prompt_ids, tokenizer.pad_token_id, "left").to(device)
            attention_mask = pad([[1] * len(ids) for ids in prompt_ids], 0, "left").to(device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                top_k=0,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            completions += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return completions


def score(reward: Reward, prompt_texts: list[str], completions: list[str]) -> torch.Tensor:
    return torch.tensor([float(reward(p, c)) for p, c in zip(prompt_texts, completions, strict=True)])
