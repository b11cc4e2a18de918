"""Audio pair members → model inputs: decoding, resampling, the log-mel front-end and the audio media decoder.

A stored clip (WAV, FLAC, OGG, ... bytes, at any rate and with any number of channels) becomes what a model
family's VAE encodes, through the :class:`~diffalign.diffusion.transforms.MediaDecoder` steps:

* ``load`` decodes the bytes with soundfile and rejects clips that are truncated (WAV), empty, non-finite or
  silent;
* ``transform`` mixes the channels to the model's count, resamples to the model's rate with soxr, trims or
  zero-pads to the model's length and, for latent-mel models (MusicLDM, AudioLDM, AudioLDM2), computes the
  log-mel spectrogram their VAE and vocoder were trained on; waveform models (Stable Audio) get the waveform.

Every decoded clip carries the span ``(start, end)`` of real audio inside the model's window, in samples at the
model's rate, as conditioning (``audio_span``): Stable Audio conditions on the clip's duration.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.diffusion.transforms import CorruptMediaError, DecodedMedia


@dataclass(frozen=True)
class MelSettings:
    """A HiFi-GAN log-mel front-end. Defaults: the 16 kHz vocoders of AudioLDM, AudioLDM2 and MusicLDM
    (1024-point STFT and window, hop 160, 64 Slaney mel bands over 0–8 kHz; Liu et al., 2023,
    github.com/haoheliu/AudioLDM, and the ``mel_spectrogram`` of github.com/jik876/hifi-gan)."""

    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 160
    mel_bins: int = 64
    fmin: float = 0.0
    fmax: float = 8_000.0
    log_floor: float = 1e-5  # HiFi-GAN's dynamic range compression: log(clamp(mel, 1e-5))

    def __post_init__(self) -> None:
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"mel band {self.fmin}–{self.fmax} Hz must satisfy 0 <= fmin < fmax <= sample_rate/2 "
                f"({self.sample_rate / 2} Hz)"
            )
        if self.hop_length > self.n_fft:
            raise ValueError(f"mel hop_length {self.hop_length} must not exceed n_fft {self.n_fft}")


@functools.cache
def mel_filters(settings: MelSettings) -> Tensor:
    """Slaney-scale, Slaney-normalised triangular filters ``[n_fft // 2 + 1, mel_bins]`` (librosa's defaults)."""
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=settings.n_fft // 2 + 1,
        num_mel_filters=settings.mel_bins,
        min_frequency=settings.fmin,
        max_frequency=settings.fmax,
        sampling_rate=settings.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters.astype(np.float32))


def log_mel_spectrogram(waveforms: Tensor, settings: MelSettings) -> Tensor:
    """``log(max(M·|STFT(x)|, floor))`` of waveforms ``[B, T]``: ``[B, T // hop, mel_bins]`` (time, mel).

    As HiFi-GAN: reflect-pad ``(n_fft − hop) / 2`` samples on both sides and run the STFT uncentred with a
    periodic Hann window, so frame ``k`` is centred on sample ``k·hop + hop/2`` and a clip of ``T`` samples gives
    exactly ``T // hop`` frames; the magnitude is ``sqrt(re² + im² + 1e-9)``. Plain torch, so differentiable.
    """
    if waveforms.ndim != 2:
        raise ValueError(f"log_mel_spectrogram expects waveforms [batch, time], got shape {tuple(waveforms.shape)}")
    padding = (settings.n_fft - settings.hop_length) // 2
    padded = F.pad(waveforms.float()[:, None], (padding, padding), mode="reflect")[:, 0]
    spectrum = torch.stft(
        padded,
        settings.n_fft,
        hop_length=settings.hop_length,
        window=torch.hann_window(settings.n_fft, device=waveforms.device),
        center=False,
        return_complex=True,
    )
    magnitude = torch.sqrt(spectrum.real**2 + spectrum.imag**2 + 1e-9)  # [B, freq, frames]
    mel = torch.einsum("bft,fm->btm", magnitude, mel_filters(settings).to(waveforms.device))
    return torch.log(mel.clamp(min=settings.log_floor))


class CorruptAudioError(CorruptMediaError):
    def __init__(self, message: str) -> None:
        super().__init__(message, reason="corrupt_audio")


def wav_truncation(data: bytes) -> tuple[int, int] | None:
    """``(declared, present)`` sizes of a RIFF/WAVE file's ``data`` chunk when the file ends inside it; None
    for a complete WAV file, another format, or a size a streaming writer left unset (0 or 0xFFFFFFFF)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if chunk == b"data":
            present = len(data) - offset - 8
            return (size, present) if present < size and size not in (0, 0xFFFFFFFF) else None
        offset += 8 + size + size % 2  # chunks are padded to an even size
    return None


@dataclass(frozen=True)
class Clip:
    """Decoded audio: float32 samples ``[channels, time]`` at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class AudioDecoder:
    """Stored audio → the VAE input of a model family (see the module docstring).

    ``mel`` set: a log-mel spectrogram ``[1, num_samples // hop, mel_bins]`` of the mono clip; unset: the waveform
    ``[channels, num_samples]``. Channels are averaged when the counts differ (stereo → mono) and the average is
    repeated for more channels (mono → stereo). Clips longer than ``num_samples`` keep their start; shorter ones
    are zero-padded at the end. ``peak_normalize`` removes the mean and scales the peak to that value, as the
    AudioLDM and Tango data loaders do for their own training (off by default: levels are part of what a
    preference may judge). A clip whose peak stays below ``silence_threshold`` is rejected as silent.
    """

    sample_rate: int
    num_samples: int
    channels: int = 1
    mel: MelSettings | None = None
    peak_normalize: float | None = None
    silence_threshold: float = 1e-4  # −80 dBFS: a few LSB of 16-bit PCM
    name: ClassVar[str] = "audio"

    def __post_init__(self) -> None:
        if self.mel is not None and (self.channels != 1 or self.mel.sample_rate != self.sample_rate):
            raise ValueError(
                f"a log-mel AudioDecoder needs channels=1 and mel.sample_rate == sample_rate, got channels="
                f"{self.channels}, mel.sample_rate={self.mel.sample_rate}, sample_rate={self.sample_rate}"
            )
        if self.num_samples < 1 or self.channels < 1:
            raise ValueError(f"num_samples and channels must be >= 1, got {self.num_samples}, {self.channels}")

    def settings(self) -> dict[str, Any]:
        # "version" names the transform code: bump it when the values it produces change.
        return {"decoder": "audio", "version": 1, **asdict(self)}

    def load(self, data: bytes) -> Clip:
        try:
            samples, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as error:
            raise CorruptAudioError(f"cannot decode the audio ({error.error_string})") from None
        except (RuntimeError, ValueError, TypeError) as error:
            raise CorruptAudioError(f"cannot decode the audio ({type(error).__name__}: {error})") from None
        truncated = wav_truncation(data)
        if truncated is not None:
            # libsndfile reads what is there without complaint; the rest would be zero-padded and trained on.
            declared, present = truncated
            raise CorruptAudioError(
                f"the WAV file is truncated: its data chunk declares {declared} bytes, {present} are present"
            )
        if samples.size == 0:
            raise CorruptAudioError("the audio has no samples")
        if not np.isfinite(samples).all():
            raise CorruptAudioError("the audio holds NaN or infinite samples")
        peak = float(np.abs(samples).max())
        if peak < self.silence_threshold:
            raise CorruptAudioError(
                f"the audio is silent (peak amplitude {peak:.3g} below the silence threshold "
                f"{self.silence_threshold:g})"
            )
        return Clip(samples=np.ascontiguousarray(samples.T), sample_rate=sample_rate)

    def draw_augmentation(self, generator: torch.Generator) -> None:
        return None

    def cache_augmentations(self) -> list[Hashable]:
        return [None]

    def waveform(self, clip: Clip) -> tuple[Tensor, int]:
        """The clip at the model's rate and channel count, trimmed or padded: ``([channels, num_samples], end)``
        where ``end`` is the number of real (unpadded) samples."""
        samples = clip.samples
        # Only the part that survives the trim is resampled, plus 100 ms for the resampler's filter to settle.
        needed = math.ceil(self.num_samples * clip.sample_rate / self.sample_rate) + clip.sample_rate // 10
        samples = samples[:, :needed]
        if samples.shape[0] != self.channels:
            samples = np.repeat(samples.mean(axis=0, keepdims=True), self.channels, axis=0)
        if clip.sample_rate != self.sample_rate:
            # soxr (default quality "HQ") reads and writes [time, channels].
            samples = soxr.resample(samples.T, clip.sample_rate, self.sample_rate).T
        waveform = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        if self.peak_normalize is not None:
            waveform = waveform - waveform.mean()
            waveform = waveform / waveform.abs().max().clamp(min=1e-8) * self.peak_normalize
        end = min(waveform.shape[1], self.num_samples)
        waveform = F.pad(waveform[:, : self.num_samples], (0, self.num_samples - end))
        return waveform, end

    def transform(self, media: Clip, augmentation: None = None) -> DecodedMedia:
        waveform, end = self.waveform(media)
        values = waveform if self.mel is None else log_mel_spectrogram(waveform, self.mel)
        return DecodedMedia(values=values, conditioning={"audio_span": (0, end)})
