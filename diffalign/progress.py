"""Progress bars for every step that can take minutes (verifying data, caching, precomputing references,
generating, scoring, relabelling, training).

Bars are drawn by tqdm on the local main process only, on stderr, and only when it is a terminal (tqdm's
``disable=None``), so logs and CI output stay clean; ``run.progress_bar: false`` turns them off for a run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_enabled = True


def configure_progress(enabled: bool) -> None:
    """Show bars (on a terminal) or never; a trainer calls it with ``run.progress_bar and is_local_main_process``."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    return _enabled


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "it",
    leave: bool = True,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one, updated with ``.update(n)``), with rate and ETA;
    ``leave=False`` for a bar that repeats every training step and is cleared when done."""
    disable = None if _enabled else True
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)
