"""Audio model families end to end on tiny models built from configs: MusicLDM/AudioLDM (CLAP class labels),
AudioLDM2 (CLAP + T5 + GPT-2) and Stable Audio (DiT, v-prediction on a continuous σ).

Each family trains one Diffusion-DPO step through the trainer (LoRA and full) on an audio-alpaca parquet, its
outputs reload, its conditioning is re-derived from the raw models, and Stable Audio's noising and targets are
checked against diffusers' CosineDPMSolverMultistepScheduler.
"""

import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from diffusers import (
    AudioLDM2Pipeline,
    AudioLDM2ProjectionModel,
    AudioLDM2UNet2DConditionModel,
    AudioLDMPipeline,
    AutoencoderKL,
    AutoencoderOobleck,
    DDIMScheduler,
    EDMDPMSolverMultistepScheduler,
    MusicLDMPipeline,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableAudioProjectionModel,
    UNet2DConditionModel,
)
from helpers import AUDIO_PAIR_COLUMNS, diffusion_config, merged, trainable_snapshot, write_audio_pairs
from peft.utils import get_peft_model_state_dict
from scipy import stats
from tiny_pipelines import t5_tokenizer
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    ClapTextModelWithProjection,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
)

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.data import DiffusionDataConfig, load_preference_pairs
from diffalign.diffusion.families import load_family
from diffalign.diffusion.families.base import with_adapter_support
from diffalign.diffusion.trainer import train
from diffalign.diffusion.training_data import build_pair_dataset
from diffalign.rewards import Audio, Scorer, register_scorer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a calm piano", "a loud fast drum beat", "soft rain", "a guitar melody"]

pytestmark = pytest.mark.usefixtures("one_thread")


# --- tiny pipelines (section A of the music reference: configs known to run) ---------------------------------


def roberta_tokenizer() -> RobertaTokenizer:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[f"Ġ{letter}"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=32)


def clap_text_config(projection_dim: int) -> dict:
    return dict(
        vocab_size=len(roberta_tokenizer()),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        projection_dim=projection_dim,
    )


def tiny_clap(projection_dim: int) -> ClapModel:
    audio = dict(
        spec_size=64,
        window_size=4,
        num_mel_bins=64,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        hidden_size=32,
        patch_embeds_hidden_size=16,
        patch_stride=2,
        enable_fusion=False,
    )
    config = ClapConfig(
        text_config=clap_text_config(projection_dim), audio_config=audio, projection_dim=projection_dim
    )
    return ClapModel(config)


def mel_parts() -> dict:
    """VAE (÷2) on the 64-band log-mel, a 16 kHz HiFi-GAN with hop 160, the published DDIM schedule."""
    return {
        "vae": AutoencoderKL(
            block_out_channels=(8, 16),
            in_channels=1,
            out_channels=1,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
        ),
        "vocoder": SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                model_in_dim=64,
                sampling_rate=16_000,
                upsample_initial_channel=16,
                upsample_rates=[10, 16],
                upsample_kernel_sizes=[20, 32],
                resblock_kernel_sizes=[3],
                resblock_dilation_sizes=[[1, 3, 5]],
                normalize_before=False,
            )
        ),
        "scheduler": DDIMScheduler(
            beta_start=0.0015,
            beta_end=0.0195,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        "tokenizer": roberta_tokenizer(),
    }


def clap_unet() -> UNet2DConditionModel:
    # 16 latent frames = 32 mel frames = 0.32 s.
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(32, 64),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=32,
        class_embeddings_concat=True,
        norm_num_groups=8,
        attention_head_dim=4,
    )


def build_musicldm(directory: Path) -> Path:
    torch.manual_seed(0)
    MusicLDMPipeline(
        text_encoder=tiny_clap(32), feature_extractor=ClapFeatureExtractor(), unet=clap_unet(), **mel_parts()
    ).save_pretrained(directory)
    return directory


def build_audioldm(directory: Path) -> Path:
    torch.manual_seed(1)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(**clap_text_config(32)))
    AudioLDMPipeline(text_encoder=text_encoder, unet=clap_unet(), **mel_parts()).save_pretrained(directory)
    return directory


def build_audioldm2(directory: Path) -> Path:
    torch.manual_seed(2)
    tokenizer_2 = t5_tokenizer()
    language_model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=100, n_positions=99, bos_token_id=0, eos_token_id=0)
    )
    language_model.config.max_new_tokens = 8
    unet = AudioLDM2UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([None, 16, 32], [None, 16, 32]),  # [self, GPT-2 (16), T5 (32)] per block
        attention_head_dim=4,
    )
    AudioLDM2Pipeline(
        text_encoder=tiny_clap(16),
        text_encoder_2=T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2)
        ),
        projection_model=AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16),
        language_model=language_model,
        tokenizer_2=tokenizer_2,
        feature_extractor=ClapFeatureExtractor(),
        unet=unet,
        **mel_parts(),
    ).save_pretrained(directory)
    return directory


# Stable Audio Open's published scheduler config (stabilityai/stable-audio-open-1.0, scheduler/).
STABLE_AUDIO_SCHEDULER = {
    "_class_name": "CosineDPMSolverMultistepScheduler",
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rho": 7.0,
    "sigma_data": 1.0,
    "sigma_max": 500,
    "sigma_min": 0.3,
    "sigma_schedule": "exponential",
    "solver_order": 2,
    "solver_type": "midpoint",
}


def build_stable_audio(directory: Path) -> Path:
    """Stereo 8 kHz, VAE hop 8, 32 latent frames = 256 samples. The published scheduler (which needs torchsde
    to instantiate) is written as its config; the pipeline is assembled with a stand-in scheduler first."""
    torch.manual_seed(3)
    tokenizer = t5_tokenizer()
    StableAudioPipeline(
        vae=AutoencoderOobleck(
            encoder_hidden_size=6,
            downsampling_ratios=[2, 4],
            decoder_channels=3,
            decoder_input_channels=3,
            audio_channels=2,
            channel_multiples=[2, 4],
            sampling_rate=8_000,
        ),
        text_encoder=T5EncoderModel(
            T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2)
        ),
        projection_model=StableAudioProjectionModel(text_encoder_dim=32, conditioning_dim=4, min_value=0, max_value=32),
        tokenizer=tokenizer,
        transformer=StableAudioDiTModel(
            sample_size=32,
            in_channels=3,
            num_layers=2,
            attention_head_dim=4,
            num_attention_heads=2,
            num_key_value_attention_heads=2,
            out_channels=3,
            cross_attention_dim=4,
            time_proj_dim=8,
            global_states_input_dim=8,
            cross_attention_input_dim=4,
        ),
        scheduler=EDMDPMSolverMultistepScheduler(),
    ).save_pretrained(directory)
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(STABLE_AUDIO_SCHEDULER))
    index = json.loads((directory / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "CosineDPMSolverMultistepScheduler"]
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


BUILDERS = {
    "musicldm": build_musicldm,
    "audioldm": build_audioldm,
    "audioldm2": build_audioldm2,
    "stable_audio": build_stable_audio,
}
DENOISER_CLASSES = {
    "musicldm": UNet2DConditionModel,
    "audioldm": UNet2DConditionModel,
    "audioldm2": AudioLDM2UNet2DConditionModel,
    "stable_audio": StableAudioDiTModel,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio-models")
    return {name: builder(root / name) for name, builder in BUILDERS.items()}


# --- audio-alpaca pairs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Eight audio-alpaca pairs, 0.1–0.45 s long."""
    return write_audio_pairs(tmp_path_factory.mktemp("audio-data") / "audio_alpaca.parquet", PROMPTS * 2, 0.1, 0.05)


def config_for(model_dir: Path, pairs: Path, output: Path, **sections) -> DiffusionTrainConfig:
    return diffusion_config(model_dir, pairs, output, **merged({"data": AUDIO_PAIR_COLUMNS}, sections))


# --- one DPO step per family, and its saved output -----------------------------------------------------------


@pytest.mark.parametrize("trainable", ["lora", "full"])
@pytest.mark.parametrize("family", ["musicldm", "audioldm2", "stable_audio"])
def test_one_dpo_step_trains_and_its_output_reloads(models, pairs_file, tmp_path, family, trainable):
    model_dir = models[family]
    metrics = train(config_for(model_dir, pairs_file, tmp_path, model={"trainable": trainable}))
    # The policy starts equal to the reference, so every pair's logit is 0 and the loss is log 2 (up to attention
    # kernels that round differently with and without autograd, which β = 5000 magnifies).
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["grad_norm"] > 0

    trained = trainable_snapshot(tmp_path)
    denoiser_class, subfolder = DENOISER_CLASSES[family], "transformer" if family == "stable_audio" else "unet"
    base = with_adapter_support(denoiser_class).from_pretrained(model_dir, subfolder=subfolder)
    if trainable == "lora":
        assert trained and all("lora" in name for name in trained)
        # The diffusers LoRA file loads into the stock denoiser (none of the audio pipelines has a LoRA loader).
        base.load_lora_adapter(tmp_path / "final", prefix=subfolder, use_safetensors=True)
        loaded = get_peft_model_state_dict(base, adapter_name="default_0")
        assert len(loaded) == len(trained)
        for name, value in trained.items():
            torch.testing.assert_close(loaded[name.replace(".default.", ".")], value, rtol=0, atol=0)
    else:
        stock = denoiser_class.from_pretrained(tmp_path / "final" / subfolder)
        assert type(stock) is denoiser_class  # the saved config names the stock class
        state = stock.state_dict()
        assert len(trained) == len(state) == len(base.state_dict())
        assert all(torch.equal(state[name], value) for name, value in trained.items())
        assert any(not torch.equal(base.state_dict()[name], value) for name, value in trained.items())
        if family != "stable_audio":  # (the Stable Audio pipeline's scheduler needs torchsde)
            pipeline_class = {"musicldm": MusicLDMPipeline, "audioldm2": AudioLDM2Pipeline}[family]
            assert pipeline_class.from_pretrained(model_dir, unet=stock).unet is stock


# --- conditioning, re-derived from the raw models ------------------------------------------------------------


def clap_tokens(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")


def test_musicldm_conditions_the_unet_on_the_clap_text_embedding(models):
    family = load_family(str(models["musicldm"]))
    tokens = clap_tokens(family.tokenizer, PROMPTS[:2])
    clap = ClapModel.from_pretrained(models["musicldm"], subfolder="text_encoder")
    expected = clap.get_text_features(tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
    embeds = family.encode_prompts(PROMPTS[:2])
    torch.testing.assert_close(embeds["class_labels"], expected)
    torch.testing.assert_close(embeds["class_labels"].norm(dim=-1), torch.ones(2))

    latents, timesteps = torch.randn(2, 4, 16, 32), torch.tensor([10, 900])
    unet = UNet2DConditionModel.from_pretrained(models["musicldm"], subfolder="unet")
    inputs = family.denoiser_inputs(embeds, {})
    with torch.no_grad():
        prediction = family.predict(family.denoiser, latents, timesteps, inputs)
        direct = unet(latents, timesteps, encoder_hidden_states=None, class_labels=expected).sample
    torch.testing.assert_close(prediction, direct)


def test_audioldm_normalises_its_projected_text_embedding(models):
    family = load_family(str(models["audioldm"]))
    assert type(family).__name__ == "AudioLDMFamily"
    tokens = clap_tokens(family.tokenizer, PROMPTS[:2])
    encoder = ClapTextModelWithProjection.from_pretrained(models["audioldm"], subfolder="text_encoder")
    projected = encoder(tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
    torch.testing.assert_close(
        family.encode_prompts(PROMPTS[:2])["class_labels"], projected / projected.norm(dim=-1, keepdim=True)
    )


def test_mel_families_decode_through_the_vae_and_the_vocoder(models):
    family = load_family(str(models["musicldm"]))
    decoder = family.media_decoder(DiffusionDataConfig())
    # 16 latent frames × VAE ÷2 = 32 mel frames × hop 160 = 5120 samples at the vocoder's 16 kHz.
    assert (decoder.sample_rate, decoder.num_samples, decoder.mel.hop_length, decoder.mel.mel_bins) == (
        16_000,
        5_120,
        160,
        64,
    )
    latents = torch.randn(2, 4, 16, 32)
    with torch.no_grad():
        audio = family.decode(latents)
        mel = family.vae.decode(latents / family.vae.config.scaling_factor).sample
        expected = family.vocoder(mel[:, 0])
    assert isinstance(audio, Audio) and audio.sample_rate == 16_000 and audio.waveforms.shape == (2, 5_120)
    torch.testing.assert_close(audio.waveforms, expected)


@pytest.mark.parametrize("family_name", ["musicldm", "stable_audio"])
def test_reencoding_decodes_and_encodes_in_the_vaes_unbounded_space(models, family_name):
    """Log-mel and waveforms are not clamped (images are: see test_seppo); the posterior draw follows each seed."""
    family = load_family(str(models[family_name]))
    config = family.denoiser.config
    shape = (2, 4, 16, 32) if family_name == "musicldm" else (2, config.in_channels, config.sample_size)
    latents = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    scale = family.latent_normalization.scale
    assert family.latent_normalization.shift == 0.0
    with torch.no_grad():
        reencoded = family.reencode(latents, seeds=[5, 6])
        posterior = family.vae.encode(family.vae.decode(latents / scale).sample).latent_dist
    draws = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in (5, 6)])
    torch.testing.assert_close(reencoded, (posterior.mean + posterior.std * draws) * scale)


def test_audioldm2_encodes_each_prompt_alone_through_the_whole_chain(models):
    family = load_family(str(models["audioldm2"]))
    pipeline = AudioLDM2Pipeline.from_pretrained(models["audioldm2"])
    embeds = family.encode_prompts(PROMPTS[:2])
    assert embeds["prompt_embeds"].shape == (2, 24, 32)  # padded to the T5 tokenizer's 24 tokens
    assert embeds["generated_prompt_embeds"].shape == (2, 8, 16)  # GPT-2's 8 generated "AudioMAE" states
    for number, prompt in enumerate(PROMPTS[:2]):
        t5_states, _, generated = pipeline.encode_prompt(prompt, "cpu", 1, False)
        length = t5_states.shape[1]
        torch.testing.assert_close(embeds["generated_prompt_embeds"][number], generated[0])
        torch.testing.assert_close(embeds["prompt_embeds"][number, :length], t5_states[0])
        assert torch.all(embeds["prompt_embeds"][number, length:] == 0)
        assert embeds["attention_mask"][number].tolist() == [1] * length + [0] * (24 - length)
    # Encoding in a batch changes nothing: padding never reaches GPT-2.
    for number, prompt in enumerate(PROMPTS[:2]):
        alone = family.encode_prompts([prompt])
        for name, value in alone.items():
            torch.testing.assert_close(embeds[name][number], value[0])

    latents, timesteps = torch.randn(2, 4, 16, 32), torch.tensor([5, 700])
    unet = AudioLDM2UNet2DConditionModel.from_pretrained(models["audioldm2"], subfolder="unet")
    with torch.no_grad():
        prediction = family.predict(family.denoiser, latents, timesteps, family.denoiser_inputs(embeds, {}))
        direct = unet(
            latents,
            timesteps,
            encoder_hidden_states=embeds["generated_prompt_embeds"],
            encoder_hidden_states_1=embeds["prompt_embeds"],
            encoder_attention_mask_1=embeds["attention_mask"],
        ).sample
    torch.testing.assert_close(prediction, direct)


def test_audioldm2_training_reads_cached_conditioning_and_never_runs_gpt2(models, pairs_file, tmp_path, monkeypatch):
    cache = {"cache_dir": str(tmp_path / "cache")}
    train(config_for(models["audioldm2"], pairs_file, tmp_path / "first", data=cache))

    def no_generation(*args, **kwargs):
        raise AssertionError("GPT-2 ran during training")

    monkeypatch.setattr(GPT2LMHeadModel, "forward", no_generation)
    with pytest.raises(AssertionError, match="GPT-2 ran"):  # the patch does catch the conditioning chain
        load_family(str(models["audioldm2"])).encode_prompts(["a new prompt"])
    metrics = train(config_for(models["audioldm2"], pairs_file, tmp_path / "second", data=cache, run={"max_steps": 2}))
    assert math.isfinite(metrics["loss"])


# --- the latent cache on audio -------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", ["musicldm", "stable_audio"])
def test_the_latent_cache_stores_each_clips_vae_posterior_and_audio_span(models, pairs_file, tmp_path, family_name):
    family = load_family(str(models[family_name]))
    config = config_for(models[family_name], pairs_file, tmp_path, data={"cache_dir": str(tmp_path / "cache")})
    decoder = family.media_decoder(config.data)
    dataset, _, stats = build_pair_dataset(config.data, family=family, seed=0, decoder=decoder)
    assert stats["cache_pairs"] == 8 and stats["cache_images_encoded"] == 16
    cache = dataset.cache
    pairs = load_preference_pairs(config.data, decoder)
    for pair in (0, 7):
        for key, data in zip(cache.image_keys[pair], pairs.media_bytes(pair)):
            decoded = decoder.transform(decoder.load(data))
            with torch.no_grad():
                posterior = family.encode(decoded.values[None])
            entry = cache.posterior(key, 0)
            torch.testing.assert_close(entry["mean"], posterior.mean[0])
            torch.testing.assert_close(entry["std"], posterior.std[0])
            assert tuple(entry["audio_span"].tolist()) == decoded.conditioning["audio_span"]
    item = dataset[3]
    assert item["chosen_latents"].shape == posterior.mean.shape[1:]
    chosen = decoder.transform(decoder.load(pairs.media_bytes(3)[0]))
    assert item["chosen_audio_span"] == chosen.conditioning["audio_span"]


def test_stable_audio_trains_from_the_cache_with_per_clip_seconds(models, pairs_file, tmp_path):
    config = config_for(models["stable_audio"], pairs_file, tmp_path, data={"cache_dir": str(tmp_path / "cache")})
    metrics = train(config)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_stable_audio_seconds_conditioning_follows_each_clips_span(models):
    family = load_family(str(models["stable_audio"]))
    embeds = family.encode_prompts(PROMPTS[:2])
    spans = torch.tensor([[0, 256], [0, 100]])
    inputs = family.denoiser_inputs(embeds, {"audio_span": spans})
    duration = family.projection_model(
        start_seconds=torch.zeros(2), end_seconds=torch.tensor([256 / 8_000, 100 / 8_000])
    )
    start, end = duration.seconds_start_hidden_states, duration.seconds_end_hidden_states
    torch.testing.assert_close(inputs["encoder_hidden_states"][:, :-2], embeds["text_hidden_states"])
    torch.testing.assert_close(inputs["encoder_hidden_states"][:, -2:], torch.cat([start, end], dim=1))
    torch.testing.assert_close(inputs["global_hidden_states"], torch.cat([start, end], dim=2))
    assert not torch.equal(end[0], end[1])
    cos, sin = inputs["rotary_embedding"]
    assert cos.shape == sin.shape == (32 + 1, 2)  # the global token + 32 latent frames, head dim 4 // 2


# --- Stable Audio's maths against CosineDPMSolverMultistepScheduler ------------------------------------------


@pytest.fixture(scope="module")
def cosine_scheduler_class():
    """diffusers' CosineDPMSolverMultistepScheduler, whose module imports torchsde only for the Brownian noise of
    its SDE ``step``. These tests never step, so without torchsde an empty stand-in module lets it import."""
    modules = [
        "diffusers.schedulers.scheduling_cosine_dpmsolver_multistep",
        "diffusers.schedulers.scheduling_dpmsolver_sde",
    ]
    stand_in = importlib.util.find_spec("torchsde") is None
    if stand_in:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        yield importlib.import_module(modules[0]).CosineDPMSolverMultistepScheduler
    finally:
        if stand_in:
            for name in ["torchsde", *modules]:
                sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def stable_audio(models):
    return load_family(str(models["stable_audio"]))


def published_scheduler(scheduler_class, **overrides):
    config = {key: value for key, value in STABLE_AUDIO_SCHEDULER.items() if not key.startswith("_")}
    return scheduler_class(**{**config, **overrides})


def test_noising_matches_the_schedulers_add_noise(stable_audio, cosine_scheduler_class):
    scheduler = published_scheduler(cosine_scheduler_class)
    indices = torch.tensor([0, 1, 250, 500, 998, 999])
    sigmas, timesteps = scheduler.sigmas[indices], scheduler.timesteps[indices]
    latents, noise = torch.randn(6, 3, 32), torch.randn(6, 3, 32)
    expected = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(stable_audio.add_noise(latents, noise, sigmas), expected)
    torch.testing.assert_close(expected, latents + sigmas[:, None, None] * noise)  # x_σ = x₀ + σ·ε


def test_the_target_is_the_v_whose_denoised_estimate_is_the_clean_latent(stable_audio, cosine_scheduler_class):
    scheduler = published_scheduler(cosine_scheduler_class)
    sigmas = torch.tensor([0.3, 1.0, 7.5, 80.0, 500.0])
    latents, noise = torch.randn(5, 3, 32), torch.randn(5, 3, 32)
    noisy = stable_audio.add_noise(latents, noise, sigmas)
    target = stable_audio.target(latents, noise, sigmas)
    for number, sigma in enumerate(sigmas):
        denoised = scheduler.precondition_outputs(noisy[number], target[number], sigma)
        torch.testing.assert_close(denoised, latents[number], rtol=0, atol=5e-4)
    # σ_d = 1 and σ = tan(πt/2): v = cos(πt/2)·ε − sin(πt/2)·x₀.
    angle = (torch.atan(sigmas) * 2 / math.pi * math.pi / 2)[:, None, None]
    torch.testing.assert_close(target, angle.cos() * noise - angle.sin() * latents)
    torch.testing.assert_close(
        stable_audio.denoised(noisy, target, sigmas), latents, rtol=0, atol=5e-4
    )


def test_the_dit_sees_the_schedulers_scaled_input_and_noise_level(stable_audio, cosine_scheduler_class):
    scheduler = published_scheduler(cosine_scheduler_class)
    scheduler.set_timesteps(10)
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, hidden_states, timestep, **inputs):
            calls.append((hidden_states, timestep))
            return types.SimpleNamespace(sample=hidden_states)

    noisy, sigmas = torch.randn(3, 3, 32), scheduler.sigmas[[0, 4, 9]]
    stable_audio.predict(Recorder(), noisy, sigmas, {})
    scaled, noise_levels = calls[0]
    for number, index in enumerate([0, 4, 9]):
        scheduler._step_index = index
        torch.testing.assert_close(scaled[number], scheduler.scale_model_input(noisy[number], scheduler.timesteps[index]))
    torch.testing.assert_close(noise_levels, scheduler.timesteps[[0, 4, 9]])


@pytest.mark.parametrize("schedule", ["exponential", "karras"])
def test_inference_sigmas_are_the_schedulers(stable_audio, cosine_scheduler_class, schedule):
    scheduler = published_scheduler(cosine_scheduler_class, sigma_schedule=schedule)
    scheduler.set_timesteps(12)
    ours = type(stable_audio.schedule)(sigma_schedule=schedule).inference_sigmas(12)
    torch.testing.assert_close(ours, scheduler.sigmas)


def test_training_noise_levels_are_log_uniform_over_the_schedulers_range(stable_audio, cosine_scheduler_class):
    scheduler = published_scheduler(cosine_scheduler_class)
    generator = torch.Generator().manual_seed(0)
    sigmas = stable_audio.sample_timesteps(4_000, torch.device("cpu"), generator=generator)
    low, high = scheduler.sigmas[-2].item(), scheduler.sigmas[0].item()  # the training grid's ends: 0.3 and 500
    assert sigmas.min() >= low * (1 - 1e-6) and sigmas.max() <= high * (1 + 1e-6)
    log_position = (sigmas.log() - math.log(low)) / (math.log(high) - math.log(low))
    assert stats.kstest(log_position.numpy(), "uniform").pvalue > 0.01
    again = stable_audio.sample_timesteps(4_000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sigmas, again)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_ddim_sampling_lands_on_the_data_of_a_point_mass_world(stable_audio, monkeypatch, guidance_scale):
    """With the exact v of a one-point data distribution x₀ = c, deterministic DDIM reaches c from any noise."""
    clean = torch.randn(3, 32)

    class ExactV(torch.nn.Module):
        def forward(self, scaled, noise_level, **inputs):
            sigma = torch.tan(noise_level * math.pi / 2)[:, None, None]
            noisy = scaled * torch.sqrt(sigma**2 + 1)
            noise = (noisy - clean) / sigma
            return types.SimpleNamespace(sample=(noise - sigma * clean) / torch.sqrt(sigma**2 + 1))

    monkeypatch.setattr(stable_audio, "decode", lambda latents: Audio(latents.flatten(1), 8_000))
    generators = [torch.Generator().manual_seed(seed) for seed in range(2)]
    audio = stable_audio.generate(
        ExactV(), PROMPTS[:2], generators, num_inference_steps=8, guidance_scale=guidance_scale
    )
    torch.testing.assert_close(audio.waveforms, clean.flatten()[None].expand(2, -1), rtol=0, atol=1e-3)


# --- evaluation: samples as audio ----------------------------------------------------------------------------


SCORED: list[Audio] = []


class LoudnessScorer(Scorer):
    """RMS level of each clip: a stand-in audio reward that records what it was given."""

    modality = "audio"

    def forward(self, audio: Audio, prompts=None, reference=None) -> torch.Tensor:
        SCORED.append(audio)
        return self.output(audio.waveforms.pow(2).mean(dim=1).sqrt())


@register_scorer("test_audio_loudness")
def loudness_scorer(device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoudnessScorer:
    return LoudnessScorer(device, dtype)


@pytest.mark.parametrize(("family", "sample_rate", "length"), [("musicldm", 16_000, 5_120), ("stable_audio", 8_000, 256)])
def test_evaluation_writes_wavs_and_a_spectrogram_grid_and_scores_audio(
    models, pairs_file, tmp_path, family, sample_rate, length
):
    SCORED.clear()
    evaluation = {"prompts": PROMPTS[:2], "num_inference_steps": 2, "reward": "test_audio_loudness"}
    metrics = train(config_for(models[family], pairs_file, tmp_path, eval=evaluation))
    assert 0.0 <= metrics["eval/win_rate"] <= 1.0
    base_audio, aligned_audio = SCORED  # the base model is sampled once, then the aligned one
    assert base_audio.sample_rate == sample_rate and base_audio.waveforms.shape == (2, length)

    folder = tmp_path / "samples" / "step-0000001"
    for row, audio in (("base", base_audio), ("aligned", aligned_audio)):
        for number in range(2):
            samples, rate = soundfile.read(folder / f"{row}-{number:03d}.wav", dtype="float32")
            assert rate == sample_rate
            np.testing.assert_allclose(samples, audio.waveforms[number].clamp(-1, 1).numpy(), atol=1 / 32_000)
    assert metrics["eval/reward_base"] == pytest.approx(base_audio.waveforms.pow(2).mean(dim=1).sqrt().mean().item())

    from PIL import Image

    from diffalign.eval.grid import labelled_grid

    grid = Image.open(tmp_path / "samples" / "step-0000001.png")
    # A labelled grid of base and aligned rows × 2 prompts, each tile a clip's 64 mel bands × its 10 ms frames.
    spectrograms, zeros = torch.zeros(2, 3, 64, length // (sample_rate // 100)), torch.zeros(2)
    rows, scores = {"base": spectrograms, "aligned": spectrograms}, {"base": zeros, "aligned": zeros}
    assert grid.size == labelled_grid(rows, PROMPTS[:2], scores, "test_audio_loudness")[1].size


def test_unknown_family_messages_list_the_audio_pipelines(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "TangoPipeline"}))
    with pytest.raises(ValueError, match="AudioLDM2Pipeline.*MusicLDMPipeline.*StableAudioPipeline"):
        load_family(str(tmp_path))


def test_an_unsupported_stable_audio_prediction_type_is_refused(models, tmp_path):
    import shutil

    directory = tmp_path / "eps"
    shutil.copytree(models["stable_audio"], directory)
    (directory / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**STABLE_AUDIO_SCHEDULER, "prediction_type": "epsilon"})
    )
    with pytest.raises(ValueError, match="prediction_type 'epsilon'.*v_prediction"):
        load_family(str(directory))

