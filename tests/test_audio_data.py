"""Audio pair data: decoding and its edge cases, resampling, trimming, the log-mel front-end, the audio-alpaca schema."""

import io
import json
from pathlib import Path

import librosa
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import soxr
import torch
from scipy.signal import get_window

from diffalign.config import from_dict
from diffalign.diffusion.audio import AudioDecoder, MelSettings, log_mel_spectrogram, mel_filters
from diffalign.diffusion.data import DiffusionDataConfig, PreferencePairDataset, load_preference_pairs
from diffalign.diffusion.transforms import CorruptMediaError

MEL = MelSettings()  # 16 kHz, n_fft 1024, hop 160, 64 bands up to 8 kHz
MEL_DECODER = AudioDecoder(sample_rate=16_000, num_samples=16_000, mel=MEL)


def tone(frequency: float, seconds: float, rate: int, amplitude: float = 0.3, phase: float = 0.0) -> np.ndarray:
    time = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * time + phase)).astype(np.float32)


def encoded(samples: np.ndarray, rate: int, format: str = "WAV", subtype: str | None = "FLOAT") -> bytes:
    """``samples`` ``[time]`` or ``[time, channels]`` as audio file bytes."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


# --- the log-mel front-end -----------------------------------------------------------------------------------


def test_mel_filters_are_librosas_slaney_filters():
    expected = librosa.filters.mel(sr=16_000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8_000.0)  # [mel, freq]
    torch.testing.assert_close(mel_filters(MEL), torch.from_numpy(expected.T), rtol=1e-4, atol=1e-7)


def test_log_mel_matches_a_frame_by_frame_numpy_computation():
    rng = np.random.default_rng(0)
    waveform = (0.1 * rng.standard_normal(4_000)).astype(np.float64)
    # HiFi-GAN's front-end written out: reflect padding of (n_fft - hop)/2, uncentred frames, periodic Hann.
    padding = (MEL.n_fft - MEL.hop_length) // 2
    padded = np.pad(waveform, padding, mode="reflect")
    window = get_window("hann", MEL.n_fft, fftbins=True)
    frames = [
        padded[start : start + MEL.n_fft] * window
        for start in range(0, len(padded) - MEL.n_fft + 1, MEL.hop_length)
    ]
    spectrum = np.fft.rfft(np.stack(frames), axis=1)
    magnitude = np.sqrt(spectrum.real**2 + spectrum.imag**2 + 1e-9)
    basis = librosa.filters.mel(sr=16_000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8_000.0)
    expected = np.log(np.maximum(magnitude @ basis.T, 1e-5))

    mel = log_mel_spectrogram(torch.from_numpy(waveform).float()[None], MEL)[0]
    assert mel.shape == (4_000 // 160, 64) == expected.shape
    torch.testing.assert_close(mel, torch.from_numpy(expected).float(), rtol=0, atol=2e-4)


def test_a_pure_tone_peaks_in_the_mel_band_of_its_frequency():
    mel = log_mel_spectrogram(torch.from_numpy(tone(1_000.0, 0.5, 16_000))[None], MEL)[0]
    centres = librosa.mel_frequencies(n_mels=64 + 2, fmin=0.0, fmax=8_000.0)[1:-1]
    assert abs(centres[mel.mean(0).argmax()] - 1_000.0) < 80.0  # bands are ~70 Hz apart around 1 kHz


def test_log_mel_is_differentiable():
    waveform = torch.from_numpy(tone(440.0, 0.2, 16_000))[None].requires_grad_(True)
    log_mel_spectrogram(waveform, MEL).sum().backward()
    assert waveform.grad is not None and waveform.grad.abs().sum() > 0


# --- decoding: corrupt, empty, silent, non-finite ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"definitely not audio", "cannot decode the audio"),
        (encoded(np.zeros((0, 1), np.float32), 16_000), "no samples"),
        (encoded(np.zeros(1_600, np.float32), 16_000), "silent"),
        (encoded(np.full(1_600, 3e-5, np.float32), 16_000), "silent"),
        (encoded(np.array([0.1, np.nan, 0.2] * 100, np.float32), 16_000), "NaN"),
    ],
    ids=["garbage", "empty", "zeros", "below-threshold", "nan"],
)
def test_bad_audio_is_rejected_with_the_reason(data, message):
    with pytest.raises(CorruptMediaError, match=message):
        MEL_DECODER.load(data)


def test_quiet_but_audible_audio_is_accepted():
    clip = MEL_DECODER.load(encoded(tone(440.0, 0.1, 16_000, amplitude=1e-3), 16_000))
    assert clip.samples.shape == (1, 1_600) and clip.sample_rate == 16_000


@pytest.mark.parametrize(("format", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_compressed_and_integer_formats_decode_to_the_written_samples(format, subtype):
    samples = tone(300.0, 0.25, 22_050)
    clip = MEL_DECODER.load(encoded(samples, 22_050, format, subtype))
    assert clip.sample_rate == 22_050 and clip.samples.shape == (1, len(samples))
    # 16-bit quantisation: within one step (writers round differently); Vorbis is lossy.
    tolerance = 0.02 if format == "OGG" else 1 / 32768
    np.testing.assert_allclose(clip.samples[0], samples, atol=tolerance)


# --- channels, rate, length ----------------------------------------------------------------------------------


def test_stereo_is_mixed_to_mono_by_averaging():
    left, right = tone(440.0, 0.5, 16_000, 0.4), tone(660.0, 0.5, 16_000, 0.2)
    decoder = AudioDecoder(sample_rate=16_000, num_samples=8_000)
    waveform, end = decoder.waveform(decoder.load(encoded(np.stack([left, right], axis=1), 16_000)))
    assert waveform.shape == (1, 8_000) and end == 8_000
    torch.testing.assert_close(waveform[0], torch.from_numpy((left + right) / 2))


def test_mono_is_repeated_for_a_stereo_model():
    samples = tone(440.0, 0.1, 8_000)
    decoder = AudioDecoder(sample_rate=8_000, num_samples=800, channels=2)
    values = decoder.transform(decoder.load(encoded(samples, 8_000))).values
    assert values.shape == (2, 800)
    torch.testing.assert_close(values[0], torch.from_numpy(samples))
    torch.testing.assert_close(values[1], torch.from_numpy(samples))


@pytest.mark.parametrize(("source_rate", "seconds"), [(44_100, 0.5), (8_000, 0.5), (22_050, 0.3)])
def test_resampling_keeps_duration_and_pitch(source_rate, seconds):
    decoder = AudioDecoder(sample_rate=16_000, num_samples=16_000)
    waveform, end = decoder.waveform(decoder.load(encoded(tone(440.0, seconds, source_rate), source_rate)))
    assert end == round(seconds * 16_000)
    # The same tone sampled at 16 kHz; the resampler's filter only disturbs the first and last few ms.
    expected = torch.from_numpy(tone(440.0, seconds, 16_000))
    inner = slice(160, end - 160)
    torch.testing.assert_close(waveform[0, inner], expected[inner], rtol=0, atol=5e-3)
    assert torch.all(waveform[0, end:] == 0)


def test_too_long_audio_keeps_its_start():
    samples = tone(440.0, 3.0, 16_000)
    waveform, end = MEL_DECODER.waveform(MEL_DECODER.load(encoded(samples, 16_000)))
    assert waveform.shape == (1, 16_000) and end == 16_000
    torch.testing.assert_close(waveform[0], torch.from_numpy(samples[:16_000]))


def test_trimming_before_resampling_changes_no_kept_sample():
    samples = tone(440.0, 5.0, 44_100) * np.linspace(0.2, 1.0, 5 * 44_100, dtype=np.float32)
    waveform, end = MEL_DECODER.waveform(MEL_DECODER.load(encoded(samples, 44_100)))
    resampled_whole = soxr.resample(samples, 44_100, 16_000)[:16_000]
    assert end == 16_000
    torch.testing.assert_close(waveform[0], torch.from_numpy(resampled_whole), rtol=0, atol=1e-5)


def test_too_short_audio_is_zero_padded_at_the_end():
    samples = tone(440.0, 0.1, 16_000)
    decoded = MEL_DECODER.transform(MEL_DECODER.load(encoded(samples, 16_000)))
    assert decoded.conditioning == {"audio_span": (0, 1_600)}
    waveform, _ = MEL_DECODER.waveform(MEL_DECODER.load(encoded(samples, 16_000)))
    torch.testing.assert_close(waveform[0, :1_600], torch.from_numpy(samples))
    assert torch.all(waveform[0, 1_600:] == 0)


def test_mel_decoder_output_is_the_log_mel_of_the_fitted_waveform():
    samples = tone(440.0, 0.7, 16_000)
    decoded = MEL_DECODER.transform(MEL_DECODER.load(encoded(samples, 16_000)))
    assert decoded.values.shape == (1, 100, 64)  # [channel, frames, mel bins]: the VAE's input layout
    padded = np.concatenate([samples, np.zeros(16_000 - len(samples), np.float32)])
    torch.testing.assert_close(decoded.values, log_mel_spectrogram(torch.from_numpy(padded)[None], MEL))


def test_peak_normalization_centres_and_scales_like_audioldm():
    samples = tone(440.0, 0.5, 16_000, amplitude=0.8) + 0.1  # a DC offset
    decoder = AudioDecoder(sample_rate=16_000, num_samples=8_000, peak_normalize=0.5)
    waveform, _ = decoder.waveform(decoder.load(encoded(samples, 16_000)))
    centred = samples - samples.mean()
    torch.testing.assert_close(waveform[0], torch.from_numpy(0.5 * centred / np.abs(centred).max()))


def test_the_cache_key_settings_change_with_every_setting():
    base = AudioDecoder(sample_rate=16_000, num_samples=16_000, mel=MEL).settings()
    json.dumps(base)  # cache keys are JSON
    variants = [
        AudioDecoder(sample_rate=16_000, num_samples=32_000, mel=MEL),
        AudioDecoder(sample_rate=16_000, num_samples=16_000, mel=MelSettings(mel_bins=80)),
        AudioDecoder(sample_rate=16_000, num_samples=16_000, mel=MEL, peak_normalize=0.5),
        AudioDecoder(sample_rate=16_000, num_samples=16_000),
    ]
    assert all(variant.settings() != base for variant in variants)


def test_inconsistent_decoder_settings_are_refused():
    with pytest.raises(ValueError, match="channels=1"):
        AudioDecoder(sample_rate=16_000, num_samples=100, channels=2, mel=MEL)
    with pytest.raises(ValueError, match=r"mel.sample_rate"):
        AudioDecoder(sample_rate=22_050, num_samples=100, mel=MEL)
    with pytest.raises(ValueError, match="fmax"):
        MelSettings(sample_rate=8_000, fmax=8_000.0)


# --- pair data: the audio-alpaca schema ----------------------------------------------------------------------


def audio_alpaca_table(path: Path, rows: list[tuple[str, bytes, bytes, str]]) -> Path:
    """``declare-lab/audio-alpaca``'s columns: prompt, chosen/rejected audio as ``{bytes, path}`` structs, strategy."""
    table = {
        "prompt": [prompt for prompt, _, _, _ in rows],
        "chosen": [{"bytes": chosen, "path": f"chosen-{n}.wav"} for n, (_, chosen, _, _) in enumerate(rows)],
        "rejected": [{"bytes": rejected, "path": f"rejected-{n}.wav"} for n, (_, _, rejected, _) in enumerate(rows)],
        "strategy": [strategy for _, _, _, strategy in rows],
    }
    pq.write_table(pa.table(table), path)
    return path


def audio_alpaca_config(source: Path, **overrides) -> DiffusionDataConfig:
    raw = {
        "source": str(source),
        "caption_column": "prompt",
        "image_0_column": "chosen",
        "image_1_column": "rejected",
        "label_0_column": None,  # chosen first
        "caption_dropout": 0.0,
        **overrides,
    }
    return from_dict(DiffusionDataConfig, raw)


def test_audio_alpaca_rows_become_decoded_pairs_chosen_first(tmp_path):
    rows = [
        ("a dog barks", encoded(tone(300.0, 0.5, 16_000), 16_000), encoded(tone(500.0, 0.5, 16_000), 16_000), "inverse"),
        (
            "rain on a roof",
            encoded(tone(700.0, 1.5, 44_100)[:, None].repeat(2, axis=1), 44_100),  # long stereo 44.1 kHz
            encoded(tone(900.0, 0.2, 8_000), 8_000),  # short 8 kHz
            "temporal",
        ),
    ]
    config = audio_alpaca_config(audio_alpaca_table(tmp_path / "train.parquet", rows))
    pairs = load_preference_pairs(config, MEL_DECODER)
    assert pairs.captions == ["a dog barks", "rain on a roof"] and pairs.labels == [1.0, 1.0]
    dataset = PreferencePairDataset(pairs, MEL_DECODER)
    item = dataset[1]
    assert item["caption"] == "rain on a roof" and item["label"] == 1.0
    chosen = MEL_DECODER.transform(MEL_DECODER.load(rows[1][1]))
    torch.testing.assert_close(item["chosen_audio"], chosen.values)
    assert item["chosen_audio_span"] == (0, 16_000) and item["rejected_audio_span"] == (0, 3_200)


def test_audio_files_listed_by_path_in_a_jsonl_index(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.flac").write_bytes(encoded(tone(300.0, 0.3, 16_000), 16_000, "FLAC", "PCM_16"))
    (tmp_path / "clips" / "b.wav").write_bytes(encoded(tone(600.0, 0.3, 16_000), 16_000))
    index = tmp_path / "pairs.jsonl"
    index.write_text(json.dumps({"caption": "a hum", "audio_w": "clips/a.flac", "audio_l": "clips/b.wav", "label": 0}))
    config = from_dict(
        DiffusionDataConfig,
        {"source": str(index), "image_0_column": "audio_w", "image_1_column": "audio_l", "label_0_column": "label"},
    )
    item = PreferencePairDataset(load_preference_pairs(config, MEL_DECODER), MEL_DECODER)[0]
    # label 0: the second clip wins, so it comes first
    expected = MEL_DECODER.transform(MEL_DECODER.load((tmp_path / "clips" / "b.wav").read_bytes())).values
    torch.testing.assert_close(item["chosen_audio"], expected)


def bad_rows_table(tmp_path: Path) -> Path:
    good, other = encoded(tone(300.0, 0.3, 16_000), 16_000), encoded(tone(500.0, 0.3, 16_000), 16_000)
    silent = encoded(np.zeros(4_800, np.float32), 16_000)
    rows = [
        ("a good pair", good, other, "a"),
        ("a silent loser", good, silent, "b"),
        ("a corrupt winner", b"RIFF\x00\x00garbage", good, "c"),
        ("another good pair", other, good, "d"),
    ]
    return audio_alpaca_table(tmp_path / "bad.parquet", rows)


def test_silent_or_corrupt_audio_names_the_file_and_row(tmp_path):
    source = bad_rows_table(tmp_path)
    with pytest.raises(ValueError, match=r"bad\.parquet, row 2: .*silent.*skip_bad_rows"):
        load_preference_pairs(audio_alpaca_config(source), MEL_DECODER)


def test_skip_bad_rows_counts_and_drops_silent_and_corrupt_pairs(tmp_path):
    config = audio_alpaca_config(bad_rows_table(tmp_path), skip_bad_rows=True)
    pairs = load_preference_pairs(config, MEL_DECODER)
    assert pairs.captions == ["a good pair", "another good pair"]
    assert pairs.stats["bad_rows_skipped"] == 2 and pairs.stats["rows_read"] == 4
