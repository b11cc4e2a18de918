"""DRAGON on a tiny SD1.5-like model: set construction on constructed rewards (instance-wise,
instance-to-distribution and leave-one-out distribution rewards), the DPO and KTO losses re-derived from the
generations, exemplar loading, audio decoding, bounded memory and a training run."""

import gc

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from helpers import diffusion_config, lora_policy, method_settings
from PIL import Image

from diffalign.config import ConfigError
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import TrainingContext
from diffalign.diffusion.methods.dragon import (
    GENERATION_STREAM,
    PAIR_STREAM,
    DistributionalRewardOptimization,
    DragonSettings,
    split_sets,
)
from diffalign.diffusion.methods.online import decode_samples, derived_seed, load_exemplars, sample_latents
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import train
from diffalign.losses import LossConfig, compute_loss
from diffalign.rewards import Audio

PROMPTS = ["a red circle", "a large blue square", "a small green circle"]


def dragon_config(**settings) -> DragonSettings:
    defaults = {"num_inference_steps": 3, "reward": "test_mean_red", "prompts": PROMPTS}
    return method_settings("dragon", **{**defaults, **settings})


def solid(colours: list[tuple[float, float, float]]) -> torch.Tensor:
    return torch.tensor(colours).view(-1, 3, 1, 1).expand(-1, 3, 4, 4).clone()


def test_split_sets_pairs_the_best_with_the_worst_of_each_prompt():
    positive, negative = split_sets(torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, 2.0, 1.0, 3.0]]))
    assert positive.tolist() == [[1, 2], [3, 0]]  # best first; equal rewards keep generation order
    assert negative.tolist() == [[0, 3], [2, 1]]  # worst first
    positive, negative = split_sets(torch.tensor([[0.2, 0.7, 0.4]]))
    assert positive.tolist() == [[1]] and negative.tolist() == [[0]]  # the middle sample is left out
    with pytest.raises(ValueError, match="samples >= 2"):
        split_sets(torch.tensor([[1.0], [2.0]]))


def test_best_worst_pairing_keeps_one_pair_per_prompt():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7], [2.0, 1.0, 2.0, 3.0, 1.0], [0.4, 0.4, 0.4, 0.4, 0.4]])
    positive, negative = split_sets(rewards, "best_worst")
    assert positive.tolist() == [[1], [3], [0]]
    # Equal worst rewards: the later generation is the negative, mirroring the positives' order, so a prompt
    # whose samples all tie still gets two distinct samples.
    assert negative.tolist() == [[0], [4], [4]]
    assert torch.equal(split_sets(rewards[:, :2], "best_worst")[0], split_sets(rewards[:, :2])[0])  # K = 2: same
    with pytest.raises(ValueError, match="best_worst"):
        split_sets(rewards, "top_bottom")
    with pytest.raises(ConfigError, match="pairing"):
        dragon_config(pairing="top_bottom")


def test_best_worst_pairs_are_each_prompts_best_and_worst_generation(sd_dir):
    """TangoFlux-style pairs from five generations per prompt, on the stand-in reward (mean red)."""
    family = load_family(str(sd_dir))
    method = DistributionalRewardOptimization(family, None, dragon_config(samples_per_prompt=5, pairing="best_worst"))
    seeds = [5, 6, 7]
    context = TrainingContext(step=0, seed=0, noise_seeds=seeds, encode=None)
    pairs, metrics = method.make_pairs(family.denoiser, {"caption": PROMPTS}, context)
    assert pairs.size == len(PROMPTS)

    repeated = [prompt for prompt in PROMPTS for _ in range(5)]
    generation_seeds = [derived_seed(seed, GENERATION_STREAM, k) for seed in seeds for k in range(5)]
    latents = sample_latents(family, family.denoiser, repeated, generation_seeds, num_inference_steps=3, guidance_scale=5.0)
    rewards = decode_samples(family, latents)[:, 0].mean(dim=(1, 2)).view(3, 5)
    grouped = latents.view(3, 5, *latents.shape[1:])
    rows = torch.arange(3)
    torch.testing.assert_close(pairs.chosen_latents, grouped[rows, rewards.argmax(1)])
    torch.testing.assert_close(pairs.rejected_latents, grouped[rows, rewards.argmin(1)])
    torch.testing.assert_close(metrics["dragon/reward_positive"], rewards.amax(1).mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["dragon/reward_negative"], rewards.amin(1).mean(), atol=1e-6, rtol=1e-5)
    assert pairs.noise_seeds == [derived_seed(seed, PAIR_STREAM, 0) for seed in seeds]


def test_instance_to_distribution_reward_prefers_samples_near_the_exemplars(sd_dir, tmp_path):
    """Per-sample FAD against red exemplars, negated: the reddish sample of each prompt is the positive."""
    exemplars = tmp_path / "exemplars"
    exemplars.mkdir()
    for index, colour in enumerate([(230, 20, 20), (200, 40, 30), (250, 10, 40)]):
        Image.new("RGB", (8, 8), colour).save(exemplars / f"{index}.png")
    family = load_family(str(sd_dir))
    method = DistributionalRewardOptimization(
        family,
        None,
        dragon_config(reward="test_fad", reward_options={"reduction": "per_sample"}, exemplars=str(exemplars)),
    )
    samples = solid([(0.1, 0.2, 0.9), (0.8, 0.1, 0.1), (0.9, 0.2, 0.2), (0.2, 0.9, 0.2)])
    rewards = method.reward(samples, ["a", "a", "b", "b"])
    assert (rewards <= 0).all()  # distances, negated
    positive, negative = split_sets(rewards.view(2, 2))
    assert positive.tolist() == [[1], [0]] and negative.tolist() == [[0], [1]]


def test_distribution_reward_is_attributed_by_leave_one_out(sd_dir):
    """Vendi of the whole batch: a duplicate adds less diversity than a distinct sample, so it is the negative."""
    family = load_family(str(sd_dir))
    method = DistributionalRewardOptimization(
        family, None, dragon_config(reward="test_vendi", reward_options={"reduction": "leave_one_out"})
    )
    red, blue, green = (0.9, 0.1, 0.1), (0.1, 0.1, 0.9), (0.1, 0.9, 0.1)
    rewards = method.reward(solid([red, blue, red, green]), ["a", "a", "b", "b"])
    positive, negative = split_sets(rewards.view(2, 2))
    assert positive.tolist() == [[1], [1]] and negative.tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="leave_one_out"):
        DistributionalRewardOptimization(family, None, dragon_config(reward="test_vendi"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto"])
def test_loss_on_generated_sets_equals_the_formula(sd_dir, loss_type):
    family = load_family(str(sd_dir))
    policy = lora_policy(family, seed=3)
    method = DistributionalRewardOptimization(
        family, ReferenceDenoiser(policy, frozen_copy=False), dragon_config(samples_per_prompt=4)
    )
    seeds = [11, 22, 33]
    context = TrainingContext(step=0, seed=0, noise_seeds=seeds, encode=None)
    pairs, metrics = method.make_pairs(policy, {"caption": PROMPTS, "sample_ids": [0, 1, 2]}, context)
    scores, _ = method.pair_scores(policy, pairs)
    beta = 5000.0 if loss_type == "sigmoid" else 2000.0
    loss = compute_loss(scores, LossConfig(type=[loss_type], beta=beta)).loss

    # The generations: the stock DDIM pipeline, sample k of prompt i seeded from (seed_i, stream, k).
    pipeline = StableDiffusionPipeline.from_pretrained(
        sd_dir, unet=policy, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    generators = [
        torch.Generator().manual_seed(derived_seed(seed, GENERATION_STREAM, k)) for seed in seeds for k in range(4)
    ]
    with torch.no_grad():
        latents = pipeline(
            [prompt for prompt in PROMPTS for _ in range(4)],
            generator=generators,
            num_inference_steps=3,
            guidance_scale=5.0,
            output_type="latent",
        ).images
        images = (pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    rewards = images[:, 0].mean(dim=(1, 2)).view(3, 4)
    order = rewards.argsort(dim=1, descending=True)
    grouped = latents.view(3, 4, 4, 8, 8)
    chosen = torch.cat([grouped[i, order[i, :2]] for i in range(3)])
    rejected = torch.cat([grouped[i, order[i].flip(0)[:2]] for i in range(3)])
    torch.testing.assert_close(pairs.chosen_latents, chosen)
    torch.testing.assert_close(pairs.rejected_latents, rejected)
    torch.testing.assert_close(metrics["dragon/reward"], rewards.mean(), atol=1e-6, rtol=1e-5)

    noises, timesteps = [], []
    for pair in range(6):
        generator = torch.Generator().manual_seed(derived_seed(seeds[pair // 2], PAIR_STREAM, pair % 2))
        noises.append(torch.randn(4, 8, 8, generator=generator))
        timesteps.append(torch.randint(0, 1000, (1,), generator=generator))
    noise, timesteps = torch.stack(noises), torch.cat(timesteps)
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    embeds = family.encode_prompts([p for p in PROMPTS for _ in range(2)])["prompt_embeds"]

    def error(model, clean):
        noisy = alphas.sqrt() * clean + (1 - alphas).sqrt() * noise
        return ((model(noisy, timesteps, encoder_hidden_states=embeds).sample - noise) ** 2).mean(dim=(1, 2, 3))

    with torch.no_grad():
        policy_w, policy_l = error(policy, chosen), error(policy, rejected)
        policy.disable_adapters()
        reference_w, reference_l = error(policy, chosen), error(policy, rejected)
        policy.enable_adapters()
    ratio_w, ratio_l = -0.5 * (policy_w - reference_w), -0.5 * (policy_l - reference_l)
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * (ratio_w - ratio_l)).mean()
    else:  # Diffusion-KTO on the two sets, z0 = max(0, batch mean log-ratio)
        z0 = torch.cat([ratio_w, ratio_l]).mean().clamp(min=0)
        desirable, undesirable = 1 - torch.sigmoid(beta * (ratio_w - z0)), 1 - torch.sigmoid(beta * (z0 - ratio_l))
        expected = torch.cat([desirable, undesirable]).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=2e-5, rtol=1e-4)


def test_exemplars_from_texts_images_and_audio(tmp_path):
    texts = tmp_path / "captions.txt"
    texts.write_text("calm piano\n\nupbeat drums\n")
    assert load_exemplars(str(texts), "method.dragon.exemplars") == ["calm piano", "upbeat drums"]
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (5, 4), (index * 100, 0, 0)).save(images / f"{index}.png")
    loaded = load_exemplars(str(images), "method.dragon.exemplars")
    assert [image.size for image in loaded] == [(5, 4), (5, 4)]
    audio = tmp_path / "audio"
    audio.mkdir()
    soundfile.write(audio / "a.wav", np.stack([np.full(800, 0.5), np.zeros(800)], axis=1), 8000)
    soundfile.write(audio / "b.wav", np.full(600, -0.25), 8000)
    clips = load_exemplars(str(audio), "method.dragon.exemplars")
    assert isinstance(clips, Audio) and clips.sample_rate == 8000 and clips.waveforms.shape == (2, 600)
    torch.testing.assert_close(clips.waveforms[0], torch.full((600,), 0.25))  # stereo mixed to mono
    Image.new("RGB", (2, 2)).save(audio / "stray.png")
    with pytest.raises(ValueError, match="not both"):
        load_exemplars(str(audio), "method.dragon.exemplars")
    with pytest.raises(FileNotFoundError, match="method.dragon.exemplars"):
        load_exemplars(str(tmp_path / "missing"), "method.dragon.exemplars")


def test_audio_families_decode_to_one_audio_batch():
    class WaveFamily:
        def decode(self, latents):
            return Audio(latents.flatten(1), 16_000)

    decoded = decode_samples(WaveFamily(), torch.arange(30.0).view(5, 2, 3), batch_size=2)
    assert isinstance(decoded, Audio) and decoded.waveforms.shape == (5, 6) and decoded.sample_rate == 16_000
    assert torch.equal(decoded.waveforms, torch.arange(30.0).view(5, 6))


def live_tensor_count() -> int:
    gc.collect()
    return sum(1 for item in gc.get_objects() if torch.is_tensor(item))


def test_generation_does_not_grow_memory_over_steps(sd_dir):
    family = load_family(str(sd_dir))
    policy = lora_policy(family, seed=3)
    method = DistributionalRewardOptimization(family, ReferenceDenoiser(policy, frozen_copy=False), dragon_config())
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    counts = []
    for step in range(6):
        context = TrainingContext(step=step, seed=0, noise_seeds=[step, 50 + step], encode=None)
        pairs, _ = method.make_pairs(policy, {"caption": PROMPTS[:2]}, context)
        scores, _ = method.pair_scores(policy, pairs)
        compute_loss(scores, LossConfig(beta=5000.0)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del pairs, scores
        counts.append(live_tensor_count())
    assert counts[-1] <= counts[1], counts


def test_a_training_run_from_prompts_alone(sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    dragon = {"prompts_file": str(prompts), "reward": "test_mean_red", "num_inference_steps": 2}
    config = diffusion_config(
        sd_dir, None, tmp_path / "run", steps=2,
        method={"name": "dragon", "dragon": dragon},
        eval={"prompts": PROMPTS, "reward": "test_mean_red", "num_inference_steps": 2},
    )
    metrics = train(config)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["dragon/reward_positive"] >= metrics["dragon/reward_negative"]
    assert 0.0 <= metrics["eval/win_rate"] <= 1.0
