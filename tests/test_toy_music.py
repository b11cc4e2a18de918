"""The toy text-to-music world: the checker that hears the captioned attributes, the scripted reward and its
scorer, audio files, the shipped assets (stock classes, offline), their recorded quality bars on a fresh sample,
the preference data and a small reproducible build (the shipped configs' runs: test_toy_demos.py)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soxr
import torch
from helpers import method_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, DDIMScheduler, MusicLDMPipeline, UNet2DConditionModel
from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizer, SpeechT5HifiGan

from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import TrainingContext
from diffalign.diffusion.methods.dragon import DistributionalRewardOptimization
from diffalign.rewards import Audio, build_scorer
from diffalign.toy import music
from diffalign.toy.music_ace import TOY_T2M_ACE_DIR
from diffalign.toy.music_build import (
    VOCODER_LOSS_FLOOR,
    MusicBuildConfig,
    build_toy_music,
    clap_features,
    clap_retrieval_accuracy,
    make_clips,
    sample_quality,
    vocoder_loss,
)
from diffalign.toy.prompts import write_prompt_files

ROOT = Path(__file__).resolve().parents[1]
ASSETS = music.TOY_T2M_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(**changes) -> music.ClipSpec:
    """A loud, slow, mid sine tone that rings (decay 3 s), with ``changes``."""
    values = dict(
        kind="tone", register="mid", tempo="slow", timbre="sine", loudness="loud", root=59, minor=False,
        pattern=(0, 1, 2), notes_per_second=3.0, decay=3.0, level=0.2, start=0.0,
    )  # fmt: skip
    return music.ClipSpec(**{**values, **changes})


@pytest.fixture(scope="module")
def build_info() -> dict:
    return json.loads((ASSETS / "build_info.json").read_text())


@pytest.fixture(scope="module")
def model() -> music.ToyMusicModel:
    return music.ToyMusicModel.load()


# --------------------------------------------------------------------------------------------- checker


def test_checker_hears_every_captioned_attribute_of_synthesized_clips():
    """``describe`` against the specs of 300 random clips (every attribute value, every decay and level)."""
    specs = music.sample_clip_specs(300, torch.Generator().manual_seed(5))
    detected = music.describe(music.synthesize(specs))
    for attribute in music.ATTRIBUTES:
        accuracy = np.mean([found[attribute] == getattr(s, attribute) for found, s in zip(detected, specs)])
        assert accuracy >= 0.98, (attribute, accuracy)
    assert music.describe(torch.zeros(2, music.CLIP_SAMPLES)) == [dict.fromkeys(music.ATTRIBUTES)] * 2


def test_checker_tells_each_value_apart_on_constructed_clips():
    clips = [
        spec(),
        spec(loudness="quiet", level=0.04),
        spec(tempo="fast", notes_per_second=8.0),
        spec(register="low", root=47),
        spec(register="high", root=71),
        spec(timbre="square"),
        spec(timbre="saw"),
        spec(kind="chord", minor=True),
        spec(kind="arpeggio", pattern=(0, 1, 2, 1)),
    ]
    detected = music.describe(music.synthesize(clips))
    for found, clip in zip(detected, clips):
        assert found == {attribute: getattr(clip, attribute) for attribute in music.ATTRIBUTES}, (found, clip)


def test_sample_quality_scores_only_the_attributes_each_prompt_names():
    clips = [spec(), spec(register="low", root=47, timbre="saw")]
    prompts = ["a loud slow mid sine tone", "a mid clip"]
    quality = sample_quality(music.synthesize(clips), prompts)
    assert quality["samples"] == 2
    assert quality["register_accuracy"] == 0.5 and quality["all_accuracy"] == 0.5  # the second is low, not mid
    for attribute in ("loudness", "tempo", "timbre", "kind"):  # named by the first prompt only, and right there
        assert quality[f"{attribute}_accuracy"] == 1.0, (attribute, quality)
    reward = music.toy_reward(music.synthesize(clips), music.SAMPLE_RATE, prompts)
    assert quality["mean_reward"] == pytest.approx(reward.mean().item())


# ---------------------------------------------------------------------------------------------- reward


def test_reward_follows_its_formula_on_constructed_clips():
    specs = [
        spec(),  # ringing
        spec(decay=0.03),  # plucked
        spec(register="high", root=71),  # ringing, not the asked register
        spec(tempo="fast", notes_per_second=8.0, decay=0.3),  # half-way, not the asked tempo
        spec(kind="arpeggio", timbre="square", register="low", root=47, tempo="fast", notes_per_second=8.0, decay=1.0),
    ]
    prompts = ["a loud slow mid sine tone"] * 4 + ["a fast low square arpeggio"]
    waveforms = music.synthesize(specs)
    reward = music.toy_reward(waveforms, music.SAMPLE_RATE, prompts)

    measured = music.measure(waveforms)
    rms = music.frame_rms(waveforms)
    sustain = (rms.mean(1) / (music.GATE * rms.amax(1))).clamp(0, 1)
    presence = ((rms.amax(1) - 0.005) / 0.01).clamp(0, 1)
    torch.testing.assert_close(sustain, measured.sustain)
    torch.testing.assert_close(reward, presence * (1 + sustain) / 2)

    assert reward[0] > 0.95 and reward[2] > 0.95 and reward[4] > 0.8
    assert 0.5 < reward[1] < 0.65  # short notes: the sustain factor alone is lost
    assert reward[1] < reward[3] < reward[0]
    # The prompt is not scored: the same clips under other prompts score the same.
    torch.testing.assert_close(music.toy_reward(waveforms, music.SAMPLE_RATE, ["a quiet fast high saw chord"] * 5), reward)
    assert torch.equal(music.toy_reward(waveforms, music.SAMPLE_RATE, prompts), reward)  # deterministic
    assert music.toy_reward(torch.zeros(1, music.CLIP_SAMPLES), music.SAMPLE_RATE, ["a slow tone"]).item() == 0.0
    with pytest.raises(ValueError, match="one prompt per clip"):
        music.toy_reward(waveforms, music.SAMPLE_RATE, prompts[:2])


def test_toy_t2m_scorer_is_the_reward_behind_the_scorer_interface():
    waveforms = music.synthesize([spec(), spec(decay=0.3), spec(decay=0.05)])
    prompts = ["a slow mid tone"] * 3
    scorer = build_scorer("toy_t2m", dtype="float64")
    assert scorer.modality == "audio" and scorer.higher_is_better and not scorer.set_level
    scores = scorer(Audio(waveforms, music.SAMPLE_RATE), prompts)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, music.toy_reward(waveforms, music.SAMPLE_RATE, prompts).double())
    assert scores[0] > scores[1] > scores[2]

    # Other rates are resampled to the toy's 16 kHz first.
    resampled = torch.from_numpy(np.stack([soxr.resample(w, 16_000, 44_100) for w in waveforms.numpy()]))
    torch.testing.assert_close(scorer(Audio(resampled.float(), 44_100), prompts), scores, atol=0.02, rtol=0)

    with pytest.raises(ValueError, match="toy_t2m scores Audio"):
        scorer(waveforms, prompts)
    with pytest.raises(ValueError, match="toy_t2m needs a list of 3 prompt"):
        scorer(Audio(waveforms, music.SAMPLE_RATE), prompts[:2])


def test_toy_t2m_fidelity_scorer_is_the_prompt_fidelity_the_reward_leaves_out():
    waveforms = music.synthesize([spec(), spec(register="high", root=71), spec(tempo="fast", notes_per_second=8.0)])
    prompts = ["a slow mid tone", "a slow mid tone", "a slow mid tone"]
    scorer = build_scorer("toy_t2m_fidelity", dtype="float64")
    assert scorer.modality == "audio" and scorer.higher_is_better
    scores = scorer(Audio(waveforms, music.SAMPLE_RATE), prompts)
    torch.testing.assert_close(scores, music.prompt_fidelity(waveforms, music.SAMPLE_RATE, prompts).double())
    # The clip that is what the prompt asks for scores above the wrong register and the wrong tempo, which the
    # toy reward (sustain alone) cannot tell apart.
    assert scores[0] > 0.8 and scores[1] < 0.2 and scores[2] < 0.2
    with pytest.raises(ValueError, match="toy_t2m_fidelity scores Audio"):
        scorer(waveforms, prompts)


def test_prompt_files_are_the_splits_one_per_line(tmp_path):
    write_prompt_files(tmp_path, music.load_prompts)
    for split in ("train", "heldout"):
        lines = (tmp_path / f"{split}.txt").read_text().splitlines()
        assert lines == music.load_prompts(split)
        assert (ASSETS / "prompts" / f"{split}.txt").read_text() == (tmp_path / f"{split}.txt").read_text()
    assert len(music.load_prompts("train")) == 72 and len(music.load_prompts("heldout")) == 36


def test_audio_files_round_trip_as_16_bit_wav_and_flac(tmp_path):
    waveform = music.synthesize(spec(timbre="saw"))
    wav, flac = music.audio_bytes(waveform), music.audio_bytes(waveform, "FLAC")
    assert wav[:4] == b"RIFF" and flac[:4] == b"fLaC" and len(flac) < 0.8 * len(wav)
    for data in (wav, flac):  # libsndfile scales floats to 16 bits slightly differently for the two formats
        torch.testing.assert_close(music.read_audio(data), waveform, atol=2 / 2**15, rtol=0)
    path = tmp_path / "clip.flac"
    path.write_bytes(flac)
    torch.testing.assert_close(music.read_audio(path), music.read_audio(flac))

    import soundfile

    other_rate = tmp_path / "44k.wav"
    soundfile.write(other_rate, waveform.numpy(), 44_100, "PCM_16")
    with pytest.raises(ValueError, match=f"{other_rate}: expected mono 16000 Hz audio, got 1 channel"):
        music.read_audio(other_rate)


# ------------------------------------------------------------------------------------------- front-end


def test_mel_front_end_is_the_floored_log_of_the_mel_magnitude():
    waveforms = music.synthesize([spec(), spec(timbre="saw", register="low", root=47)])
    magnitude = music.mel_magnitude(waveforms)
    assert magnitude.shape == (2, music.MEL_FRAMES, music.MEL_BINS)
    torch.testing.assert_close(music.waveform_to_mel(waveforms), torch.log(magnitude.clamp(min=music.LOG_MEL_FLOOR)))
    torch.testing.assert_close(music.waveform_to_mel(waveforms[0]), music.waveform_to_mel(waveforms)[0])
    # A sine's energy peaks in the mel band whose filter weighs its frequency most (B3, 247 Hz).
    frequency_bin = round(music.midi_to_hz(59) / (music.SAMPLE_RATE / music.N_FFT))
    expected_band = music._mel_filters()[frequency_bin].argmax().item()
    assert abs(magnitude[0].mean(0).argmax().item() - expected_band) <= 1


def test_vocoder_loss_pulls_a_near_silent_output_towards_the_target():
    """The soft log floor is why the toy vocoder renders sine tones: on a near-silent output, log-mel
    distances clamped at 1e-5 (as HiFi-GAN's front-end) have no gradient; the loss's soft floor has, and
    the loss is lower the more of the tone is there."""
    target = music.synthesize([spec(), spec(register="low", root=47, decay=0.3)])
    faint = (1e-6 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()

    clamped = (music.waveform_to_mel(faint) - music.waveform_to_mel(target)).abs().mean()
    (clamped_gradient,) = torch.autograd.grad(clamped, faint)
    assert clamped_gradient.abs().max() == 0

    loss = vocoder_loss(faint, target)
    (gradient,) = torch.autograd.grad(loss, faint)
    assert gradient.abs().max() > 0
    assert vocoder_loss(target, target).item() < 1e-4
    assert vocoder_loss(target, target) < vocoder_loss(0.5 * target, target) < vocoder_loss(0.1 * target, target) < loss

    # Written out: L1 of log(mel + floor), plus per STFT resolution the spectral convergence and a third of the
    # L1 of log(magnitude + floor).
    predicted = 0.3 * target.flip(1)

    def stft_magnitude(waveforms: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
        spectrum = torch.stft(waveforms, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True)
        return (spectrum.abs() ** 2 + 1e-9).sqrt()

    def log_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.log(a + VOCODER_LOSS_FLOOR) - torch.log(b + VOCODER_LOSS_FLOOR)).abs().mean()

    expected = log_l1(music.mel_magnitude(predicted), music.mel_magnitude(target))
    for n_fft, hop in ((256, 64), (512, 128), (1024, 256)):
        p, t = stft_magnitude(predicted, n_fft, hop), stft_magnitude(target, n_fft, hop)
        expected = expected + torch.linalg.norm(t - p) / torch.linalg.norm(t) + log_l1(p, t) / 3
    torch.testing.assert_close(vocoder_loss(predicted, target), expected)


# ------------------------------------------------------------------------------------------------ build


def _tiny_config() -> MusicBuildConfig:
    return MusicBuildConfig(
        clips=64,
        clap_steps=2,
        clap_batch_size=16,
        vae_steps=2,
        vae_batch_size=8,
        vocoder_steps=2,
        vocoder_batch_size=4,
        unet_steps=2,
        unet_batch_size=8,
        train_samples_per_prompt=2,
        heldout_samples_per_prompt=2,
        sampling_steps=2,
        exemplars=4,
        quality_clips=8,
    )


@pytest.mark.slow
def test_small_build_is_reproducible_and_stores_flac_pairs(tmp_path):
    infos = [build_toy_music(tmp_path / name, seed=7, config=_tiny_config()) for name in ("a", "b")]
    for split in ("train", "heldout"):
        assert pq.read_table(tmp_path / "a" / "data" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "b" / "data" / f"{split}.parquet")
        )
    weights = {
        "unet": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "vocoder": "model.safetensors",
        "text_encoder": "model.safetensors",
    }
    for component, name in weights.items():
        assert (tmp_path / "a" / component / name).read_bytes() == (tmp_path / "b" / component / name).read_bytes()
    assert infos[0]["quality"] == infos[1]["quality"]
    recorded = infos[0]["quality"]["base_samples_train"]
    assert {f"{attribute}_accuracy" for attribute in music.ATTRIBUTES} | {"all_accuracy"} <= set(recorded)
    table = pq.read_table(tmp_path / "a" / "data" / "train.parquet")
    assert table.num_rows == 72 and table.column("chosen")[0].as_py()[:4] == b"fLaC"
    MusicLDMPipeline.from_pretrained(tmp_path / "a")


# --------------------------------------------------------------------------------------- shipped model


def test_components_load_with_stock_classes_offline(model):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(model.unet) is UNet2DConditionModel
    assert type(model.vae) is AutoencoderKL
    assert type(model.vocoder) is SpeechT5HifiGan
    assert type(model.text_encoder) is ClapModel
    assert type(model.tokenizer) is RobertaTokenizer
    assert type(model.feature_extractor) is ClapFeatureExtractor
    assert type(model.scheduler) is DDIMScheduler
    assert model.scheduler.config.prediction_type == "epsilon"
    assert model.unet.config.class_embed_type == "simple_projection"
    assert model.vocoder.config.sampling_rate == music.SAMPLE_RATE

    # The stock pipeline loads the folder and samples with prompt embeddings (its own prompt path fails under
    # transformers 5); a short clip keeps this fast.
    pipeline = MusicLDMPipeline.from_pretrained(ASSETS)
    pipeline.set_progress_bar_config(disable=True)
    embeds = model.encode_prompts(["a loud fast high square arpeggio"])
    audio = pipeline(
        prompt_embeds=embeds,
        negative_prompt_embeds=model.encode_prompts([""]),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).audios
    assert audio.shape == (1, music.CLIP_SAMPLES) and torch.isfinite(audio).all()


def test_base_model_meets_its_recorded_quality_but_leaves_room_for_alignment(model, build_info):
    """A fresh sample (new seeds, every held-out prompt once) follows its prompts better than chance, about as
    well as the build measured, and leaves the reward far from its maximum.

    Chance is exact here: register and tempo probabilities sum to one over the values a prompt can ask for, so
    a uniformly random request has expected fidelity ``presence / 6``.
    """
    prompts = music.load_prompts("heldout")
    waveforms = model.generate(prompts, steps=25, guidance_scale=3.0, generator=torch.Generator().manual_seed(4321))
    measured = music.measure(waveforms)
    fidelity = music.prompt_fidelity(waveforms, music.SAMPLE_RATE, prompts).mean().item()
    chance = (measured.presence / 6).mean().item()
    fresh = sample_quality(waveforms, prompts)
    recorded = build_info["quality"]["base_samples_heldout"]
    assert fidelity > 1.2 * chance, (fidelity, chance, fresh)
    for key in ("register_accuracy", "tempo_accuracy", "mean_fidelity", "mean_reward"):
        assert fresh[key] >= recorded[key] - 0.15, (key, fresh, recorded)
    assert fresh["mean_reward"] < 0.85 and fresh["mean_sustain"] < 0.85, fresh  # room for alignment


@pytest.mark.parametrize("timbre", music.TIMBRES)
def test_vocoder_renders_every_timbre_in_its_register_with_its_level_and_sustain(model, timbre):
    """Re-synthesised from their true mels, ringing notes of each timbre keep their register, most of their
    level and much of their sustain (true sustain ≈ 0.99). A vocoder trained with hard-clamped log losses
    rendered sine tones at 2% of their level, i.e. silent. Exact pitch is not asked for: a 64-band mel
    leaves the vocoder a few semitones of freedom at low frequencies."""
    registers = [("low", 47), ("mid", 59), ("high", 69)]
    clips = [spec(timbre=timbre, register=register, root=root, level=0.2) for register, root in registers]
    waveforms = music.synthesize(clips)
    with torch.no_grad():
        vocoded = model.vocoder(music.waveform_to_mel(waveforms))[:, : music.CLIP_SAMPLES]
    true, rendered = music.measure(waveforms), music.measure(vocoded)
    assert (rendered.peak_rms / true.peak_rms).min() > 0.5, rendered.peak_rms / true.peak_rms
    assert rendered.register_probs.argmax(1).tolist() == [0, 1, 2], rendered.lowest_pitch
    assert rendered.sustain.min() > 0.45 and rendered.sustain.mean() > 0.55, rendered.sustain


def test_toy_clap_retrieves_captions_far_above_chance(model, build_info):
    clips = make_clips(48, torch.Generator().manual_seed(99))
    features = clap_features(model.feature_extractor, clips.waveforms)
    fresh = clap_retrieval_accuracy(model.text_encoder, model.tokenizer, features, clips.specs)
    recorded = build_info["quality"]["clap_retrieval"]
    assert fresh["caption_top1"] >= max(5 / 108, recorded["caption_top1"] - 0.15), fresh  # chance: 1/108
    for attribute, values in music.VOCABULARY.items():  # each value against its alternatives: chance 1/2 or 1/3
        key = f"{attribute}_accuracy"
        assert fresh[key] >= max(1 / len(values) + 0.1, recorded[key] - 0.2), (key, fresh)


def test_exemplars_are_sustained_clips_with_their_clap_embeddings(model):
    exemplars = music.load_exemplars()
    assert exemplars.waveforms.shape == (len(exemplars.prompts), music.CLIP_SAMPLES) and len(exemplars.prompts) >= 16
    torch.testing.assert_close(exemplars.clap_embeddings, model.embed_audio(exemplars.waveforms), atol=1e-4, rtol=0)
    reward = music.toy_reward(exemplars.waveforms, music.SAMPLE_RATE, exemplars.prompts)
    assert reward.mean() > 0.85


# ------------------------------------------------------------------------------------- preference data


@functools.cache
def decoded_split(split: str, root: Path = ASSETS) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """A shipped preference split of the toy in ``root`` with its chosen and rejected clips decoded, once per test
    session."""
    table = pq.read_table(root / "data" / f"{split}.parquet")
    chosen = torch.stack([music.read_audio(data) for data in table.column("chosen").to_pylist()])
    rejected = torch.stack([music.read_audio(data) for data in table.column("rejected").to_pylist()])
    return table, chosen, rejected


@pytest.mark.parametrize("root", [ASSETS, TOY_T2M_ACE_DIR], ids=["toy-t2m", "toy-t2m-ace"])  # both architectures
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_preference_data_schema_labels_and_stored_rewards(split, root):
    build_info = json.loads((root / "build_info.json").read_text())
    table, chosen, rejected = decoded_split(split, root)
    assert table.column_names == ["prompt", "chosen", "rejected", "strategy", "tie", "chosen_reward", "rejected_reward"]
    per_prompt = build_info["config"][f"{split}_samples_per_prompt"]
    prompts = table.column("prompt").to_pylist()
    assert sorted(prompts) == sorted(p for p in music.load_prompts(split) for _ in range(per_prompt // 2))
    assert set(table.column("strategy").to_pylist()) == {"resample"}

    assert chosen.shape == rejected.shape == (table.num_rows, music.CLIP_SAMPLES)
    stored_chosen = torch.tensor(table.column("chosen_reward").to_pylist(), dtype=torch.float64)
    stored_rejected = torch.tensor(table.column("rejected_reward").to_pylist(), dtype=torch.float64)
    torch.testing.assert_close(music.toy_reward(chosen, music.SAMPLE_RATE, prompts).double(), stored_chosen, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        music.toy_reward(rejected, music.SAMPLE_RATE, prompts).double(), stored_rejected, atol=2e-3, rtol=0
    )

    ties = torch.tensor(table.column("tie").to_pylist())
    assert ties.sum() == round(build_info["config"]["tie_fraction"] * table.num_rows)
    gap = stored_chosen - stored_rejected
    if ties.any():
        assert gap.abs()[ties].max() <= gap.abs()[~ties].median()  # ties are the close calls
    agreement = (gap[~ties] > 0).float().mean().item()
    assert 0.75 <= agreement <= 0.97, agreement  # 10% of labels flipped at random


def test_the_vae_keeps_the_sustain_the_pairs_are_labelled_by(model):
    """The trainers see a preference clip as its VAE latents: through VAE and vocoder its sustain must survive,
    or the labels do not reach the model. On these 96 clips the 250-step VAE of the previous build kept a
    correlation of 0.01 and moved the sustain by 0.32 on average; Diffusion-DPO trained against its labels
    (docs/experiments.md). This build: 0.89 and 0.10."""
    _, chosen, rejected = decoded_split("train")
    clips = torch.cat([chosen[:48], rejected[:48]])
    mels = music.waveform_to_mel(clips).unsqueeze(1)
    with torch.no_grad():
        reconstructed = model.vae.decode(model.vae.encode(mels).latent_dist.mean).sample.squeeze(1)
        round_trip = model.vocoder(reconstructed)[:, : music.CLIP_SAMPLES]
    before, after = music.measure(clips).sustain, music.measure(round_trip).sustain
    correlation = torch.corrcoef(torch.stack([before, after]))[0, 1]
    assert correlation > 0.75, correlation
    assert (after - before).abs().mean() < 0.12, (before.mean(), after.mean())


def test_train_labels_are_decided_by_sustain():
    """What the pairs teach (as ``toy_reward``'s docstring states): the chosen clip rings longer in most pairs,
    all but the flipped labels and the ties."""
    _, chosen, rejected = decoded_split("train")
    rings_longer = music.measure(chosen).sustain > music.measure(rejected).sustain
    assert 0.8 <= rings_longer.float().mean() <= 0.95, rings_longer.float().mean()


# ----------------------------------------------------------------------------------- online pairs


def test_dragon_generates_ranked_pairs_from_the_toy_model():
    """Online sampling through the MusicLDM pipeline (prompt embeddings) and best-vs-worst pairs."""
    family = load_family(str(ASSETS))
    settings = {"reward": "toy_t2m", "samples_per_prompt": 3, "pairing": "best_worst", "num_inference_steps": 2}
    method = DistributionalRewardOptimization(family, None, method_settings("dragon", **settings))
    prompts = ["a loud slow low sine tone", "a quiet fast high saw arpeggio"]
    context = TrainingContext(step=0, seed=0, noise_seeds=[1, 2], encode=None)
    pairs, metrics = method.make_pairs(family.denoiser, {"caption": prompts}, context)
    latent_shape = (family.denoiser.config.in_channels, music.MEL_FRAMES // 4, music.MEL_BINS // 4)
    assert pairs.chosen_latents.shape == pairs.rejected_latents.shape == (2, *latent_shape)
    assert not torch.equal(pairs.chosen_latents, pairs.rejected_latents)
    assert metrics["dragon/reward_positive"] >= metrics["dragon/reward"] >= metrics["dragon/reward_negative"]
