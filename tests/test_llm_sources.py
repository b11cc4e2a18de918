"""LLM data through ``datasets``: every kind of source loads, the common hub layouts are recognised, the
tokenisation is cached, and paths are checked before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

import diffalign.hub as hub_access
import diffalign.llm.data as llm_data
from diffalign.config import ConfigError, load_config
from diffalign.llm.batching import PreferenceStream
from diffalign.llm.config import LLMDataConfig
from diffalign.llm.data import detect_schema, load_preference_items
from diffalign.preflight import preflight_llm

TOY_LLM = Path(__file__).resolve().parents[1] / "assets" / "toy-llm"
ROWS = [
    {"prompt": "Name two cats:", "chosen": " cat, dog", "rejected": " pear"},
    {"prompt": "Name a fruit:", "chosen": " pear", "rejected": " stone"},
    {"prompt": "Name a colour:", "chosen": " red", "rejected": " loud"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOY_LLM)


@pytest.fixture
def expected(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    items, _ = load_preference_items(
        LLMDataConfig(path=str(path), cache_dir=str(tmp_path / "tok")), tokenizer
    )
    return list(items)


def load(tokenizer, tmp_path, **settings):
    items, stats = load_preference_items(
        LLMDataConfig(cache_dir=str(tmp_path / "tok"), **settings), tokenizer
    )
    return list(items), stats


def streamed(tokenizer, tmp_path, **settings):
    config = LLMDataConfig(cache_dir=str(tmp_path / "tok"), streaming=True, shuffle_buffer=1, **settings)
    stream = PreferenceStream(config, tokenizer, seed=0, pad_token_id=tokenizer.pad_token_id)
    batches = stream.batches(len(ROWS), collate=lambda items: {"items": items})
    return [item for _, item in sorted(next(batches)["items"], key=lambda pair: pair[0])]


def test_json_written_by_datasets_to_json_loads_in_both_modes(tokenizer, tmp_path, expected):
    """``Dataset.to_json`` writes JSON Lines into a ``.json`` file (the datasets default)."""
    path = tmp_path / "rows.json"
    datasets.Dataset.from_list(ROWS).to_json(path)
    assert path.read_text().count("\n") == len(ROWS)  # JSON Lines, not one array
    assert load(tokenizer, tmp_path, path=str(path))[0] == expected
    assert streamed(tokenizer, tmp_path, path=str(path)) == expected


def test_a_json_array_file_loads(tokenizer, tmp_path, expected):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    assert load(tokenizer, tmp_path, path=str(path))[0] == expected


@pytest.mark.parametrize("suffix", ["parquet", "arrow"])
def test_parquet_and_arrow_files_load(tokenizer, tmp_path, expected, suffix):
    path = tmp_path / f"rows.{suffix}"
    table = datasets.Dataset.from_list(ROWS)
    if suffix == "parquet":
        table.to_parquet(path)
    else:
        table.save_to_disk(tmp_path / "saved")
        (tmp_path / "saved" / next(p.name for p in (tmp_path / "saved").glob("*.arrow"))).rename(path)
    assert load(tokenizer, tmp_path, path=str(path))[0] == expected
    assert streamed(tokenizer, tmp_path, path=str(path)) == expected


def test_save_to_disk_folders_load_with_their_split(tokenizer, tmp_path, expected):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    splits.save_to_disk(tmp_path / "dict")
    assert load(tokenizer, tmp_path, path=str(tmp_path / "one"))[0] == expected
    assert load(tokenizer, tmp_path, path=str(tmp_path / "dict"))[0] == expected
    assert load(tokenizer, tmp_path, path=str(tmp_path / "dict"), split="test")[0] == expected[:1]
    assert streamed(tokenizer, tmp_path, path=str(tmp_path / "one")) == expected
    with pytest.raises(
        ValueError, match=r"has no split 'validation'; set data.split to one of \['train', 'test'\]"
    ):
        load(tokenizer, tmp_path, path=str(tmp_path / "dict"), split="validation")


def test_a_hub_id_is_loaded_with_its_subset_split_and_revision(tokenizer, tmp_path, expected, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, *, split, revision=None, streaming=False):
        calls.append((path, name, split, revision, streaming))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(hub_access, "check_source", lambda *args: None)  # no hub to ask here (tests/test_hub.py)
    settings = dict(path="org/prefs", subset="default", split="train_prefs", revision="v2")
    assert load(tokenizer, tmp_path, **settings)[0] == expected
    assert calls == [("org/prefs", "default", "train_prefs", "v2", False)]


def test_ultrafeedback_binarized_layout_is_detected_as_implicit_prompt(tokenizer, tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a string ``prompt`` that both message lists begin with."""

    def turns(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    hub_rows = [
        {
            "prompt": row["prompt"],
            "prompt_id": str(i),
            "chosen": turns(row["prompt"], row["chosen"]),
            "rejected": turns(row["prompt"], row["rejected"]),
            "messages": turns(row["prompt"], row["chosen"]),
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        }
        for i, row in enumerate(ROWS)
    ]
    explicit = [
        {
            "prompt": turns(row["prompt"], "")[:1],
            "chosen": turns("", row["chosen"])[1:],
            "rejected": turns("", row["rejected"])[1:],
        }
        for row in ROWS
    ]
    datasets.Dataset.from_list(hub_rows).to_parquet(tmp_path / "uf.parquet")
    datasets.Dataset.from_list(explicit).to_parquet(tmp_path / "explicit.parquet")
    items, stats = load(tokenizer, tmp_path, path=str(tmp_path / "uf.parquet"))
    assert stats.schema == "implicit_prompt" and len(items) == len(ROWS)
    assert items == load(tokenizer, tmp_path, path=str(tmp_path / "explicit.parquet"))[0]
    # Forced to the conversational schema, the string prompt is refused with the setting that reads it.
    with pytest.raises(
        ValueError, match=r"row 1: 'prompt' must be a list .*set data.schema: implicit_prompt"
    ):
        load(tokenizer, tmp_path, path=str(tmp_path / "uf.parquet"), schema="conversational")


def test_hh_rlhf_layout_is_detected_as_implicit_prompt(tokenizer, tmp_path):
    """Anthropic/hh-rlhf: ``chosen`` and ``rejected`` transcripts that share the dialogue up to the last answer."""
    rows = [
        {
            "chosen": "\n\nHuman: Name a cat.\n\nAssistant: Tom.",
            "rejected": "\n\nHuman: Name a cat.\n\nAssistant: A pear.",
        },
        {
            "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: Pear.",
            "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: Stone.",
        },
    ]
    datasets.Dataset.from_list(rows).to_json(tmp_path / "hh.jsonl")
    items, stats = load(tokenizer, tmp_path, path=str(tmp_path / "hh.jsonl"))
    assert stats.schema == "implicit_prompt" and len(items) == 2
    assert tokenizer.decode(items[0].prompt_ids, skip_special_tokens=True).endswith("Assistant:")


def test_an_unknown_layout_names_the_schema_values_to_set():
    with pytest.raises(
        ValueError, match=r"columns \['question', 'response_j', 'response_k'\]; set data.schema: standard"
    ):
        detect_schema({"question": "q", "response_j": "a", "response_k": "b"})
    with pytest.raises(ValueError, match=r"'prompt' is a str and 'chosen' a list.*implicit_prompt"):
        detect_schema({"prompt": "q", "chosen": [{"role": "user", "content": "other"}], "rejected": []})


def test_a_second_load_reads_the_tokenisation_cache(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tokenized_rows = []
    tokenize_row = llm_data.tokenize_row
    monkeypatch.setattr(
        llm_data, "tokenize_row", lambda row, *a: tokenized_rows.append(row) or tokenize_row(row, *a)
    )
    first, _ = load(tokenizer, tmp_path, path=str(path))
    assert len(tokenized_rows) == len(ROWS) and len(list((tmp_path / "tok").glob("*.arrow"))) == 1
    second, _ = load(tokenizer, tmp_path, path=str(path))
    assert second == first and len(tokenized_rows) == len(ROWS)  # read back, not tokenized again
    load(
        tokenizer, tmp_path, path=str(path), max_length=64, max_prompt_length=32
    )  # another setting: tokenized
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:2]))  # another content: tokenized
    changed, _ = load(tokenizer, tmp_path, path=str(path))
    assert len(tokenized_rows) == 2 * len(ROWS) + 2 and changed == first[:2]


# --- preflight ------------------------------------------------------------------------------------------------


def llm_config(tmp_path, *overrides):
    return load_config(
        Path(__file__).resolve().parents[1] / "configs" / "toy_llm_dpo.yaml",
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'tok'}",
            f"model.pretrained={TOY_LLM}",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.path=/nowhere/pairs.jsonl", r"data.path='/nowhere/pairs.jsonl': no such file; give an existing"),
        ("data.path=/nowhere/folder", r"data.path='/nowhere/folder': no such file or directory"),
        ("model.pretrained=./no-model", r"model.pretrained='./no-model': no such file or directory"),
        ("eval.prompts=/nowhere/prompts.jsonl", r"eval.prompts='/nowhere/prompts.jsonl': no such file"),
        ("data.path=org/not-cached", r"data.path='org/not-cached': HF_HUB_OFFLINE is set and this dataset is not"),
    ],
)
def test_preflight_names_a_missing_path(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        preflight_llm(llm_config(tmp_path, override))


def test_preflight_refuses_columns_that_fit_no_schema_and_an_unwritable_output(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(
        ConfigError, match=r"has the columns \['answer', 'question'\], which fit no schema; set data.schema"
    ):
        preflight_llm(llm_config(tmp_path, f"data.path={path}"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"run.output_dir: .*file/run is not writable"):
        preflight_llm(llm_config(tmp_path, f"run.output_dir={tmp_path / 'file' / 'run'}"))
