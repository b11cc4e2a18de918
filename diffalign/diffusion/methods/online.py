"""What the online methods (SePPO, DRAGON, RPO, GRPO) share: training prompts, seeded sampling from a denoiser
during training, its decoding for rewards, a scorer of :mod:`diffalign.rewards` as a per-sample reward, and
swapping a past checkpoint's weights into the policy.

Sampling goes through the family (``family.sample``), which returns clean latents in the denoiser's space for
every family, ready for the loss. Every sample has its own generator, seeded from the batch item it belongs to:
a resumed or multi-process run generates exactly the same samples as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import soundfile
import torch
from accelerate.utils import extract_model_from_parallel
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffalign.diffusion.families import DiffusionFamily
from diffalign.eval.prompts import read_prompts
from diffalign.progress import progress
from diffalign.rewards import Audio, Samples, build_scorer
from diffalign.training.seeding import (
    derived_seed as derived_seed,  # the diffusion methods import it from here
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


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
    for start in progress(range(0, len(prompts), batch_size), desc="generating", unit="batch", leave=False):
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


# --- training prompts --------------------------------------------------------------------------------------------


def load_prompts(path: str | None, prompts: Sequence[str], key: str) -> list[str]:
    """``prompts`` plus those of the prompt file ``path`` (one per line in a .txt; see eval/prompts.py); ``key``
    is the settings section they come from, for the error messages (e.g. ``method.dragon``)."""
    loaded = list(prompts)
    if path is not None:
        loaded += read_prompts(Path(path), key=f"{key}.prompts_file")
    if not loaded:
        raise ValueError(f"{key} has no prompts; set {key}.prompts_file (one prompt per line) or {key}.prompts")
    return loaded


class PromptDataset(Dataset):
    """Training prompts: items ``{"caption", "index"}``."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"caption": self.prompts[index], "index": index}


# --- rewards -----------------------------------------------------------------------------------------------------


def load_exemplars(path: str, key: str) -> list[str] | list[Image.Image] | Audio:
    """An exemplar set: a text file (one exemplar text per line, e.g. captions for a CLAP reward), or a folder of
    images, or of audio files (mixed to mono, cut to the shortest; all at one sample rate). ``key`` names the
    setting in error messages."""
    location = Path(path)
    if location.is_file():
        texts = [line.strip() for line in location.read_text().splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{key}: {location} has no non-empty line")
        return texts
    if not location.is_dir():
        raise FileNotFoundError(f"{key}: {location} does not exist; give a text file or a folder of images or audio")
    files = sorted(path for path in location.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES | AUDIO_SUFFIXES)
    kinds = {path.suffix.lower() in IMAGE_SUFFIXES for path in files}
    if not files or len(kinds) > 1:
        raise ValueError(
            f"{key}: {location} must hold images ({sorted(IMAGE_SUFFIXES)}) or audio files "
            f"({sorted(AUDIO_SUFFIXES)}), not {'both' if files else 'neither'}"
        )
    if kinds == {True}:
        return [Image.open(path).convert("RGB") for path in files]
    waveforms, rates = [], set()
    for file in files:
        try:
            data, rate = soundfile.read(file, dtype="float32", always_2d=True)
        except RuntimeError as error:
            raise ValueError(f"{key}: cannot read {file} ({error})") from None
        waveforms.append(torch.from_numpy(data.mean(axis=1)))
        rates.add(rate)
    if len(rates) > 1:
        raise ValueError(f"{key}: {location} mixes sample rates {sorted(rates)}; resample to one")
    length = min(len(waveform) for waveform in waveforms)
    return Audio(torch.stack([waveform[:length] for waveform in waveforms]), rates.pop())


class SampleReward:
    """A scorer of :mod:`diffalign.rewards` as an online reward: one value per sample, higher is better
    (distances are negated), against its exemplar set when it has one (embedded or summarised once: the set does
    not change during training). ``keys`` name the settings of the scorer's name, options and exemplars, for error
    messages (e.g. ``method.dragon.reward``, ``method.dragon.reward_options``, ``method.dragon.exemplars``)."""

    def __init__(
        self, name: str, options: dict[str, Any], exemplars: str | None, keys: tuple[str, str, str]
    ) -> None:
        name_key, options_key, exemplars_key = keys
        self.scorer = build_scorer(name, **options).eval()
        if self.scorer.set_level:
            raise ValueError(
                f"{name_key}: {name!r} returns one score per set; an online method needs a signal per sample: set "
                f"{options_key}.reduction to leave_one_out (or per_sample)"
            )
        self.exemplars = None
        if exemplars is not None:
            self.exemplars = self.scorer.prepare_reference(load_exemplars(exemplars, exemplars_key))

    @torch.no_grad()
    def __call__(self, samples: Samples, prompts: list[str]) -> Tensor:
        """Per-sample rewards ``[N]`` in fp32 on the CPU."""
        extra = {} if self.exemplars is None else {"reference": self.exemplars}
        scores = self.scorer(samples, prompts, **extra).float().cpu()
        return scores if self.scorer.higher_is_better else -scores
