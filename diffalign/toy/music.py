"""The toy text-to-music world: clips, captions, the mel front-end, a checker and a scripted preference.

A clip is 1.28 s of 16 kHz mono audio: a repeated tone, a repeated chord or an arpeggio. Its caption names
five attributes, e.g. "a loud fast high square arpeggio":

- loudness ``quiet``/``loud`` (RMS level of a note),
- tempo ``slow``/``fast`` (3 or 8 notes per second),
- register ``low``/``mid``/``high`` (every note lies in the octave from A2, A3 or A4),
- timbre ``sine``/``square``/``saw``,
- kind ``tone`` (the root repeated), ``chord`` (a triad struck together) or ``arpeggio`` (triad notes in turn).

Things a caption does not fix vary freely: the root within its register, major or minor, the arpeggio
pattern, the exact tempo and level, the start, and above all how fast each note decays (from a 30 ms pluck
to a sustained note). The scripted preference (:func:`toy_reward`) asks for sustained notes; the base model
(``assets/toy-t2m``, built by :mod:`diffalign.toy.music_build`) decays its notes at random, which leaves
preference alignment a job to do. The checker (:func:`describe`) names the value of each
of the five attributes it hears in a clip, so that a model's samples can be scored against every attribute
their caption names, as :func:`t2i.detect_shape <diffalign.toy.t2i.detect_shape>` does for scenes.

Everything here is plain torch: the mel front-end (:func:`waveform_to_mel`) is the one the VAE and the
vocoder were trained on, and it is differentiable.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TOY_T2M_DIR = Path(__file__).resolve().parents[2] / "assets" / "toy-t2m"
"""Where the built toy model lives in a source checkout (the assets are not part of the wheel)."""

SAMPLE_RATE = 16_000
CLIP_SAMPLES = 20_480  # 1.28 s: 128 mel frames, 32 latent frames after the VAE's ÷4
CLIP_SECONDS = CLIP_SAMPLES / SAMPLE_RATE

# The front-end of the 16 kHz HiFi-GAN vocoders of AudioLDM and MusicLDM (their vocoder config and
# the HiFi-GAN `mel_spectrogram` of jik876/hifi-gan): 1024-point STFT, hop 160, 64 Slaney mel bands from
# 0 to 8 kHz, natural log of the magnitude clamped at 1e-5.
N_FFT = 1024
HOP_LENGTH = 160
MEL_BINS = 64
MEL_FMIN = 0.0
MEL_FMAX = 8_000.0
LOG_MEL_FLOOR = 1e-5
MEL_FRAMES = CLIP_SAMPLES // HOP_LENGTH

KINDS = ("tone", "chord", "arpeggio")
REGISTERS = {"low": 45, "mid": 57, "high": 69}  # MIDI number of the octave's lowest note: A2, A3, A4
TEMPOS = {"slow": 3.0, "fast": 8.0}  # notes per second
TIMBRES = ("sine", "square", "saw")
LOUDNESSES = {"quiet": (0.03, 0.05), "loud": (0.16, 0.25)}  # RMS range of one voice at a note's onset
ATTRIBUTES = ("loudness", "tempo", "register", "timbre", "kind")  # in caption order
VOCABULARY: dict[str, tuple[str, ...]] = {
    "loudness": tuple(LOUDNESSES),
    "tempo": tuple(TEMPOS),
    "register": tuple(REGISTERS),
    "timbre": TIMBRES,
    "kind": KINDS,
}

# Roots lie in the lowest five semitones of the register, so that a triad's fifth (+7) stays in its octave.
ROOT_SPAN = 5
ARPEGGIO_PATTERNS = ((0, 1, 2), (0, 1, 2, 1))  # chord-tone indices, cycled: up, and up-down
GATE = 0.75  # a note sounds for this fraction of its step, so repeated notes have audible gaps
ATTACK_SECONDS = 0.005
RELEASE_SECONDS = 0.01
DECAY_RANGE = (0.03, 3.0)  # seconds to fall to 1/e, drawn log-uniformly
TEMPO_JITTER = 0.1  # notes per second vary by ±10% around the tempo
MAX_START_SECONDS = 0.05

# (timbre, kind) combinations whose captions never appear in the preference training data; each timbre and
# each kind is held out once, so held-out prompts test generalisation of the learnt preference.
HELDOUT_TIMBRE_KINDS = (("sine", "arpeggio"), ("square", "tone"), ("saw", "chord"))

Split = Literal["train", "heldout"]


# ---------------------------------------------------------------------------------------------- captions


def make_caption(
    kind: str | None = None,
    register: str | None = None,
    tempo: str | None = None,
    timbre: str | None = None,
    loudness: str | None = None,
) -> str:
    """``make_caption("arpeggio", "high", "fast", "square", "loud") == "a loud fast high square arpeggio"``.

    Attributes given as ``None`` are left out; with no kind the caption ends in "clip" ("a fast clip").
    """
    words = [loudness, tempo, register, timbre, kind if kind is not None else "clip"]
    return " ".join(["a", *(word for word in words if word is not None)])


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption asks for, keyed by :data:`ATTRIBUTES` (``None`` where it does not say).

    Words outside the toy vocabulary are ignored, so "a fast low sine arpeggio, please" parses. Raises
    ``ValueError`` when a caption names two different values of one attribute.
    """
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    for word in caption.lower().replace(",", " ").split():
        for attribute, values in VOCABULARY.items():
            if word in values:
                if found[attribute] not in (None, word):
                    raise ValueError(f"caption {caption!r} names two {attribute}s: {found[attribute]!r} and {word!r}")
                found[attribute] = word
    return found


def all_captions() -> list[str]:
    """The 108 full captions of the world, in a fixed order."""
    return [
        make_caption(kind, register, tempo, timbre, loudness)
        for kind in KINDS
        for timbre in TIMBRES
        for register in REGISTERS
        for tempo in TEMPOS
        for loudness in LOUDNESSES
    ]


def load_prompts(split: Split) -> list[str]:
    """Prompts of the preference data: ``"train"`` (72) or ``"heldout"`` (36, whose timbre–kind pairs never
    occur in preference training; the base model was pretrained on all 108)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")

    def is_heldout(caption: str) -> bool:
        asked = parse_caption(caption)
        return (asked["timbre"], asked["kind"]) in HELDOUT_TIMBRE_KINDS

    return [caption for caption in all_captions() if is_heldout(caption) == (split == "heldout")]


# --------------------------------------------------------------------------------------------- synthesis


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines a clip: the captioned attributes and the free ones."""

    kind: str
    register: str
    tempo: str
    timbre: str
    loudness: str
    root: int  # MIDI note number, within the register's lowest ROOT_SPAN semitones
    minor: bool
    pattern: tuple[int, ...]  # arpeggio order of chord tones (0 root, 1 third, 2 fifth); unused otherwise
    notes_per_second: float
    decay: float  # seconds for a note to fall to 1/e
    level: float  # RMS of one voice at a note's onset
    start: float  # seconds before the first note

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            value = getattr(self, attribute)
            if value not in VOCABULARY[attribute]:
                raise ValueError(f"{attribute} must be one of {', '.join(VOCABULARY[attribute])}, got {value!r}")
        lowest = REGISTERS[self.register]
        if not lowest <= self.root < lowest + ROOT_SPAN:
            raise ValueError(
                f"root {self.root} is outside the {self.register} register's roots {lowest}..{lowest + ROOT_SPAN - 1}"
            )
        if self.decay <= 0 or self.notes_per_second <= 0 or self.level <= 0 or self.start < 0:
            raise ValueError(f"decay, notes_per_second and level must be positive and start ≥ 0, got {self}")

    @property
    def caption(self) -> str:
        return make_caption(self.kind, self.register, self.tempo, self.timbre, self.loudness)

    @property
    def chord(self) -> tuple[int, int, int]:
        """MIDI notes of the triad on the root."""
        return (self.root, self.root + (3 if self.minor else 4), self.root + 7)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, values: Sequence):
    return values[torch.randint(len(values), (), generator=generator).item()]


def sample_clip_specs(
    count: int,
    generator: torch.Generator,
    prompt: str | None = None,
    decay_range: tuple[float, float] = DECAY_RANGE,
) -> list[ClipSpec]:
    """Draw ``count`` random clips; attributes that ``prompt`` names are fixed, the rest uniform.

    The decay is log-uniform in ``decay_range`` (seconds); pass a narrow range of long decays for clips
    the scripted preference likes.
    """
    asked = parse_caption(prompt) if prompt is not None else dict.fromkeys(ATTRIBUTES)
    low_decay, high_decay = (math.log(value) for value in decay_range)
    specs = []
    for _ in range(count):
        attributes = {name: asked[name] or _choice(generator, VOCABULARY[name]) for name in ATTRIBUTES}
        specs.append(
            ClipSpec(
                **attributes,
                root=REGISTERS[attributes["register"]] + int(torch.randint(ROOT_SPAN, (), generator=generator)),
                minor=bool(torch.rand((), generator=generator) < 0.5),
                pattern=_choice(generator, ARPEGGIO_PATTERNS),
                notes_per_second=TEMPOS[attributes["tempo"]] * _uniform(generator, 1 - TEMPO_JITTER, 1 + TEMPO_JITTER),
                decay=math.exp(_uniform(generator, low_decay, high_decay)),
                level=_uniform(generator, *LOUDNESSES[attributes["loudness"]]),
                start=_uniform(generator, 0.0, MAX_START_SECONDS),
            )
        )
    return specs


def midi_to_hz(midi: Tensor | float) -> Tensor | float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def hz_to_midi(frequency: Tensor) -> Tensor:
    return 69 + 12 * torch.log2(frequency / 440.0)


def _poly_blep(phase: Tensor, increment: Tensor) -> Tensor:
    """The polyBLEP residual that band-limits a unit step at phase 0 (Välimäki & Huovilainen, 2007)."""
    after = phase / increment
    before = (phase - 1) / increment
    return torch.where(
        phase < increment, 2 * after - after**2 - 1, torch.where(phase > 1 - increment, before**2 + 2 * before + 1, 0.0)
    )


def _oscillator(timbre: str, phase: Tensor, increment: Tensor) -> Tensor:
    """A unit-RMS periodic wave at ``phase`` (cycles, in [0,1)) advancing ``increment`` cycles per sample."""
    if timbre == "sine":
        return math.sqrt(2) * torch.sin(2 * math.pi * phase)
    saw = 2 * phase - 1 - _poly_blep(phase, increment)
    if timbre == "saw":
        return math.sqrt(3) * saw
    # A square wave is the difference of two saws half a cycle apart.
    shifted = (phase + 0.5) % 1
    return saw - (2 * shifted - 1 - _poly_blep(shifted, increment))


def _voice(timbres: list[str], increment: Tensor) -> Tensor:
    """One voice per clip ``[B,T]``, each in its timbre, from its per-sample phase increment (cycles)."""
    # Phase accumulated in float64, so that it does not drift over the clip; continuous across note changes.
    phase = (torch.cumsum(increment.double(), dim=-1) % 1).float()
    wave = torch.empty_like(phase)
    for timbre in TIMBRES:
        rows = torch.tensor([name == timbre for name in timbres])
        if rows.any():
            wave[rows] = _oscillator(timbre, phase[rows], increment[rows])
    return wave


def synthesize(specs: ClipSpec | Sequence[ClipSpec]) -> Tensor:
    """Render clips: ``[B, CLIP_SAMPLES]`` float32 in [-1, 1] (``[CLIP_SAMPLES]`` for one spec).

    Each note has a 5 ms attack, an exponential decay and a 10 ms release at the end of its gate (75% of
    the note's step). Square and saw waves are band-limited with polyBLEP; a chord's three voices are
    scaled by 1/√3 so that loudness does not depend on the kind.
    """
    if isinstance(specs, ClipSpec):
        return synthesize([specs])[0]
    time = torch.arange(CLIP_SAMPLES) / SAMPLE_RATE

    def column(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32)[:, None]

    step = 1 / column([spec.notes_per_second for spec in specs])
    since_start = time[None] - column([spec.start for spec in specs])
    note_index = torch.floor(since_start / step)
    in_note = since_start - note_index * step
    gate = GATE * step
    envelope = (
        (in_note / ATTACK_SECONDS).clamp(max=1)
        * torch.exp(-in_note / column([spec.decay for spec in specs]))
        * ((gate - in_note) / RELEASE_SECONDS).clamp(min=0, max=1)
        * (since_start >= 0)
    )

    # The first voice plays the root (tones, chords) or follows the arpeggio pattern; chords add two voices
    # holding the third and the fifth.
    chords = torch.tensor([spec.chord for spec in specs], dtype=torch.float32)  # [B,3]
    patterns = [spec.pattern if spec.kind == "arpeggio" else (0,) for spec in specs]
    padded = torch.tensor([pattern + (0,) * (4 - len(pattern)) for pattern in patterns])
    position = note_index.clamp(min=0).long() % torch.tensor([len(pattern) for pattern in patterns])[:, None]
    melody = chords.gather(1, padded.gather(1, position))  # [B,T]
    timbres = [spec.timbre for spec in specs]
    mix = _voice(timbres, midi_to_hz(melody) / SAMPLE_RATE)
    is_chord = torch.tensor([spec.kind == "chord" for spec in specs])
    if is_chord.any():
        chord_timbres = [timbre for timbre, chord in zip(timbres, is_chord.tolist()) if chord]
        for voice in (1, 2):
            increment = (midi_to_hz(chords[is_chord, voice]) / SAMPLE_RATE)[:, None].expand(-1, CLIP_SAMPLES)
            mix[is_chord] += _voice(chord_timbres, increment)
        mix[is_chord] /= math.sqrt(3)
    audio = column([spec.level for spec in specs]) * envelope * mix
    return audio.clamp(-1, 1)


# --------------------------------------------------------------------------------------------- front-end


@functools.cache
def _mel_filters() -> Tensor:
    from transformers.audio_utils import mel_filter_bank

    # Slaney-normalised Slaney-scale filters: librosa's defaults, which the HiFi-GAN front-end uses.
    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=MEL_BINS,
        min_frequency=MEL_FMIN,
        max_frequency=MEL_FMAX,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters.astype(np.float32))  # [freq, mel]


def mel_magnitude(waveforms: Tensor) -> Tensor:
    """Mel-band magnitude ``[B, T // 160, 64]`` (time, mel) of 16 kHz waveforms ``[B, T]``, before the log.

    As HiFi-GAN: reflect-pad (n_fft − hop)/2 on both sides, STFT without centring, magnitude, Slaney mel
    filters. Differentiable.
    """
    if waveforms.ndim != 2:
        raise ValueError(f"expected waveforms [B, T], got shape {tuple(waveforms.shape)}")
    padding = (N_FFT - HOP_LENGTH) // 2
    padded = F.pad(waveforms.float()[:, None], (padding, padding), mode="reflect")[:, 0]
    spectrum = torch.stft(
        padded,
        N_FFT,
        hop_length=HOP_LENGTH,
        window=torch.hann_window(N_FFT, device=waveforms.device),
        center=False,
        return_complex=True,
    )
    magnitude = torch.sqrt(spectrum.real**2 + spectrum.imag**2 + 1e-9)  # [B, freq, frames]
    return torch.einsum("bft,fm->btm", magnitude, _mel_filters().to(waveforms.device))


def waveform_to_mel(waveforms: Tensor) -> Tensor:
    """Log-mel spectrogram ``[B, T // 160, 64]`` (time, mel) of 16 kHz waveforms ``[B, T]`` (or ``[T]``).

    The input layout of ``SpeechT5HifiGan`` (``vae.decode(...).sample.squeeze(1)``); add a channel axis
    (``unsqueeze(1)``) for the VAE. ``log(clamp(mel_magnitude, 1e-5))`` as HiFi-GAN. Differentiable.
    """
    single = waveforms.ndim == 1
    if waveforms.ndim not in (1, 2):
        raise ValueError(f"expected waveforms [B, T] or [T], got shape {tuple(waveforms.shape)}")
    log_mel = torch.log(mel_magnitude(waveforms[None] if single else waveforms).clamp(min=LOG_MEL_FLOOR))
    return log_mel[0] if single else log_mel


# ------------------------------------------------------------------------------------------ measurement

# Soft decisions of the scripted preference.
REGISTER_SIGMA = 2.5  # semitones: width of each register's Gaussian around its roots' centre
TEMPO_WIDTH = 0.2  # octaves of note rate: slope of the slow/fast logistic
PRESENCE_RMS = (0.005, 0.015)  # loudest-frame RMS: below the first a clip counts as silent, above the second as present
PEAK_THRESHOLD = 0.25  # a spectral peak counts as a note if it reaches this fraction of the strongest one
ONSET_THRESHOLD = 0.3  # an onset-strength peak counts if it reaches this fraction of the strongest one
ONSET_RANGE_NATS = 4.0  # onsets ignore energy this far below the clip's loudest frame (~35 dB)
PITCH_BAND_HZ = (50.0, 2000.0)
LOUDNESS_BOUNDARY = math.sqrt(LOUDNESSES["quiet"][1] * LOUDNESSES["loud"][0])  # onset RMS between the ranges
SAW_SECOND_HARMONIC = 0.3  # a saw's second partial is half its first; square and sine have none
SQUARE_THIRD_HARMONIC = 0.07  # square and saw have a third partial a third of the first; a sine has none
CHORD_TONE_RANGE = 1.6  # a triad's notes lie within this ratio of its root (the fifth: 1.5)
CHORD_CONCURRENCY = 0.7  # a chord sounds its tones together, an arpeggio one at a time


@dataclass
class Measurements:
    """What the scripted preference hears in each clip (all ``[B]`` tensors)."""

    lowest_pitch: Tensor  # MIDI number of the lowest strong spectral peak
    register_probs: Tensor  # [B, 3], in REGISTERS order
    notes_per_second: Tensor  # from the median interval between detected onsets
    fast_prob: Tensor
    sustain: Tensor  # in [0,1]: 1 for notes that ring through their gate, near 0 for short plucks
    presence: Tensor  # in [0,1]: 0 for silence
    peak_rms: Tensor  # RMS of the loudest 20 ms frame


def _check_waveforms(waveforms: Tensor, sample_rate: int) -> Tensor:
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the toy music world is {SAMPLE_RATE} Hz, got sample_rate={sample_rate}; resample first")
    if waveforms.ndim != 2 or not waveforms.is_floating_point():
        raise ValueError(f"expected float waveforms [B, T], got {waveforms.dtype} of shape {tuple(waveforms.shape)}")
    if waveforms.shape[1] < N_FFT:
        raise ValueError(f"clips must be at least {N_FFT} samples long, got {waveforms.shape[1]}")
    return waveforms.detach().float().cpu()


def frame_rms(waveforms: Tensor, frame: int = 2 * HOP_LENGTH, hop: int = HOP_LENGTH) -> Tensor:
    """RMS of ``frame``-sample frames every ``hop`` samples (default 20 ms every 10 ms): ``[B, frames]``."""
    return waveforms.unfold(1, frame, hop).pow(2).mean(-1).sqrt()


@dataclass
class _Spectrum:
    """The whole clip's Hann-windowed magnitude spectrum (0.8 Hz bins for 1.28 s), averaged over ±8 Hz, which
    merges the sidebands that note gating puts around each partial; ``is_peak`` marks the maxima within ±8 Hz."""

    smooth: Tensor  # [B, bins]
    is_peak: Tensor  # [B, bins]
    frequencies: Tensor  # [bins]

    @classmethod
    def of(cls, waveforms: Tensor) -> _Spectrum:
        length = waveforms.shape[1]
        magnitude = torch.fft.rfft(waveforms * torch.hann_window(length, periodic=False)).abs()
        bin_hz = SAMPLE_RATE / length
        width = 2 * round(8 / bin_hz) + 1
        smooth = F.avg_pool1d(magnitude[:, None], width, stride=1, padding=width // 2, count_include_pad=False)[:, 0]
        is_peak = F.max_pool1d(smooth[:, None], width, stride=1, padding=width // 2)[:, 0] == smooth
        return cls(smooth, is_peak & (smooth > 0), torch.arange(smooth.shape[1]) * bin_hz)

    def strong_peaks(self, low_hz: Tensor, high_hz: Tensor) -> Tensor:
        """``[B, bins]``: peaks in [low, high) Hz (per clip) reaching PEAK_THRESHOLD of the strongest there."""
        band = (self.frequencies >= low_hz[:, None]) & (self.frequencies < high_hz[:, None])
        in_band = torch.where(band, self.smooth, torch.zeros(()))
        return self.is_peak & band & (in_band >= PEAK_THRESHOLD * in_band.amax(1, keepdim=True))

    def lowest_pitch(self) -> Tensor:
        """Hz of the lowest strong peak in PITCH_BAND_HZ. Square and saw partials lie above their fundamental,
        and every chord contains its root, so this is the lowest note played."""
        count = len(self.smooth)
        strong = self.strong_peaks(torch.full((count,), PITCH_BAND_HZ[0]), torch.full((count,), PITCH_BAND_HZ[1]))
        lowest = torch.where(strong.any(1), strong.float().argmax(1), self.smooth.argmax(1))
        return self.frequencies[lowest].clamp(min=PITCH_BAND_HZ[0])

    def at(self, frequencies: Tensor) -> Tensor:
        """The largest smoothed magnitude within ±3% of each clip's frequency ``[B]``."""
        near = (self.frequencies >= 0.97 * frequencies[:, None]) & (self.frequencies <= 1.03 * frequencies[:, None])
        return torch.where(near, self.smooth, torch.zeros(())).amax(1)


def _notes_per_second(rms: Tensor) -> Tensor:
    """Note rate from the median interval between onsets: peaks of the rise in log frame energy.

    Every note ends in a gap, so each onset is a rise of the energy envelope; ``rms`` are the clips'
    :func:`frame_rms`. Clips with fewer than two onsets count as one note per clip.
    """
    log_rms = torch.log(rms.clamp(min=1e-8))
    log_rms = torch.maximum(log_rms, log_rms.amax(1, keepdim=True) - ONSET_RANGE_NATS)
    rise = (log_rms[:, 1:] - log_rms[:, :-1]).clamp(min=0)  # [B, frames-1]
    strength = rise / rise.amax(1, keepdim=True).clamp(min=1e-6)
    local_max = F.max_pool1d(strength[:, None], 5, stride=1, padding=2)[:, 0] == strength
    onsets = local_max & (strength >= ONSET_THRESHOLD)
    rates = []
    for row in onsets:
        times = row.nonzero()[:, 0].float() * HOP_LENGTH / SAMPLE_RATE
        if len(times) < 2:
            rates.append(1 / CLIP_SECONDS)
        else:
            rates.append(1 / (times[1:] - times[:-1]).median().item())
    return torch.tensor(rates)


def measure(waveforms: Tensor, sample_rate: int = SAMPLE_RATE) -> Measurements:
    """Measure pitch register, note rate, sustain and presence of 16 kHz clips ``[B, T]``."""
    waveforms = _check_waveforms(waveforms, sample_rate)
    rms = frame_rms(waveforms)
    peak_rms = rms.amax(1)
    lowest_pitch = hz_to_midi(_Spectrum.of(waveforms).lowest_pitch())
    centres = torch.tensor([lowest + (ROOT_SPAN - 1) / 2 for lowest in REGISTERS.values()])
    register_probs = (-((lowest_pitch[:, None] - centres) ** 2) / (2 * REGISTER_SIGMA**2)).softmax(1)
    notes_per_second = _notes_per_second(rms)
    boundary = math.sqrt(TEMPOS["slow"] * TEMPOS["fast"])
    fast_prob = torch.sigmoid(torch.log2(notes_per_second / boundary) / TEMPO_WIDTH)
    # A note that rings through its gate keeps the frame RMS near its peak for GATE of the time.
    sustain = (rms.mean(1) / (GATE * peak_rms.clamp(min=1e-8))).clamp(0, 1)
    low, high = PRESENCE_RMS
    presence = ((peak_rms - low) / (high - low)).clamp(0, 1)
    return Measurements(lowest_pitch, register_probs, notes_per_second, fast_prob, sustain, presence, peak_rms)


def _kind(spectrum: _Spectrum, waveforms: Tensor, roots: Tensor) -> list[str]:
    """Tone, chord or arpeggio: how many strong peaks lie between the root and CHORD_TONE_RANGE above it in the
    whole clip, and whether they sound together, from a 2048-point STFT (7.8 Hz bins, which resolve a triad
    in the low register): the median over sounding frames of the second-strongest tone over the strongest."""
    tones = spectrum.strong_peaks(0.97 * roots, CHORD_TONE_RANGE * roots)
    n_fft = 2048
    frames = torch.stft(waveforms, n_fft, hop_length=256, window=torch.hann_window(n_fft), return_complex=True).abs()
    kinds = []
    for clip, peaks in zip(frames, tones):
        frequencies = spectrum.frequencies[peaks]
        if len(frequencies) < 2:
            kinds.append("tone")
            continue
        bins = (frequencies * n_fft / SAMPLE_RATE).round().long()
        energy = torch.stack([clip[b - 1 : b + 2].amax(0) for b in bins.tolist()])  # [tones, frames]
        loudest = energy.amax(0)
        ranked = energy[:, loudest > 0.3 * loudest.max()].sort(0, descending=True).values
        together = (ranked[1] / ranked[0].clamp_min(1e-12)).median()
        kinds.append("chord" if together >= CHORD_CONCURRENCY else "arpeggio")
    return kinds


def describe(waveforms: Tensor, sample_rate: int = SAMPLE_RATE) -> list[dict[str, str | None]]:
    """The five captioned attributes the checker hears in each clip, keyed by :data:`ATTRIBUTES` (all ``None``
    for a silent clip), as :func:`t2i.detect_shape <diffalign.toy.t2i.detect_shape>` does for scenes.

    Register and tempo as the reward measures them; loudness from the loudest 10 ms frame (a note's onset)
    against the geometric mean of the quiet and loud ranges; timbre from the partials at two and three times
    the lowest pitch (a saw has both, a square only the third, a sine neither); kind from :func:`_kind`.
    """
    waveforms = _check_waveforms(waveforms, sample_rate)
    measured = measure(waveforms)
    spectrum = _Spectrum.of(waveforms)
    roots = spectrum.lowest_pitch()
    fundamental = spectrum.at(roots).clamp_min(1e-12)
    second, third = spectrum.at(2 * roots) / fundamental, spectrum.at(3 * roots) / fundamental
    onset_rms = frame_rms(waveforms, HOP_LENGTH, HOP_LENGTH // 2).amax(1)
    kinds = _kind(spectrum, waveforms, roots)
    detections = []
    for i in range(len(waveforms)):
        if measured.presence[i] < 0.5:
            detections.append(dict.fromkeys(ATTRIBUTES))
            continue
        timbre = "saw" if second[i] > SAW_SECOND_HARMONIC else "square" if third[i] > SQUARE_THIRD_HARMONIC else "sine"
        detections.append(
            {
                "loudness": "loud" if onset_rms[i] > LOUDNESS_BOUNDARY else "quiet",
                "tempo": "fast" if measured.fast_prob[i] > 0.5 else "slow",
                "register": list(REGISTERS)[measured.register_probs[i].argmax()],
                "timbre": timbre,
                "kind": kinds[i],
            }
        )
    return detections


def _fidelity(measured: Measurements, prompts: Sequence[str]) -> Tensor:
    fidelity = measured.presence.clone()
    for i, prompt in enumerate(prompts):
        asked = parse_caption(prompt)
        if asked["register"] is not None:
            fidelity[i] *= measured.register_probs[i, list(REGISTERS).index(asked["register"])]
        if asked["tempo"] is not None:
            fast = measured.fast_prob[i]
            fidelity[i] *= fast if asked["tempo"] == "fast" else 1 - fast
    return fidelity


def _check_prompts(waveforms: Tensor, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or len(prompts) != len(waveforms):
        raise ValueError(f"expected one prompt per clip ({len(waveforms)}), got {prompts!r}")


def prompt_fidelity(waveforms: Tensor, sample_rate: int, prompts: Sequence[str]) -> Tensor:
    """``presence · p(register) · p(tempo)`` of each clip for its prompt: ``[B]`` in [0,1] (attributes the
    prompt leaves out are not scored)."""
    _check_prompts(waveforms, prompts)
    return _fidelity(measure(waveforms, sample_rate), prompts)


def toy_reward(waveforms: Tensor, sample_rate: int, prompts: Sequence[str]) -> Tensor:
    """The scripted preference of the toy music world: ``[B]`` in [0,1], higher is better, deterministic.

    ``reward = presence · (1 + sustain) / 2``: a clip scores between 0.5 (plucked notes) and 1 (notes that
    ring through their gate); silence scores 0. The sustain is the mean over the peak of the frame RMS. As the
    image world's centredness, sustain is what the caption leaves free, what the base model does at random
    and what preference alignment can add. Prompt fidelity (:func:`prompt_fidelity`, :func:`describe`) is
    not part of it: the base model follows register and tempo only part of the time, and with fidelity as a
    factor its flips between two samples of one prompt decided the comparisons (docs/experiments.md, "The toy
    music build"). ``prompts`` are checked (one per clip) and otherwise unused.
    """
    _check_prompts(waveforms, prompts)
    measured = measure(waveforms, sample_rate)
    return measured.presence * (1 + measured.sustain) / 2


# ---------------------------------------------------------------------------------------- audio files


def audio_bytes(waveform: Tensor, format: Literal["WAV", "FLAC"] = "WAV") -> bytes:
    """A mono 16 kHz waveform ``[T]`` in [-1, 1] as 16-bit PCM bytes: a WAV file, or a FLAC file (lossless,
    about half the size)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, waveform.detach().float().cpu().clamp(-1, 1).numpy(), SAMPLE_RATE, "PCM_16", format=format)
    return buffer.getvalue()


def read_audio(data: bytes | str | Path) -> Tensor:
    """A mono audio file (WAV or FLAC; bytes or a path) as a float32 ``[T]`` tensor; it must be 16 kHz."""
    import soundfile

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    audio, rate = soundfile.read(source, dtype="float32", always_2d=True)
    name = "audio bytes" if isinstance(data, bytes) else str(data)
    if rate != SAMPLE_RATE or audio.shape[1] != 1:
        raise ValueError(f"{name}: expected mono {SAMPLE_RATE} Hz audio, got {audio.shape[1]} channel(s) at {rate} Hz")
    return torch.from_numpy(audio[:, 0].copy())


# -------------------------------------------------------------------------------------------- the model


@dataclass
class ToyMusicModel:
    """The built toy model's components (stock diffusers/transformers classes) and a plain sampling loop.

    ``MusicLDMPipeline.from_pretrained`` loads the same folder; its prompt path is broken under
    transformers 5 (``get_text_features`` returns an output object), so prompts are encoded here, as
    :meth:`encode_prompts` does, and passed as ``prompt_embeds``.
    """

    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module  # AutoencoderKL
    vocoder: torch.nn.Module  # SpeechT5HifiGan
    text_encoder: torch.nn.Module  # ClapModel
    tokenizer: object  # RobertaTokenizer
    feature_extractor: object  # ClapFeatureExtractor
    scheduler: object  # DDIMScheduler

    @classmethod
    def load(cls, path: str | Path | None = None) -> ToyMusicModel:
        """Load each component from its folder of ``path`` (default: the shipped ``assets/toy-t2m``)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizer, SpeechT5HifiGan

        root = Path(path) if path is not None else TOY_T2M_DIR
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{root / 'model_index.json'} not found; build the toy model with `python -m diffalign.toy build t2m`"
            )
        return cls(
            unet=UNet2DConditionModel.from_pretrained(root / "unet").eval(),
            vae=AutoencoderKL.from_pretrained(root / "vae").eval(),
            vocoder=SpeechT5HifiGan.from_pretrained(root / "vocoder").eval(),
            text_encoder=ClapModel.from_pretrained(root / "text_encoder").eval(),
            tokenizer=RobertaTokenizer.from_pretrained(root / "tokenizer"),
            feature_extractor=ClapFeatureExtractor.from_pretrained(root / "feature_extractor"),
            scheduler=DDIMScheduler.from_pretrained(root / "scheduler"),
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """The UNet's conditioning ``[B, D]``: CLAP text embeddings (L2-normalised), as MusicLDM."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        return self.text_encoder.get_text_features(**tokens).pooler_output

    @torch.no_grad()
    def embed_audio(self, waveforms: Tensor) -> Tensor:
        """Toy-CLAP audio embeddings ``[B, D]`` (L2-normalised) of 16 kHz clips ``[B, T]``."""
        features = self.feature_extractor(
            list(waveforms.detach().float().cpu().numpy()), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        )["input_features"]
        return self.text_encoder.get_audio_features(input_features=features).pooler_output

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, C, 32, 16]`` → waveforms ``[B, CLIP_SAMPLES]`` (VAE decode, then vocoder)."""
        mels = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return self.vocoder(mels.squeeze(1))[:, :CLIP_SAMPLES]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        batch_size: int = 128,
    ) -> Tensor:
        """Sample clips ``[B, CLIP_SAMPLES]``: DDIM (η = 0) with classifier-free guidance against the empty
        prompt, then :meth:`decode`."""
        unconditional = self.encode_prompts([""])
        channels, height, width = self.unet.config.in_channels, MEL_FRAMES // 4, MEL_BINS // 4
        clips = []
        for start in range(0, len(prompts), batch_size):
            conditions = self.encode_prompts(prompts[start : start + batch_size])
            count = len(conditions)
            latents = torch.randn(count, channels, height, width, generator=generator)
            latents = latents * self.scheduler.init_noise_sigma
            self.scheduler.set_timesteps(steps)
            class_labels = torch.cat([unconditional.expand(count, -1), conditions])
            for timestep in self.scheduler.timesteps:
                model_input = self.scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
                noise = self.unet(model_input, timestep, encoder_hidden_states=None, class_labels=class_labels).sample
                noise_unconditional, noise_conditional = noise.chunk(2)
                noise = noise_unconditional + guidance_scale * (noise_conditional - noise_unconditional)
                latents = self.scheduler.step(noise, timestep, latents).prev_sample
            clips.append(self.decode(latents))
        return torch.cat(clips)


# ------------------------------------------------------------------------------------------ exemplars


@dataclass
class Exemplars:
    """Reference clips for distribution rewards (FAD, Vendi): sustained, faithful clips of every caption.

    ``clap_embeddings`` are the toy CLAP's L2-normalised audio embeddings of ``waveforms``.
    """

    waveforms: Tensor  # [N, CLIP_SAMPLES]
    prompts: list[str]
    clap_embeddings: Tensor  # [N, D]
    sample_rate: int = SAMPLE_RATE


def load_exemplars(root: str | Path | None = None) -> Exemplars:
    """The exemplar set shipped in ``<toy-t2m>/exemplars/`` (``exemplars.json``, WAV clips, embeddings)."""
    from safetensors.torch import load_file

    root = Path(root) if root is not None else TOY_T2M_DIR / "exemplars"
    spec_path = root / "exemplars.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found; build the toy world with `python -m diffalign.toy build t2m`")
    spec = json.loads(spec_path.read_text())
    missing = [str(root / name) for name in [*spec["files"], spec["embeddings"]] if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{spec_path} lists files that do not exist: {', '.join(missing)}")
    waveforms = torch.stack([read_audio(root / name) for name in spec["files"]])
    embeddings = load_file(root / spec["embeddings"])["clap_embeddings"]
    if len(embeddings) != len(waveforms):
        raise ValueError(f"{root / spec['embeddings']} has {len(embeddings)} embeddings for {len(waveforms)} clips")
    return Exemplars(waveforms=waveforms, prompts=spec["prompts"], clap_embeddings=embeddings)


def build(output_dir: str | Path, seed: int = 0) -> None:
    """Build the whole toy text-to-music world into ``output_dir`` (see :mod:`diffalign.toy.music_build`)."""
    # Imported here: training code (diffusers, transformers models) is only needed to build, not to use the world.
    from diffalign.toy.music_build import build_toy_music

    build_toy_music(output_dir, seed)
