"""Typed configs: YAML files in ``configs/`` read into nested dataclasses, with dotted CLI overrides.

A config file names its kind with a top-level ``kind`` key (``diffusion``, ``llm``, ``eval``): the kind fixes
the dataclass every other key must exist in, the command that runs it and the function that does. Values are
checked against the type hints before any model loads, and errors name the key, the value and what is allowed::

    cfg = load_config("configs/toy_dpo.yaml", ["optim.lr=1e-5", "loss.beta=2500"], command="train")
    metrics = entry_point(cfg.kind)(cfg)
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


@dataclass(frozen=True)
class ConfigKind:
    """What a ``kind:`` stands for. Both targets are ``module:name`` strings, imported only when used, so that
    loading a config never imports a trainer's heavy dependencies it does not need."""

    config: str  # the dataclass the file is read into
    command: str  # the ``diffalign`` command that runs it
    entry_point: str  # the function the command calls with the config
    description: str


CONFIG_KINDS: dict[str, ConfigKind] = {
    "diffusion": ConfigKind(
        "diffalign.diffusion.config:DiffusionTrainConfig",
        "train",
        "diffalign.diffusion.trainer:train",
        "the diffusion preference trainer (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2 [klein], Qwen-Image, "
        "SANA, MusicLDM, AudioLDM, AudioLDM2, Stable Audio, ACE-Step)",
    ),
    "llm": ConfigKind(
        "diffalign.llm.config:LLMTrainConfig",
        "train",
        "diffalign.llm.trainer:train",
        "the LLM preference trainer (transformers causal LMs)",
    ),
    "llm_online": ConfigKind(
        "diffalign.llm.online_config:LLMOnlineTrainConfig",
        "train",
        "diffalign.llm.online:train",
        "the online LLM trainer (GRPO and its variants, RLOO, online DPO on sampled groups)",
    ),
    "eval": ConfigKind(
        "diffalign.eval.config:EvalConfig",
        "eval",
        "diffalign.eval.run:evaluate",
        "a base-vs-aligned evaluation report",
    ),
    "llm_eval": ConfigKind(
        "diffalign.llm.config:LLMEvalRunConfig",
        "eval",
        "diffalign.llm.report:evaluate",
        "a base-vs-aligned evaluation report of an LLM: completions of held-out prompts under a reward",
    ),
}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and what is allowed."""


class LoadError(ConfigError):
    """A model, tokenizer, dataset or reward named in a config cannot be loaded; the message names the config key,
    the value and the fix. A :class:`ConfigError`, so the command line reports it in one line as it does those."""


class SourceNotFoundError(LoadError, FileNotFoundError):
    """A file, directory or hub repository named in a config is not there; the message says what to place where."""


def require_at_least_one(
    settings: Any, section: str, names: typing.Sequence[str], *, nullable: bool = False
) -> None:
    """Raise a ValueError naming ``section.name`` for the first of ``names`` whose value is below 1 (or null,
    unless ``nullable``), so every config section words this check the same way."""
    for name in names:
        value = getattr(settings, name)
        if value is None and nullable:
            continue
        if value is None or value < 1:
            raise ValueError(f"{section}.{name} must be >= 1{' or null' if nullable else ''}, got {value}")


def kinds_for(command: str) -> list[str]:
    return [kind for kind, entry in CONFIG_KINDS.items() if entry.command == command]


def _import(target: str) -> Any:
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def config_class(kind: str) -> type:
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"kind: {kind!r} is not a config kind; allowed: {sorted(CONFIG_KINDS)}")
    return _import(CONFIG_KINDS[kind].config)


def entry_point(kind: str) -> Callable[[Any], Any]:
    """The function that runs a config of this kind (a trainer's ``train``, or ``evaluate``)."""
    config_class(kind)  # the same error for an unknown kind
    return _import(CONFIG_KINDS[kind].entry_point)


def load_config(path: str | Path, overrides: typing.Sequence[str] = (), command: str | None = None) -> Any:
    """Read a YAML config, apply ``key.sub=value`` overrides and build the config dataclass of its kind.

    With ``command`` (``train``, ``eval``), a config whose kind another command runs is refused before anything
    else is checked.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    # A model's config.yaml records where it came from under `provenance` (provenance.py): no setting.
    raw.pop("provenance", None)
    for override in overrides:
        apply_override(raw, override)
    if "kind" not in raw:
        raise ConfigError(f"{path}: missing top-level key 'kind'; allowed: {sorted(CONFIG_KINDS)}")
    kind = raw["kind"]
    if command is not None and kind in CONFIG_KINDS and CONFIG_KINDS[kind].command != command:
        raise ConfigError(
            f"{path}: kind: {kind} is run by `diffalign {CONFIG_KINDS[kind].command} {path}`, not "
            f"`diffalign {command}`; `diffalign {command}` takes kind: {' or '.join(kinds_for(command))}"
        )
    try:
        return from_dict(config_class(raw["kind"]), raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``1e-5``, ``[a, b]``, ``null``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted_key, text = override.split("=", 1)
    keys = dotted_key.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(text)


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, converting and checking every value against its type hint."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; allowed keys here: {sorted(fields)}")
    values = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:  # a required field without default is missing
        raise ConfigError(f"{prefix or 'config'}: {error}") from None
    except ValueError as error:  # __post_init__ checks
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(" / ".join(errors))
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        item_hint = get_args(hint)[0] if get_args(hint) else Any
        if isinstance(value, (str, int, float, bool)):  # a single value where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_hint = get_args(hint)[1] if get_args(hint) else Any
        return {k: _convert(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads `1e-5` (no dot) as a string, so numeric strings are accepted here.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be reproduced from its output."""
    from diffalign.files import write_text_whole  # files imports torch; the config module stays light

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
