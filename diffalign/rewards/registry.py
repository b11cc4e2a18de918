"""Scorers by name, so online methods and evaluation configure them from YAML::

    scorer = build_scorer("pickscore", device="cuda", dtype="float16")
    scorer = ScorerConfig(name="clap_score", options={"model": "/models/clap"}).build()

Each name maps to a factory function whose keyword arguments are the scorer's options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from diffalign.rewards.base import Scorer

Factory = TypeVar("Factory", bound=Callable[..., Scorer])

_SCORERS: dict[str, Callable[..., Scorer]] = {}
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def register_scorer(name: str) -> Callable[[Factory], Factory]:
    def register(factory: Factory) -> Factory:
        if name in _SCORERS:
            raise ValueError(f"scorer {name!r} is registered twice")
        _SCORERS[name] = factory
        return factory

    return register


def scorer_names() -> list[str]:
    return sorted(_SCORERS)


def require_registered(key: str, name: str) -> None:
    """``name`` is a registered scorer; raises a ``ValueError`` naming the config ``key`` and the choices."""
    if name not in _SCORERS:
        raise ValueError(f"{key}: {name!r} is not a registered scorer; choose one of {scorer_names()}")


def build_scorer(name: str, **options: Any) -> Scorer:
    """The scorer registered as ``name``, built with ``options`` (a config mapping; ``dtype`` may be a string)."""
    if name not in _SCORERS:
        raise ValueError(f"scorer {name!r} is not registered; available: {scorer_names()}")
    factory = _SCORERS[name]
    if isinstance(options.get("dtype"), str):
        options["dtype"] = parse_dtype(options["dtype"])
    allowed = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"scorer {name!r} has no option {unknown[0]!r}; its options: {list(allowed)}")
    return factory(**options)


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported; choose one of {list(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class ScorerConfig:
    """A config section naming a scorer and its options, e.g. ``{name: pickscore, options: {device: cuda}}``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_registered("name", self.name)

    def build(self) -> Scorer:
        return build_scorer(self.name, **self.options)
