"""The online LLM trainer (``kind: llm_online``): GRPO and its variants, RLOO and online DPO, as a recipe for the
shared training loop.

Every micro-batch of B prompts is first a rollout, without gradients:

1. G completions per prompt from the current policy (``llm/rollout.py``), completion g of the prompt with sample
   id s seeded from ``(run.seed, s, g)``;
2. their rewards (``llm/rewards.py``), ``[B·G, K]`` for K weighted rewards, each call seeded the same way;
3. for the policy-gradient methods, the per-token log-probs of the sampling policy (``old_logps``) and, when a
   KL needs them, of the reference; then the advantages (``losses.advantages.compute_advantages``) over the
   rewards of every process's micro-batch, so batch-level scales equal those of one process with the global
   batch.

Then the loss, with gradients:

- ``grpo``, ``rloo``: the policy's per-token log-probs of the same rows recomputed and fed, with the old ones,
  the advantages, the completion mask and the reference's log-probs, to ``losses.policy_gradient_loss``.
  DAPO's normaliser is the active tokens of the micro-batch over all processes divided by their number (TRL
  normalises over a whole accumulation window; the same when ``run.gradient_accumulation_steps`` is 1).
- ``online_dpo``: each group's best and worst completion as a pair (``best_and_worst``) for the core's pair
  losses (``llm/scores.py``, as the offline trainer).

With ``rollout.iterations`` μ > 1 the rollouts of an accumulation window are kept and trained on for μ optimizer
steps (GRPO's μ, TRL's ``num_iterations``), and are part of the checkpoint, so a run resumed in the middle of
the μ steps trains on the same rollouts. Log-probs are of ``softmax(logits / rollout.temperature)``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather, set_seed
from torch import Tensor, nn

from diffalign.llm.batching import collate_rows
from diffalign.llm.evaluate import HeldOutEvaluation
from diffalign.llm.logprobs import completion_token_logps
from diffalign.llm.model import (
    frozen_copy,
    load_model,
    load_tokenizer,
    make_trainable,
    policy_card_facts,
    save_policy,
    weight_dtype,
)
from diffalign.llm.online_config import LLMOnlineTrainConfig
from diffalign.llm.prompts import PromptDataset, load_prompt_items
from diffalign.llm.reference import ModelReference
from diffalign.llm.rewards import load_rewards, score_completions
from diffalign.llm.rollout import build_sampler
from diffalign.llm.scores import ROW_KEYS, paired_scores
from diffalign.losses import compute_advantages, kl_penalised_rewards, policy_gradient_loss
from diffalign.losses.advantages import combine_rewards, grouped, std_of
from diffalign.model_card import CardFacts
from diffalign.training import Recipe, StepOutput, make_accelerator, run_training
from diffalign.training.distributed import compute_loss_on_global_batch
from diffalign.training.seeding import derived_seed
from diffalign.training.trackers import LoggedSamples

logger = logging.getLogger("diffalign")

# Random streams of a prompt's visit (see derived_seed): its completions' sampling and its rewards.
SAMPLING_STREAM, REWARD_STREAM = 1, 2


@dataclass
class Rollout:
    """One micro-batch's scored groups: rows laid out group by group, ``[prompt 0: g = 0..G−1, prompt 1: ...]``."""

    input_ids: Tensor  # [N, L] prompt + completion, right-padded
    attention_mask: Tensor
    completion_mask: Tensor
    rewards: Tensor  # [N, K], one column per configured reward
    advantages: Tensor | None = None  # [N] (grpo, rloo)
    old_logps: Tensor | None = None  # [N, L − 1] the sampling policy's per-token log-probs (grpo, rloo)
    ref_logps: Tensor | None = None  # [N, L − 1] the reference's, where a KL needs them
    pairs: Tensor | None = None  # [P, 2] rows of each group's chosen and rejected completion (online_dpo)
    num_items: float = 1.0  # DAPO's normaliser (module docstring)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Rollout:
        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {key: move(item) for key, item in value.items()}
            return value

        return Rollout(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @property
    def rows(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in ROW_KEYS}


def repeat_each(values: list[Any], times: int) -> list[Any]:
    """``[a, b] → [a, a, b, b]`` for ``times`` 2: every prompt's entry once per completion of its group."""
    return [value for value in values for _ in range(times)]


def best_and_worst(rewards: Tensor, group_size: int) -> Tensor:
    """``[P, 2]`` row indices of each group's chosen and rejected completion: the first with the highest reward
    and the last with the lowest. With G = 2 a tie makes the first generation chosen, as TRL's OnlineDPOTrainer
    (``scores[:n] >= scores[n:]``); a group whose rewards all tie still gives two distinct rows."""
    groups = grouped(rewards, group_size)
    best = groups.argmax(dim=1)  # the first maximum
    worst = group_size - 1 - groups.flip(dims=[1]).argmin(dim=1)  # the last minimum
    offsets = torch.arange(groups.shape[0], device=rewards.device) * group_size
    return torch.stack([best + offsets, worst + offsets], dim=1)


class OnlineLLMRecipe(Recipe):
    def __init__(self, config: LLMOnlineTrainConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.tokenizer = load_tokenizer(config.model)
        dtype = weight_dtype(config.model, accelerator.mixed_precision)
        model = load_model(config.model, dtype).to(accelerator.device)
        self.train_dataset = PromptDataset(load_prompt_items(config.data, self.tokenizer))
        self.collate = self.train_dataset.collate

        self.evaluation = HeldOutEvaluation(
            config.eval, self.tokenizer, config.run.output_dir, accelerator.is_main_process
        )
        self.evaluation.sample_base(model)

        strategy = config.reference_strategy
        reference_model = frozen_copy(model) if strategy == "frozen_copy" else None
        self.model = make_trainable(model, config.model, config.run.gradient_checkpointing)
        self.reference: ModelReference | None = None
        if strategy != "none":
            self.reference = ModelReference(
                reference_model if reference_model is not None else self.model,
                adapter_disabled=strategy == "adapter_disabled",
                layout=config.model.layout,
            )
        logger.info("method: %s, reference: %s", config.method, strategy)

        self.rewards = load_rewards(config.rewards, accelerator.device, dtype)
        self.sampler = build_sampler(config, self.tokenizer, dtype)
        # Dr. GRPO's L_max is the completion budget (TRL's max_completion_length), not the padded row width.
        self.policy_config = dataclasses.replace(
            config.policy,
            max_completion_length=config.policy.max_completion_length or config.rollout.max_new_tokens,
        )
        self.advantage_config = dataclasses.replace(
            config.advantages, reward_weights=[reward.weight for reward in config.rewards]
        )
        self.token_inputs = config.loss.needed_inputs()
        self.micro_batches = 0  # seen by training_step: where the rollout cycle stands
        self.window_rollouts: list[Rollout] = []  # kept for the window's reuse when rollout.iterations > 1

    # --- rollouts -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, model: nn.Module, batch: dict[str, Any]) -> Rollout:
        """Sample, score and (for the policy-gradient methods) prepare the advantages of a batch of prompts."""
        group_size = self.config.rollout.group_size
        policy = self.accelerator.unwrap_model(model)
        prompt_ids = repeat_each(batch["prompt_ids"], group_size)
        visits = [(sample_id, g) for sample_id in batch["sample_ids"] for g in range(group_size)]
        seed = self.config.run.seed
        was_training = policy.training
        policy.eval()
        completions = self.sampler.sample(
            policy, prompt_ids, [derived_seed(seed, SAMPLING_STREAM, s, g) for s, g in visits]
        )
        policy.train(was_training)
        rows = collate_rows(prompt_ids, completions, self.tokenizer.pad_token_id, "right")
        rows = {key: value.to(self.accelerator.device) for key, value in rows.items()}
        rewards = score_completions(
            self.rewards,
            repeat_each(batch["prompts"], group_size),
            repeat_each(batch["prompt_texts"], group_size),
            self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            [derived_seed(seed, REWARD_STREAM, s, g) for s, g in visits],
        ).to(self.accelerator.device)
        ended = torch.tensor(
            [ids[-1:] == [self.tokenizer.eos_token_id] for ids in completions], dtype=torch.float32
        )
        rollout = Rollout(**rows, rewards=rewards)
        rollout.metrics = self._rollout_metrics(rollout, ended.to(self.accelerator.device))
        if self.config.method == "online_dpo":
            total = combine_rewards(rewards, self.advantage_config.reward_weights)
            rollout.pairs = best_and_worst(total, group_size)
            gaps = gather(total[rollout.pairs[:, 0]] - total[rollout.pairs[:, 1]])
            rollout.metrics["pairs/reward_gap"] = gaps.mean()
            rollout.metrics["pairs/ties"] = (gaps == 0).float().mean()
        else:
            self._add_advantages(policy, rollout)
        return rollout

    def _add_advantages(self, policy: nn.Module, rollout: Rollout) -> None:
        """Old (and reference) log-probs, and the advantages from the rewards of the global batch."""
        config = self.config
        old = completion_token_logps(
            policy, **rollout.rows, temperature=config.rollout.temperature, layout=config.model.layout
        )
        rollout.old_logps = old.token_logps
        if self.reference is not None:
            rollout.ref_logps = self.reference.tokens(
                rollout.rows, temperature=config.rollout.temperature
            ).token_logps
        scored = rollout.rewards
        if config.method == "rloo" and rollout.ref_logps is not None:
            total = combine_rewards(rollout.rewards, self.advantage_config.reward_weights)
            scored = kl_penalised_rewards(
                total, rollout.old_logps, rollout.ref_logps, old.mask, config.rloo.kl_beta
            )
            rollout.metrics["kl"] = ((rollout.old_logps - rollout.ref_logps) * old.mask).sum(dim=-1).mean()
        # Every process's rewards (equal batch sizes), so batch scales and GDPO's batch z-score are global.
        global_rewards = gather(scored)
        advantages = compute_advantages(global_rewards, config.rollout.group_size, self.advantage_config)
        size = scored.shape[0]
        rank = self.accelerator.process_index
        rollout.advantages = advantages[rank * size : (rank + 1) * size]
        rollout.num_items = (gather(old.mask.sum().reshape(1)).sum() / self.accelerator.num_processes).item()

    def _rollout_metrics(self, rollout: Rollout, ended: Tensor) -> dict[str, Tensor]:
        """Reward mean and spread, per-reward means and completion lengths, over every process's rollouts."""
        rewards = gather(rollout.rewards)
        total = combine_rewards(rewards, self.advantage_config.reward_weights)
        groups = grouped(total, self.config.rollout.group_size)
        group_std = std_of(groups, dim=1)
        metrics = {
            "reward/mean": total.mean(),
            "reward/std": std_of(total),
            "reward/group_std": group_std.mean(),
            "reward/zero_std_groups": (group_std == 0).float().mean(),
            "completions/length": gather(rollout.completion_mask.sum(dim=-1).float()).mean(),
            "completions/truncated": 1.0 - gather(ended).mean(),
        }
        for column, reward in enumerate(self.config.rewards):
            metrics[f"reward/{reward.name}"] = rewards[:, column].mean()
        return metrics

    # --- training -----------------------------------------------------------------------------------------------
    def rollout_for(self, model: nn.Module, batch: dict[str, Any]) -> Rollout:
        """This micro-batch's rollout: sampled now at the first of the μ steps on a window, kept ones after."""
        accumulation = self.config.run.gradient_accumulation_steps
        iterations = self.config.rollout.iterations
        window, position = divmod(self.micro_batches, accumulation)
        self.micro_batches += 1
        if window % iterations != 0:
            return self.window_rollouts[position].to(self.accelerator.device)
        rollout = self.collect(model, batch)
        if iterations > 1:
            if position == 0:
                self.window_rollouts = []
            self.window_rollouts.append(rollout.to("cpu"))
        return rollout

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        rollout = self.rollout_for(model, batch)
        if self.config.method == "online_dpo":
            loss, metrics = self.pair_loss(model, rollout)
        else:
            loss, metrics = self.policy_gradient_loss(model, rollout)
        return StepOutput(
            loss=loss,
            metrics={**rollout.metrics, **metrics},
            counts={"completions": rollout.input_ids.shape[0], "tokens": rollout.attention_mask.sum().item()},
        )

    def policy_gradient_loss(self, model: nn.Module, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        new = completion_token_logps(
            model,
            **rollout.rows,
            temperature=self.config.rollout.temperature,
            layout=self.config.model.layout,
        )
        output = policy_gradient_loss(
            new.token_logps,
            rollout.old_logps,
            rollout.advantages,
            new.mask,
            self.policy_config,
            ref_logps=rollout.ref_logps if self.policy_config.beta > 0 else None,
            num_items=rollout.num_items,
        )
        return output.loss, output.metrics

    def pair_loss(self, model: nn.Module, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        rows = torch.cat([rollout.pairs[:, 0], rollout.pairs[:, 1]])
        batch = {key: value[rows] for key, value in rollout.rows.items()}
        scores = paired_scores(
            model,
            batch,
            rollout.pairs.shape[0],
            self.reference,
            self.token_inputs,
            layout=self.config.model.layout,
        )
        output = compute_loss_on_global_batch(scores, self.config.loss)
        return output.loss, output.metrics

    # --- evaluation, resumption, export -------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return self.evaluation(model, step)

    def logged_samples(self) -> LoggedSamples | None:
        return self.evaluation.logged

    def card_facts(self) -> CardFacts:
        return policy_card_facts(self.config.model)

    def extra_state(self) -> dict[str, Any]:
        return {
            "micro_batches": self.micro_batches,
            "window_rollouts": [dataclasses.asdict(rollout) for rollout in self.window_rollouts],
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.micro_batches = state["micro_batches"]
        self.window_rollouts = [Rollout(**rollout) for rollout in state["window_rollouts"]]

    def save_final(self, model: nn.Module, output_dir: Path) -> None:
        save_policy(model, self.tokenizer, self.config.model, output_dir)


def train(config: LLMOnlineTrainConfig) -> dict[str, float]:
    """Align ``config.model`` online on ``config.data``'s prompts; returns the final metrics."""
    accelerator = make_accelerator(config.run)
    if config.rollout.backend == "vllm":
        from diffalign.llm.vllm_sampler import require_vllm

        require_vllm(accelerator)
    set_seed(config.run.seed)
    recipe = OnlineLLMRecipe(config, accelerator)
    return run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)
