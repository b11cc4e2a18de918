"""What the online methods (SePPO, DRAGON, RPO) share: seeded sampling from a denoiser during training, its
decoding for rewards, and swapping a past checkpoint's weights into the policy.

Sampling goes through the family (``family.sample``), which returns clean latents in the denoiser's space for
every family, ready for the loss. Every sample has its own generator, seeded from the batch item it belongs to:
a resumed or multi-process run generates exactly the same samples as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from diffalign.diffusion.families import DiffusionFamily
from diffalign.rewards import Audio, Samples


def derived_seed(*numbers: int) -> int:
    """A 64-bit seed mixed from ``numbers`` (NumPy's SeedSequence), e.g. (item seed, stream, sample index).

    Streams of one item (generation, selection, noise) then never overlap, whatever the numbers' sizes.
    """
    high, low = np.random.SeedSequence([int(number) for number in numbers]).generate_state(2)
    return (int(high) << 32) | int(low)


def trainable_weights(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of ``model``'s trainable parameters (the LoRA weights, or the whole denoiser)."""
    model = extract_model_from_parallel(model)
    return {
        name: parameter.detach().to("cpu", copy=True)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, Tensor]) -> Iterator[nn.Module]:
    """``model`` with its trainable parameters replaced by ``weights`` inside the context, restored exactly after.

    Only for gradient-free use before the policy's own forward: an autograd graph built on the parameters
    would see them change.
    """
    model = extract_model_from_parallel(model)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(parameters):
        missing, unexpected = sorted(set(parameters) - set(weights)), sorted(set(weights) - set(parameters))
        raise ValueError(
            f"the stored weights do not match the model's trainable parameters (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); were they saved from a model with another LoRA/full setting?"
        )
    with torch.no_grad():
        saved = {name: parameter.detach().clone() for name, parameter in parameters.items()}
        for name, parameter in parameters.items():
            parameter.copy_(weights[name])
        try:
            yield model
        finally:
            for name, parameter in parameters.items():
                parameter.copy_(saved[name])


@torch.no_grad()
def sample_latents(
    family: DiffusionFamily,
    denoiser: nn.Module,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 16,
) -> Tensor:
    """Clean latents ``[N, ...]`` in the denoiser's space from ``family.sample``, one per prompt, in batches of
    ``batch_size``; sample ``i`` draws its initial noise from a generator seeded ``seeds[i]``."""
    if len(seeds) != len(prompts):
        raise ValueError(f"sample_latents needs one seed per prompt, got {len(seeds)} for {len(prompts)}")
    denoiser = extract_model_from_parallel(denoiser)
    device = next(denoiser.parameters()).device
    latents = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds[start : start + batch_size]]
        latents.append(
            family.sample(
                denoiser,
                prompts[start : start + batch_size],
                generators,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
        )
    return torch.cat(latents)


@torch.no_grad()
def decode_samples(family: DiffusionFamily, latents: Tensor, batch_size: int = 16) -> Samples:
    """What a reward scores, decoded in chunks: images ``[N,3,H,W]`` in [0, 1] or :class:`Audio`, on the CPU."""
    decoded = [family.decode(latents[start : start + batch_size]) for start in range(0, len(latents), batch_size)]
    if isinstance(decoded[0], Audio):
        return Audio(torch.cat([chunk.waveforms.float().cpu() for chunk in decoded]), decoded[0].sample_rate)
    return torch.cat([chunk.float().cpu() for chunk in decoded])
