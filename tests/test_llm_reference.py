"""Reference log-probs: precomputed equals on the fly, adapter-disabled equals the base model, cache keys."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from helpers import TOY_LLM
from peft import LoraConfig, get_peft_model
from tiny_pipelines import build_tiny_llm
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffalign.llm import reference as reference_module
from diffalign.llm.batching import PreferenceDataset
from diffalign.llm.config import LLMDataConfig
from diffalign.llm.data import assign_mismatched_completions, load_preference_items
from diffalign.llm.reference import (
    ModelReference,
    load_or_precompute,
    precompute_reference_logps,
    precomputed_reference,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def toy_dataset(
    tokenizer, schema_file: str = "conversational_train.jsonl", rows: int = 10, **kwargs
) -> PreferenceDataset:
    items, _ = load_preference_items(
        LLMDataConfig(path=str(TOY_LLM / "data" / schema_file), max_rows=rows), tokenizer
    )
    items = list(items)  # in memory, as the trainer holds KTO's items: the tests below change some
    if kwargs.get("with_mismatched"):
        assign_mismatched_completions(items)
    return PreferenceDataset(items, pad_token_id=tokenizer.pad_token_id, **kwargs)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
@pytest.mark.parametrize(
    ("schema_file", "with_mismatched"),
    [("conversational_train.jsonl", False), ("unpaired_train.jsonl", True)],
)
def test_precomputed_equals_on_the_fly(model, tokenizer, schema_file, with_mismatched, layout):
    dataset = toy_dataset(tokenizer, schema_file, with_mismatched=with_mismatched)
    on_the_fly = ModelReference(model, adapter_disabled=False)
    dataset.reference_logps = precompute_reference_logps(model, dataset, batch_size=3, layout=layout)
    assert dataset.reference_logps.shape == (10, 2)
    for indices in ([4, 1, 7], [9, 0], [2]):
        batch = dataset.collate(indices)
        torch.testing.assert_close(precomputed_reference(batch), on_the_fly(batch), atol=1e-5, rtol=0)


def test_adapter_disabled_reference_is_the_base_model(model, tokenizer):
    dataset = toy_dataset(tokenizer)
    batch = dataset.collate([0, 1, 2])
    base = ModelReference(model, adapter_disabled=False)(batch)
    # Non-zero LoRA weights, so the adapted model differs from the base.
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        adapted = ModelReference(policy, adapter_disabled=False)(batch)
    reference = ModelReference(policy, adapter_disabled=True)(batch)
    torch.testing.assert_close(reference, base, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-3
    # The adapter is back on afterwards.
    torch.testing.assert_close(ModelReference(policy, adapter_disabled=False)(batch), adapted)


def test_cache_is_reused_and_invalidated_by_model_or_data_changes(model, tokenizer, tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    dataset = toy_dataset(tokenizer)

    def precompute(target_model, target_dataset):
        return load_or_precompute(
            target_model, tokenizer, target_dataset, cache_dir=tmp_path, batch_size=4, accelerator=accelerator
        )

    first = precompute(model, dataset)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    calls = []
    original = reference_module.precompute_reference_logps
    monkeypatch.setattr(
        reference_module, "precompute_reference_logps", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    torch.testing.assert_close(precompute(model, dataset), first)
    assert calls == []  # read back, not recomputed

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 0.5
    changed_model = precompute(model, dataset)
    assert calls == [1] and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.equal(changed_model, first)

    dataset.items[3].rejected_ids = dataset.items[3].rejected_ids[:-2] + dataset.items[3].rejected_ids[-1:]
    precompute(model, dataset)
    assert calls == [1, 1] and len(list(tmp_path.glob("*.safetensors"))) == 3
