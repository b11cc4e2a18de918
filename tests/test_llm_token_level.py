"""The LLM trainer's token-level path (per-token log-probs, KL and WPO's log Σp² for the core), TR-DPO's
reference syncing and β-DPO's running margin, on a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from helpers import llm_config
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_llm

from diffalign.llm.logprobs import completion_logps
from diffalign.llm.trainer import LLMRecipe, train
from diffalign.training import make_accelerator, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def moved_policy_recipe(config) -> LLMRecipe:
    recipe = LLMRecipe(config, make_accelerator(config.run))
    with torch.no_grad():  # policy ≠ reference, so log-ratios and KLs are not trivially 0
        for parameter in recipe.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return recipe


def naive_next_token_distributions(model, row_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=row_ids[None]).logits[0].double(), dim=-1)


def test_token_level_scores_equal_a_naive_full_softmax_computation(tiny_dir, tmp_path):
    """TDPO + WPO + LD-DPO configured: per-token log-probs, KL(πref ‖ πθ) and log Σ_v πθ(v)² of every completion
    token equal those of one unpadded sequence through the full softmax; the sums equal the default path's."""
    torch.manual_seed(0)
    config = llm_config(
        tiny_dir,
        tmp_path,
        model={"trainable": "full"},
        reference={"strategy": "frozen_copy"},
        loss={"type": ["tdpo2"], "use_weighting": True, "ld_alpha": 0.5},
    )
    recipe = moved_policy_recipe(config)
    batch = recipe.collate([2, 0, 5])
    scores, _ = recipe.pair_scores(recipe.model, batch)
    assert scores.has_tokens and scores.chosen_tokens.kl.requires_grad

    rows = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        default_sums, lengths = completion_logps(recipe.model, **rows)
    torch.testing.assert_close(
        torch.cat([scores.policy_chosen, scores.policy_rejected]).detach(), default_sums
    )
    torch.testing.assert_close(torch.cat([scores.chosen_lengths, scores.rejected_lengths]), lengths)

    for row in (0, 4):  # a chosen and a rejected row
        side = scores.chosen_tokens if row < 3 else scores.rejected_tokens
        index = row % 3
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        completion = batch["completion_mask"][row][batch["attention_mask"][row].bool()].bool()
        policy = naive_next_token_distributions(recipe.model, ids)
        reference = naive_next_token_distributions(recipe.reference.model, ids)
        positions = torch.nonzero(completion[1:]).squeeze(-1)  # logits at p predict token p + 1
        tokens = ids[positions + 1]
        expected_logps = policy[positions, tokens]
        expected_kl = (reference[positions].exp() * (reference[positions] - policy[positions])).sum(-1)
        expected_sq = torch.logsumexp(2 * policy[positions], dim=-1)
        mask = side.mask[index].bool()
        torch.testing.assert_close(side.policy[index][mask].double(), expected_logps, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            side.reference[index][mask].double(), reference[positions, tokens], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(side.kl[index][mask].double().detach(), expected_kl, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            side.log_sum_sq_probs[index][mask].double(), expected_sq, atol=1e-5, rtol=0
        )


def test_the_default_path_computes_no_token_inputs(tiny_dir, tmp_path):
    config = llm_config(tiny_dir, tmp_path)
    recipe = LLMRecipe(config, make_accelerator(config.run))
    scores, _ = recipe.pair_scores(recipe.model, recipe.collate([0, 1]))
    assert not scores.has_tokens


def test_token_level_losses_refuse_a_precomputed_reference_before_any_model_loads(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="reference.strategy: precomputed stores summed ones"):
        llm_config(
            tiny_dir,
            tmp_path,
            loss={"type": ["sigmoid"], "ld_alpha": 0.5},
            reference={"strategy": "precomputed"},
        )


def trained(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "trainable.safetensors")


def test_tr_dpo_moves_the_reference_as_trls_sync_callback(tiny_dir, tmp_path):
    """TRL SyncRefModelCallback, on the end of step k·τ: ref ← α·θ_k + (1 − α)·ref. With τ = 1 and two steps,
    step 2 trains against α·θ_1 + (1 − α)·θ_0 and the reference ends there."""
    alpha = 0.6
    config = llm_config(
        tiny_dir,
        tmp_path,
        model={"trainable": "full"},
        reference={"strategy": "frozen_copy", "sync_steps": 1, "mixup_alpha": alpha},
        run={"max_steps": 2, "checkpoint_every": 1},
    )
    accelerator = make_accelerator(config.run)
    set_seed(config.run.seed)
    recipe = LLMRecipe(config, accelerator)
    initial = {name: p.detach().clone() for name, p in recipe.reference.model.named_parameters()}
    run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)
    after_step_1 = trained(tmp_path / "checkpoints" / "step-0000001")
    for name, parameter in recipe.reference.model.named_parameters():
        expected = alpha * after_step_1[name] + (1 - alpha) * initial[name]
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-6, rtol=1e-5)
        assert not parameter.requires_grad
    assert any(not torch.equal(after_step_1[name], initial[name]) for name in initial)


def test_tr_dpo_resumes_from_the_moved_reference(tiny_dir, tmp_path):
    sections = dict(model={"trainable": "full"}, reference={"strategy": "frozen_copy", "sync_steps": 1})
    run = {"max_steps": 3, "checkpoint_every": 1}
    train(llm_config(tiny_dir, tmp_path / "straight", run=run, **sections))
    train(llm_config(tiny_dir, tmp_path / "resumed", run={**run, "max_steps": 2}, **sections))
    train(llm_config(tiny_dir, tmp_path / "resumed", run={**run, "resume": "latest"}, **sections))
    straight = trained(tmp_path / "straight" / "checkpoints" / "step-0000003")
    resumed = trained(tmp_path / "resumed" / "checkpoints" / "step-0000003")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_tr_dpo_needs_a_frozen_copy_of_a_full_fine_tune(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="reference.sync_steps"):
        llm_config(tiny_dir, tmp_path, reference={"sync_steps": 4})  # LoRA: the reference is the base model


def test_beta_dpo_keeps_a_running_margin_across_steps_and_resumes(tiny_dir, tmp_path):
    """M0 ← 0.9·M0 + 0.1·mean margin, before each batch's loss; saved with the checkpoint."""
    config = llm_config(tiny_dir, tmp_path, model={"trainable": "full"}, loss={"type": ["beta_dpo"]})
    recipe = moved_policy_recipe(config)
    batch = recipe.collate([0, 1, 2, 3])
    output = recipe.training_step(recipe.model, batch)
    scores, _ = recipe.pair_scores(recipe.model, batch)
    margin = (
        (scores.policy_chosen - scores.ref_chosen) - (scores.policy_rejected - scores.ref_rejected)
    ).mean()
    assert recipe.margin_baseline.value == pytest.approx(0.1 * margin.item(), rel=1e-5)
    assert torch.isfinite(output.loss)
    state = recipe.extra_state()
    fresh = LLMRecipe(config, make_accelerator(config.run))
    fresh.load_extra_state(state)
    assert fresh.margin_baseline.value == recipe.margin_baseline.value
