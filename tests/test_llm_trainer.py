"""The LLM trainer end to end on a tiny Llama: every loss with every reference strategy, exact resume,
gradient-accumulation equivalence, and outputs that load with transformers."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TOY_LLM, llm_config
from safetensors.torch import load_file
from tiny_pipelines import build_tiny_llm
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

from diffalign.config import from_dict
from diffalign.llm.config import LLMModelConfig
from diffalign.llm.logprobs import completion_logps
from diffalign.llm.model import load_model, load_tokenizer, make_trainable, save_policy
from diffalign.llm.trainer import LLMRecipe, train
from diffalign.losses import LOSSES
from diffalign.training import make_accelerator

LINEAR_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def loss_settings(name: str) -> dict:
    settings: dict[str, Any] = {"type": [name]}
    if name == "exo_pair":
        settings["label_smoothing"] = 1e-3
    return settings


def data_for(name: str) -> dict:
    # KTO on the shipped unpaired file; every other loss on pairs (NPO and SFT use one side of each pair).
    return {"path": str(TOY_LLM / "data" / "unpaired_train.jsonl")} if name == "kto" else {}


def assert_trained_weights_moved(initial_dir: Path, final_dir: Path, trainable: str) -> None:
    initial = AutoModelForCausalLM.from_pretrained(initial_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(final_dir).state_dict()
    assert initial.keys() == final.keys()
    for name, before in initial.items():
        moved = not torch.equal(before, final[name])
        if any(part in name for part in LINEAR_WEIGHTS):
            assert moved, f"{name} did not change"
        elif trainable == "lora":
            assert not moved, f"{name} is frozen under LoRA but changed"
    if trainable == "full":
        assert not torch.equal(initial["model.embed_tokens.weight"], final["model.embed_tokens.weight"])


REFERENCE_LOSSES = [name for name, spec in LOSSES.items() if spec.needs_reference]
REFERENCE_FREE_LOSSES = [name for name, spec in LOSSES.items() if not spec.needs_reference]
# frozen_copy with a full fine-tune; the adapter-disabled and precomputed references with LoRA.
STRATEGIES = {"frozen_copy": "full", "adapter_disabled": "lora", "precomputed": "lora"}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("loss", REFERENCE_LOSSES)
def test_every_loss_trains_one_step_with_each_reference(loss, strategy, tiny_dir, tmp_path):
    trainable = STRATEGIES[strategy]
    sections = dict(
        model={"trainable": trainable},
        data=data_for(loss),
        reference={"strategy": strategy},
        loss=loss_settings(loss),
    )
    if LOSSES[loss].needs_token_kl and strategy == "precomputed":
        # Precomputed references are summed log-probs; TDPO needs the reference's per-token distributions.
        with pytest.raises(ValueError, match="per-token log-probs, but reference.strategy: precomputed"):
            llm_config(tiny_dir, tmp_path, **sections)
        return
    metrics = train(llm_config(tiny_dir, tmp_path, **sections))
    assert math.isfinite(metrics["loss"]) and metrics["tokens_per_s"] > 0
    assert_trained_weights_moved(tiny_dir, tmp_path / "final", trainable)
    if strategy == "precomputed":
        assert len(list((tmp_path / "reference-cache").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("loss", REFERENCE_FREE_LOSSES)
def test_reference_free_losses_train_one_step(loss, tiny_dir, tmp_path):
    config = llm_config(tiny_dir, tmp_path, loss=loss_settings(loss))
    assert config.reference_strategy == "none"
    metrics = train(config)
    assert math.isfinite(metrics["loss"])
    assert_trained_weights_moved(tiny_dir, tmp_path / "final", "lora")


def test_every_reference_strategy_gives_the_same_reference_logps(tiny_dir, tmp_path):
    scores = {}
    for strategy, trainable in STRATEGIES.items():
        config = llm_config(
            tiny_dir, tmp_path / strategy, model={"trainable": trainable}, reference={"strategy": strategy}
        )
        recipe = LLMRecipe(config, make_accelerator(config.run))
        batch = recipe.collate([3, 0, 5])
        scores[strategy], _ = recipe.pair_scores(recipe.model, batch)
    expected = scores["frozen_copy"]
    for strategy in ("adapter_disabled", "precomputed"):
        torch.testing.assert_close(scores[strategy].ref_chosen, expected.ref_chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores[strategy].ref_rejected, expected.ref_rejected, atol=1e-5, rtol=0)
        # Before any update the policy is the reference.
        torch.testing.assert_close(
            scores[strategy].policy_chosen.detach(), expected.ref_chosen, atol=1e-5, rtol=0
        )


def test_kto_reference_point_comes_from_mismatched_pairs(tiny_dir, tmp_path):
    """z0 = max(0, mean over the batch of policy − reference on (prompt_i, completion of another prompt))."""
    config = llm_config(
        tiny_dir,
        tmp_path,
        loss={"type": ["kto"]},
        data=data_for("kto"),
        reference={"strategy": "frozen_copy"},
        model={"trainable": "full"},
    )
    recipe = LLMRecipe(config, make_accelerator(config.run))
    with torch.no_grad():  # move the policy away from the reference so that z0 is not trivially 0
        for parameter in recipe.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = recipe.collate([0, 1, 2, 3])
    scores, metrics = recipe.pair_scores(recipe.model, batch)
    rows = {key: batch[key][4:] for key in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        policy, _ = completion_logps(recipe.model, **rows)
        reference, _ = completion_logps(recipe.reference.model, **rows)
    expected = (policy - reference).mean().clamp(min=0)
    torch.testing.assert_close(scores.kl_reference_point, expected, atol=1e-5, rtol=0)
    assert (
        not scores.kl_reference_point.requires_grad
        and metrics["kl_reference_point"] is scores.kl_reference_point
    )
    assert scores.policy_chosen.shape[0] + scores.policy_rejected.shape[0] == 4


def trainable_after(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir / "trainable.safetensors")


def test_resume_is_exact(tiny_dir, tmp_path):
    run = {"max_steps": 4, "checkpoint_every": 2}
    train(llm_config(tiny_dir, tmp_path / "straight", run=run))
    train(llm_config(tiny_dir, tmp_path / "resumed", run={**run, "max_steps": 2}))
    train(llm_config(tiny_dir, tmp_path / "resumed", run={**run, "resume": "latest"}))
    straight = trainable_after(tmp_path / "straight" / "checkpoints" / "step-0000004")
    resumed = trainable_after(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_gradient_accumulation_matches_the_large_batch(tiny_dir, tmp_path):
    # With eps ≫ |gradient|, Adam's first update is lr·g/eps: linear in the gradient, so a wrongly scaled
    # accumulation would show (Adam's usual first step, lr·sign(g), and gradient clipping would hide it).
    optim = {"lr": 1.0e4, "eps": 1.0e4, "max_grad_norm": None}
    train(llm_config(tiny_dir, tmp_path / "large", optim=optim, run={"batch_size": 8}))
    train(
        llm_config(
            tiny_dir,
            tmp_path / "accumulated",
            optim=optim,
            run={"batch_size": 4, "gradient_accumulation_steps": 2},
        )
    )
    large = trainable_after(tmp_path / "large" / "checkpoints" / "step-0000001")
    accumulated = trainable_after(tmp_path / "accumulated" / "checkpoints" / "step-0000001")
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], atol=1e-6, rtol=1e-4)
    assert max(large[name].abs().max().item() for name in large if "lora_B" in name) > 1e-4


def test_adapter_output_loads_with_from_pretrained_like_the_merged_one(tiny_dir, tmp_path):
    train(llm_config(tiny_dir, tmp_path / "merged", run={"max_steps": 2}))
    train(llm_config(tiny_dir, tmp_path / "adapter", run={"max_steps": 2}, model={"save": "adapter"}))
    assert (tmp_path / "adapter" / "final" / "adapter_config.json").is_file()
    assert not (tmp_path / "merged" / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "final")
    adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter" / "final")
    ids = tokenizer("<|user|>\nList two cats one per line.<|end|><|assistant|>\n", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, adapter, base))
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3


class NewStorageBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage the ops run under it create (views and no-op copies excluded)."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.seen, self.total = set(existing), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(tensor.untyped_storage().data_ptr())
                self.total += tensor.untyped_storage().nbytes()
        return out


def test_the_merged_save_copies_only_the_adapted_layers(tiny_dir, tmp_path):
    """Regression: the final save of a LoRA run merged a deep copy of the whole model, doubling the memory at
    the end of a run that fitted; the merged weights are now formed beside the live policy."""
    config = from_dict(LLMModelConfig, {"pretrained": str(tiny_dir), "lora": {"target_modules": ["q_proj"]}})
    policy = make_trainable(load_model(config, torch.float32), config, gradient_checkpointing=False)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    tensors = list(policy.parameters()) + list(policy.buffers())
    model_bytes = sum(t.untyped_storage().nbytes() for t in tensors)
    with NewStorageBytes({t.untyped_storage().data_ptr() for t in tensors}) as counter:
        save_policy(policy, load_tokenizer(config), config, tmp_path / "final")
    assert counter.total < model_bytes / 2  # a merged copy of the model allocates all of it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert expected.keys() == merged.state_dict().keys()
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=0)
    assert any(".lora_A." in name for name, _ in policy.named_parameters())  # the live policy keeps its adapter


def test_unpaired_data_with_a_paired_loss_is_rejected(tiny_dir, tmp_path):
    config = llm_config(tiny_dir, tmp_path, data=data_for("kto"))
    with pytest.raises(ValueError, match=r"unpaired .* paired losses \['sigmoid'\]"):
        train(config)


@pytest.mark.parametrize(
    ("layout", "loss"),
    [("packed", "sigmoid")] + [("shared_prompt", loss) for loss in ("sigmoid", "tdpo2", "kto")],
)
def test_other_row_layouts_give_the_padded_scores_and_gradients(layout, loss, tiny_dir, tmp_path):
    """``model.padding_free`` packs the rows of a batch into one sequence, ``model.share_prompt`` runs each
    pair's prompt once: the pair scores (policy, reference, per-token KL) and the loss's gradient are those of
    the padded forward."""
    results = {}
    for model in ({}, {"padding_free": layout == "packed", "share_prompt": layout == "shared_prompt"}):
        config = llm_config(
            tiny_dir, tmp_path / str(len(results)), model=model, loss=loss_settings(loss), data=data_for(loss)
        )
        torch.manual_seed(0)  # the same LoRA A in both recipes: B's gradient is A's function
        recipe = LLMRecipe(config, make_accelerator(config.run))
        batch = recipe.collate([3, 0, 5, 1])
        assert batch["attention_mask"].float().mean() < 1  # rows of different lengths: the padded batch pads
        recipe.model.zero_grad()
        output = recipe.training_step(recipe.model, batch)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in recipe.model.named_parameters() if p.requires_grad}
        results[config.model.layout] = (output.loss.detach(), output.metrics, grads)
    (padded_loss, padded_metrics, padded_grads), (other_loss, other_metrics, other_grads) = results.values()
    torch.testing.assert_close(other_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert other_metrics.keys() == padded_metrics.keys()
    for name, value in padded_metrics.items():
        torch.testing.assert_close(other_metrics[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert other_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(other_grads[name], grad, atol=1e-5, rtol=1e-4)
