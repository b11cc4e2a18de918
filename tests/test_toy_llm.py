"""The shipped toy LLM: loads with stock transformers classes offline, its reward scores the request, the base
model satisfies it only sometimes, and its preference data follow TRL's schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from diffalign.toy.llm import (
    CATEGORIES,
    chat_text,
    load_prompts,
    parse_answer,
    parse_request,
    sample_completions,
    toy_reward,
)

TOY_LLM = Path(__file__).resolve().parents[1] / "assets" / "toy-llm"
DATA = TOY_LLM / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOY_LLM)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TOY_LLM).eval()


def test_loads_with_stock_classes_and_renders_the_chat_template(tokenizer, model):
    assert isinstance(model, LlamaForCausalLM)
    assert (TOY_LLM / "tokenizer.json").is_file()
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    messages = [{"role": "user", "content": "List two cats one per line."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        rendered
        == chat_text("List two cats one per line.")
        == "<|user|>\nList two cats one per line.<|end|><|assistant|>\n"
    )
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert size_mb < 10


def test_generation_stops_at_the_end_token(tokenizer, model):
    ids = tokenizer(
        chat_text("Name three fruits separated by commas."), return_tensors="pt", add_special_tokens=False
    )
    torch.manual_seed(0)
    output = model.generate(**ids, do_sample=False, max_new_tokens=40)
    new_tokens = output[0, ids["input_ids"].shape[1] :].tolist()
    assert tokenizer.eos_token_id in new_tokens
    assert len(new_tokens) < 40


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        # 0.5·format + 0.25·count + 0.25·(distinct items of the category)/max(asked, given)
        ("List three fruits as a numbered list.", "1. apple\n2. pear\n3. plum", 1.0),
        ("List three fruits as a numbered list.", "apple, pear, plum<|end|>", 0.5),
        ("List three fruits as a numbered list.", "1. apple\n2. pear", 0.5 + 0.25 * 2 / 3),
        ("List three fruits as a numbered list.", "1. apple\n2. apple\n3. dog", 0.5 + 0.25 + 0.25 / 3),
        ("Give me two animals, one per line.", "cat\ndog", 1.0),
        ("Give me two animals, one per line.", "- cat\n- dog", 0.5),
        ("Name four colors as a bulleted list.", "- red\n- blue\n- gold\n- pink\n- tuba", 0.5 + 0.25 * 4 / 5),
        ("Name two metals separated by commas.", "iron", 0.25 * 1 / 2),
        ("List three tools as a numbered list.", "1. saw\n3. axe\n2. rake", 0.25 + 0.25),
    ],
)
def test_reward_on_constructed_answers(prompt, completion, expected):
    assert toy_reward(prompt, completion) == pytest.approx(expected)
    # The chat-templated prompt is scored the same as the bare request.
    assert toy_reward(chat_text(prompt), completion) == pytest.approx(expected)


def test_request_and_answer_parsing():
    assert parse_request("Name five birds, as a bulleted list.") == (5, "birds", "bulleted")
    assert parse_answer("a\nb") == ("lines", ["a", "b"])
    assert parse_answer("- a\nb")[0] is None
    with pytest.raises(ValueError, match="no toy-LLM request"):
        toy_reward("What is the capital of France?", "Paris")


def test_prompt_splits_are_disjoint_and_fixed():
    train, heldout = load_prompts("train"), load_prompts("heldout")
    assert len(train) == 384 and len(heldout) == 96
    assert not set(train) & set(heldout)
    assert load_prompts("heldout") == heldout
    with pytest.raises(ValueError, match="split='test'"):
        load_prompts("test")


def test_base_model_satisfies_the_request_only_sometimes(tokenizer, model):
    """Band stated in assets/README.md: 20–60% of base samples get reward 1 on held-out prompts."""
    prompts = load_prompts("heldout")[:48]
    completions = sample_completions(model, tokenizer, prompts, num_samples=2, seed=0)
    rewards = [toy_reward(p, c) for p, samples in zip(prompts, completions) for c in samples]
    satisfied = sum(r == 1.0 for r in rewards) / len(rewards)
    assert 0.2 <= satisfied <= 0.6, satisfied
    # Answers are lists of the asked category, mostly: the model knows the world, it just does not comply.
    items = [item for p, samples in zip(prompts, completions) for c in samples for item in parse_answer(c)[1]]
    known = sum(any(item in words for words in CATEGORIES.values()) for item in items) / len(items)
    assert known > 0.9


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_preference_data_schemas(split):
    prompts = set(load_prompts(split))
    standard = read_jsonl(DATA / f"standard_{split}.jsonl")
    conversational = read_jsonl(DATA / f"conversational_{split}.jsonl")
    unpaired = read_jsonl(DATA / f"unpaired_{split}.jsonl")
    assert len(standard) == len(conversational) > len(prompts)
    for plain, chat in zip(standard, conversational):
        assert set(plain) == set(chat) == {"prompt", "chosen", "rejected"}
        (user,) = chat["prompt"]
        (chosen,), (rejected,) = chat["chosen"], chat["rejected"]
        assert user["role"] == "user" and user["content"] in prompts
        assert chosen["role"] == rejected["role"] == "assistant"
        assert plain == {
            "prompt": chat_text(user["content"]),
            "chosen": chosen["content"],
            "rejected": rejected["content"],
        }
        assert toy_reward(user["content"], chosen["content"]) > toy_reward(
            user["content"], rejected["content"]
        )
    assert {row["prompt"][0]["content"] for row in unpaired} <= prompts
    for row in unpaired:
        assert set(row) == {"prompt", "completion", "label"} and isinstance(row["label"], bool)
        assert row["label"] == (
            toy_reward(row["prompt"][0]["content"], row["completion"][0]["content"]) == 1.0
        )
    labels = [row["label"] for row in unpaired]
    assert 0.2 < sum(labels) / len(labels) < 0.8
    held_out_prompts = read_jsonl(DATA / f"prompts_{split}.jsonl")
    assert [row["prompt"][0]["content"] for row in held_out_prompts] == load_prompts(split)
