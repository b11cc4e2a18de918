"""The LLM preference trainer: a recipe for the shared training loop.

It loads the policy and tokenizer, tokenizes the preference data, sets up the reference (frozen copy, adapter
disabled, or precomputed log-probs), and in each step turns a batch into summed completion log-probs, the
core's ``PairScores`` and the loss. Evaluation samples held-out prompts from the base model (once, before
training) and from the aligned model with the same seeds, and reports the win rate under a reward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn

from diffalign.llm.batching import PreferenceDataset
from diffalign.llm.config import LLMTrainConfig
from diffalign.llm.data import PairItem, UnpairedItem, assign_mismatched_completions, load_preference_items
from diffalign.llm.evaluate import (
    generate_completions,
    load_eval_prompts,
    load_reward,
    render_prompt,
    score,
    win_rate,
)
from diffalign.llm.logprobs import completion_logps
from diffalign.llm.model import (
    frozen_copy,
    load_model,
    load_tokenizer,
    make_trainable,
    save_policy,
    weight_dtype,
)
from diffalign.llm.reference import ModelReference, load_or_precompute, precomputed_reference
from diffalign.losses import LOSSES, PairScores
from diffalign.training import Recipe, StepOutput, make_accelerator, run_training
from diffalign.training.distributed import compute_loss_on_global_batch, mean_over_processes

logger = logging.getLogger("diffalign")

ROW_KEYS = ("input_ids", "attention_mask", "completion_mask")


def select_rows(batch: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    return {key: batch[key][rows] for key in ROW_KEYS}


def unpair(items: list[PairItem]) -> list[UnpairedItem]:
    """Paired data for unpaired losses: each chosen is a desirable sample, each rejected an undesirable one
    (TRL's ``unpair_preference_dataset``)."""
    out = []
    for item in items:
        out.append(UnpairedItem(item.prompt_ids, item.chosen_ids, desirable=True))
        out.append(UnpairedItem(item.prompt_ids, item.rejected_ids, desirable=False))
    return out


class LLMRecipe(Recipe):
    def __init__(self, config: LLMTrainConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.tokenizer = load_tokenizer(config.model)
        model = load_model(config.model, weight_dtype(config.model, accelerator.mixed_precision))
        model.to(accelerator.device)

        self.train_dataset = self._build_dataset()
        self.collate = self.train_dataset.collate

        # Base-model samples are drawn before any update, whatever the reference strategy keeps in memory.
        self.eval_prompts = load_eval_prompts(config.eval) if config.eval.prompts else []
        self.eval_prompt_texts = [render_prompt(self.tokenizer, prompt) for prompt in self.eval_prompts]
        self.reward = load_reward(config.eval.reward) if config.eval.reward else None
        self.base_completions: list[str] = []
        self.base_scores: Tensor | None = None
        if self.reward is not None and accelerator.is_main_process:
            self.base_completions, self.base_scores = self._sample_and_score(model)

        strategy = config.reference_strategy
        self.reference: Any = None
        if strategy == "precomputed":
            self.train_dataset.reference_logps = load_or_precompute(
                model,
                self.tokenizer,
                self.train_dataset,
                cache_dir=config.reference.cache_dir,
                batch_size=config.reference.batch_size,
                accelerator=accelerator,
            )
            self.reference = precomputed_reference
        elif strategy == "frozen_copy":
            self.reference = ModelReference(frozen_copy(model), adapter_disabled=False)
        self.model = make_trainable(model, config.model, config.run.gradient_checkpointing)
        if strategy == "adapter_disabled":
            self.reference = ModelReference(self.model, adapter_disabled=True)
        logger.info("reference: %s", strategy)

    def _build_dataset(self) -> PreferenceDataset:
        config = self.config
        items, self.data_stats = load_preference_items(config.data, self.tokenizer)
        uses_kto = "kto" in config.loss.type
        if isinstance(items[0], PairItem) and uses_kto:
            items = unpair(items)
        if uses_kto:
            assign_mismatched_completions(items)
        if isinstance(items[0], UnpairedItem):
            paired = [name for name in config.loss.type if LOSSES[name].paired]
            if paired:
                raise ValueError(
                    f"data.path={config.data.path!r} is unpaired (prompt/completion/label) but loss.type has paired "
                    f"losses {paired}; use kto/npo/sft or paired data"
                )
        return PreferenceDataset(
            items,
            pad_token_id=self.tokenizer.pad_token_id,
            padding_side=config.data.padding_side,
            with_mismatched=uses_kto,
        )

    # --- training -----------------------------------------------------------------------------------------------
    def pair_scores(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[PairScores, dict[str, Tensor]]:
        """The core's inputs for a batch: summed completion log-probs of policy and reference, and lengths."""
        size = len(batch["index"])
        reference = self.reference(batch) if self.reference is not None else None
        if self.train_dataset.paired:
            logps, lengths = completion_logps(model, **select_rows(batch, slice(None)))
            scores = PairScores(
                policy_chosen=logps[:size],
                policy_rejected=logps[size:],
                ref_chosen=reference[:size] if reference is not None else None,
                ref_rejected=reference[size:] if reference is not None else None,
                chosen_lengths=lengths[:size],
                rejected_lengths=lengths[size:],
            )
            return scores, {}

        logps, lengths = completion_logps(model, **select_rows(batch, slice(0, size)))
        desirable = batch["desirable"]
        metrics = {}
        kl_reference_point = None
        if self.train_dataset.with_mismatched:
            # KTO's z0: a detached batch estimate of KL(πθ‖πref) from mismatched pairs, mean over all processes,
            # clamped at 0 (Ethayarajh et al., arXiv 2402.01306).
            with torch.no_grad():
                mismatched, _ = completion_logps(model, **select_rows(batch, slice(size, None)))
            kl_reference_point = mean_over_processes(mismatched - reference[size:]).clamp(min=0)
            metrics["kl_reference_point"] = kl_reference_point
        reference = reference[:size] if reference is not None else None
        scores = PairScores(
            policy_chosen=logps[desirable],
            policy_rejected=logps[~desirable],
            ref_chosen=reference[desirable] if reference is not None else None,
            ref_rejected=reference[~desirable] if reference is not None else None,
            chosen_lengths=lengths[desirable],
            rejected_lengths=lengths[~desirable],
            kl_reference_point=kl_reference_point,
        )
        return scores, metrics

    def training_step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        scores, metrics = self.pair_scores(model, batch)
        # Batch-level losses (AOT) sort the scores of every process's pairs, not just this process's.
        output = compute_loss_on_global_batch(scores, self.config.loss)
        return StepOutput(
            loss=output.loss,
            metrics={**output.metrics, **metrics},
            counts={"pairs": len(batch["index"]), "tokens": batch["attention_mask"].sum().item()},
        )

    # --- evaluation ---------------------------------------------------------------------------------------------
    def _sample_and_score(self, model: nn.Module) -> tuple[list[str], Tensor]:
        was_training = model.training
        model.eval()
        completions = generate_completions(model, self.tokenizer, self.eval_prompts, self.config.eval)
        model.train(was_training)
        return completions, score(self.reward, self.eval_prompt_texts, completions)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.reward is None or not self.accelerator.is_main_process:
            return {}
        completions, aligned_scores = self._sample_and_score(model)
        self._write_samples(completions, aligned_scores, step)
        return {
            "win_rate": win_rate(aligned_scores, self.base_scores),
            "reward_aligned": aligned_scores.mean().item(),
            "reward_base": self.base_scores.mean().item(),
        }

    def _write_samples(self, completions: list[str], scores: Tensor, step: int) -> None:
        """Base and aligned completions side by side with their rewards, for reading."""
        path = Path(self.config.run.output_dir) / "samples" / f"step-{step:07d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as out:
            for i, prompt in enumerate(self.eval_prompt_texts):
                row = {
                    "prompt": prompt,
                    "base": self.base_completions[i],
                    "base_reward": self.base_scores[i].item(),
                    "aligned": completions[i],
                    "aligned_reward": scores[i].item(),
                }
                out.write(json.dumps(row) + "\n")

    # --- export -------------------------------------------------------------------------------------------------
    def save_final(self, model: nn.Module, output_dir: Path) -> None:
        save_policy(model, self.tokenizer, self.config.model, output_dir)


def train(config: LLMTrainConfig) -> dict[str, float]:
    """Align ``config.model`` on ``config.data``; returns the final metrics (``eval/win_rate`` with a reward)."""
    accelerator = make_accelerator(config.run)
    set_seed(config.run.seed)
    recipe = LLMRecipe(config, accelerator)
    return run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)
