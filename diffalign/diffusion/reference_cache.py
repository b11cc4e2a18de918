"""Precomputed reference errors for Diffusion-DPO (``model.reference_cache``).

The reference's denoising error of a pair is computed once, before training, and read from a table at every
later visit, so a training step runs no reference forward at all (and a frozen-copy reference can leave the
device). TRL's ``precompute_ref_log_probs`` does the same for LLMs, where the reference log-prob of a pair is a
fixed number. For diffusion it is not:

**This changes the estimator.** The Diffusion-DPO loss is an expectation over the noise ε, the timestep t, the
VAE posterior sample and the caption dropout and flip of each pair; on-the-fly training draws all of them afresh
at every visit. A stored reference error ``L_ref(x, ε, t)`` is only valid for the draw it was computed with, so
with the cache every pair keeps the draws of its first visit (epoch 0) for the whole run: the policy sees one
fixed Monte Carlo sample per pair instead of a new one per epoch. Within the first epoch the two are the same
computation (the test checks the losses agree); over several epochs the cached run loses the variance reduction
of redrawing and can fit those fixed draws. Use it for runs of about one epoch, or where the reference forward
is the bottleneck.

The table lives in ``<cache_dir>/<key>.safetensors`` (``pair_index`` ``[M]``, ``errors`` ``[M, 2]`` fp32: chosen,
rejected), written atomically. The key hashes everything the errors depend on: the reference weights (adapters
excluded, they are off when the reference runs), the VAE and text encoders, the family's noising maths, the
data content, the run seed, the data settings and the precision. A changed model, dataset or setting therefore
builds a new table and never reads a stale one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffalign.diffusion.cache import CachedPairDataset
from diffalign.diffusion.data import PreferencePairDataset
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.methods.base import LatentPairBatch
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.files import read_cache_file, save_tensors_atomically
from diffalign.hashing import ContentHash, module_fingerprint
from diffalign.progress import progress
from diffalign.training.loop import move_to_device
from diffalign.training.sampler import collate_with_sample_ids

logger = logging.getLogger("diffalign")


class FixedDraws(Dataset):
    """``dataset`` with every pair's randomness frozen to its first visit: item ``epoch·N + i`` is item ``i``.

    The pair datasets draw caption dropout, flips and latent samples from (seed, epoch, pair); hiding the epoch
    makes every visit of a pair identical, as precomputed reference errors require.
    """

    reads_sample_ids = False  # so the loop passes ``sample_id mod N``: always the epoch-0 item

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


@dataclass
class ReferenceErrors:
    """Reference errors per pair index, on the training device."""

    table: Tensor  # [max pair index + 1, 2]: (chosen, rejected); NaN for indices with no pair
    path: Path
    built: bool  # computed in this run (False: read from disk)

    @property
    def num_pairs(self) -> int:
        return int(self.table[:, 0].isfinite().sum())

    def lookup(self, pair_index: Tensor) -> Tensor:
        """The ``[chosen; rejected]`` errors (``[2B]``) of a batch's pairs: a gather on the device, no host sync."""
        rows = self.table[pair_index]
        return torch.cat([rows[:, 0], rows[:, 1]])


def reference_fingerprint(reference: ReferenceDenoiser) -> str:
    """Class, config and weights of the model the reference computes with. For an adapter-disabled reference that
    is the policy without its adapter weights: they are the trainable parameters, and off when it runs."""
    module = reference.copy if reference.copy is not None else reference.policy
    adapters = (
        set() if reference.copy is not None else {n for n, p in module.named_parameters() if p.requires_grad}
    )
    return ContentHash().update_module(module, skip=adapters).hexdigest()


def noising_fingerprint(family: DiffusionFamily, device: torch.device) -> str:
    """The family's noising maths on a fixed probe: its timestep distribution, noise schedule and regression
    target, for any family, without knowing where each family keeps them."""
    generator = torch.Generator(device).manual_seed(0)
    timesteps = family.sample_timesteps(8, device, generator=generator)
    latents = torch.randn(8, 1, 1, 1, generator=generator, device=device)
    noise = torch.randn(8, 1, 1, 1, generator=generator, device=device)
    probe = torch.cat(
        [
            timesteps.float().flatten(),
            family.add_noise(latents, noise, timesteps).float().flatten(),
            family.target(latents, noise, timesteps).float().flatten(),
        ]
    )
    return ContentHash(probe.cpu().numpy().tobytes()).hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """The content of an offline pair dataset: per pair its images (the latent cache's content keys, or the image
    bytes), caption and label."""
    digest = ContentHash()
    if isinstance(dataset, CachedPairDataset):
        cache = dataset.cache
        # astuple: (scale, shift) as before, and a per-channel normalisation's means and stds after them.
        digest.update(cache.text_encoder_id, repr(dataclasses.astuple(cache.normalization)))
        for index in cache.pair_indices:
            pair = [index, cache.image_keys[index], cache.captions[index], cache.labels[index]]
            digest.update(json.dumps(pair))
    elif isinstance(dataset, PreferencePairDataset):
        pairs = dataset.pairs
        for index in range(len(pairs)):
            digest.update(json.dumps([index, pairs.captions[index], pairs.labels[index]]), *pairs.media_bytes(index))
    else:
        raise TypeError(
            f"model.reference_cache needs an offline pair dataset, got {type(dataset).__name__}; methods that "
            "bring their own data (online methods) cannot precompute their reference"
        )
    return digest.hexdigest()


def reference_cache_key(
    *,
    reference: ReferenceDenoiser,
    family: DiffusionFamily,
    dataset: Dataset,
    settings: dict[str, Any],
    device: torch.device,
) -> tuple[str, dict[str, Any]]:
    """The cache key and the parts it hashes (kept in the file's metadata, for reading)."""
    frozen: list[nn.Module] = [module for _, module in sorted(family.frozen_modules().items())]
    parts = {
        "family": family.prompt_encoding_id(),
        "reference": reference_fingerprint(reference),
        "frozen_modules": module_fingerprint(*frozen),
        "noising": noising_fingerprint(family, device),
        "data": dataset_fingerprint(dataset),
        "settings": settings,
    }
    encoded = json.dumps(parts, sort_keys=True, default=str)
    return ContentHash(encoded).hexdigest(), parts


@torch.no_grad()
def precompute_reference_errors(
    method: DiffusionDPO, batches: Iterator[tuple[Tensor, LatentPairBatch]]
) -> tuple[Tensor, Tensor]:
    """The reference over every batch: pair indices ``[M]`` and their errors ``[M, 2]`` (chosen, rejected), fp32
    on the CPU. Each batch's noise and timesteps come from its ``noise_seeds``, as in training."""
    indices, errors = [], []
    for pair_index, batch in batches:
        chosen, rejected = method.reference_errors(batch).float().chunk(2)
        indices.append(pair_index.cpu())
        errors.append(torch.stack([chosen, rejected], dim=1).cpu())
    return torch.cat(indices), torch.cat(errors)


def load_or_build_reference_errors(
    cache_dir: str | Path,
    *,
    method: DiffusionDPO,
    dataset: FixedDraws,
    collate: Callable[[list[Any]], dict[str, Any]],
    latent_batch: Callable[[dict[str, Any]], LatentPairBatch],
    batch_size: int,
    settings: dict[str, Any],
    accelerator: Accelerator,
) -> ReferenceErrors:
    """The reference errors of every pair of ``dataset``: read from ``cache_dir``, or computed and stored there.

    Batches are built as the training loop builds them (``collate`` with sample ids ``0..N-1``, moved to the
    device, turned into a ``LatentPairBatch`` by ``latent_batch``) and run under the accelerator's autocast,
    so each error is the one on-the-fly training would compute on the first visit. The main process builds;
    the others wait and read its file.
    """
    if method.reference is None:
        raise ValueError("model.reference_cache: the method has no reference to precompute")
    key, parts = reference_cache_key(
        reference=method.reference,
        family=method.family,
        dataset=dataset.dataset,
        settings=settings,
        device=accelerator.device,
    )
    path = Path(cache_dir) / f"{key}.safetensors"
    with accelerator.main_process_first():
        built = not path.is_file()
        if built:
            started = time.perf_counter()
            pair_index, errors = _compute_reference_errors(
                method, dataset, collate, latent_batch, batch_size, accelerator
            )
            if accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                metadata = {"format": "pt", "parts": json.dumps(parts, sort_keys=True, default=str)}
                save_tensors_atomically({"pair_index": pair_index, "errors": errors}, path, metadata)
            logger.info(
                "reference cache: %d pairs computed in %.1f s -> %s",
                len(pair_index),
                time.perf_counter() - started,
                path,
            )
        else:
            stored = read_cache_file(path)
            pair_index, errors = stored["pair_index"], stored["errors"]
            logger.info("reference cache: %d pairs read from %s", len(pair_index), path)
    table = torch.full((int(pair_index.max()) + 1, 2), float("nan"))
    table[pair_index] = errors
    return ReferenceErrors(table=table.to(accelerator.device), path=path, built=built)


def _compute_reference_errors(
    method: DiffusionDPO,
    dataset: FixedDraws,
    collate: Callable[[list[Any]], dict[str, Any]],
    latent_batch: Callable[[dict[str, Any]], LatentPairBatch],
    batch_size: int,
    accelerator: Accelerator,
) -> tuple[Tensor, Tensor]:
    """:func:`precompute_reference_errors` over ``dataset`` in training's batches, under the accelerator's
    autocast; non-finite errors raise naming the first pairs."""
    with_ids = collate_with_sample_ids(collate)

    def batches() -> Iterator[tuple[Tensor, LatentPairBatch]]:
        for start in range(0, len(dataset), batch_size):
            positions = range(start, min(start + batch_size, len(dataset)))
            batch = move_to_device(with_ids([(p, dataset[p]) for p in positions]), accelerator.device)
            yield batch["index"], latent_batch(batch)

    with accelerator.autocast():
        batch_count = -(-len(dataset) // batch_size)
        bar = progress(batches(), total=batch_count, desc="reference errors", unit="batch")
        pair_index, errors = precompute_reference_errors(method, bar)
    if not errors.isfinite().all():
        bad = pair_index[~errors.isfinite().all(dim=1)][:5].tolist()
        raise ValueError(
            f"model.reference_cache: non-finite reference errors for pairs {bad}; check the data and "
            "run.mixed_precision"
        )
    return pair_index, errors
