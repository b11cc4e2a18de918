"""Preference data in TRL's schemas: reading, checking, tokenizing and truncating.

Schemas (column names and types as in TRL):

- standard: ``prompt``, ``chosen``, ``rejected`` strings; completions get the tokenizer's EOS appended.
- conversational: the same columns holding lists of ``{role, content}`` messages, rendered with the tokenizer's
  chat template (the completion is the rendered conversation minus the rendered prompt).
- implicit_prompt: only ``chosen`` and ``rejected`` (strings or messages) that share a prefix, as in Anthropic
  HH; the shared prefix is the prompt.
- unpaired: ``prompt``, ``completion`` and a boolean ``label`` (desirable or not), for KTO-style losses.

Rows are read by ``datasets`` from a JSONL/JSON/parquet/arrow file, a ``save_to_disk`` folder, a folder of data
files or a hub id (subset, split, revision), and tokenized by ``Dataset.map`` into an arrow file cached under
their content, the tokenizer and the truncation settings, so that a second run reads it back. A malformed row
stops the run with its file and row number, or is skipped and counted (``data.bad_rows: skip``). With
``data.streaming`` rows are read, checked and tokenized as they are trained on (llm/batching.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.config import LoadError
from diffalign.llm.config import LLMDataConfig
from diffalign.progress import progress_enabled
from diffalign.streaming import BadRow as BadRowError
from diffalign.streaming import ShardedSource, stream_files, stream_hub

logger = logging.getLogger("diffalign")

Text = str | list[dict[str, str]]  # a plain string, or chat messages


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

RAW_COLUMN = "__row_json__"  # rows that no typed table can hold (mixed types, non-objects), as JSON text
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class RowTable:
    """The rows of ``data.path`` as a ``datasets.Dataset`` (memory-mapped; one :data:`RAW_COLUMN` of JSON text
    when the rows have no common type), with what identifies their content for the tokenisation cache."""

    dataset: Any
    name: str
    identity: str


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_rows(
    path: str,
    *,
    split: str = "train",
    subset: str | None = None,
    revision: str | None = None,
    key: str = "data.path",
) -> RowTable:
    """Rows of a JSONL/JSON (JSON Lines or a list)/parquet/arrow file, a ``save_to_disk`` folder, a folder of
    data files, or a hub dataset (``subset``, ``split``, ``revision``), read by ``datasets``; ``key`` names the
    config key of ``path`` in errors."""
    from diffalign.hub import loading

    local = Path(path)
    if local.is_file():
        return _open_file(local)
    _require_existing_file(local, path, key)
    with loading(
        key, path, f"dataset (subset {subset!r}, split {split!r})", repo_type="dataset", revision=revision
    ):
        import datasets  # after the hub check: it takes seconds to import

        if local.is_dir() and is_saved_dataset(local):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise LoadError(
                        f"{key}={path!r} (a saved DatasetDict) has no split {split!r}; set data.split to one of "
                        f"{list(loaded)}"
                    )
                loaded = loaded[split]
            return RowTable(loaded, str(local), f"saved:{loaded._fingerprint}")
        dataset = datasets.load_dataset(path, subset, split=split, revision=revision)
    return RowTable(dataset, path, f"hub:{dataset._fingerprint}")


def _require_existing_file(local: Path, path: str, key: str) -> None:
    if local.suffix in BUILDERS:
        raise LoadError(
            f"{key}={path!r}: no such file; give an existing data file, a dataset directory or a hub id"
        )


def _open_file(path: Path) -> RowTable:
    import datasets

    if path.suffix not in BUILDERS:
        raise ValueError(
            f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json, .parquet or .arrow"
        )
    if path.suffix == ".parquet":
        _require_parquet(path)
    stat = path.stat()
    identity = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        dataset = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # `datasets` raises many types for a file it cannot make one table of
        if BUILDERS[path.suffix] != "json":
            raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
        # Read again line by line: it names a line that is not JSON, and keeps rows of mixed types as JSON text
        # so that each reaches the row checks.
        rows = _read_json_rows(path)
        dataset = datasets.Dataset.from_dict({RAW_COLUMN: [json.dumps(row) for row in rows]})
    return RowTable(dataset, str(path), identity)


def _require_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except pa.ArrowException as error:
        raise ValueError(f"{path} is not a readable parquet file ({error})") from None


def _read_json_rows(path: Path) -> list[Any]:
    data = path.read_bytes()
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        rows = json.loads(_utf8_text(data, path))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json data file must hold a list of row objects or JSON Lines")
        return rows
    return _read_jsonl(path)


def open_row_stream(config: LLMDataConfig) -> ShardedSource:
    """``data.path`` as a ``datasets`` stream (``data.streaming``): files, saved datasets, folders and hub ids."""
    local = Path(config.path)
    if local.is_file():
        if local.suffix not in BUILDERS:
            raise ValueError(
                f"{local}: unsupported data file type {local.suffix!r}; use .jsonl, .json, .parquet or .arrow"
            )
        return stream_files([local], BUILDERS[local.suffix])
    _require_existing_file(local, config.path, "data.path")
    if local.is_dir() and is_saved_dataset(local):
        table = open_rows(config.path, split=config.split)
        shards = max(1, len(table.dataset.cache_files))
        dataset = table.dataset.to_iterable_dataset(num_shards=shards)
        return ShardedSource(
            dataset, [f"{local} shard {i + 1}/{shards}" for i in range(shards)], [None] * shards
        )
    return stream_hub(
        config.path, key="data.path", split=config.split, subset=config.subset, revision=config.revision
    )


def read_rows(
    path: str, split: str = "train", subset: str | None = None, key: str = "data.path"
) -> list[Any]:
    """Rows of ``path`` (see :func:`open_rows`) as plain values: dicts, or whatever a JSON line holds."""
    table = open_rows(path, split=split, subset=subset, key=key)
    if RAW_COLUMN in table.dataset.column_names:
        return [json.loads(text) for text in table.dataset[RAW_COLUMN]]
    return table.dataset.to_list()


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


SCHEMA_HELP = (
    "set data.schema: standard (prompt/chosen/rejected strings), conversational (the same columns as lists of "
    "{role, content} messages), implicit_prompt (chosen/rejected that begin with their shared prompt, as "
    "HH-RLHF and ultrafeedback_binarized) or unpaired (prompt/completion/label)"
)


def detect_schema(row: dict[str, Any]) -> str:
    """The schema of a row from its columns and value types: TRL's four, plus the hub layouts that put the
    prompt inside both completions (Anthropic HH-RLHF: text; ultrafeedback_binarized: messages, with the prompt
    repeated as a string in ``prompt``)."""
    columns = set(row)
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired"
    if {"chosen", "rejected"} <= columns:
        if "prompt" not in columns:
            return "implicit_prompt"
        prompt, chosen = row["prompt"], row["chosen"]
        if _is_messages(chosen) and _is_messages(prompt):
            return "conversational"
        if isinstance(prompt, str) and isinstance(chosen, str):
            return "standard"
        if isinstance(prompt, str) and _is_messages(chosen) and chosen and chosen[0].get("content") == prompt:
            return "implicit_prompt"  # ultrafeedback_binarized: the messages begin with the prompt
        raise ValueError(
            f"cannot tell the schema: 'prompt' is a {type(prompt).__name__} and 'chosen' a {type(chosen).__name__}, "
            f"which fit no schema; {SCHEMA_HELP}"
        )
    raise ValueError(f"cannot tell the schema from the columns {sorted(columns)}; {SCHEMA_HELP}")


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
        hint = (
            " (messages that begin with the prompt: set data.schema: implicit_prompt)"
            if key == "prompt"
            else ""
        )
        raise BadRowError(
            "wrong type", f"{key!r} must be a list of {{role, content}} messages, got {value!r:.80}{hint}"
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


@dataclass
class TokenizedRow:
    """A checked, tokenized and truncated row: a pair (``second_ids`` rejected) or an unpaired sample."""

    prompt_ids: list[int]
    first_ids: list[int]  # chosen, or the unpaired completion
    second_ids: list[int]  # rejected; empty for unpaired rows
    desirable: bool  # unpaired rows' label (True for pairs)
    truncated_prompt: bool = False
    truncated_completion: bool = False

    def item(self, paired: bool) -> PairItem | UnpairedItem:
        if paired:
            return PairItem(self.prompt_ids, self.first_ids, self.second_ids)
        return UnpairedItem(self.prompt_ids, self.first_ids, self.desirable)


def truncate(
    prompt_ids: list[int], completions: list[list[int]], config: LLMDataConfig
) -> tuple[list[int], list[list[int]], bool, bool]:
    """Keep the prompt's last ``max_prompt_length`` tokens and each completion's first ``max_length − prompt``;
    also says whether the prompt and the completions were cut."""
    truncated_prompt = truncated_completion = False
    if config.max_prompt_length is not None and len(prompt_ids) > config.max_prompt_length:
        prompt_ids = prompt_ids[-config.max_prompt_length :]
        truncated_prompt = True
    if config.max_length is not None:
        room = config.max_length - len(prompt_ids)
        if room < 1:
            raise BadRowError(
                "prompt too long",
                f"the prompt has {len(prompt_ids)} tokens, leaving no room under data.max_length={config.max_length}; "
                "set data.max_prompt_length below data.max_length",
            )
        if any(len(ids) > room for ids in completions):
            truncated_completion = True
            completions = [ids[:room] for ids in completions]
    return prompt_ids, completions, truncated_prompt, truncated_completion


def tokenize_row(row: Any, schema: str, tokenizer: Any, config: LLMDataConfig) -> TokenizedRow:
    """Check, tokenize and truncate one row of ``schema``; raises :class:`BadRowError`."""
    prompt, first, second = parse_row(row, schema)
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    completions = [tokenize_completion(tokenizer, prompt, first)]
    if schema != "unpaired":
        completions.append(tokenize_completion(tokenizer, prompt, second))
    prompt_ids, completions, cut_prompt, cut_completion = truncate(prompt_ids, completions, config)
    if len(completions) == 2 and completions[0] == completions[1]:
        raise BadRowError("chosen == rejected", "'chosen' and 'rejected' are identical after tokenization")
    if schema == "unpaired":
        return TokenizedRow(prompt_ids, completions[0], [], bool(second), cut_prompt, cut_completion)
    return TokenizedRow(prompt_ids, completions[0], completions[1], True, cut_prompt, cut_completion)


# --- the tokenized dataset ----------------------------------------------------------------------------------

# Bump when tokenize_row's output changes for the same row: it keys the tokenisation cache.
TOKENIZATION_VERSION = 1
TOKEN_COLUMNS = ("prompt_ids", "first_ids", "second_ids")
TOKENIZED_FLAGS = ("desirable", "truncated_prompt", "truncated_completion", "bad_reason", "bad_message")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides how ``tokenizer`` encodes text and renders chats."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(
        json.dumps([tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode()
    )
    return digest.hexdigest()


def _tokenize_batch(
    batch: dict[str, list], *, schema: str, tokenizer: Any, config: LLMDataConfig
) -> dict[str, list]:
    """``Dataset.map`` function: one output row per input row, bad rows marked (``bad_reason``), not dropped,
    so that an error can name the row."""
    if RAW_COLUMN in batch:
        rows = [json.loads(text) for text in batch[RAW_COLUMN]]
    else:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {name: [] for name in (*TOKEN_COLUMNS, *TOKENIZED_FLAGS)}
    for row in rows:
        try:
            tokenized = tokenize_row(row, schema, tokenizer, config)
            reason = message = ""
        except BadRowError as error:
            tokenized, reason, message = TokenizedRow([], [], [], False), error.reason, str(error)
        for name in TOKEN_COLUMNS:
            out[name].append(getattr(tokenized, name))
        out["desirable"].append(tokenized.desirable)
        out["truncated_prompt"].append(tokenized.truncated_prompt)
        out["truncated_completion"].append(tokenized.truncated_completion)
        out["bad_reason"].append(reason)
        out["bad_message"].append(message)
    return out


def tokenize_table(table: RowTable, schema: str, tokenizer: Any, config: LLMDataConfig) -> Any:
    """Every row of ``table`` tokenized by ``Dataset.map`` (batched, ``data.num_proc`` processes), cached in
    ``data.cache_dir`` under a key of the rows' content, the tokenizer and the settings: a second run with the
    same inputs reads the cached arrow file instead of tokenizing again."""
    import datasets

    settings = [
        table.identity,
        tokenizer_fingerprint(tokenizer),
        schema,
        config.max_prompt_length,
        config.max_length,
        TOKENIZATION_VERSION,
        len(table.dataset),
    ]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]
    cache_dir = Path(config.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ids = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features(
        {
            **{name: ids for name in TOKEN_COLUMNS},
            "desirable": datasets.Value("bool"),
            "truncated_prompt": datasets.Value("bool"),
            "truncated_completion": datasets.Value("bool"),
            "bad_reason": datasets.Value("string"),
            "bad_message": datasets.Value("string"),
        }
    )
    return table.dataset.map(
        _tokenize_batch,
        batched=True,
        num_proc=config.num_proc,
        fn_kwargs={"schema": schema, "tokenizer": tokenizer, "config": config},
        remove_columns=table.dataset.column_names,
        features=features,
        cache_file_name=str(cache_dir / f"{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        desc="tokenizing",
    )


class TokenizedItems(Sequence):
    """The usable rows of a tokenized dataset as :class:`PairItem` or :class:`UnpairedItem`, read from the
    memory-mapped arrow table on access."""

    def __init__(self, dataset: Any, paired: bool) -> None:
        self.dataset = dataset.select_columns([*TOKEN_COLUMNS, "desirable"])
        self.paired = paired

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> PairItem | UnpairedItem:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row = self.dataset[index]
        return TokenizedRow(row["prompt_ids"], row["first_ids"], row["second_ids"], row["desirable"]).item(
            self.paired
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


def first_row(table: RowTable) -> Any:
    """The first row that is an object, for schema detection."""
    dataset = table.dataset
    if RAW_COLUMN not in dataset.column_names:
        return dataset[0] if len(dataset) else None
    for text in dataset[RAW_COLUMN]:
        row = json.loads(text)
        if isinstance(row, dict):
            return row
    return None


def load_preference_items(config: LLMDataConfig, tokenizer: Any) -> tuple[TokenizedItems, DataStats]:
    """Read, check, tokenize (cached) and truncate the configured data; the first ``data.max_rows`` usable rows."""
    import datasets
    import pyarrow.compute as pc

    if not progress_enabled():
        datasets.disable_progress_bars()
    table = open_rows(config.path, split=config.split, subset=config.subset, revision=config.revision)
    first = first_row(table)
    if first is None:
        found = f"none of its {len(table.dataset)} rows is an object" if len(table.dataset) else "it is empty"
        raise ValueError(f"data.path={config.path!r} holds no rows ({found}); give a file of preference rows")
    schema = config.schema if config.schema != "auto" else detect_schema(first)
    limit = len(table.dataset) if config.max_rows is None else min(len(table.dataset), config.max_rows)
    while True:  # with data.max_rows, tokenize a prefix that holds enough usable rows
        part = (
            table
            if limit == len(table.dataset)
            else RowTable(table.dataset.select(range(limit)), table.name, f"{table.identity}:{limit}")
        )
        tokenized = tokenize_table(part, schema, tokenizer, config)
        reasons = tokenized.data.column("bad_reason")
        usable = pc.indices_nonzero(pc.equal(reasons, "")).to_pylist()
        if config.max_rows is None or len(usable) >= config.max_rows or limit == len(table.dataset):
            break
        limit = min(len(table.dataset), 2 * limit)
    if config.bad_rows == "error" and len(usable) < len(tokenized):
        number = next(index for index, reason in enumerate(reasons.to_pylist()) if reason)
        raise ValueError(
            f"data.path={config.path!r}, row {number + 1}: {tokenized[number]['bad_message']}. Fix the row, or set "
            "data.bad_rows: skip to skip such rows (they are counted and logged)"
        )
    usable = usable[: config.max_rows]
    selected = tokenized.select(usable)
    stats = DataStats(source=config.path, schema=schema, rows=len(tokenized), used=len(usable))
    counts = pc.value_counts(reasons).to_pylist()
    stats.skipped.update({entry["values"]: entry["counts"] for entry in counts if entry["values"]})
    for key, column in (
        ("truncated_prompts", "truncated_prompt"),
        ("truncated_completions", "truncated_completion"),
    ):
        setattr(stats, key, pc.sum(tokenized.data.column(column).take(usable)).as_py() or 0)
    if not usable:
        raise ValueError(f"data.path={config.path!r}: no usable rows ({stats.summary()})")
    logger.info("training data: %s", stats.summary())
    return TokenizedItems(selected, paired=schema != "unpaired"), stats


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
