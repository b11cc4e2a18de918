"""Where a scorer's weights come from: an explicit local path, or a Hugging Face hub id — never a guess.

A *source* is either a local path (absolute, or starting with ``.``/``~``, or any path that exists) or a hub
reference: ``org/name`` for a model directory, ``org/name/path/in/repo`` for a single file. With
``HF_HUB_OFFLINE=1`` hub references are read from the local cache only, and anything missing raises
:class:`WeightsNotFoundError` saying which file to place where. Everything is checked before a library gets to
load it, because some libraries (``transformers`` tokenizers among them) quietly build an empty object when
their files are absent offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError

from diffalign.config import LoadError, SourceNotFoundError
from diffalign.hub import check_hub_repo, hub_offline, is_local_source

# Each entry is a file a directory must hold; a tuple lists alternatives, any one of which will do.
FileRequirement = str | tuple[str, ...]

MODEL_FILES: tuple[FileRequirement, ...] = (
    "config.json",
    (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
)
TOKENIZER_FILES: tuple[FileRequirement, ...] = (("tokenizer.json", "vocab.json", "vocab.txt"),)
# transformers 5 saves a processor's image settings inside processor_config.json; older saves, and most hub
# repositories, have preprocessor_config.json. AutoImageProcessor reads either.
PREPROCESSOR_FILES: tuple[FileRequirement, ...] = (("preprocessor_config.json", "processor_config.json"),)
OPEN_CLIP_FILES: tuple[FileRequirement, ...] = ("open_clip_config.json",)

# Weight files by preference; only the first kind a hub repository has is downloaded (many ship several
# copies: safetensors and pickles, or transformers and open_clip formats of the same model).
TRANSFORMERS_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Configs, tokenizers and processors.
_SMALL_FILES = ["*.json", "*.txt", "*.model"]


class WeightsNotFoundError(SourceNotFoundError):
    """A weight, config or tokenizer file is not where the scorer was told to look; the message says what to do."""


def resolve_pretrained_dir(
    source: str, required: Sequence[FileRequirement], what: str, weights: Sequence[str] = ()
) -> Path:
    """A local directory holding every ``required`` file, from a local path or a hub repository id.

    From the hub, configs and tokenizers are fetched with the first kind of ``weights`` (glob patterns) the
    repository has; ``what`` names the thing for error messages, e.g. ``"PickScore model 'org/name'"``.
    """
    if is_local_source(source):
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise WeightsNotFoundError(
                f"{what}: {directory} is not a directory; pass a local directory saved with "
                f"`save_pretrained` or a hub id such as 'org/name'"
            )
    else:
        directory = _download_snapshot(source, weights, what)
    missing = [_describe(requirement) for requirement in required if _find(directory, requirement) is None]
    if missing:
        fix = (
            f"copy every file of the model's hub repository there (`hf download ORG/NAME --local-dir {directory}`)"
            if is_local_source(source)
            else f"the hub snapshot is incomplete: run `hf download {source}` on a connected machine"
        )
        raise WeightsNotFoundError(f"{what}: {directory} lacks {', '.join(missing)}; {fix}")
    return directory


def resolve_weights_file(source: str, what: str) -> Path:
    """A local file, from a local path or a hub file reference ``org/name/path/in/repo``."""
    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{what}: no file at {path}; place the file there or pass its hub reference"
            )
        return path
    parts = source.split("/")
    if len(parts) < 3:
        raise WeightsNotFoundError(
            f"{what}: {source!r} is neither an existing local file nor a hub file reference "
            f"'org/name/filename'; place the file locally and pass its path"
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not hub_offline():  # offline, the cache lookup below says what is missing
        _check_online(repo_id, what)
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=hub_offline()))
    except LocalEntryNotFoundError:
        raise WeightsNotFoundError(
            f"{what}: HF_HUB_OFFLINE is set and {filename} of {repo_id} is not in the hub cache "
            f"({constants.HF_HUB_CACHE}); download it on a connected machine "
            f"(`hf download {repo_id} {filename} --local-dir DIR`) and pass DIR/{filename} instead"
        ) from None


def require_cached_hub_files(files: dict[str, Sequence[FileRequirement]], needed_by: str) -> None:
    """Fail unless every ``{repo_id: [file requirement, ...]}`` is in the hub cache, when offline.

    For libraries that fetch hub files by hard-coded names (laion-clap, ImageReward): offline, they would
    otherwise build empty tokenizers or fail deep inside with an unrelated message.
    """
    if not hub_offline():
        return
    missing = {
        f"{repo_id}/{_describe(requirement)}": repo_id
        for repo_id, requirements in files.items()
        for requirement in requirements
        if not any(
            isinstance(try_to_load_from_cache(repo_id, name), str)
            for name in ((requirement,) if isinstance(requirement, str) else requirement)
        )
    }
    if missing:
        repos = " ".join(sorted(set(missing.values())))
        raise WeightsNotFoundError(
            f"{needed_by} loads hub files by name and HF_HUB_OFFLINE is set, but these are not in the hub cache "
            f"({constants.HF_HUB_CACHE}): {', '.join(missing)}; run `hf download REPO` for each of {repos} on a "
            f"connected machine and copy the cache here (or point HF_HOME at a copy)"
        )


def _download_snapshot(repo_id: str, weights: Sequence[str], what: str) -> Path:
    offline = hub_offline()
    try:
        if offline:  # the cached snapshot as it is
            return Path(snapshot_download(repo_id, local_files_only=True))
        _check_online(repo_id, what)
        directory = Path(snapshot_download(repo_id, allow_patterns=_SMALL_FILES))
        for pattern in weights:
            directory = Path(snapshot_download(repo_id, allow_patterns=[pattern]))
            if any(directory.glob(pattern)):
                break
        return directory
    except LocalEntryNotFoundError as error:
        reason = "HF_HUB_OFFLINE is set and" if offline else f"the download failed ({error}) and"
        raise WeightsNotFoundError(
            f"{what}: {reason} {repo_id!r} is not in the hub cache ({constants.HF_HUB_CACHE}) nor a local "
            f"directory; on a connected machine run `hf download {repo_id} --local-dir DIR`, copy DIR here "
            f"and pass its path instead of the hub id"
        ) from None


def _check_online(repo_id: str, what: str) -> None:
    """One bounded request before the retried downloads: a dead or unreachable hub fails in seconds."""
    try:
        check_hub_repo(repo_id, subject=f"{what}: {repo_id!r}")
    except LoadError as error:
        raise WeightsNotFoundError(str(error)) from None


def _find(directory: Path, requirement: FileRequirement) -> Path | None:
    names = (requirement,) if isinstance(requirement, str) else requirement
    return next((directory / name for name in names if (directory / name).is_file()), None)


def _describe(requirement: FileRequirement) -> str:
    return requirement if isinstance(requirement, str) else " or ".join(requirement)
