"""``diffalign eval`` for LLMs (``kind: llm_eval``): base and aligned complete the same held-out prompts with the
same seeds, a reward scores every completion, and a report folder is written::

    report.json   the reward's mean ± CI for base and aligned, the paired difference, the win rate of aligned
                  over base with its CI; every prompt with both completions and their rewards
    report.md     the same as a table, and the first ``report.side_by_side`` completions side by side

Intervals are those of :mod:`diffalign.eval.statistics` (Student t for means, Wilson for the win rate), as in
the diffusion report.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from diffalign.config import from_dict, to_dict
from diffalign.eval.statistics import ScorerResult, format_interval
from diffalign.hub import loading
from diffalign.llm.config import LLMEvalRunConfig, LLMModelConfig, LLMTrainConfig
from diffalign.llm.evaluate import (
    generate_completions,
    load_eval_prompts,
    load_reward,
    prompt_label,
    render_prompt,
    score,
)
from diffalign.llm.model import load_model, load_tokenizer, load_trained_policy
from diffalign.training.checkpoint_model import is_checkpoint, read_checkpoint_config, read_checkpoint_model
from diffalign.training.trackers import cell_text

logger = logging.getLogger("diffalign")


def locate_policy(path: str) -> tuple[Path, dict[str, Any] | None]:
    """``model.aligned`` as a folder (a run's ``final/``, a checkpoint, a model folder) and its run's config."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model.aligned: {directory} is not a local directory; give a training output directory, its final/ "
            "folder or a checkpoint"
        )
    if is_checkpoint(directory):
        return directory, read_checkpoint_config(directory)
    if (directory / "final").is_dir():
        directory = directory / "final"
    config_file = directory / "config.yaml"
    return directory, yaml.safe_load(config_file.read_text()) if config_file.is_file() else None


def load_aligned(directory: Path, device: torch.device) -> tuple[nn.Module, str]:
    """The aligned policy (a checkpoint rebuilt from its config, else ``from_pretrained``) and what it was."""
    if is_checkpoint(directory):
        checkpoint = read_checkpoint_model(directory)
        config = from_dict(LLMTrainConfig, checkpoint.settings)
        return load_trained_policy(config.model, checkpoint).to(device), "checkpoint"
    from transformers import AutoModelForCausalLM

    kind = "adapter" if (directory / "adapter_config.json").is_file() else "model"
    with loading("model.aligned", str(directory), "causal language model"):
        model = AutoModelForCausalLM.from_pretrained(directory)
    return model.to(device).eval(), kind


def evaluate(config: LLMEvalRunConfig) -> dict[str, Any]:
    """Run the evaluation of ``config`` and write its report folder; returns what ``report.json`` holds."""
    aligned_dir, run_config = locate_policy(config.model.aligned)
    run_model = (run_config or {}).get("model") or {}
    base = config.model.base or run_model.get("pretrained")
    if not base:
        raise ValueError(
            f"model.base is empty and {aligned_dir} has no config.yaml naming model.pretrained; set model.base"
        )
    revision = config.model.revision if config.model.base else run_model.get("revision")
    device = torch.device(
        config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    base_config = LLMModelConfig(pretrained=base, revision=revision, dtype="float32")
    tokenizer = load_tokenizer(base_config)
    prompts = load_eval_prompts(config.eval)
    prompt_texts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    reward = load_reward(config.eval.reward)

    def complete(model: nn.Module) -> tuple[list[str], torch.Tensor]:
        completions = generate_completions(model.eval(), tokenizer, prompts, config.eval)
        return completions, score(reward, prompt_texts, completions)

    logger.info("sampling the base model %s on %d prompts", base, len(prompts))
    base_completions, base_rewards = complete(load_model(base_config, torch.float32).to(device))
    gc.collect()
    aligned_model, aligned_kind = load_aligned(aligned_dir, device)
    logger.info("sampling the aligned model (%s from %s)", aligned_kind, aligned_dir)
    aligned_completions, aligned_rewards = complete(aligned_model)

    result = ScorerResult(config.eval.reward, config.eval.reward, True, False, base_rewards, aligned_rewards)
    report = {
        "base_model": base,
        "aligned_model": str(aligned_dir),
        "aligned_kind": aligned_kind,
        "prompts": {"source": config.eval.prompts, "count": len(prompts) // config.eval.samples_per_prompt},
        "confidence": config.report.confidence,
        "reward": {"name": config.eval.reward, **result.summary(config.report.confidence)},
        "samples": [
            {
                "index": index,
                "prompt": prompt_label(prompts[index]),
                "prompt_text": prompt_texts[index],  # as the models read it (chat template applied)
                "base": base_completions[index],
                "base_reward": base_rewards[index].item(),
                "aligned": aligned_completions[index],
                "aligned_reward": aligned_rewards[index].item(),
            }
            for index in range(len(prompts))
        ],
        "config": to_dict(config),
    }
    output_dir = Path(config.report.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (output_dir / "report.md").write_text(markdown(report, config))
    logger.info("report written to %s", output_dir / "report.md")
    return report


def markdown(report: dict[str, Any], config: LLMEvalRunConfig) -> str:
    """The settings, the reward's table row and the first completions of both models side by side."""
    entry, settings = report["reward"], config.eval
    win = entry["win_rate"]
    percent = round(100 * report["confidence"])
    lines = [
        "# Evaluation: aligned vs base",
        "",
        f"- base model: `{report['base_model']}`",
        f"- aligned model: `{report['aligned_model']}` ({report['aligned_kind']})",
        f"- prompts: `{report['prompts']['source']}`: {report['prompts']['count']} prompts × "
        f"{settings.samples_per_prompt} samples, seed {settings.seed}",
        f"- sampling: temperature {settings.temperature}, top-p {settings.top_p}, at most {settings.max_new_tokens} "
        "new tokens",
        "",
        f"Means ± {percent}% confidence interval (Student t), the paired difference aligned − base with its interval, "
        "and the win rate of aligned over base on the same prompt and seed (ties count one half; Wilson interval).",
        "",
        "| reward | base | aligned | aligned − base | win rate of aligned (W/T/L) |",
        "|---|---|---|---|---|",
        f"| `{entry['name']}` | {format_interval(entry['base'])} | {format_interval(entry['aligned'])} | "
        f"{format_interval(entry['difference'], signed=True)} | {win['value']:.1%} [{win['low']:.1%}, "
        f"{win['high']:.1%}] ({win['wins']}/{win['ties']}/{win['losses']}) |",
        "",
    ]
    shown = report["samples"][: config.report.side_by_side]
    if shown:
        lines += [
            f"## Completions ({len(shown)} of {len(report['samples'])})",
            "",
            "| prompt | base | reward | aligned | reward |",
            "|---|---|---|---|---|",
            *[
                f"| {cell_text(row['prompt'])} | {cell_text(row['base'])} | {row['base_reward']:.3f} | "
                f"{cell_text(row['aligned'])} | {row['aligned_reward']:.3f} |"
                for row in shown
            ],
            "",
        ]
    return "\n".join(lines)
