"""What an offline diffusion method trains on: the ``data:`` preference pairs, decoded on the fly or read through
the latent and text-embedding cache (``data.cache_dir``)."""

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
from diffalign.diffusion.transforms import MediaDecoder
from diffalign.hashing import module_fingerprint


def build_pair_dataset(
    config: DiffusionDataConfig,
    *,
    family: DiffusionFamily,
    seed: int,
    accelerator: Any | None = None,
    decoder: MediaDecoder | None = None,
) -> tuple[Dataset, Callable[[Sequence[dict[str, Any]]], dict[str, Any]], dict[str, int]]:
    """The training dataset for ``config``, its collate function and the data statistics to log.

    Without ``cache_dir`` items hold pixels (the trainer encodes them); with it, the cache is built (or completed)
    first, on the main process while the others wait, and items hold sampled latents and prompt embeddings.
    ``family`` provides ``vae``, ``latent_normalization``, ``encode_prompts`` and ``frozen_modules()``.
    """
    decoder = decoder or image_decoder(config)
    pairs = load_preference_pairs(config, decoder)
    if config.cache_dir is None:
        dataset = PreferencePairDataset(pairs, decoder, caption_dropout=config.caption_dropout, seed=seed)
        return dataset, collate_pairs, pairs.stats
    text_encoders = [module for name, module in sorted(family.frozen_modules().items()) if name != "vae"]
    text_encoder_id = f"{type(family).__name__}:{module_fingerprint(*text_encoders)}"

    def build() -> Any:
        return build_pair_cache(
            pairs,
            decoder,
            config.cache_dir,
            vae=family.vae,
            normalization=family.latent_normalization,
            encode_prompts=family.encode_prompts,
            text_encoder_id=text_encoder_id,
            batch_size=config.vae_encode_batch_size,
            skip_bad_rows=config.skip_bad_rows,
        )

    if accelerator is None:
        cache = build()
    else:
        with accelerator.main_process_first():
            cache = build()
    dataset = CachedPairDataset(cache, caption_dropout=config.caption_dropout, seed=seed)
    return dataset, collate_pairs, {**pairs.stats, **cache.stats}
