"""Where a trained model came from, written into the ``config.yaml`` that travels with it.

The config of a final model (``final/config.yaml``, and every folder ``diffalign export`` writes) is the run's
resolved config with two changes that make it reproducible elsewhere:

- every value naming a local file or folder (the base model, the data, prompt files, caches) is an absolute
  path, so the config works from any directory (relative ones are resolved from the directory training ran in);
- a top-level ``provenance`` section (recorded, not a setting: ``load_config`` ignores it) holds the diffalign
  version and git commit (``git_dirty`` when the checkout had uncommitted changes), the versions of Python and
  of the libraries that compute the step, the time it was written, and the commit of every hub model or data set
  the config names that is in the local Hugging Face cache.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from diffalign.hub import cached_revision

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "huggingface_hub")
# "org/name": what a hub id looks like (a local path that exists is taken as a path first).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROVENANCE_KEY = "provenance"


# Config keys whose values are paths whatever they look like (other values count as paths only with a separator
# or a suffix, so that a value such as `train` is not taken for a folder of that name in the working directory).
PATH_KEYS = frozenset(
    {"pretrained", "vae", "source", "path", "prompts", "prompts_file", "cache_dir", "reference_cache", "output_dir",
     "resume", "bank_dir", "subject_dir", "exemplars", "reference"}
)


def local_path(value: str, base: Path, key: str = "") -> Path | None:
    """The existing local file or folder a config string names, relative paths taken from ``base``."""
    if not value or not (os.sep in value or Path(value).suffix or key in PATH_KEYS):
        return None
    path = base / Path(value).expanduser()
    return path.resolve() if path.exists() else None


def absolute_paths(value: Any, base: Path, key: str = "") -> Any:
    """``value`` (a config mapping) with every string naming an existing local path made absolute."""
    if isinstance(value, dict):
        return {name: absolute_paths(item, base, name) for name, item in value.items()}
    if isinstance(value, list):
        return [absolute_paths(item, base, key) for item in value]
    if isinstance(value, str) and (path := local_path(value, base, key)) is not None:
        return str(path)
    return value


def hub_references(config: dict[str, Any], prefix: str = "") -> dict[str, dict[str, str]]:
    """``{dotted key: {repo_id, revision}}`` for every config value that is a hub id found in the local cache
    (models, then data sets); a ``revision`` beside the key (``model.revision``) selects the cached snapshot."""
    found: dict[str, dict[str, str]] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            found.update(hub_references(value, f"{prefix}{key}."))
        elif isinstance(value, str) and HUB_ID.match(value) and local_path(value, Path.cwd()) is None:
            revision = cached_revision(value, config.get("revision"))
            if revision is not None:
                found[f"{prefix}{key}"] = {"repo_id": value, "revision": revision}
    return found


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """The commit checked out at ``directory`` and whether tracked files differ from it; (None, None) unless
    ``directory`` is the top of a git checkout (an installed package inside some other repository is not), or
    without git."""
    if not (directory / ".git").exists():  # a folder, or a file in a worktree
        return None, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(changes)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """The ``provenance`` section for a model trained under ``config`` (a plain config mapping)."""
    commit, dirty = git_state(Path(__file__).resolve().parents[1])
    record: dict[str, Any] = {
        "diffalign_version": package_version("diffalign"),
        "git_commit": commit,
        "git_dirty": dirty,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Relative paths of the config are relative to it.
        "working_directory": os.getcwd(),
        "python": platform.python_version(),
        "libraries": {name: package_version(name) for name in LIBRARIES if package_version(name)},
    }
    hub = hub_references(config)
    if hub:
        record["hub"] = hub
    return record


def with_provenance(config: dict[str, Any], exported: bool = False) -> dict[str, Any]:
    """``config`` with absolute local paths and a ``provenance`` section: the one it has (a checkpoint's, written
    when training started; with ``exported``, what writes it now is added under ``exported``), or a new one."""
    earlier = config.get(PROVENANCE_KEY)
    base = Path(earlier.get("working_directory", ".")) if earlier else Path.cwd()
    resolved = absolute_paths({key: value for key, value in config.items() if key != PROVENANCE_KEY}, base)
    if earlier is None:
        resolved[PROVENANCE_KEY] = provenance(resolved)
    elif not exported:
        resolved[PROVENANCE_KEY] = earlier
    else:
        now = provenance(resolved)
        resolved[PROVENANCE_KEY] = {
            **earlier,
            "exported": {key: now[key] for key in ("diffalign_version", "git_commit", "git_dirty", "written")},
        }
    return resolved


def write_model_config(config: dict[str, Any], path: Path, exported: bool = False) -> dict[str, Any]:
    """Write :func:`with_provenance` of ``config`` to ``path``; returns what was written."""
    resolved = with_provenance(config, exported)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return resolved
