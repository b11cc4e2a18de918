"""Reading and writing the media evaluation and relabelling handle: images, audio clips, reference sets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from PIL import Image
from torch import Tensor

from diffalign.eval.prompts import PROMPT_SUFFIXES, read_prompts
from diffalign.rewards import Audio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")

Reference = list[Image.Image] | Audio | list[str]


def decode_image(data: bytes, where: str) -> Image.Image:
    """An RGB image from encoded bytes; ``where`` names the row or file in the error."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: not a readable image ({type(error).__name__}: {error})") from None
    return image.convert("RGB")


def decode_audio(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """A mono float32 waveform (channels averaged) and its sample rate from encoded bytes (WAV, FLAC, OGG)."""
    try:
        waveform, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise ValueError(f"{where}: not a readable audio file ({type(error).__name__}: {error})") from None
    if waveform.shape[0] == 0:
        raise ValueError(f"{where}: the audio clip is empty")
    return waveform.mean(axis=1), sample_rate


def images_as_batch(images: list[Image.Image]) -> Tensor | list[Image.Image]:
    """A ``[B,3,H,W]`` tensor in [0,1] when every image has one size (scorers such as toy_t2i need tensors),
    else the PIL images themselves (model scorers resize them)."""
    if len({image.size for image in images}) != 1:
        return images
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def clips_as_audio(clips: list[tuple[np.ndarray, int]]) -> Audio:
    """One :class:`Audio` batch from clips of any rates and lengths: each is resampled to the first clip's rate
    (soxr) and every clip is cut to the shortest, since a batch is one ``[B, T]`` tensor."""
    sample_rate = clips[0][1]
    waveforms = [
        waveform if rate == sample_rate else soxr.resample(waveform, rate, sample_rate).astype(np.float32)
        for waveform, rate in clips
    ]
    length = min(len(waveform) for waveform in waveforms)
    return Audio(torch.from_numpy(np.stack([waveform[:length] for waveform in waveforms])), sample_rate)


def load_reference(path: str) -> Reference:
    """A reference set: a folder of images or of audio clips, or a prompt file of exemplar texts."""
    location = Path(path)
    if location.is_file() and location.suffix in PROMPT_SUFFIXES:
        return read_prompts(location)
    if not location.is_dir():
        raise FileNotFoundError(
            f"reference: {location} is neither a folder of images ({', '.join(IMAGE_SUFFIXES)}) or audio clips "
            f"({', '.join(AUDIO_SUFFIXES)}) nor a prompt file ({', '.join(PROMPT_SUFFIXES)})"
        )
    files = sorted(p for p in location.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + AUDIO_SUFFIXES)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if images and len(images) < len(files):
        raise ValueError(f"reference: {location} mixes images and audio clips; keep one kind per folder")
    if not files:
        raise ValueError(
            f"reference: {location} holds no image ({', '.join(IMAGE_SUFFIXES)}) or audio clip "
            f"({', '.join(AUDIO_SUFFIXES)})"
        )
    if images:
        return [decode_image(p.read_bytes(), str(p)) for p in images]
    return clips_as_audio([decode_audio(p.read_bytes(), str(p)) for p in files])


def write_wav(path: Path, waveform: Tensor, sample_rate: int) -> None:
    """A mono float waveform as 16-bit PCM WAV (clipped to [-1, 1])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, waveform.detach().float().clamp(-1, 1).cpu().numpy(), sample_rate, subtype="PCM_16")


def write_png(path: Path, image: Tensor) -> None:
    """A ``[3,H,W]`` image in [0,1] as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)
