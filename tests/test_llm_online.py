"""The online LLM trainer (GRPO, RLOO, online DPO) on the shipped toy LLM: seeded rollouts, the sampling
policy's log-probs on completion tokens, the wiring of the core's advantages and losses (each step's loss
against the core's function on log-probs recomputed here row by row), rollout reuse, rewards and exact resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TOY_LLM, merged, quiet_run
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from diffalign.config import ConfigError, from_dict, load_config
from diffalign.llm.data import tokenize_prompt
from diffalign.llm.online import SAMPLING_STREAM, OnlineLLMRecipe, Rollout, best_and_worst, train
from diffalign.llm.online_config import LLMOnlineTrainConfig
from diffalign.llm.rewards import RewardConfig, RewardFunction, RewardModel
from diffalign.llm.rollout import SeededGumbelSampling, TransformersSampler
from diffalign.losses import PolicyGradientConfig, policy_gradient_loss
from diffalign.model_card import method_name
from diffalign.toy.llm import load_prompts, toy_reward
from diffalign.training import make_accelerator
from diffalign.training.seeding import derived_seed

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = (1.0, 0.5)  # toy_reward and short_answer


def online_config(output_dir: Path, **sections: Any) -> LLMOnlineTrainConfig:
    raw = {
        "kind": "llm_online",
        "method": "grpo",
        "model": {"pretrained": str(TOY_LLM), "trainable": "lora", "lora": {"rank": 4}},
        "data": {"path": str(TOY_LLM / "data" / "prompts_train.jsonl"), "max_rows": 16},
        "rollout": {"group_size": 4, "max_new_tokens": 24, "temperature": 0.8},
        "rewards": [
            {"function": "diffalign.toy.llm:toy_reward", "weight": WEIGHTS[0]},
            {"function": "online_rewards:short_answer", "weight": WEIGHTS[1]},
        ],
        "optim": {"lr": 0.01, "weight_decay": 0.0, "scheduler": "constant"},
        "run": quiet_run(output_dir, max_steps=1, batch_size=2, checkpoint_every=100),
    }
    return from_dict(LLMOnlineTrainConfig, merged(raw, sections))


def make_recipe(tmp_path: Path, **sections: Any) -> OnlineLLMRecipe:
    config = online_config(tmp_path, **sections)
    return OnlineLLMRecipe(config, make_accelerator(config.run))


def prompt_batch(recipe: OnlineLLMRecipe, indices: list[int]) -> dict[str, Any]:
    batch = recipe.collate(indices)
    batch["sample_ids"] = list(indices)
    return batch


def move_policy_off_the_reference(recipe: OnlineLLMRecipe) -> None:
    """LoRA's B starts at zero, so the policy equals its adapter-disabled reference until it is moved."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in recipe.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)


@torch.no_grad()
def logps_row_by_row(model: torch.nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Per-token log-probs of each row's completion from one unpadded forward per row, laid out as the rollout's
    ``[N, L − 1]`` (position t scores token t + 1), 0 elsewhere."""
    out = torch.zeros(rollout.input_ids.shape[0], rollout.input_ids.shape[1] - 1)
    for i in range(rollout.input_ids.shape[0]):
        length = int(rollout.attention_mask[i].sum())
        ids = rollout.input_ids[i, :length]
        logits = model(input_ids=ids[None]).logits[0, :-1].float() / temperature
        logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[1:, None])[:, 0]
        completion = rollout.completion_mask[i, 1:length].bool()
        out[i, : length - 1][completion] = logps[completion]
    return out


def group_normalised(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: (r − mean of the group) / (Bessel std of the group + 1e-4), written out."""
    out = torch.empty_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = group.sum() / group_size
        std = math.sqrt(((group - mean) ** 2).sum() / (group_size - 1))
        out[start : start + group_size] = (group - mean) / (std + 1e-4)
    return out


# --- rollouts ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOY_LLM)
    return tokenizer, AutoModelForCausalLM.from_pretrained(TOY_LLM).eval()


def test_a_completion_depends_only_on_its_prompt_and_seed(toy):
    tokenizer, model = toy
    prompts = [tokenize_prompt(tokenizer, [{"role": "user", "content": p}]) for p in load_prompts("train")[:4]]
    rows = [prompts[i % 4] for i in range(8)]
    seeds = list(range(100, 108))

    def sampler(batch_size: int) -> TransformersSampler:
        return TransformersSampler(
            tokenizer, max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0, batch_size=batch_size
        )

    together = sampler(8).sample(model, rows, seeds)
    reordered = sampler(8).sample(model, rows[5:] + rows[:5], seeds[5:] + seeds[:5])
    in_threes = sampler(3).sample(model, rows, seeds)
    alone = [sampler(1).sample(model, [row], [seed])[0] for row, seed in zip(rows[:2], seeds[:2])]
    assert reordered[3:] + reordered[:3] == together
    assert in_threes == together and alone == together[:2]
    # Rows 0 and 4 ask the same prompt with different seeds: different samples; each ends at EOS or the limit.
    assert together[0] != together[4]
    for completion in together:
        assert completion.count(tokenizer.eos_token_id) <= 1
        assert completion[-1] == tokenizer.eos_token_id or len(completion) == 24


def test_seeded_gumbel_sampling_draws_from_the_warped_softmax(toy):
    tokenizer, _ = toy
    sampler = TransformersSampler(tokenizer, max_new_tokens=1, temperature=0.7, top_p=0.8, top_k=0, batch_size=1)
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    # softmax(logits / T), then the smallest set of most probable tokens reaching top_p, renormalised.
    probs = torch.softmax(logits / 0.7, dim=0)
    order = probs.argsort(descending=True)
    kept = order[: int((probs[order].cumsum(0) < 0.8).sum()) + 1]
    expected = torch.zeros(5)
    expected[kept] = probs[kept] / probs[kept].sum()

    draws = 40000
    scores = logits.repeat(draws, 1)
    for warper in sampler.warpers:
        scores = warper(None, scores)
    generators = [torch.Generator().manual_seed(seed) for seed in range(draws)]
    tokens = SeededGumbelSampling(generators)(None, scores).argmax(dim=-1)
    frequencies = torch.bincount(tokens, minlength=5).float() / draws
    assert 2 <= len(kept) < 5
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)  # 4 standard errors
    assert frequencies[expected == 0].sum() == 0


def test_rollout_keeps_the_sampling_policys_logps_on_completion_tokens(tmp_path):
    recipe = make_recipe(tmp_path)
    batch = prompt_batch(recipe, [3, 7])
    rollout = recipe.collect(recipe.model, batch)
    assert rollout.input_ids.shape[0] == 8 and rollout.rewards.shape == (8, 2)
    torch.testing.assert_close(
        rollout.old_logps, logps_row_by_row(recipe.model, rollout, temperature=0.8), atol=1e-5, rtol=0
    )
    # The rows are the prompts followed by what the sampler draws from each completion's seed.
    completions = recipe.sampler.sample(
        recipe.model,
        [batch["prompt_ids"][i // 4] for i in range(8)],
        [derived_seed(0, SAMPLING_STREAM, sample_id, g) for sample_id in (3, 7) for g in range(4)],
    )
    for i, completion in enumerate(completions):
        prompt = batch["prompt_ids"][i // 4]
        length = len(prompt) + len(completion)
        assert rollout.input_ids[i, :length].tolist() == prompt + completion
        assert rollout.completion_mask[i].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (
            rollout.input_ids.shape[1] - length
        )
    texts = recipe.tokenizer.batch_decode(completions, skip_special_tokens=True)
    prompt_texts = [batch["prompt_texts"][i // 4] for i in range(8)]
    assert rollout.rewards[:, 0].tolist() == pytest.approx([toy_reward(p, c) for p, c in zip(prompt_texts, texts)])


# --- losses: the core's, on what the recipe computes -----------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [{"loss_type": "grpo"}, {"loss_type": "dr_grpo"}, {"loss_type": "dapo"}, {"importance_level": "sequence"}],
    ids=["grpo", "dr_grpo", "dapo", "gspo"],
)
@pytest.mark.parametrize("share_prompt", [False, True])  # each group's prompt run once for its completions
def test_grpo_step_is_the_core_loss_on_recomputed_logps_with_ratio_one(policy, share_prompt, tmp_path):
    recipe = make_recipe(tmp_path, policy={**policy, "beta": 0.05}, model={"share_prompt": share_prompt})
    move_policy_off_the_reference(recipe)  # so the k3 KL term is not zero
    batch = prompt_batch(recipe, [0, 5])
    rollout = recipe.collect(recipe.model, batch)
    total = WEIGHTS[0] * rollout.rewards[:, 0] + WEIGHTS[1] * rollout.rewards[:, 1]
    advantages = group_normalised(total, 4)
    torch.testing.assert_close(rollout.advantages, advantages, atol=1e-5, rtol=1e-5)
    with recipe.model.disable_adapter():
        reference = logps_row_by_row(recipe.model, rollout, temperature=0.8)
    torch.testing.assert_close(rollout.ref_logps, reference, atol=1e-5, rtol=0)

    output = recipe.training_step(recipe.model, batch)  # samples the same rollout again, then the loss
    mask = rollout.completion_mask[:, 1:].float()
    expected = policy_gradient_loss(
        logps_row_by_row(recipe.model, rollout, temperature=0.8),
        rollout.old_logps,
        advantages,
        mask,
        PolicyGradientConfig(**policy, beta=0.05, max_completion_length=24),
        ref_logps=reference,
        num_items=mask.sum(),
    )
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-6, rtol=1e-5)
    # No update between sampling and training: the policy is the sampling policy.
    assert output.metrics["ratio/min"].item() == pytest.approx(1.0, abs=1e-5)
    assert output.metrics["ratio/max"].item() == pytest.approx(1.0, abs=1e-5)
    assert output.metrics["kl"].item() > 0
    output.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.model.parameters() if p.requires_grad)


def test_rloo_advantages_carry_the_k1_kl_in_the_reward(tmp_path):
    recipe = make_recipe(
        tmp_path,
        method="rloo",
        policy={"loss_type": "rloo"},
        advantages={"baseline": "leave_one_out", "scale": "none"},
        rloo={"kl_beta": 0.1},
    )
    move_policy_off_the_reference(recipe)
    batch = prompt_batch(recipe, [2, 9])
    rollout = recipe.collect(recipe.model, batch)
    with recipe.model.disable_adapter():
        reference = logps_row_by_row(recipe.model, rollout, temperature=0.8)
    policy = logps_row_by_row(recipe.model, rollout, temperature=0.8)
    kl = (policy - reference).sum(dim=1)  # Σ_t over completion tokens (0 elsewhere)
    rewards = WEIGHTS[0] * rollout.rewards[:, 0] + WEIGHTS[1] * rollout.rewards[:, 1] - 0.1 * kl
    groups = rewards.view(2, 4)
    leave_one_out = groups - (groups.sum(dim=1, keepdim=True) - groups) / 3
    assert kl.abs().min() > 0
    torch.testing.assert_close(rollout.advantages, leave_one_out.reshape(-1), atol=1e-5, rtol=1e-5)

    output = recipe.training_step(recipe.model, batch)
    ratio = torch.exp(((policy - rollout.old_logps) * rollout.completion_mask[:, 1:]).sum(dim=1))
    expected = -torch.min(ratio * rollout.advantages, ratio.clamp(0.8, 1.2) * rollout.advantages).mean()
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=1e-5)


def test_best_and_worst_pairs_break_ties_as_trl():
    rewards = torch.tensor([0.5, 1.0, 1.0, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3])
    # Group of 5: chosen the first best (1), rejected the last worst (4); a group that ties everywhere still
    # pairs two distinct rows (5 and 9).
    assert best_and_worst(rewards, 5).tolist() == [[1, 4], [5, 9]]
    # G = 2: ties go to the first generation, as TRL's online DPO (chosen = scores[:n] >= scores[n:]).
    assert best_and_worst(torch.tensor([0.3, 0.3, 0.1, 0.9]), 2).tolist() == [[0, 1], [3, 2]]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_online_dpo_step_is_dpo_on_each_groups_best_and_worst(share_prompt, tmp_path):
    recipe = make_recipe(
        tmp_path,
        method="online_dpo",
        loss={"type": ["sigmoid"], "beta": 0.1},
        model={"share_prompt": share_prompt},
    )
    move_policy_off_the_reference(recipe)
    batch = prompt_batch(recipe, [1, 4])
    rollout = recipe.collect(recipe.model, batch)
    total = WEIGHTS[0] * rollout.rewards[:, 0] + WEIGHTS[1] * rollout.rewards[:, 1]
    for group, (chosen, rejected) in enumerate(rollout.pairs.tolist()):
        rows = total[4 * group : 4 * group + 4]
        assert 4 * group <= chosen < 4 * group + 4 and 4 * group <= rejected < 4 * group + 4
        assert total[chosen] == rows.max() and total[rejected] == rows.min() and chosen != rejected

    output = recipe.training_step(recipe.model, batch)
    policy = logps_row_by_row(recipe.model, rollout, temperature=1.0).sum(dim=1)
    with recipe.model.disable_adapter():
        reference = logps_row_by_row(recipe.model, rollout, temperature=1.0).sum(dim=1)
    chosen, rejected = rollout.pairs[:, 0], rollout.pairs[:, 1]
    margin = (policy[chosen] - reference[chosen]) - (policy[rejected] - reference[rejected])
    torch.testing.assert_close(output.loss, -F.logsigmoid(0.1 * margin).mean(), atol=1e-6, rtol=1e-5)
    assert output.metrics["pairs/reward_gap"] >= 0


def test_rollouts_are_reused_for_the_configured_iterations(tmp_path):
    recipe = make_recipe(tmp_path, rollout={"iterations": 2})
    optimizer = torch.optim.SGD([p for p in recipe.model.parameters() if p.requires_grad], lr=1.0)
    first = recipe.rollout_for(recipe.model, prompt_batch(recipe, [0, 1]))
    loss, _ = recipe.policy_gradient_loss(recipe.model, first)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    # The second step trains on the same rollout (its batch's prompts are not sampled), now off-policy.
    second = recipe.rollout_for(recipe.model, prompt_batch(recipe, [2, 3]))
    for name in ("input_ids", "old_logps", "advantages", "rewards"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    _, metrics = recipe.policy_gradient_loss(recipe.model, second)
    assert metrics["ratio/max"] - metrics["ratio/min"] > 1e-3
    third = recipe.rollout_for(recipe.model, prompt_batch(recipe, [2, 3]))
    assert not torch.equal(third.input_ids[:, :4], first.input_ids[:, :4])  # new prompts sampled


# --- rewards ----------------------------------------------------------------------------------------------------


def test_a_stochastic_reward_function_is_seeded_per_row_and_leaves_the_global_rng_alone():
    reward = RewardFunction("online_rewards:noisy_toy_reward")
    prompts = ["Give me two animals, one per line."] * 3
    completions = ["cat\ndog", "cat\ndog", "- cat"]
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected_next = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    first = reward(prompts, prompts, completions, seeds=[11, 12, 13])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_next
    again = reward(prompts, prompts, completions, seeds=[11, 12, 13])
    other = reward(prompts, prompts, completions, seeds=[11, 99, 13])
    assert torch.equal(first, again) and first[0] != first[1] and other[1] != first[1]
    noise = first - torch.tensor([toy_reward(p, c) for p, c in zip(prompts, completions)])
    random.seed(11)
    assert noise[0].item() == pytest.approx(0.1 * random.random(), abs=1e-6)


def test_a_reward_model_scores_by_its_first_logit(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOY_LLM)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = RewardModel(RewardConfig(model=str(tmp_path / "rm"), batch_size=2), torch.device("cpu"), torch.float32)
    prompts = [[{"role": "user", "content": "List two cats one per line."}], "Name two metals. "]
    prompt_texts = [tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True), prompts[1]]
    completions = ["cat\ndog", "iron, tin"]
    scores = reward(prompts, prompt_texts, completions, seeds=[0, 1])
    # The chat prompt gets the template over prompt + answer messages; the plain one is concatenated.
    texts = [
        "<|user|>\nList two cats one per line.<|end|><|assistant|>\ncat\ndog<|end|>",
        "Name two metals. iron, tin",
    ]
    assert reward.texts(prompts, prompt_texts, completions) == texts
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        expected = [model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0] for text in texts]
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=0)
    assert scores[0] != scores[1]


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"method": "rloo"}, "method: rloo .* takes policy.loss_type: rloo and advantages.baseline: leave_one_out"),
        ({"policy": {"loss_type": "rloo"}}, "use method: rloo"),
        ({"reference": {"strategy": "precomputed"}}, "online completions are new"),
        ({"rewards": []}, "rewards is empty"),
        ({"advantages": {"reward_weights": [1.0, 2.0]}}, r"rewards\[i\].weight"),
        ({"method": "online_dpo", "loss": {"type": ["kto"]}}, r"unpaired losses \['kto'\]"),
        ({"rollout": {"group_size": 1}}, "at least 2 completions"),
        ({"rewards": [{"function": "diffalign.toy.llm.toy_reward"}]}, "must be 'module:function'"),
    ],
)
def test_bad_online_configs_fail_before_any_model_loads(sections, message, tmp_path):
    raw = {key: value for key, value in sections.items()}
    with pytest.raises(ConfigError, match=message):
        online_config(tmp_path, **raw)


def test_the_toy_configs_load_with_their_methods():
    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(root / "toy_llm_grpo.yaml").method == "grpo"
    online_dpo = load_config(root / "toy_llm_online_dpo.yaml")
    assert online_dpo.method == "online_dpo" and online_dpo.reference_strategy == "adapter_disabled"


# --- resumption -------------------------------------------------------------------------------------------------


def losses(output: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def test_resume_mid_run_is_exact(tmp_path):
    """Checkpoint after step 3 of 4 (2 micro-batches a step, each window's rollouts trained on twice, a
    stochastic reward): the resumed step 4 trains on the checkpointed rollouts exactly as the uninterrupted run."""
    sections = dict(
        rollout={"iterations": 2, "group_size": 2},
        rewards=[{"function": "online_rewards:noisy_toy_reward"}],
        run={"max_steps": 4, "checkpoint_every": 3, "gradient_accumulation_steps": 2},
    )
    train(online_config(tmp_path / "straight", **sections))
    stopped = merged(sections, {"run": {"max_steps": 3}})
    train(online_config(tmp_path / "resumed", **stopped))
    extra = torch.load(tmp_path / "resumed" / "checkpoints" / "step-0000003" / "extra.pt", weights_only=False)
    assert extra["micro_batches"] == 6 and len(extra["window_rollouts"]) == 2
    train(online_config(tmp_path / "resumed", **merged(sections, {"run": {"resume": "latest"}})))
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "trainable.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000004" / "trainable.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(set(losses(tmp_path / "straight").values())) == 4


def test_the_model_card_names_the_online_method_and_its_loss():
    grpo = {"kind": "llm_online", "method": "grpo", "policy": {"loss_type": "dapo"}, "loss": {"type": ["sigmoid"]}}
    online_dpo = {"kind": "llm_online", "method": "online_dpo", "loss": {"type": ["ipo"]}}
    dragon = {"kind": "diffusion", "method": {"name": "dragon"}, "loss": {"type": ["sigmoid"]}}
    assert method_name(grpo) == "grpo (dapo)"  # policy:'s loss, not the unused loss: section
    assert method_name(online_dpo) == "online_dpo (ipo)"
    assert method_name(dragon) == "dragon (sigmoid)"
