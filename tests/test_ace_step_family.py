"""The ACE-Step 1.5 family on a tiny random pipeline built from the shipped configs (configs/models/ace-step-v15/)
at tiny widths, with a tiny Qwen3 text encoder and a byte-level tokenizer: conditioning and sampling against the
stock AceStepPipeline, training draws, flow-matching DPO against its formula written out here, the frames-first
latents, and LoRA and full DPO steps whose outputs load with the pipeline's own loaders."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AceStepPipeline,
    AceStepTransformer1DModel,
    AutoencoderOobleck,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder
from helpers import AUDIO_PAIR_COLUMNS, diffusion_config, merged, write_audio_pairs
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import FamilyOptions, load_family
from diffalign.diffusion.methods import LatentPairBatch, pair_noise
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import DiffusionRecipe, train
from diffalign.losses import LossConfig, compute_loss
from diffalign.rewards import Audio
from diffalign.training import make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).parents[1] / "configs" / "models" / "ace-step-v15"
SECONDS = 0.64  # 16 latent frames at 25 frames/s
OPTIONS = FamilyOptions(audio_seconds=SECONDS)
PROMPTS = ["a calm piano", "a loud fast drum beat with an electric guitar"]  # different token lengths
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def shipped(name: str, **tiny) -> dict:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    return {**{key: value for key, value in config.items() if not key.startswith("_")}, **tiny}


def byte_level_tokenizer() -> Qwen2Tokenizer:
    """Qwen's byte-level BPE with no merges: one token per byte, ``<|endoftext|>`` (id 0) as pad and end."""
    vocab = {"<|endoftext|>": 0}
    for character in sorted(ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[])


def build_tiny_ace_step(directory: Path, is_turbo: bool = False) -> Path:
    """The shipped transformer, condition encoder and VAE configs at widths 32/16/8: 8 latent channels, the VAE's
    published 1920× downsampling of 48 kHz stereo (25 frames/s), a random silence latent; sliding windows of 2."""
    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    heads = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=2)
    condition_encoder = AceStepConditionEncoder(
        **shipped(
            "condition_encoder", hidden_size=32, intermediate_size=64, text_hidden_dim=16, timbre_hidden_dim=8,
            num_lyric_encoder_hidden_layers=2, num_timbre_encoder_hidden_layers=2, **heads,
        )
    )
    with torch.no_grad():
        condition_encoder.silence_latent.normal_()
    transformer = AceStepTransformer1DModel(
        **shipped(
            "transformer", hidden_size=32, intermediate_size=64, num_hidden_layers=2, in_channels=24,
            audio_acoustic_hidden_dim=8, encoder_hidden_size=32, layer_types=["sliding_attention", "full_attention"],
            is_turbo=is_turbo, **heads,
        )
    )
    AceStepPipeline(
        vae=AutoencoderOobleck(
            **shipped("vae", encoder_hidden_size=16, decoder_input_channels=8, decoder_channels=4,
                      channel_multiples=[1, 2, 2, 2, 2])
        ),
        text_encoder=Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
            )
        ),
        tokenizer=tokenizer,
        transformer=transformer,
        condition_encoder=condition_encoder,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_ace_step(tmp_path_factory.mktemp("ace-step") / "model")


@pytest.fixture(scope="module")
def family(model_dir):
    return load_family(str(model_dir), options=OPTIONS)


def stock_pipeline(model_dir: Path) -> AceStepPipeline:
    pipeline = AceStepPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Four audio-alpaca pairs, 0.2–0.5 s long."""
    prompts = ["a calm piano", "a loud fast drum beat", "soft rain", "a guitar melody"]
    return write_audio_pairs(tmp_path_factory.mktemp("ace-step-data") / "audio_alpaca.parquet", prompts, 0.2, 0.1)


def config_for(model_dir: Path, pairs: Path, output: Path, **sections) -> DiffusionTrainConfig:
    ace_step = {
        "model": {"lora": {"alpha": 16.0, "target_modules": LORA_TARGETS}, "audio_seconds": SECONDS},
        "data": AUDIO_PAIR_COLUMNS,
        "loss": {"beta": 500.0},
    }
    return diffusion_config(model_dir, pairs, output, **merged(ace_step, sections))


def velocity_by_hand(transformer, family, noisy: torch.Tensor, t: torch.Tensor, embeds: dict) -> torch.Tensor:
    """The transformer on text2music inputs: conditioning cut to the longest caption, context = silence ‖ ones."""
    batch_size, frames, _ = noisy.shape
    length = int(embeds["encoder_attention_mask"].sum(dim=1).max())
    silence = family.condition_encoder.silence_latent[:, :frames].expand(batch_size, -1, -1)
    return transformer(
        hidden_states=noisy,
        timestep=t,
        timestep_r=t,
        encoder_hidden_states=embeds["encoder_hidden_states"][:, :length],
        context_latents=torch.cat([silence, torch.ones_like(silence)], dim=-1),
    ).sample


# --- conditioning and sampling against the stock pipeline -----------------------------------------------------------


def test_conditioning_is_the_pipelines_for_the_same_batch_and_each_caption_is_batch_independent(family, model_dir):
    pipeline = stock_pipeline(model_dir)
    with torch.no_grad():
        text, text_mask, lyric, lyric_mask = pipeline.encode_prompt(
            PROMPTS, lyrics=["", ""], device="cpu", audio_duration=SECONDS
        )
        silence = pipeline.condition_encoder.silence_latent[:, :750].expand(2, -1, -1)  # 30 s of 25 frames/s
        expected, _ = pipeline.condition_encoder(text, text_mask, lyric, lyric_mask, silence, torch.arange(2))
    embeds = family.encode_prompts(PROMPTS)
    assert embeds["encoder_hidden_states"].shape[1] == lyric.shape[1] + 1 + 256  # captions padded to 256 tokens
    conditioning = family.denoiser_inputs(embeds, {})["encoder_hidden_states"]
    assert conditioning.shape == expected.shape and expected.shape[1] < embeds["encoder_hidden_states"].shape[1]
    torch.testing.assert_close(conditioning, expected, rtol=1e-5, atol=1e-5)
    # Encoded alone or in a batch, a caption's embedding is the same (what the prompt cache relies on).
    alone = family.encode_prompts(PROMPTS[:1])
    for name, value in alone.items():
        torch.testing.assert_close(value[0], embeds[name][0], rtol=1e-5, atol=1e-5)
    # The empty caption (caption dropout) is the learned null condition, the model's unconditional input.
    dropped = family.encode_prompts(["", PROMPTS[0]])["encoder_hidden_states"]
    null = family.condition_encoder.null_condition_emb[0, 0]
    assert torch.equal(dropped[0], null.expand_as(dropped[0]))
    torch.testing.assert_close(dropped[1], embeds["encoder_hidden_states"][0], rtol=1e-5, atol=1e-5)


def test_the_batch_length_is_counted_exactly_in_bf16(model_dir):
    """A caption filling its tokens packs to more than 256 valid positions (lyrics, timbre, caption), which a bf16
    sum would round to an even number."""
    family = load_family(str(model_dir), options=FamilyOptions(audio_seconds=SECONDS, max_text_length=255))
    embeds = family.encode_prompts(["a long caption " * 40, "a calm piano"])
    length = int(embeds["encoder_attention_mask"].sum(dim=1).max())
    assert length > 256 and length % 2 == 1  # bf16 holds only even integers between 256 and 512
    half = {name: value.to(torch.bfloat16) for name, value in embeds.items()}
    assert family.denoiser_inputs(half, {})["encoder_hidden_states"].shape[1] == length


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])  # 1: unguided; 3: the pipeline's APG with the null condition
def test_sampling_equals_the_stock_pipeline(family, model_dir, guidance_scale):
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    ours = family.sample(family.denoiser, PROMPTS, generators, num_inference_steps=4, guidance_scale=guidance_scale)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    stock = stock_pipeline(model_dir)(
        PROMPTS,
        lyrics=["", ""],  # the pipeline's default lyrics="" fails for a list of prompts
        audio_duration=SECONDS,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="latent",
    ).audios
    assert ours.shape == (2, 16, 8)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    audio = family.generate(family.denoiser, PROMPTS[:1], generators[:1], num_inference_steps=2, guidance_scale=3.0)
    assert isinstance(audio, Audio) and audio.sample_rate == 48_000 and audio.waveforms.shape == (1, 16 * 1920)


def test_turbo_checkpoints_sample_unguided_as_the_pipeline(tmp_path):
    model_dir = build_tiny_ace_step(tmp_path / "turbo", is_turbo=True)
    family = load_family(str(model_dir), options=OPTIONS)
    guided = family.sample(family.denoiser, PROMPTS, [torch.Generator().manual_seed(3)] * 2, num_inference_steps=2,
                           guidance_scale=5.0)
    unguided = family.sample(family.denoiser, PROMPTS, [torch.Generator().manual_seed(3)] * 2, num_inference_steps=2,
                             guidance_scale=1.0)
    torch.testing.assert_close(guided, unguided, rtol=0, atol=0)


def test_unguided_trajectory_log_probs_are_recomputed_exactly_and_guided_ones_are_refused(family):
    """Flow-GRPO's on-policy check (ratio exactly 1); APG's momentum ties each guided step to the earlier ones."""
    sde_steps = torch.tensor([True, False, True])
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    trajectory = family.sample_trajectory(
        family.denoiser, PROMPTS, generators, num_inference_steps=3, guidance_scale=1.0, noise_level=0.7,
        sde_steps=sde_steps,
    )
    assert trajectory.latents.shape == (2, 4, 16, 8)
    sigmas = trajectory.sigmas
    for guidance_scale in (1.0, 3.0):
        inputs, guided = family.sampling_inputs(PROMPTS, guidance_scale)
        for step in sde_steps.nonzero().flatten().tolist():
            arguments = (
                family.denoiser, trajectory.latents[:, step], trajectory.latents[:, step + 1], sigmas[step].expand(2),
                sigmas[step + 1].expand(2), sigmas[1].expand(1), inputs, guided, guidance_scale, 0.7,
            )
            if guided:
                with pytest.raises(ValueError, match="APG guidance carries momentum"):
                    family.transition_log_prob(*arguments)
                continue
            log_prob = family.transition_log_prob(*arguments).log_prob
            assert torch.exp(log_prob - trajectory.log_probs[:, step]).sub(1).abs().max() < 1e-5


def test_guided_grpo_is_refused_when_the_config_loads():
    """The same limit as above, found before any model loads: the shipped ACE-Step GRPO config samples unguided."""
    from diffalign.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1]
    config, toy = root / "configs" / "toy_ace_music_grpo.yaml", f"model.pretrained={root / 'assets' / 'toy-t2m-ace'}"
    assert load_config(config, [toy]).method.grpo.guidance_scale == 1.0
    with pytest.raises(ConfigError, match=r"method.grpo.guidance_scale > 1 .* AceStepFamily .* change the setting"):
        load_config(config, [toy, "method.grpo.guidance_scale=3.0"])


# --- training draws and flow-matching DPO ---------------------------------------------------------------------------


def test_training_times_are_drawn_directly_from_the_density(family):
    """t = sigmoid(N(0, 1)) in [0, 1): the scheduler's one-level training grid would give t = 1 every time."""
    drawn = family.sample_timesteps(512, torch.device("cpu"), torch.Generator().manual_seed(5))
    expected = torch.sigmoid(torch.normal(0.0, 1.0, (512,), generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(drawn, expected.clamp(max=1 - 1e-7), rtol=1e-6, atol=1e-7)
    assert len(family.noise_scheduler.sigmas) == 1


def test_flow_dpo_loss_equals_the_formula(model_dir):
    """L = −log σ(−½β[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)]), e = mean (v̂ − (ε − x0))², x_t = t·ε + (1 − t)·x0,
    the transformer at timestep = timestep_r = t; one ε and t per pair."""
    family = load_family(str(model_dir), options=OPTIONS)
    policy = family.denoiser
    policy.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 8, generator=generator)
    embeds = family.encode_prompts(PROMPTS)
    batch = LatentPairBatch(chosen, rejected, embeds, noise_seeds=[11, 12])
    beta = 500.0
    scores, _ = DiffusionDPO(family, ReferenceDenoiser(policy, frozen_copy=False)).pair_scores(policy, batch)
    loss = compute_loss(scores, LossConfig(type=["sigmoid"], beta=beta)).loss
    noise, t = pair_noise(family, batch)  # the pair's own draws, shared by both members
    both_embeds = {key: torch.cat([value, value]) for key, value in embeds.items()}

    def errors(model) -> torch.Tensor:
        latents, epsilon, times = torch.cat([chosen, rejected]), torch.cat([noise, noise]), t.repeat(2)
        noisy = times.view(-1, 1, 1) * epsilon + (1 - times.view(-1, 1, 1)) * latents
        velocity = velocity_by_hand(model, family, noisy, times, both_embeds)
        return (velocity - (epsilon - latents)).pow(2).mean(dim=(1, 2))

    with torch.no_grad():
        policy_errors = errors(policy)
        policy.disable_adapters()
        reference_errors = errors(policy)
        policy.enable_adapters()
    inside = -0.5 * beta * ((policy_errors[:2] - reference_errors[:2]) - (policy_errors[2:] - reference_errors[2:]))
    expected = -F.logsigmoid(inside).mean()
    assert abs(expected.item() - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


# --- latents ----------------------------------------------------------------------------------------------------------


def test_audio_becomes_frames_first_vae_latents_and_decodes_back(model_dir, pairs_file, tmp_path):
    config = config_for(model_dir, pairs_file, tmp_path)
    recipe = DiffusionRecipe(config, make_accelerator(config.run))
    decoder = recipe.decoder
    assert (decoder.sample_rate, decoder.channels, decoder.num_samples) == (48_000, 2, 16 * 1920)
    batch = recipe.collate([recipe.train_dataset[index] for index in range(2)])
    batch["sample_ids"] = [0, 1]
    latents = recipe.latent_batch(batch)
    vae = recipe.family.vae
    with torch.no_grad():
        posterior = vae.encode(torch.cat([batch["chosen_audio"], batch["rejected_audio"]])).latent_dist
    seeds = recipe.noise_seeds(batch)
    draws = [torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(2 * s + 1)) for s in seeds]
    chosen = posterior.mean[:2] + posterior.std[:2] * torch.stack(draws)  # [B, 8, 16]: no scale, no shift
    assert latents.chosen_latents.shape == (2, 16, 8)
    torch.testing.assert_close(latents.chosen_latents, chosen.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # The latent cache maps one sample at a time, without a batch dimension.
    normalization = recipe.family.latent_normalization
    assert torch.equal(normalization.to_latents(chosen[0]), normalization.to_latents(chosen)[0])
    assert torch.equal(normalization.from_latents(normalization.to_latents(chosen[0])), chosen[0])
    with torch.no_grad():
        audio = recipe.family.decode(latents.chosen_latents)
        expected = vae.decode(chosen).sample.mean(dim=1)
    assert audio.sample_rate == 48_000
    torch.testing.assert_close(audio.waveforms, expected, rtol=1e-5, atol=1e-6)


# --- training steps and their outputs --------------------------------------------------------------------------


def test_a_lora_step_trains_and_loads_with_the_pipelines_load_lora_weights(family, model_dir, pairs_file, tmp_path):
    """Through the latent and prompt cache; alpha 16 ≠ rank 4, so a loader assuming alpha = rank would be 4× off."""
    cache = {"cache_dir": str(tmp_path / "cache")}
    config = config_for(model_dir, pairs_file, tmp_path, optim={"lr": 0.05}, data=cache)
    metrics = train(config)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-3) and metrics["grad_norm"] > 0
    lora_file = tmp_path / "final" / "pytorch_lora_weights.safetensors"
    with safe_open(lora_file, "pt") as handle:
        assert {key.split(".")[0] for key in handle.keys()} == {AceStepPipeline.transformer_name}  # noqa: SIM118

    trained = AceStepTransformer1DModel.from_pretrained(model_dir, subfolder="transformer")
    trained.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS))
    snapshot = load_file(sorted((tmp_path / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    assert not trained.load_state_dict(snapshot, strict=False).unexpected_keys
    pipeline = stock_pipeline(model_dir)
    pipeline.load_lora_weights(tmp_path / "final")

    embeds = family.encode_prompts(PROMPTS)
    latents = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        base = velocity_by_hand(family.denoiser, family, latents, t, embeds)
        expected = velocity_by_hand(trained, family, latents, t, embeds)
        loaded = velocity_by_hand(pipeline.transformer, family, latents, t, embeds)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)


def test_a_full_step_writes_a_transformer_that_loads_with_from_pretrained(model_dir, pairs_file, tmp_path):
    metrics = train(config_for(model_dir, pairs_file, tmp_path, model={"trainable": "full"}))
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    loaded = AceStepTransformer1DModel.from_pretrained(tmp_path / "final" / "transformer")
    saved = loaded.state_dict()
    snapshot = load_file(sorted((tmp_path / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    assert set(snapshot) == {name for name, _ in loaded.named_parameters()}
    assert all(torch.equal(saved[key], value) for key, value in snapshot.items())
    base = AceStepTransformer1DModel.from_pretrained(model_dir, subfolder="transformer").state_dict()
    assert any(not torch.equal(base[key], value) for key, value in snapshot.items())
    assert AceStepPipeline.from_pretrained(model_dir, transformer=loaded).transformer is loaded


def test_audio_seconds_is_refused_by_families_that_ignore_it(pairs_file, tmp_path):
    from diffalign.config import ConfigError

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableAudioPipeline"}))
    with pytest.raises(ConfigError, match="model.audio_seconds is set, but StableAudioFamily"):
        config_for(tmp_path, pairs_file, tmp_path)
