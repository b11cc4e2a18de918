"""Files a run writes: ordinary permissions, whole-or-absent tensor files and model folders, the free space for
disk-full errors, damaged cache files."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor


def current_umask() -> int:
    status = Path("/proc/self/status")  # Linux: read without changing it
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)  # elsewhere the only way to read it is to set it (briefly to the strictest mask)
    os.umask(mask)
    return mask


def respect_umask(path: Path) -> None:
    """Give ``path`` (a file, or every file and folder below a folder) the mode a plain ``open`` would.

    safetensors writes its files with mode 0600, which hides checkpoints and exported models from the other
    users of a shared machine; everything else the run writes follows the process's umask.
    """
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def file_written_whole(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it with the umask's mode when the ``with`` block completes.

    A crash or a full disk midway never leaves a truncated (or, for a Parquet writer closed on the way out, a
    valid but partial) file where a reader (a cache lookup, the next run) would take it for a complete one.
    """
    temporary = path.with_name(f".{path.name}.partial")
    try:
        yield temporary
        respect_umask(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, whole or not at all (see :func:`file_written_whole`)."""
    with file_written_whole(path) as temporary:
        temporary.write_text(text)


def save_tensors_atomically(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path``, whole or not at all (see :func:`file_written_whole`)."""
    with file_written_whole(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


@contextlib.contextmanager
def folder_written_whole(folder: Path) -> Iterator[Path]:
    """A staging folder beside ``folder`` that takes ``folder``'s place only when the ``with`` block completes.

    A model folder (``final/``, ``best/``, an export) is many files; written in place, a crash, a signal or a full
    disk midway leaves a folder a loader takes for complete, or destroys the earlier ``best/``. Here a failure
    leaves ``folder`` as it was (or absent) and removes the staging folder, so a retry starts clean. The folder
    gets the umask's mode.
    """
    staging = folder.with_name(f".{folder.name}.partial")
    previous = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(staging, ignore_errors=True)  # from a run killed while it wrote
    if previous.exists() and not folder.exists():  # a run killed between the two renames below
        previous.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        respect_umask(staging)
        if folder.exists():
            folder.rename(previous)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if previous.exists() and not folder.exists():
            previous.rename(folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def free_space(path: Path) -> str:
    """The free space on the disk holding ``path`` (or its nearest existing parent), for error messages."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


def damaged_cache(path: Path, error: Exception) -> ValueError:
    """The error for a cache file that cannot be read: caches are rebuilt from the data, so deleting it is safe."""
    return ValueError(f"cache file {path} is damaged ({error}); delete it and the next run computes it again")


def read_cache_file(path: Path) -> dict[str, Tensor]:
    """A safetensors cache file, or :func:`damaged_cache` naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise damaged_cache(path, error) from None
