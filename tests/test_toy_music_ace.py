"""The ACE-Step-architecture toy of the music world (assets/toy-t2m-ace): the build's pieces (tokenizer, silence
latent, VAE loss), a small reproducible build, the shipped pipeline in the stock diffusers class, our family's
samples against the stock pipeline's, and what its VAE keeps of the clips (the preference data's schema and
labels: test_toy_music.py; the shipped DPO config's run: test_toy_demos.py)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (
    AceStepPipeline,
    AceStepTransformer1DModel,
    AutoencoderOobleck,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder
from transformers import Qwen2Tokenizer, Qwen3Model

from diffalign.diffusion.families import load_family
from diffalign.diffusion.families.ace_step import AceStepFamily
from diffalign.toy import music
from diffalign.toy.music_ace import (
    AUDIO_SECONDS,
    FAMILY_OPTIONS,
    TEXT_TOKENS,
    TOY_T2M_ACE_DIR,
    MusicAceBuildConfig,
    build_tokenizer,
    build_toy_music_ace,
    envelope_loss,
    formatted_prompt,
    make_vae,
    round_trip,
    silence_latent,
)
from diffalign.toy.music_build import caption_variants, variant_caption

ASSETS = TOY_T2M_ACE_DIR
PROMPTS = ["a loud fast high square arpeggio", "a quiet slow low sine tone"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline() -> AceStepPipeline:
    pipe = AceStepPipeline.from_pretrained(ASSETS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_info() -> dict:
    return json.loads((ASSETS / "build_info.json").read_text())


# ------------------------------------------------------------------------------------------ build pieces


def test_build_config_names_the_bad_key():
    with pytest.raises(ValueError, match="transformer_steps"):
        MusicAceBuildConfig(transformer_steps=0)
    with pytest.raises(ValueError, match="transformer_layers"):
        MusicAceBuildConfig(transformer_layers=3)
    with pytest.raises(ValueError, match="vae_crop_frames"):
        MusicAceBuildConfig(vae_crop_frames=33)
    with pytest.raises(ValueError, match="heldout_samples_per_prompt"):
        MusicAceBuildConfig(heldout_samples_per_prompt=3)


def test_tokenizer_keeps_every_caption_word_whole_and_fits_every_formatted_caption(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<|endoftext|>"
    for values in music.VOCABULARY.values():
        for word in values:
            assert len(tokenizer.tokenize(" " + word)) == 1, word
    lengths = [len(tokenizer(formatted_prompt(variant_caption(v))).input_ids) for v in caption_variants()]
    assert max(lengths) <= TEXT_TOKENS
    # The template is the pipeline's own: instruction, caption, metadata with the clip's whole seconds.
    text = formatted_prompt("a quiet slow low sine tone")
    assert "# Caption\na quiet slow low sine tone\n" in text and "- duration: 1 seconds" in text


def test_silence_latent_is_the_vae_posterior_mean_of_silence_at_every_frame():
    torch.manual_seed(0)
    vae = make_vae().eval()
    latent = silence_latent(vae, 750)
    assert latent.shape == (1, 750, 8)
    with torch.no_grad():
        middle = vae.encode(torch.zeros(1, 1, 8 * 640)).latent_dist.mean[0, :, 4]
    torch.testing.assert_close(latent[0], middle.expand(750, -1))


def test_envelope_loss_is_the_relative_l1_distance_of_the_frame_rms():
    """``Σ|rms(ŷ) − rms(y)| / Σ rms(y)`` over 20 ms frames every 10 ms, written out here."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3200, generator=generator) * torch.linspace(1, 0, 3200)
    predicted = 0.5 * target + 0.01 * torch.randn(2, 3200, generator=generator)

    def rms(waveforms):
        return torch.stack([waveforms[:, i : i + 320].pow(2).mean(-1).sqrt() for i in range(0, 3200 - 320 + 1, 160)], 1)

    expected = (rms(predicted) - rms(target)).abs().mean() / rms(target).mean()
    torch.testing.assert_close(envelope_loss(predicted, target), expected)
    assert envelope_loss(target, target) == 0


def _tiny_config() -> MusicAceBuildConfig:
    return MusicAceBuildConfig(
        clips=64,
        vae_steps=2,
        transformer_steps=2,
        transformer_batch_size=8,
        train_samples_per_prompt=2,
        heldout_samples_per_prompt=2,
        sampling_steps=2,
        quality_clips=8,
    )


@pytest.mark.slow
def test_small_build_is_reproducible_and_loads_with_the_stock_pipeline(tmp_path):
    infos = [build_toy_music_ace(tmp_path / name, seed=7, config=_tiny_config()) for name in ("a", "b")]
    for split in ("train", "heldout"):
        assert pq.read_table(tmp_path / "a" / "data" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "b" / "data" / f"{split}.parquet")
        )
    for weights in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    assert json.dumps(infos[0]["quality"]) == json.dumps(infos[1]["quality"])  # NaN ≠ NaN: a tiny VAE's correlation
    table = pq.read_table(tmp_path / "a" / "data" / "train.parquet")
    assert table.num_rows == 72 and table.column("chosen")[0].as_py()[:4] == b"fLaC"
    assert (tmp_path / "a" / "prompts" / "heldout.txt").read_text().splitlines() == music.load_prompts("heldout")
    AceStepPipeline.from_pretrained(tmp_path / "a")


# --------------------------------------------------------------------------------------- shipped model


def test_pipeline_loads_with_the_stock_ace_step_class_and_generates_the_worlds_clips(pipeline):
    assert type(pipeline.transformer) is AceStepTransformer1DModel
    assert type(pipeline.vae) is AutoencoderOobleck
    assert type(pipeline.condition_encoder) is AceStepConditionEncoder
    assert type(pipeline.text_encoder) is Qwen3Model
    assert isinstance(pipeline.tokenizer, Qwen2Tokenizer)
    assert type(pipeline.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipeline.sample_rate == music.SAMPLE_RATE and pipeline.latents_per_second == 25
    audio = pipeline(
        PROMPTS,
        lyrics=[""] * len(PROMPTS),  # the stock pipeline does not broadcast a single lyrics string over a batch
        audio_duration=AUDIO_SECONDS, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).audios
    assert audio.shape == (2, 1, music.CLIP_SAMPLES) and torch.isfinite(audio).all()


def test_family_samples_equal_the_stock_pipelines(pipeline):
    family = load_family(str(ASSETS), options=FAMILY_OPTIONS)
    assert isinstance(family, AceStepFamily) and family.num_frames == 32

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in (3, 4)]

    ours = family.sample(family.denoiser, PROMPTS, generators(), num_inference_steps=3, guidance_scale=3.0)
    stock = pipeline(
        PROMPTS,
        lyrics=[""] * len(PROMPTS),
        audio_duration=AUDIO_SECONDS,
        max_text_length=TEXT_TOKENS,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=generators(),
        output_type="latent",
    ).audios
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_the_vae_keeps_the_sustain_the_pairs_are_labelled_by(pipeline):
    """The trainers see a preference clip as its VAE latents, so its sustain must survive the VAE's round trip."""
    table = pq.read_table(ASSETS / "data" / "train.parquet")
    clips = torch.stack([music.read_audio(data) for data in table.column("chosen").to_pylist()[:96]])
    before, after = music.measure(clips).sustain, music.measure(round_trip(pipeline.vae, clips)).sustain
    correlation = torch.corrcoef(torch.stack([before, after]))[0, 1]
    assert correlation > 0.75, correlation
    assert (after - before).abs().mean() < 0.12, (before.mean(), after.mean())
