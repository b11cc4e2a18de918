"""What an offline diffusion method trains on: the ``data:`` preference pairs, decoded on the fly (loaded, or
streamed with ``data.streaming``) or read through the latent and text-embedding cache (``data.cache_dir``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from diffalign.diffusion.cache import CachedPairDataset, build_pair_cache
from diffalign.diffusion.data import (
    DiffusionDataConfig,
    PreferencePairDataset,
    collate_pairs,
    image_decoder,
    load_preference_pairs,
)
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.streamed_pairs import StreamedPairs
from diffalign.diffusion.transforms import MediaDecoder
from diffalign.hashing import module_fingerprint
from diffalign.streaming import RowStream


def build_pair_dataset(
    config: DiffusionDataConfig,
    *,
    family: DiffusionFamily,
    seed: int,
    accelerator: Any | None = None,
    decoder: MediaDecoder | None = None,
) -> tuple[Dataset | RowStream, Callable[[Sequence[dict[str, Any]]], dict[str, Any]], dict[str, int]]:
    """The training dataset for ``config``, its collate function and the data statistics to log.

    Without ``cache_dir`` items hold pixels (the trainer encodes them): a map-style dataset, or with
    ``data.streaming`` a :class:`~diffalign.streaming.RowStream`. With ``cache_dir`` the cache is built (or
    completed) first by every process of ``accelerator``, each its share, from the loaded or streamed pairs;
    items then hold sampled latents and prompt embeddings, read from the cache by index. ``family`` provides
    ``vae``, ``latent_normalization``, ``encode_prompts``, ``prompt_encoding_id()`` and ``frozen_modules()``.
    """
    decoder = decoder or image_decoder(config)
    if config.streaming:
        stream = StreamedPairs(config, decoder, seed=seed)
        if config.cache_dir is None:
            return stream, collate_pairs, {"streamed_shards": stream.source.num_shards}
        records, total, stats = stream.records(), None, {"streamed_shards": stream.source.num_shards}
    else:
        pairs = load_preference_pairs(config, decoder)
        if config.cache_dir is None:
            dataset = PreferencePairDataset(pairs, decoder, caption_dropout=config.caption_dropout, seed=seed)
            return dataset, collate_pairs, pairs.stats
        records, total, stats = pairs.records(), len(pairs), pairs.stats
    text_encoders = [module for name, module in sorted(family.frozen_modules().items()) if name != "vae"]
    cache = build_pair_cache(
        records,
        decoder,
        config.cache_dir,
        vae=family.vae,
        normalization=family.latent_normalization,
        encode_prompts=family.encode_prompts,
        text_encoder_id=f"{family.prompt_encoding_id()}:{module_fingerprint(*text_encoders)}",
        batch_size=config.vae_encode_batch_size,
        skip_bad_rows=config.skip_bad_rows,
        total=total,
        accelerator=accelerator,
    )
    dataset = CachedPairDataset(cache, caption_dropout=config.caption_dropout, seed=seed)
    return dataset, collate_pairs, {**stats, **cache.stats}
