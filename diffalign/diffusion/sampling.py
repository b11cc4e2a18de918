"""Sampling for evaluation: the same prompts and seeds for every model, so differences are the models'."""

from __future__ import annotations

from pathlib import Path

import soundfile
import torch
from matplotlib import colormaps
from PIL import Image
from torch import Tensor, nn

from diffalign.diffusion.audio import MelSettings, log_mel_spectrogram
from diffalign.diffusion.families import DiffusionFamily
from diffalign.eval.grid import labelled_grid
from diffalign.rewards.base import Audio

Samples = Tensor | Audio  # images [N, 3, H, W] in [0, 1], or audio clips


@torch.no_grad()
def generate_samples(
    family: DiffusionFamily,
    denoiser: nn.Module,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 16,
) -> Samples:
    """A sample per prompt (images, or audio); prompt ``i`` always uses the generator seeded ``seed + i``."""
    device = next(denoiser.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + i) for i in range(len(chunk))]
        chunks.append(
            family.generate(
                denoiser,
                chunk,
                generators,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
        )
    if isinstance(chunks[0], Audio):
        return Audio(torch.cat([chunk.waveforms for chunk in chunks]), chunks[0].sample_rate)
    return torch.cat(chunks)


def spectrogram_images(rows: list[Audio]) -> list[Tensor]:
    """Each clip's log-mel spectrogram (64 bands, 10 ms hop, 40 ms window) as a magma-coloured image
    ``[3, 64, frames]``, low frequencies at the bottom, on one colour scale for all rows so that levels compare
    across models."""
    sample_rate = rows[0].sample_rate
    hop_length = sample_rate // 100
    settings = MelSettings(sample_rate, n_fft=4 * hop_length, hop_length=hop_length, fmax=sample_rate / 2)
    spectrograms = [log_mel_spectrogram(row.waveforms.float().cpu(), settings).flip(-1) for row in rows]
    low = min(spectrogram.min() for spectrogram in spectrograms)
    high = max(spectrogram.max() for spectrogram in spectrograms)
    colormap = colormaps["magma"]
    images = []
    for spectrogram in spectrograms:
        levels = ((spectrogram - low) / (high - low).clamp(min=1e-6)).transpose(1, 2)  # [N, mel, frames]
        images.append(torch.from_numpy(colormap(levels.numpy())[..., :3]).float().permute(0, 3, 1, 2))
    return images


def sample_views(rows: dict[str, Samples]) -> dict[str, Tensor]:
    """What a grid shows of each row: the images themselves, or the spectrograms of audio clips."""
    samples = list(rows.values())
    if not isinstance(samples[0], Audio):
        return rows
    return dict(zip(rows, spectrogram_images(samples)))


def save_samples(
    rows: dict[str, Samples], path: Path, prompts: list[str], scores: dict[str, Tensor] | None = None,
    score_name: str = "reward", higher_is_better: bool = True,
) -> Image.Image:
    """One row per model (``{"base": ..., "aligned": ...}``) in a labelled PNG grid at ``path`` (prompts under the
    columns, scores under the samples): the images, or the spectrograms of audio clips; audio also goes to
    ``<path without suffix>/<row>-<n>.wav`` (16-bit PCM). Returns the grid."""
    grid, _ = labelled_grid(sample_views(rows), prompts, scores, score_name, higher_is_better=higher_is_better)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    if isinstance(next(iter(rows.values())), Audio):
        folder = path.with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        for name, audio in rows.items():
            for number, waveform in enumerate(audio.waveforms.float().cpu().clamp(-1, 1).numpy()):
                soundfile.write(folder / f"{name}-{number:03d}.wav", waveform, audio.sample_rate, subtype="PCM_16")
    return grid
