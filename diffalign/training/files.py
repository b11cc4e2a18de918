"""Run outputs on disk: ordinary file permissions and a readable disk-full message."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
