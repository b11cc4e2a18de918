"""The LLM preference trainer: a recipe for the shared training loop.

It loads the policy and tokenizer, tokenizes the preference data, sets up the reference (frozen copy, adapter
disabled, or precomputed log-probs; moved towards the policy every few steps with TR-DPO's
``reference.sync_steps``), and in each step turns a batch into summed completion log-probs (per-token ones too
when a token-level loss or option is configured), the core's ``PairScores`` and the loss. Evaluation samples held-out prompts from the base model (once, before
training) and from the aligned model with the same seeds, and reports the win rate under a reward.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn

from diffalign.llm.batching import PreferenceDataset, PreferenceStream
from diffalign.llm.config import LLMTrainConfig
from diffalign.llm.data import PairItem, UnpairedItem, assign_mismatched_completions, load_preference_items
from diffalign.llm.evaluate import HeldOutEvaluation
from diffalign.llm.logprobs import completion_logps
from diffalign.llm.model import (
    frozen_copy,
    load_model,
    load_tokenizer,
    make_trainable,
    policy_card_facts,
    save_policy,
    weight_dtype,
)
from diffalign.llm.reference import ModelReference, load_or_precompute, precomputed_reference
from diffalign.llm.scores import paired_scores, select_rows
from diffalign.losses import LOSSES, PairScores
from diffalign.model_card import CardFacts
from diffalign.preflight import preflight_llm
from diffalign.training import Recipe, StepOutput, make_accelerator, run_training
from diffalign.training.distributed import compute_loss_on_global_batch, mean_over_processes
from diffalign.training.engines import shards_parameters
from diffalign.training.loss_state import MarginBaseline
from diffalign.training.reference_sync import ReferenceSync
from diffalign.training.trackers import LoggedSamples

logger = logging.getLogger("diffalign")

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
        self.evaluation = HeldOutEvaluation(
            config.eval, self.tokenizer, config.run.output_dir, accelerator.is_main_process
        )
        self.evaluation.sample_base(model)

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
                layout=config.model.layout,
            )
            self.reference = precomputed_reference
        elif strategy == "frozen_copy":
            self.reference = ModelReference(
                frozen_copy(model), adapter_disabled=False, layout=config.model.layout
            )
        self.model = make_trainable(model, config.model, config.run.gradient_checkpointing)
        if strategy == "adapter_disabled":
            self.reference = ModelReference(self.model, adapter_disabled=True, layout=config.model.layout)
        logger.info("reference: %s", strategy)
        self.token_inputs = config.loss.needed_inputs()
        self.reference_sync = None
        if config.reference.sync_steps is not None:
            if shards_parameters(accelerator):
                raise ValueError(
                    "reference.sync_steps (TR-DPO) is not supported under FSDP or ZeRO-3, where the policy's "
                    "parameters are sharded; use DDP or ZeRO-2, or set reference.sync_steps: null"
                )
            self.reference_sync = ReferenceSync(
                self.reference.model,
                every=config.reference.sync_steps,
                alpha=config.reference.mixup_alpha,
                accumulation_steps=config.run.gradient_accumulation_steps,
            )
        self.margin_baseline = MarginBaseline() if "beta_dpo" in config.loss.type else None
        self.micro_batches = 0  # seen by training_step, for the reference's sync steps

    def _build_dataset(self) -> PreferenceDataset | PreferenceStream:
        config = self.config
        uses_kto = "kto" in config.loss.type
        if config.data.streaming:
            self.data_stats = None  # a stream counts its rows as it reads them
            dataset: PreferenceDataset | PreferenceStream = PreferenceStream(
                config.data,
                self.tokenizer,
                seed=config.run.seed,
                pad_token_id=self.tokenizer.pad_token_id,
                padding_side=config.data.padding_side,
            )
        else:
            items, self.data_stats = load_preference_items(config.data, self.tokenizer)
            if uses_kto:  # KTO's mismatched completions are assigned to items held in memory
                items = unpair(items) if isinstance(items[0], PairItem) else list(items)
                assign_mismatched_completions(items)
            dataset = PreferenceDataset(
                items,
                pad_token_id=self.tokenizer.pad_token_id,
                padding_side=config.data.padding_side,
                with_mismatched=uses_kto,
            )
        paired_losses = [name for name in config.loss.type if LOSSES[name].paired]
        if not dataset.paired and paired_losses:
            raise ValueError(
                f"data.path={config.data.path!r} is unpaired (prompt/completion/label) but loss.type has paired "
                f"losses {paired_losses}; use kto/npo/sft or paired data"
            )
        return dataset

    # --- training -----------------------------------------------------------------------------------------------
    def pair_scores(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[PairScores, dict[str, Tensor]]:
        """The core's inputs for a batch: summed completion log-probs of policy and reference, and lengths
        (and the per-token values when a configured loss or option needs them)."""
        size = len(batch["index"])
        layout = self.config.model.layout
        if self.train_dataset.paired:
            scores = paired_scores(model, batch, size, self.reference, self.token_inputs, layout=layout)
            return scores, {}
        reference = self.reference(batch) if self.reference is not None else None
        logps, lengths = completion_logps(model, **select_rows(batch, slice(0, size)), layout=layout)
        desirable = batch["desirable"]
        metrics = {}
        kl_reference_point = None
        if self.train_dataset.with_mismatched:
            # KTO's z0: a detached batch estimate of KL(πθ‖πref) from mismatched pairs, mean over all processes,
            # clamped at 0 (Ethayarajh et al., arXiv 2402.01306).
            with torch.no_grad():
                mismatched, _ = completion_logps(
                    model, **select_rows(batch, slice(size, None)), layout=layout
                )
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
        if self.reference_sync is not None:
            self.reference_sync.before_micro_batch(self.micro_batches, model)
        self.micro_batches += 1
        scores, metrics = self.pair_scores(model, batch)
        if self.margin_baseline is not None:
            scores = self.margin_baseline.update(scores)
        # Batch-level losses (AOT, β-DPO) see the scores of every process's pairs, not just this process's.
        output = compute_loss_on_global_batch(scores, self.config.loss)
        return StepOutput(
            loss=output.loss,
            metrics={**output.metrics, **metrics},
            counts={"pairs": len(batch["index"]), "tokens": batch["attention_mask"].sum().item()},
        )

    # --- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return self.evaluation(model, step)

    # --- resumption ---------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"micro_batches": self.micro_batches}
        if self.reference_sync is not None:  # the moved reference, not the initial model
            state["reference"] = self.reference_sync.state_dict()
        if self.margin_baseline is not None:
            state["margin_baseline"] = self.margin_baseline.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.micro_batches = state.get("micro_batches", 0)
        if self.reference_sync is not None and "reference" in state:
            self.reference_sync.load_state_dict(state["reference"])
        if self.margin_baseline is not None and "margin_baseline" in state:
            self.margin_baseline.load_state_dict(state["margin_baseline"])

    def logged_samples(self) -> LoggedSamples | None:
        return self.evaluation.logged

    # --- export -------------------------------------------------------------------------------------------------
    def card_facts(self) -> CardFacts:
        return policy_card_facts(self.config.model)

    def save_final(self, model: nn.Module, output_dir: Path) -> None:
        save_policy(model, self.tokenizer, self.config.model, output_dir)


def train(config: LLMTrainConfig) -> dict[str, float]:
    """Align ``config.model`` on ``config.data``; returns the final metrics (``eval/win_rate`` with a reward)."""
    preflight_llm(config)
    accelerator = make_accelerator(config.run)
    set_seed(config.run.seed)
    recipe = LLMRecipe(config, accelerator)
    return run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)
