"""A content-keyed disk cache of VAE posteriors and text embeddings for preference pairs.

Encoding both images and the caption of every pair at every step costs more than the denoiser's forward on small
models. The cache encodes each image and each caption once:

* per image and per view a decoder can produce (plain and, with random flips, flipped), the VAE posterior's
  ``mean`` and ``std``, not a sample, so latents stay stochastic: every read draws
  ``latent = family.to_latents(mean + std·z)`` (the family's scale and shift) with ``z`` from the item's own
  generator;
* per caption (and the empty caption, for caption dropout), whatever ``encode_prompts`` returns, each tensor
  without its trailing all-zero rows (a caption's padding, as Qwen-Image's embeddings are padded to 512 tokens),
  which a read puts back.

Keys are content hashes: image bytes + the decoder's settings + the VAE's fingerprint (class, config, weights,
dtype); caption text + the text encoders' identity (the trainer's: their fingerprint and the family's prompt options,
such as ``model.max_text_length``). A changed dataset, VAE, text encoder or transform therefore never reads a
stale entry, and a build computes only the entries that are missing, so an interrupted build (killed, out of
time) resumes where it stopped. Several processes (``accelerate launch``) build one cache together: each encodes
the entries whose key falls to it, then all read the whole cache.

Layout: ``<cache_dir>/images/*.safetensors`` and ``<cache_dir>/texts/*.safetensors``. Each shard holds complete
entries (tensors named ``<key>/<view>/mean``, ``<key>/prompt_embeds``, ...) and is written to a temporary file
and renamed, so a crash never leaves half an entry. Stale entries are never read but never deleted either: remove
the folder to reclaim space.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffalign.diffusion.data import SKIP_HINT, BadRowError, PairRecord, split_index
from diffalign.diffusion.families.base import LatentNormalization, vae_posterior
from diffalign.diffusion.transforms import CorruptMediaError, MediaDecoder, draw_pair_randomness
from diffalign.files import damaged_cache, save_tensors_atomically
from diffalign.hashing import content_hash, module_fingerprint
from diffalign.progress import progress

logger = logging.getLogger(__name__)

# The name under which an entry's tensor stored without its trailing zero rows keeps its full row count.
PADDED_ROWS = "padded_rows/"

# Shards a reader keeps open (each a memory map and an open file): enough for a shuffled epoch's working set to
# hit often on small caches, few enough for any file-descriptor limit.
OPEN_SHARDS = 16


def posterior_draw(
    mean: Tensor, std: Tensor, normalization: LatentNormalization, generator: torch.Generator | None = None
) -> Tensor:
    """``normalization.to_latents(mean + std·z)`` with ``z ~ N(0, I)``: a posterior sample in the denoiser's space."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return normalization.to_latents(mean + std * noise)


class _ShardStore:
    """Entries (each a dict of tensors) in the safetensors shards of one folder; an index maps key → shard."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.shard_size = shard_size
        self.index: dict[str, Path] = {}
        # Per key, the names of its tensors: a read then parses no shard header and scans no other entry's names.
        self.names: dict[str, list[str]] = {}
        self._pending: dict[str, Tensor] = {}
        self._pending_keys: set[str] = set()
        self._handles: OrderedDict[Path, Any] = OrderedDict()  # open shards, most recently read last
        self.refresh()

    def refresh(self) -> None:
        """Index the shards on disk that are not indexed yet (written by other processes since)."""
        known = set(self.index.values())
        for path in sorted(self.folder.glob("*.safetensors")):
            if path in known:
                continue
            names: dict[str, list[str]] = {}
            with _open_shard(path) as shard:
                for name in shard.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                    names.setdefault(name.split("/", 1)[0], []).append(name)
            for key, key_names in names.items():
                self.index[key] = path
                self.names[key] = key_names

    def __getstate__(self) -> dict[str, Any]:
        # Open shards are memory maps of this process; a data-loader worker opens its own.
        return {**self.__dict__, "_handles": OrderedDict()}

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending_keys

    def add(self, key: str, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            # A clone: safetensors refuses tensors that share storage (rows of one batch do).
            self._pending[f"{key}/{name}"] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_keys.add(key)
        if len(self._pending_keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending_keys:
            return
        path = self.folder / f"{uuid.uuid4().hex}.safetensors"
        save_tensors_atomically(self._pending, path, {"format": "pt"})
        self.index.update(dict.fromkeys(self._pending_keys, path))
        for name in self._pending:
            self.names.setdefault(name.split("/", 1)[0], []).append(name)
        self._pending, self._pending_keys = {}, set()

    def read(self, prefix: str) -> dict[str, Tensor]:
        """The tensors named ``prefix...``, keyed by the rest of their name (``prefix`` starts with the key)."""
        key = prefix.split("/", 1)[0]
        path = self.index[key]
        shard = self._shard(path)
        names = [name for name in self.names[key] if name.startswith(prefix)]
        try:
            return {name[len(prefix) :]: shard.get_tensor(name) for name in names}
        except SafetensorError as error:
            raise damaged_cache(path, error) from None

    def _shard(self, path: Path) -> Any:
        """The open shard at ``path``: opening one parses its whole header, so the last few read stay open."""
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = _open_shard(path)
            if len(self._handles) >= OPEN_SHARDS:
                self._handles.popitem(last=False)
        self._handles[path] = handle
        return handle


def _open_shard(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise damaged_cache(path, error) from None


@dataclass
class PairCache:
    """A built cache over a list of pairs: what :class:`CachedPairDataset` reads.

    ``pair_indices`` lists the pairs whose entries are all present (pairs with unreadable images were skipped).
    ``stats`` counts what the build did, for the trainer to log.
    """

    captions: list[str | None]  # per pair (None: its media could not be read)
    labels: list[float | None]
    decoder: MediaDecoder
    augmentations: list[Hashable]  # the cached views, in their on-disk order
    image_keys: list[tuple[str, str] | None]  # per pair: (chosen, rejected) entry keys
    pair_indices: list[int]
    text_encoder_id: str
    normalization: LatentNormalization
    images: _ShardStore
    texts: _ShardStore
    stats: dict[str, int]

    def posterior(self, key: str, view: int) -> dict[str, Tensor]:
        """``mean``, ``std`` and the conditioning tensors (``original_size``, ...) of one image view."""
        return self.images.read(f"{key}/{view}/")

    def prompt_embeds(self, caption: str) -> dict[str, Tensor]:
        return with_padding(self.texts.read(f"{caption_key(self.text_encoder_id, caption)}/"))


def caption_key(text_encoder_id: str, caption: str) -> str:
    return content_hash(text_encoder_id, caption)


def without_padding(entry: dict[str, Tensor]) -> dict[str, Tensor]:
    """``entry`` with each tensor's trailing all-zero rows (along its first axis) left out, and the row count of
    each tensor so shortened kept under ``padded_rows/<name>``: lossless, and a caption padded to hundreds of
    tokens stores only its own."""
    stored: dict[str, Tensor] = {}
    for name, value in entry.items():
        stored[name] = value
        if value.ndim == 0:
            continue
        nonzero_rows = value.reshape(len(value), -1).any(dim=1).nonzero()
        rows = int(nonzero_rows[-1]) + 1 if len(nonzero_rows) else 1  # an all-zero tensor keeps one row
        if rows < len(value):
            stored[f"{PADDED_ROWS}{name}"] = torch.tensor(len(value))
            stored[name] = value[:rows]
    return stored


def with_padding(stored: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entry :func:`without_padding` stored, its zero rows put back."""
    entry = {name: value for name, value in stored.items() if not name.startswith(PADDED_ROWS)}
    for padded_name, rows in stored.items():
        if padded_name.startswith(PADDED_ROWS):
            name = padded_name.removeprefix(PADDED_ROWS)
            padding = entry[name].new_zeros((int(rows) - len(entry[name]), *entry[name].shape[1:]))
            entry[name] = torch.cat([entry[name], padding])
    return entry


def _encode_captions(
    captions: list[str],
    texts: _ShardStore,
    encode_prompts: Callable[[list[str]], dict[str, Tensor]],
    text_encoder_id: str,
    batch_size: int,
) -> None:
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        with torch.no_grad():
            embeddings = encode_prompts(chunk)
        for name, value in embeddings.items():
            if not isinstance(value, Tensor) or value.shape[:1] != (len(chunk),):
                raise ValueError(
                    f"encode_prompts returned {name!r} of shape {getattr(value, 'shape', type(value).__name__)} for "
                    f"{len(chunk)} captions; it must return batch-first tensors"
                )
        for number, caption in enumerate(chunk):
            entry = {name: value[number] for name, value in embeddings.items()}
            texts.add(caption_key(text_encoder_id, caption), without_padding(entry))
    texts.flush()


def _owner(key: str, processes: int) -> int:
    """The process that encodes entry ``key`` when several build a cache together: keys are uniform hashes."""
    return int(key[:8], 16) % processes


def _from_every_process(accelerator: Any | None, value: Any) -> list[Any]:
    """``value`` of every process, in process order (once every process has reached this point)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


@dataclass
class _PairKeys:
    """Per record, in record order (``None`` for a record that stands for an unreadable pair)."""

    image_keys: list[tuple[str, str] | None]
    captions: list[str | None]
    labels: list[float | None]
    skipped: Counter[str]


def _encode_pair_images(
    records: Iterable[PairRecord | BadRowError],
    build: _ImageBuild,
    rank: tuple[int, int],
    skip_bad_rows: bool,
    total: int | None,
) -> _PairKeys:
    """Content keys of every record's two images; this process (``rank``: index, count) encodes the ones that fall
    to it and the cache does not hold."""
    process, processes = rank
    pairs = _PairKeys([], [], [], Counter())
    with build.in_dtype():
        image_settings = json.dumps(
            {"decoder": build.decoder.settings(), "vae": module_fingerprint(build.vae)}, sort_keys=True
        )
        for record in progress(records, total=total, desc="latent cache", unit="pair"):
            if isinstance(record, BadRowError):
                if not skip_bad_rows:
                    raise ValueError(f"{record}. {SKIP_HINT}") from None
                pairs.skipped[record.reason] += 1
                pairs.image_keys.append(None)
                pairs.captions.append(None)
                pairs.labels.append(None)
                continue
            keys = (
                content_hash(image_settings, record.media[0]),
                content_hash(image_settings, record.media[1]),
            )
            pairs.image_keys.append(keys)
            pairs.captions.append(record.caption)
            pairs.labels.append(record.label)
            for key, data in zip(keys, record.media):
                if _owner(key, processes) == process:
                    build.add(key, data, record.location)
        build.finish()
    return pairs


def _readable_pairs(
    image_keys: list[tuple[str, str] | None], bad_keys: dict[str, str], skipped: Counter[str]
) -> list[int]:
    """Indices of the pairs whose two images were encoded; the others are counted in ``skipped`` by reason."""
    pair_indices = []
    for index, keys in enumerate(image_keys):
        if keys is None:
            continue
        reasons = [bad_keys[key] for key in keys if key in bad_keys]
        if reasons:
            skipped[reasons[0]] += 1
        else:
            pair_indices.append(index)
    return pair_indices


def build_pair_cache(
    records: Iterable[PairRecord | BadRowError],
    decoder: MediaDecoder,
    cache_dir: str | Path,
    *,
    vae: nn.Module,
    normalization: LatentNormalization,
    encode_prompts: Callable[[list[str]], dict[str, Tensor]],
    text_encoder_id: str,
    batch_size: int = 8,
    vae_dtype: torch.dtype = torch.float32,
    skip_bad_rows: bool = False,
    shard_size: int = 256,
    total: int | None = None,
    accelerator: Any | None = None,
) -> PairCache:
    """Encode every image (each cacheable view) and every caption of the pairs ``records`` lists (in pair order;
    a :class:`BadRowError` stands for a pair whose media cannot be read) that ``cache_dir`` does not hold yet.

    With an ``accelerator`` every process reads every record and encodes the entries whose content key falls to
    it, so N processes share the work; they then exchange the images they found corrupt, wait for each other
    and read the whole cache. ``total`` (the number of records, if known) gives the progress bar its ETA.

    The VAE runs on its device in micro-batches of ``batch_size`` images, in ``vae_dtype`` (restored afterwards).
    fp32 by default: SDXL's VAE overflows in fp16 unless a fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
    is given; non-finite latents raise. ``encode_prompts`` maps captions to batch-first tensors;
    ``text_encoder_id`` must change whenever its output would (e.g. :func:`module_fingerprint` of the encoders).
    Images that cannot be read or decoded raise naming the row, or with ``skip_bad_rows`` their pairs are
    counted and left out.
    """
    root = Path(cache_dir)
    build = _ImageBuild(
        decoder, _ShardStore(root / "images", shard_size), vae, batch_size, vae_dtype, skip_bad_rows
    )
    texts = _ShardStore(root / "texts", shard_size)
    pairs = _encode_pair_images(records, build, _rank(accelerator), skip_bad_rows, total)

    bad_keys, encoded = _share_image_results(build, accelerator)
    image_keys, captions, skipped = pairs.image_keys, pairs.captions, pairs.skipped
    pair_indices = _readable_pairs(image_keys, bad_keys, skipped)
    _require_entries(build.images, [key for index in pair_indices for key in image_keys[index]], root)

    unique_captions = list(dict.fromkeys(["", *(captions[index] for index in pair_indices)]))
    captions_encoded = _cache_captions(
        unique_captions, texts, encode_prompts, text_encoder_id, batch_size, accelerator, root
    )

    unique_keys = {key for keys in image_keys if keys is not None for key in keys}
    stats = {
        "cache_pairs": len(pair_indices),
        "cache_images_encoded": encoded,
        "cache_images_reused": len(unique_keys) - encoded - len(bad_keys),
        "cache_captions_encoded": captions_encoded,
        "cache_captions_reused": len(unique_captions) - captions_encoded,
        "cache_bad_rows_skipped": sum(skipped.values()),
        **{f"cache_skipped_{reason}": count for reason, count in sorted(skipped.items())},
    }
    _report(root, stats, skipped)
    return PairCache(
        captions=captions,
        labels=pairs.labels,
        decoder=decoder,
        augmentations=build.augmentations,
        image_keys=image_keys,
        pair_indices=pair_indices,
        text_encoder_id=text_encoder_id,
        normalization=normalization,
        images=build.images,
        texts=texts,
        stats=stats,
    )


def _report(root: Path, stats: dict[str, int], skipped: Counter[str]) -> None:
    logger.info("latent cache %s: %s", root, stats)
    if skipped:
        logger.warning("latent cache %s: skipped %d pairs (%s)", root, sum(skipped.values()), dict(skipped))
    if not stats["cache_pairs"]:
        raise ValueError(f"latent cache {root}: no pair could be encoded ({stats})")


def _rank(accelerator: Any | None) -> tuple[int, int]:
    """(this process's index, number of processes)."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _share_image_results(build: _ImageBuild, accelerator: Any | None) -> tuple[dict[str, str], int]:
    """Every process's corrupt images (key: reason) and count of encoded images, once every process's shards are
    written and indexed here."""
    reports = _from_every_process(accelerator, (build.bad_keys, build.encoded))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    build.images.refresh()
    bad_keys = {key: reason for keys, _ in reports for key, reason in keys.items()}
    return bad_keys, sum(count for _, count in reports)


def _cache_captions(
    captions: list[str],
    texts: _ShardStore,
    encode_prompts: Callable[[list[str]], dict[str, Tensor]],
    text_encoder_id: str,
    batch_size: int,
    accelerator: Any | None,
    root: Path,
) -> int:
    """Encode the ``captions`` that ``texts`` lacks (each process those whose key falls to it), wait for every
    process and check that all are there; returns how many were missing."""
    process, processes = _rank(accelerator)
    missing = [caption for caption in captions if caption_key(text_encoder_id, caption) not in texts]
    mine = [
        caption for caption in missing if _owner(caption_key(text_encoder_id, caption), processes) == process
    ]
    _encode_captions(mine, texts, encode_prompts, text_encoder_id, batch_size)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    texts.refresh()
    _require_entries(texts, [caption_key(text_encoder_id, caption) for caption in captions], root)
    return len(missing)


def _require_entries(store: _ShardStore, keys: list[str], root: Path) -> None:
    missing = [key for key in keys if key not in store]
    if missing:
        raise RuntimeError(
            f"latent cache {root}: {len(missing)} entries are missing after the build (e.g. {missing[0]}); did "
            "another process of the run fail? Run again: the build completes what is missing"
        )


class _ImageBuild:
    """The images one process encodes: queued by key, decoded and encoded by the VAE in micro-batches."""

    def __init__(
        self,
        decoder: MediaDecoder,
        images: _ShardStore,
        vae: nn.Module,
        batch_size: int,
        vae_dtype: torch.dtype,
        skip_bad_rows: bool,
    ) -> None:
        self.decoder, self.images, self.vae = decoder, images, vae
        self.batch_size, self.vae_dtype, self.skip_bad_rows = batch_size, vae_dtype, skip_bad_rows
        self.augmentations = decoder.cache_augmentations()
        self.pending: dict[str, tuple[bytes, str]] = {}  # key → (stored bytes, location) of images to encode
        self.bad_keys: dict[str, str] = {}  # key → why it cannot be encoded (a skip reason)
        self.encoded = 0

    @contextlib.contextmanager
    def in_dtype(self) -> Iterator[None]:
        original_dtype = self.vae.dtype
        if self.vae_dtype == original_dtype:
            yield
            return
        self.vae.to(dtype=self.vae_dtype)
        try:
            yield
        finally:
            self.vae.to(dtype=original_dtype)

    def posteriors(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posteriors' means and stds of ``pixels``, in micro-batches of ``batch_size`` views. When the
        accelerator runs out of memory the micro-batch is halved, for the rest of the build as well, so a build
        finds the largest size that fits instead of failing on the first batch."""
        means, stds, start = [], [], 0
        while start < len(pixels):
            chunk = pixels[start : start + self.batch_size]
            try:
                mean, std = vae_posterior(self.vae, chunk)
            except torch.OutOfMemoryError as error:
                if self.batch_size == 1:
                    raise RuntimeError(
                        f"the VAE ran out of memory encoding a single {tuple(chunk.shape[1:])} input in "
                        f"{self.vae_dtype}; lower data.resolution, or build the cache on a device with more memory"
                    ) from error
                # torch's allocator has already returned its unused cached blocks before raising.
                self.batch_size //= 2
                logger.warning("the VAE ran out of memory; encoding the cache %d views at a time", self.batch_size)
                continue
            means.append(mean)
            stds.append(std)
            start += len(chunk)
        return torch.cat(means), torch.cat(stds)

    def add(self, key: str, data: bytes, location: str) -> None:
        if key not in self.images and key not in self.bad_keys and key not in self.pending:
            self.pending[key] = (data, location)
        if len(self.pending) >= self.batch_size:
            self.encode_pending()

    def finish(self) -> None:
        self.encode_pending()
        self.images.flush()

    def encode_pending(self) -> None:
        decoder, augmentations = self.decoder, self.augmentations
        keys, locations, views = [], [], []
        for key, (data, location) in self.pending.items():
            try:
                media = decoder.load(data)
            except CorruptMediaError as error:
                self.bad_keys[key] = error.reason
                if not self.skip_bad_rows:
                    raise ValueError(f"{location}: {error}. {SKIP_HINT}") from None
                continue
            keys.append(key)
            locations.append(location)
            views.extend(decoder.transform(media, augmentation) for augmentation in augmentations)
        self.pending.clear()
        if not views:
            return
        means, stds = self.posteriors(torch.stack([view.values for view in views]))
        means = means.unflatten(0, (len(keys), len(augmentations)))
        stds = stds.unflatten(0, (len(keys), len(augmentations)))
        finite = (means.isfinite() & stds.isfinite()).flatten(1).all(dim=1)
        if not finite.all():
            raise ValueError(
                f"{locations[int((~finite).nonzero()[0])]}: the VAE produced non-finite latents in "
                f"{self.vae_dtype}; build the cache with vae_dtype=torch.float32, or give a VAE that is safe in "
                "float16 (for SDXL: madebyollin/sdxl-vae-fp16-fix)"
            )
        for image_number, key in enumerate(keys):
            entry = {}
            for view_number in range(len(augmentations)):
                entry[f"{view_number}/mean"] = means[image_number, view_number]
                entry[f"{view_number}/std"] = stds[image_number, view_number]
                conditioning = views[image_number * len(augmentations) + view_number].conditioning
                for name, value in conditioning.items():
                    entry[f"{view_number}/{name}"] = torch.tensor(value, dtype=torch.int64)
            self.images.add(key, entry)
        self.encoded += len(keys)


class CachedPairDataset(Dataset):
    """Pairs read from a :class:`PairCache`: ``{"caption", "chosen_latents", "rejected_latents" (scaled),
    "prompt_embeds": dict[str, Tensor], "label", "index"}`` plus each image's size conditioning.

    Caption dropout, the flip (which cached view is read) and the latent noise all come from the pair's own
    generator, drawn in the same order as :class:`~diffalign.diffusion.data.PreferencePairDataset` draws them.
    """

    # The training loop passes running sample ids (epoch · N + index), not plain indices.
    reads_sample_ids = True

    def __init__(self, cache: PairCache, *, caption_dropout: float = 0.0, seed: int = 0) -> None:
        self.cache = cache
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __len__(self) -> int:
        return len(self.cache.pair_indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cache = self.cache
        position, epoch = split_index(index, len(self))
        pair = cache.pair_indices[position]
        generator, drop_caption, augmentation = draw_pair_randomness(
            self.seed, epoch, pair, self.caption_dropout, cache.decoder
        )
        view = cache.augmentations.index(augmentation)
        caption = "" if drop_caption else cache.captions[pair]
        item: dict[str, Any] = {
            "caption": caption,
            "label": cache.labels[pair],
            "index": pair,
            "prompt_embeds": cache.prompt_embeds(caption),
        }
        for role, key in zip(("chosen", "rejected"), cache.image_keys[pair]):
            entry = cache.posterior(key, view)
            item[f"{role}_latents"] = posterior_draw(
                entry.pop("mean"), entry.pop("std"), cache.normalization, generator
            )
            item.update({f"{role}_{name}": tuple(value.tolist()) for name, value in entry.items()})
        return item
