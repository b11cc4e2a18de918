"""Preference data in TRL's schemas: reading, checking, tokenizing and truncating.

Schemas (column names and types as in TRL):

- standard: ``prompt``, ``chosen``, ``rejected`` strings; completions get the tokenizer's EOS appended.
- conversational: the same columns holding lists of ``{role, content}`` messages, rendered with the tokenizer's
  chat template (the completion is the rendered conversation minus the rendered prompt).
- implicit_prompt: only ``chosen`` and ``rejected`` (strings or messages) that share a prefix, as in Anthropic
  HH; the shared prefix is the prompt.
- unpaired: ``prompt``, ``completion`` and a boolean ``label`` (desirable or not), for KTO-style losses.

Rows are read from a local JSONL/JSON/parquet file, a local dataset directory or a hub id. A malformed row
stops the run with its file and row number, or is skipped and counted (``data.bad_rows: skip``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.llm.config import LLMDataConfig

logger = logging.getLogger("diffalign")

Text = str | list[dict[str, str]]  # a plain string, or chat messages


class BadRowError(ValueError):
    """A row that does not fit its schema; ``reason`` is a short category for skip counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PairItem:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class UnpairedItem:
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    # Another prompt's completion: (prompt, mismatched) estimates KTO's reference point z0.
    mismatched_ids: list[int] = field(default_factory=list)


@dataclass
class DataStats:
    source: str
    schema: str
    rows: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_prompts: int = 0
    truncated_completions: int = 0

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = f"{self.source}: {self.used} of {self.rows} rows used (schema {self.schema})"
        if skipped:
            text += f"; skipped {skipped} bad rows {dict(self.skipped)}"
        if self.truncated_prompts or self.truncated_completions:
            text += (
                f"; truncated {self.truncated_prompts} prompts (data.max_prompt_length) and "
                f"{self.truncated_completions} rows' completions (data.max_length)"
            )
        return text


# --- reading ------------------------------------------------------------------------------------------------


def read_rows(path: str, split: str = "train", subset: str | None = None, key: str = "data.path") -> list[Any]:
    """Rows of a JSONL/JSON/parquet file, a local dataset directory or a hub dataset, as plain values (dicts,
    unless the file holds something else: callers check each row); ``key`` names the config key of ``path`` in
    errors."""
    local = Path(path)
    if local.is_file():
        if local.suffix == ".jsonl":
            return _read_jsonl(local)
        if local.suffix == ".json":
            rows = json.loads(_utf8_text(local.read_bytes(), local))
            if not isinstance(rows, list):
                raise ValueError(f"{local}: a .json data file must hold a list of row objects")
            return rows
        if local.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                return pq.read_table(local).to_pylist()
            except pa.ArrowException as error:
                raise ValueError(f"{local} is not a readable parquet file ({error})") from None
        raise ValueError(
            f"{local}: unsupported data file type {local.suffix!r}; use .jsonl, .json or .parquet"
        )
    if local.suffix in (".jsonl", ".json", ".parquet"):
        from diffalign.config import LoadError

        raise LoadError(f"{key}={path!r}: no such file; give an existing data file, a dataset directory or a hub id")

    from diffalign.hub import loading

    with loading(key, path, f"dataset (subset {subset!r}, split {split!r})", repo_type="dataset"):
        import datasets  # after the hub check: it takes seconds to import

        dataset = datasets.load_dataset(path, subset, split=split)
    return dataset.to_list()


def _utf8_text(data: bytes, where: Path | str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{where}: not UTF-8 text (byte {error.start + 1} is {data[error.start]:#04x}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = _utf8_text(raw, f"{path}, line {number}")
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({error}); fix or remove the line"
                ) from None
    return rows


def detect_schema(row: dict[str, Any]) -> str:
    columns = set(row)
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired"
    if {"chosen", "rejected"} <= columns:
        if "prompt" not in columns:
            return "implicit_prompt"
        return "conversational" if _is_messages(row["chosen"]) else "standard"
    raise ValueError(
        f"cannot tell the schema from the columns {sorted(columns)}; expected prompt/chosen/rejected (standard or "
        "conversational), chosen/rejected (implicit prompt) or prompt/completion/label (unpaired)"
    )


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


# --- checking rows ------------------------------------------------------------------------------------------


def _field(row: dict[str, Any], key: str, conversational: bool) -> Text:
    if key not in row or row[key] is None:
        raise BadRowError("missing field", f"missing field {key!r}")
    value = row[key]
    if conversational and not _is_messages(value):
        raise BadRowError(
            "wrong type", f"{key!r} must be a list of {{role, content}} messages, got {value!r:.80}"
        )
    if conversational and not value:
        raise BadRowError("empty messages", f"{key!r} holds no messages")
    if conversational and any(message["content"] is None for message in value):
        # A chat template renders null as the text "None".
        raise BadRowError("empty messages", f"{key!r} has a message whose content is null")
    if not conversational and not isinstance(value, str):
        raise BadRowError("wrong type", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not text or all(not str(m["content"]).strip() for m in text)


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) from two texts that share a prefix, as TRL's ``extract_prompt``.

    Messages split at the first differing message. Strings split at the first differing character, moved back
    before a space so that the completions start with the space (as they would after a prompt in running text).
    """
    if isinstance(chosen, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        return chosen[:shared], chosen[shared:], rejected[shared:]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_row(row: Any, schema: str) -> tuple[Text, Text, Text | bool]:
    """(prompt, chosen, rejected) for paired schemas, (prompt, completion, label) for unpaired; checked."""
    if not isinstance(row, dict):
        raise BadRowError("not an object", f"the row is {row!r:.40}, not an object with the schema's fields")
    if schema == "unpaired":
        conversational = _is_messages(row.get("prompt"))
        prompt = _field(row, "prompt", conversational)
        completion = _field(row, "completion", conversational)
        label = row.get("label")
        if not isinstance(label, bool):
            raise BadRowError("wrong type", f"'label' must be true or false, got {label!r}")
        if _is_empty(completion):
            raise BadRowError("empty completion", "'completion' is empty")
        return prompt, completion, label

    if schema == "implicit_prompt":
        conversational = _is_messages(row.get("chosen"))
        prompt, chosen, rejected = split_implicit_prompt(
            _field(row, "chosen", conversational), _field(row, "rejected", conversational)
        )
        if _is_empty(prompt):
            raise BadRowError(
                "no shared prompt", "'chosen' and 'rejected' share no prefix to use as the prompt"
            )
    else:
        conversational = schema == "conversational"
        prompt = _field(row, "prompt", conversational)
        chosen = _field(row, "chosen", conversational)
        rejected = _field(row, "rejected", conversational)
    if _is_empty(chosen) or _is_empty(rejected):
        raise BadRowError("empty completion", "'chosen' or 'rejected' is empty")
    if chosen == rejected:
        raise BadRowError(
            "chosen == rejected", "'chosen' and 'rejected' are identical, so there is no preference"
        )
    return prompt, chosen, rejected


# --- tokenizing ---------------------------------------------------------------------------------------------


def tokenize_prompt(tokenizer, prompt: Text) -> list[int]:
    """Prompt token ids: chat-templated (with the generation prompt) for messages, special tokens added for text."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def tokenize_completion(tokenizer, prompt: Text, completion: Text) -> list[int]:
    """Completion token ids.

    Messages: the chat template renders prompt + completion; the completion is what follows the rendered
    prompt, end-of-turn tokens included. Text: the completion's own tokens plus EOS (as TRL).
    """
    if isinstance(completion, list):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise BadRowError(
                "chat template",
                "the chat template renders prompt + completion with a different prefix than the prompt alone "
                "(does it rewrite earlier turns?); use the standard schema with pre-rendered text",
            )
        return tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def truncate(
    prompt_ids: list[int], completions: list[list[int]], config: LLMDataConfig, stats: DataStats
) -> tuple[list[int], list[list[int]]]:
    """Keep the prompt's last ``max_prompt_length`` tokens and each completion's first ``max_length − prompt``."""
    if config.max_prompt_length is not None and len(prompt_ids) > config.max_prompt_length:
        prompt_ids = prompt_ids[-config.max_prompt_length :]
        stats.truncated_prompts += 1
    if config.max_length is not None:
        room = config.max_length - len(prompt_ids)
        if room < 1:
            raise BadRowError(
                "prompt too long",
                f"the prompt has {len(prompt_ids)} tokens, leaving no room under data.max_length={config.max_length}; "
                "set data.max_prompt_length below data.max_length",
            )
        if any(len(ids) > room for ids in completions):
            stats.truncated_completions += 1
            completions = [ids[:room] for ids in completions]
    return prompt_ids, completions


def load_preference_items(
    config: LLMDataConfig, tokenizer
) -> tuple[list[PairItem] | list[UnpairedItem], DataStats]:
    """Read, check, tokenize and truncate the configured data; unpaired items get their mismatched completion."""
    rows = read_rows(config.path, config.split, config.subset)
    objects = [row for row in rows if isinstance(row, dict)]
    if not objects:
        found = f"none of its {len(rows)} rows is an object" if rows else "it is empty"
        raise ValueError(f"data.path={config.path!r} holds no rows ({found}); give a file of preference rows")
    schema = config.schema if config.schema != "auto" else detect_schema(objects[0])
    stats = DataStats(source=config.path, schema=schema, rows=len(rows))
    items: list[Any] = []
    for number, row in enumerate(rows, start=1):
        if config.max_rows is not None and len(items) >= config.max_rows:
            break
        try:
            prompt, first, second = parse_row(row, schema)
            prompt_ids = tokenize_prompt(tokenizer, prompt)
            if schema == "unpaired":
                completions = [tokenize_completion(tokenizer, prompt, first)]
            else:
                completions = [
                    tokenize_completion(tokenizer, prompt, first),
                    tokenize_completion(tokenizer, prompt, second),
                ]
            prompt_ids, completions = truncate(prompt_ids, completions, config, stats)
            if len(completions) == 2 and completions[0] == completions[1]:
                raise BadRowError(
                    "chosen == rejected", "'chosen' and 'rejected' are identical after tokenization"
                )
        except BadRowError as error:
            if config.bad_rows == "error":
                raise ValueError(
                    f"data.path={config.path!r}, row {number}: {error}. Fix the row, or set data.bad_rows: skip "
                    "to skip such rows (they are counted and logged)"
                ) from None
            stats.skipped[error.reason] += 1
            continue
        if schema == "unpaired":
            items.append(UnpairedItem(prompt_ids, completions[0], desirable=second))
        else:
            items.append(PairItem(prompt_ids, completions[0], completions[1]))
    stats.used = len(items)
    if not items:
        raise ValueError(f"data.path={config.path!r}: no usable rows ({stats.summary()})")
    logger.info("training data: %s", stats.summary())
    return items, stats


def assign_mismatched_completions(items: list[UnpairedItem]) -> None:
    """Give each item the completion of the next item (cyclically) that has a different prompt.

    KTO estimates its reference point z0 from (prompt_i, completion_j) pairs with j ≠ i (Ethayarajh et al.,
    arXiv 2402.01306; TRL pairs each prompt with the next row's completion). Fixing the pairing per item, rather
    than per batch, makes the reference log-probs of these pairs precomputable.
    """
    count = len(items)
    for i, item in enumerate(items):
        others = ((i + k) % count for k in range(1, count))
        j = next((j for j in others if items[j].prompt_ids != item.prompt_ids), None)
        if j is None:
            raise ValueError(
                "KTO needs at least two distinct prompts in the data to estimate its reference point"
            )
        item.mismatched_ids = items[j].completion_ids
