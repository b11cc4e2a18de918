"""LLM data: TRL schemas, bad rows, truncation, and collation with left and right padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TOY_LLM
from transformers import AutoTokenizer

from diffalign.llm.batching import PreferenceDataset, collate_rows
from diffalign.llm.config import LLMDataConfig
from diffalign.llm.data import (
    PairItem,
    UnpairedItem,
    assign_mismatched_completions,
    detect_schema,
    load_preference_items,
    split_implicit_prompt,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOY_LLM)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_detect_schema():
    assert detect_schema({"prompt": "a", "chosen": "b", "rejected": "c"}) == "standard"
    assert (
        detect_schema({"prompt": user("a"), "chosen": assistant("b"), "rejected": assistant("c")})
        == "conversational"
    )
    assert detect_schema({"chosen": "a b", "rejected": "a c"}) == "implicit_prompt"
    assert detect_schema({"prompt": "a", "completion": "b", "label": True}) == "unpaired"
    with pytest.raises(ValueError, match="cannot tell the schema"):
        detect_schema({"question": "a", "answer": "b"})


def test_standard_and_conversational_toy_data_tokenize_identically(tokenizer):
    """The shipped standard file is the chat-templated rendering of the conversational one."""
    config = dict(max_prompt_length=None, max_length=None, max_rows=20)
    standard, _ = load_preference_items(
        LLMDataConfig(path=str(TOY_LLM / "data/standard_train.jsonl"), **config), tokenizer
    )
    chat, stats = load_preference_items(
        LLMDataConfig(path=str(TOY_LLM / "data/conversational_train.jsonl"), **config), tokenizer
    )
    assert stats.schema == "conversational" and len(chat) == 20
    assert standard == chat
    # Completions end with the end-of-turn token, which is the tokenizer's EOS.
    assert all(item.chosen_ids[-1] == tokenizer.eos_token_id for item in chat)


def test_conversational_completion_is_the_template_suffix(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "prompt": user("List two cats one per line."),
                "chosen": assistant("cat\ndog"),
                "rejected": assistant("cat, dog"),
            }
        ],
    )
    (item,), _ = load_preference_items(LLMDataConfig(path=path), tokenizer)
    full = tokenizer.apply_chat_template(
        user("List two cats one per line.") + assistant("cat\ndog"), tokenize=False
    )
    prompt = tokenizer.apply_chat_template(
        user("List two cats one per line."), tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(item.prompt_ids) == prompt
    assert tokenizer.decode(item.prompt_ids + item.chosen_ids) == full
    assert tokenizer.decode(item.chosen_ids) == "cat\ndog<|end|>"


def test_implicit_prompt_split():
    prompt, chosen, rejected = split_implicit_prompt(
        "Human: hi Assistant: hello there", "Human: hi Assistant: go away"
    )
    assert (prompt, chosen, rejected) == ("Human: hi Assistant:", " hello there", " go away")
    turns = user("hi") + assistant("hello")
    prompt, chosen, rejected = split_implicit_prompt(turns, user("hi") + assistant("go away"))
    assert prompt == user("hi") and chosen == assistant("hello") and rejected == assistant("go away")


def test_implicit_prompt_rows_match_explicit_ones(tokenizer, tmp_path):
    implicit = write_jsonl(
        tmp_path / "i.jsonl", [{"chosen": "List two cats: cat, dog", "rejected": "List two cats: pear"}]
    )
    explicit = write_jsonl(
        tmp_path / "e.jsonl", [{"prompt": "List two cats:", "chosen": " cat, dog", "rejected": " pear"}]
    )
    (a,), stats = load_preference_items(LLMDataConfig(path=implicit), tokenizer)
    (b,), _ = load_preference_items(LLMDataConfig(path=explicit), tokenizer)
    assert stats.schema == "implicit_prompt" and a == b
    # Text completions get EOS appended, as in TRL.
    assert a.chosen_ids == tokenizer(" cat, dog", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def test_unpaired_rows(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "u.jsonl",
        [
            {"prompt": "Name two cats:", "completion": " cat, dog", "label": True},
            {"prompt": "Name two fruits:", "completion": " pear", "label": False},
        ],
    )
    items, stats = load_preference_items(LLMDataConfig(path=path), tokenizer)
    assert stats.schema == "unpaired"
    assert [item.desirable for item in items] == [True, False]
    items = list(items)  # read from the tokenized arrow table: held in memory to be given their mismatch
    assign_mismatched_completions(items)
    assert (
        items[0].mismatched_ids == items[1].completion_ids
        and items[1].mismatched_ids == items[0].completion_ids
    )


def test_mismatched_completion_skips_rows_of_the_same_prompt():
    items = [UnpairedItem([1], [10], True), UnpairedItem([1], [11], False), UnpairedItem([2], [12], True)]
    assign_mismatched_completions(items)
    assert [item.mismatched_ids for item in items] == [[12], [12], [10]]
    with pytest.raises(ValueError, match="two distinct prompts"):
        assign_mismatched_completions([UnpairedItem([1], [10], True), UnpairedItem([1], [11], False)])


BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'", "missing field"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "empty", "empty completion"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical", "chosen == rejected"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "must be a string", "wrong type"),
]


@pytest.mark.parametrize(("row", "message", "reason"), BAD_ROWS)
def test_bad_row_is_an_error_naming_file_and_row(tokenizer, tmp_path, row, message, reason):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=rf"bad.jsonl'?, row 2: .*{message}.*bad_rows: skip"):
        load_preference_items(LLMDataConfig(path=path, schema="standard"), tokenizer)


def test_bad_rows_are_skipped_and_counted(tokenizer, tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good] + [row for row, _, _ in BAD_ROWS] + [good])
    items, stats = load_preference_items(
        LLMDataConfig(path=path, schema="standard", bad_rows="skip"), tokenizer
    )
    assert len(items) == 2 and stats.rows == 6 and stats.used == 2
    assert dict(stats.skipped) == {reason: 1 for _, _, reason in BAD_ROWS}


def test_corrupt_jsonl_line_is_named(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2: not valid JSON"):
        load_preference_items(LLMDataConfig(path=str(path)), tokenizer)


def test_parquet_file_reads_like_jsonl(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Name two cats:", "chosen": " cat, dog", "rejected": " pear"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from_parquet, _ = load_preference_items(LLMDataConfig(path=str(tmp_path / "d.parquet")), tokenizer)
    from_jsonl, _ = load_preference_items(
        LLMDataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer
    )
    assert from_parquet == from_jsonl


def test_truncation_keeps_prompt_end_and_completion_start_and_counts(tokenizer, tmp_path):
    long_prompt = "Name " + "very " * 20 + "many cats:"
    rows = [
        {"prompt": long_prompt, "chosen": " cat", "rejected": " dog"},
        {"prompt": "Name cats:", "chosen": " cat, dog, cow, pig, hen, owl", "rejected": " cat"},
        {"prompt": "Name cats:", "chosen": " cat", "rejected": " dog"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    full, _ = load_preference_items(
        LLMDataConfig(path=path, max_prompt_length=None, max_length=None), tokenizer
    )
    items, stats = load_preference_items(
        LLMDataConfig(path=path, max_prompt_length=6, max_length=10), tokenizer
    )
    assert items[0].prompt_ids == full[0].prompt_ids[-6:]
    assert items[0].chosen_ids == full[0].chosen_ids  # short completion untouched
    room = 10 - len(full[1].prompt_ids)
    assert items[1].chosen_ids == full[1].chosen_ids[:room] and items[1].rejected_ids == full[1].rejected_ids
    assert items[2] == full[2]
    assert (stats.truncated_prompts, stats.truncated_completions) == (1, 1)
    assert "truncated 1 prompts" in stats.summary()


def test_config_rejects_prompt_limit_at_or_above_total_limit():
    with pytest.raises(ValueError, match=r"data.max_prompt_length=10 must be < data.max_length=10"):
        LLMDataConfig(max_prompt_length=10, max_length=10)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_rows_exact(side):
    batch = collate_rows([[1, 2], [3]], [[4, 5], [6]], pad_token_id=0, padding_side=side)
    if side == "right":
        assert batch["input_ids"].tolist() == [[1, 2, 4, 5], [3, 6, 0, 0]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
        assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    else:
        assert batch["input_ids"].tolist() == [[1, 2, 4, 5], [0, 0, 3, 6]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
        assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


def test_paired_batch_is_chosen_rows_then_rejected_rows():
    items = [PairItem([1], [2], [3]), PairItem([4, 5], [6], [7, 8])]
    dataset = PreferenceDataset(items, pad_token_id=0)
    batch = dataset.collate([1, 0])
    assert batch["input_ids"].tolist() == [[4, 5, 6, 0], [1, 2, 0, 0], [4, 5, 7, 8], [1, 3, 0, 0]]
    assert batch["index"].tolist() == [1, 0]


def test_unpaired_batch_appends_mismatched_rows_and_reference_logps():
    import torch

    items = [
        UnpairedItem([1], [2], True, mismatched_ids=[3]),
        UnpairedItem([4], [5], False, mismatched_ids=[2]),
    ]
    dataset = PreferenceDataset(items, pad_token_id=0, with_mismatched=True)
    dataset.reference_logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    batch = dataset.collate([0, 1])
    assert batch["input_ids"].tolist() == [[1, 2], [4, 5], [1, 3], [4, 2]]
    assert batch["desirable"].tolist() == [True, False]
    assert batch["reference_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
