"""Hub access that fails in seconds, with the config key, the value and the offline fix.

huggingface_hub's shared HTTP client has no default timeout, and some calls pass none (transformers' tokenizers
call ``model_info`` without one), so an endpoint that accepts connections and never answers hangs a run for good;
with DNS failing, each library retries its downloads for tens of seconds and then reports a missing file
("does not appear to have a file named model_index.json"). So before a library loads a hub id:

- :func:`bound_hub_timeouts` gives every request of the shared client that has no timeout a connect timeout of
  ``HF_HUB_ETAG_TIMEOUT`` and read, write and pool timeouts of ``HF_HUB_DOWNLOAD_TIMEOUT`` (10 s each unless
  set), for every library that downloads through it (transformers, diffusers, datasets);
- :func:`check_source` asks the hub once, with that timeout and no retries, whether the repository exists (with
  ``HF_HUB_OFFLINE=1``: whether it is in the cache, with no request at all), and raises a
  :class:`~diffalign.config.LoadError` that names the key, the value, the endpoint and the fix;
- :func:`loading` does that check and turns the library's own load failure into the same one-line error.

It also holds what outputs ask of the hub: the commit of a cached model for provenance (:func:`cached_revision`),
and, for users who are online, uploading a model folder (``run.push_to_hub``: :func:`check_push_possible`,
:func:`push_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffalign.config import ConfigError, LoadError

if TYPE_CHECKING:
    import httpx2

RepoType = Literal["model", "dataset"]

_TRUE = {"1", "ON", "YES", "TRUE"}


def load_failures() -> tuple[type[BaseException], ...]:
    """What a library raises when the files it was pointed at cannot be had: missing or unreadable files and
    repositories (OSError, which huggingface_hub's HTTP errors also are), configs it does not recognise
    (ValueError), and network failures below the HTTP layer."""
    import httpx2

    return (OSError, ValueError, httpx2.HTTPError)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now rather than at import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag is not None and flag.upper() in _TRUE for flag in flags)


def is_local_source(source: str) -> bool:
    """A local path: absolute, or starting with ``.``/``~``, or any path that exists; anything else is a hub id."""
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def hub_timeouts() -> dict[str, float]:
    from huggingface_hub import constants

    read = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    return {"connect": float(constants.HF_HUB_ETAG_TIMEOUT), "read": read, "write": read, "pool": read}


def _bound_request(request: httpx2.Request) -> None:
    """A request hook of the hub's HTTP client: every timeout the caller left unset gets its bound."""
    extensions = request.extensions
    given = extensions.get("timeout") or {}
    extensions["timeout"] = {
        phase: given.get(phase) if given.get(phase) is not None else limit
        for phase, limit in hub_timeouts().items()
    }


def bound_hub_timeouts() -> None:
    """Bound every request of huggingface_hub's shared client (idempotent; the client is re-made after a fork)."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks["request"]
    if _bound_request not in hooks:
        hooks.insert(0, _bound_request)


def offline_fix(
    key: str | None, value: str, repo_type: RepoType = "model", revision: str | None = None
) -> str:
    """How to run without the hub: a local copy (``key`` set to it, or passed in place of the id), or the cache."""
    flags = (" --repo-type dataset" if repo_type == "dataset" else "") + (
        f" --revision {revision}" if revision else ""
    )
    use_copy = f"set {key}=DIR" if key else "pass DIR in place of the hub id"
    return (
        f"on a connected machine run `hf download {value}{flags} --local-dir DIR`, copy DIR here and {use_copy}; "
        f"or fill the hub cache there (`hf download {value}{flags}`), copy it here and set HF_HUB_OFFLINE=1"
    )


def is_cached(repo_id: str, repo_type: RepoType = "model") -> bool:
    """Whether a snapshot of the repository is in the hub cache (or, for a dataset, in the datasets cache)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = (
        Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    )
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        return (datasets_cache / repo_id.replace("/", "___")).is_dir()
    return False


def check_source(key: str, value: str, repo_type: RepoType = "model", revision: str | None = None) -> None:
    """Fail in seconds, naming ``key``, ``value`` and the fix, unless ``value`` is an existing local path or a hub
    repository that can be had: in the cache with ``HF_HUB_OFFLINE=1``, on the hub otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    subject = f"{key}={value!r}"
    if is_local_source(value):
        if not Path(value).expanduser().exists():
            raise LoadError(f"{subject}: no such file or directory; give an existing local path or a hub id")
        return
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise LoadError(
            f"{subject} is neither an existing local path nor a hub id ('org/name'); fix the path"
        ) from None
    check_hub_repo(value, repo_type, revision, subject=subject, key=key)


def check_hub_repo(
    repo_id: str,
    repo_type: RepoType = "model",
    revision: str | None = None,
    *,
    subject: str | None = None,
    key: str | None = None,
    fix: str | None = None,
) -> None:
    """Fail in seconds unless the hub repository can be had: in the cache with ``HF_HUB_OFFLINE=1`` (no request
    is made), otherwise on the hub (one request, bounded by ``HF_HUB_ETAG_TIMEOUT``, no retries).

    ``subject`` opens the error message (default: the repository id); ``key`` is the config key the fix tells the
    user to set to a local copy; ``fix`` replaces that advice.
    """
    from huggingface_hub import HfApi, constants

    subject = subject or repr(repo_id)
    fix = fix or offline_fix(key, repo_id, repo_type, revision)
    if hub_offline():
        if not is_cached(repo_id, repo_type):
            raise LoadError(
                f"{subject}: HF_HUB_OFFLINE is set and this {repo_type} is not in the hub cache "
                f"({constants.HF_HUB_CACHE}); {fix}"
            )
        return
    bound_hub_timeouts()
    api = HfApi()
    info = api.model_info if repo_type == "model" else api.dataset_info
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    try:
        info(repo_id, revision=revision, timeout=timeout)
    except Exception as error:
        failure = _lookup_failure(error, subject, repo_id, repo_type, revision, api.endpoint, timeout, fix)
        if failure is None:
            raise
        raise failure from None


def _lookup_failure(
    error: Exception,
    subject: str,
    repo_id: str,
    repo_type: RepoType,
    revision: str | None,
    endpoint: str,
    timeout: float,
    fix: str,
) -> LoadError | None:
    """The one-line error for a failed hub lookup (None for an error that is not the hub's)."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Subclasses first: a gated repository is a kind of not-found one, and all three are HTTP errors.
    if isinstance(error, GatedRepoError):
        return LoadError(
            f"{subject} is gated on {endpoint}: accept its terms at {endpoint}/{_page(repo_id, repo_type)} and log "
            "in (`hf auth login`, or set HF_TOKEN), or give a local copy"
        )
    if isinstance(error, RevisionNotFoundError):
        return LoadError(f"{subject}: {endpoint} has no revision {revision!r} of it; fix the revision")
    if isinstance(error, RepositoryNotFoundError):
        return LoadError(
            f"{subject} is not a local path, and {endpoint} has no {repo_type} repository of that name (or it is "
            "private: log in with `hf auth login`); give a local path or an existing hub id"
        )
    if isinstance(error, (httpx2.TransportError, HfHubHTTPError)):
        cached = (
            " (it is in the hub cache here, so HF_HUB_OFFLINE=1 alone will do)"
            if is_cached(repo_id, repo_type)
            else ""
        )
        return LoadError(
            f"{subject} is a hub id, but the hub at {endpoint} could not be asked for it ({type(error).__name__}: "
            f"{one_line(error)}; timeout {timeout:g} s){cached}; {fix}"
        )
    return None


def _page(repo_id: str, repo_type: RepoType) -> str:
    return repo_id if repo_type == "model" else f"datasets/{repo_id}"


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, shortened: libraries' messages run to paragraphs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def loading(
    key: str, value: str, what: str, repo_type: RepoType = "model", revision: str | None = None
) -> Iterator[None]:
    """Check ``value`` (:func:`check_source`), then turn a failure of the load inside into a :class:`LoadError`::

    with loading("model.pretrained", config.model.pretrained, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(config.model.pretrained)
    """
    check_source(key, value, repo_type, revision)
    bound_hub_timeouts()  # a local model may still name hub files (tokenizers, sub-models) its library fetches
    try:
        yield
    except LoadError:
        raise
    except load_failures() as error:
        raise LoadError(
            f"{key}={value!r}: cannot load the {what} ({type(error).__name__}: {one_line(error)}); "
            f"{_load_fix(key, value, what, repo_type, revision, error)}"
        ) from error


def _load_fix(
    key: str, value: str, what: str, repo_type: RepoType, revision: str | None, error: BaseException
) -> str:
    if is_local_source(value):
        return f"point {key} at a complete {what} (saved with `save_pretrained`, or `hf download ... --local-dir`)"
    if isinstance(error, ValueError):  # the hub files were had, but are not what the loader expects
        return f"check that {key} names a {what}"
    return offline_fix(key, value, repo_type, revision)


@contextmanager
def under_key(key: str) -> Iterator[None]:
    """Prefix a :class:`LoadError` raised inside (a reward's missing weights, say) with the config key that asked
    for the thing being loaded."""
    try:
        yield
    except LoadError as error:
        raise LoadError(f"{key}: {error}") from error


def cached_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The commit of the locally cached snapshot of ``repo_id`` (a model, else a data set) at ``revision``
    (default: the branch ``main``), read from the cache alone; None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    for repo_type in ("model", "dataset"):
        try:
            folder = snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, local_files_only=True
            )
        except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
            continue
        return Path(folder).name  # snapshots/<commit>
    return None


def check_push_possible(repo_id: str | None) -> None:
    """Refuse ``run.push_to_hub`` before training when the push at its end could not happen."""
    if hub_offline():
        raise ConfigError(
            f"run.push_to_hub is true but the Hub is off limits (HF_HUB_OFFLINE is set), so final/ could not be "
            f"uploaded to {repo_id}; unset HF_HUB_OFFLINE, or set run.push_to_hub: false and upload later with "
            f"`hf upload {repo_id} <run.output_dir>/final`"
        )
    from huggingface_hub import get_token

    if get_token() is None:
        raise ConfigError(
            f"run.push_to_hub is true but no Hugging Face token is set, so final/ could not be uploaded to "
            f"{repo_id}; log in with `hf auth login` or set HF_TOKEN"
        )


def push_folder(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created, ``private``, when missing); returns its URL.

    A failed upload raises naming the folder, which is complete on disk and can be uploaded again by hand."""
    check_push_possible(repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except Exception as error:  # network, permission or quota errors of the Hub client alike
        raise RuntimeError(
            f"uploading {folder} to {repo_id} failed ({type(error).__name__}: {error}); the folder is complete, "
            f"upload it with `hf upload {repo_id} {folder}`"
        ) from error
    return str(url)
