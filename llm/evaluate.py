"""Held-out evaluation: sample completions for fixed prompts and compare base and aligned under a reward."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.eval.statistics import win_rate
from diffalign.llm.batching import pad
from diffalign.llm.config import LLMEvalConfig
from diffalign.llm.data import Text, read_rows, tokenize_prompt
from diffalign.llm.rewards import import_function
from diffalign.progress import progress
from diffalign.training.trackers import LoggedSamples

Reward = Callable[[str, str], float]

__all__ = [
    "HeldOutEvaluation",
    "generate_completions",
    "load_eval_prompts",
    "load_reward",
    "prompt_label",
    "render_prompt",
    "score",
    "win_rate",
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
    return import_function(spec, "eval.reward")


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


class HeldOutEvaluation:
    """Base and aligned model sampled on the held-out prompts with the same seeds, compared under ``eval.reward``.

    The base model's samples are drawn once (``sample_base``, before any update); each evaluation samples the
    aligned model, writes both side by side to ``<output_dir>/samples/step-N.jsonl`` and reports the win rate.
    Only the main process evaluates.
    """

    def __init__(self, config: LLMEvalConfig, tokenizer: Any, output_dir: str | Path, is_main_process: bool) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.active = config.reward is not None and is_main_process
        self.prompts = load_eval_prompts(config) if config.prompts else []
        self.prompt_texts = [render_prompt(tokenizer, prompt) for prompt in self.prompts]
        self.reward = load_reward(config.reward) if config.reward else None
        self.base_completions: list[str] = []
        self.base_scores: Tensor | None = None
        self.logged: LoggedSamples | None = None  # the last evaluation's completions, for the trackers

    def sample_and_score(self, model: nn.Module) -> tuple[list[str], Tensor]:
        was_training = model.training
        model.eval()
        completions = generate_completions(model, self.tokenizer, self.prompts, self.config)
        model.train(was_training)
        return completions, score(self.reward, self.prompt_texts, completions)

    def sample_base(self, model: nn.Module) -> None:
        if self.active:
            self.base_completions, self.base_scores = self.sample_and_score(model)

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self.active:
            return {}
        completions, aligned_scores = self.sample_and_score(model)
        self.write_samples(completions, aligned_scores, step)
        count = self.config.logged_samples
        self.logged = LoggedSamples(
            [prompt_label(prompt) for prompt in self.prompts[:count]],
            {"base": self.base_completions[:count], "aligned": completions[:count]},
            {"base": self.base_scores[:count].tolist(), "aligned": aligned_scores[:count].tolist()},
            score_name=self.config.reward.split(":")[-1],
        )
        return {
            "win_rate": win_rate(aligned_scores, self.base_scores),
            "reward_aligned": aligned_scores.mean().item(),
            "reward_base": self.base_scores.mean().item(),
        }

    def write_samples(self, completions: list[str], scores: Tensor, step: int) -> None:
        """Base and aligned completions side by side with their rewards, for reading."""
        path = self.output_dir / "samples" / f"step-{step:07d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            for i, prompt in enumerate(self.prompt_texts):
                row = {
                    "prompt": prompt,
                    "base": self.base_completions[i],
                    "base_reward": self.base_scores[i].item(),
                    "aligned": completions[i],
                    "aligned_reward": scores[i].item(),
                }
                out.write(json.dumps(row) + "\n")
