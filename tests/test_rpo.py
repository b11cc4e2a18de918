"""λ-Harmonic RPO on a tiny SD1.5-like model and a tiny CLIP: the reward and the Bradley–Terry labels against
their formulas, the loss against the official ``train.py`` formula (every option), subject loading, and early
stopping keeping the best validated checkpoint."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from helpers import diffusion_config, method_settings
from PIL import Image
from tiny_pipelines import text_config, tiny_tokenizer
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.methods.online import derived_seed
from diffalign.diffusion.methods.rpo import (
    NEGATIVE_STREAM,
    REJECTED_NOISE_STREAM,
    RewardPreferenceOptimization,
    harmonic_reward,
    load_subject,
)
from diffalign.diffusion.models import make_trainable
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.trainer import train
from diffalign.losses import LossConfig, compute_loss

TEMPLATES = ["a [V] circle", "a red [V]"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(directory)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = text_config(16, len(tokenizer)).to_dict()
    config = CLIPConfig(text_config=text, vision_config=dict(**tower, image_size=16, patch_size=4), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(1)
    names = []
    for index in range(3):
        names.append(f"{index:02d}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(directory / names[-1])
    (directory / "prompts.json").write_text(json.dumps({"templates": TEMPLATES, "identifier": "sks", "images": names}))
    return directory


def rpo_settings(subject_dir: Path, clip_dir: Path, **settings) -> dict:
    defaults = {
        "subject_dir": str(subject_dir),
        "reward_model": str(clip_dir),
        "negatives_per_prompt": 2,
        "sampling_steps": 2,
        "guidance_scale": 3.0,
        "validation_images": 2,
    }
    return {**defaults, **settings}


def rpo_config(subject_dir: Path, clip_dir: Path, **settings) -> Any:
    return method_settings("rpo", **rpo_settings(subject_dir, clip_dir, **settings))


def cosines(clip_dir: Path, images: torch.Tensor, texts: list[str], reference: torch.Tensor):
    """Image–image (mean over the reference) and image–text cosines from the raw CLIPModel."""
    from transformers import AutoTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)

    def unit(features):  # transformers 5 returns an output object whose pooler_output is the projection
        return F.normalize(getattr(features, "pooler_output", features), dim=-1)

    def embed(batch):
        pixels = processor(images=batch.float() * 255, return_tensors="pt")["pixel_values"]
        return unit(model.get_image_features(pixel_values=pixels))

    with torch.no_grad():
        image, ref = embed(images), embed(reference)
        text = unit(model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")))
    return (image @ ref.T).mean(dim=1), (image * text).sum(dim=1)


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])).permute(0, 3, 1, 2)


@pytest.mark.parametrize("rescale", [True, False])
def test_harmonic_reward_follows_the_formula(sd_dir, clip_dir, subject_dir, rescale):
    family = load_family(str(sd_dir))
    method = RewardPreferenceOptimization(
        family, ReferenceDenoiser(family.denoiser, frozen_copy=True), rpo_config(subject_dir, clip_dir)
    )
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a circle", "a red", "a circle", "a red circle"]
    reference = as_tensor(method.subject.images)
    image_similarity, text_similarity = cosines(clip_dir, images, prompts, reference)
    if rescale:  # the official RewardModel maps cosines to [0, 1]
        image_similarity, text_similarity = (image_similarity + 1) / 2, (text_similarity + 1) / 2
    for lam in (0.0, 0.3, 1.0):
        expected = 1 / (lam / (image_similarity + 1e-8) + (1 - lam) / (text_similarity + 1e-8))
        reward = harmonic_reward(method.encoder, method.subject_embeddings, images, prompts, lam, rescale)
        torch.testing.assert_close(reward, expected, atol=1e-5, rtol=1e-4)


def test_subject_loading_and_its_errors(subject_dir, tmp_path):
    subject = load_subject(str(subject_dir), [], None)
    assert subject.prompts() == ["a sks circle", "a red sks"]
    assert subject.reward_prompts() == ["a circle", "a red"]
    assert len(subject.images) == 3
    with pytest.raises(ValueError, match="lack the \\[V\\] placeholder"):
        load_subject(str(subject_dir), ["a dog"], None)
    (tmp_path / "0.png").write_bytes((subject_dir / "00.png").read_bytes())
    with pytest.raises(ValueError, match="identifier"):
        load_subject(str(tmp_path), TEMPLATES, None)
    assert load_subject(str(tmp_path), TEMPLATES, "zwx").prompts()[0] == "a zwx circle"


def training_config(sd_dir: Path, clip_dir: Path, subject_dir: Path, output: Path, **rpo) -> DiffusionTrainConfig:
    return diffusion_config(
        sd_dir, None, output, steps=4,
        method={"name": "rpo", "rpo": rpo_settings(subject_dir, clip_dir, **rpo)},
        data={"random_flip": False},
        loss={"type": ["sigmoid", "sft"], "weights": [1.0, 2.0], "beta": 2.0},
        optim={"lr": 2e-2},
        run={"seed": 3, "eval_every": 1, "checkpoint_every": 100},
    )



@pytest.mark.parametrize("label_sampling", ["soft", "bernoulli"])
def test_labels_are_bradley_terry_probabilities_of_the_harmonic_reward(
    sd_dir, clip_dir, subject_dir, tmp_path, label_sampling
):
    config = training_config(sd_dir, clip_dir, subject_dir, tmp_path, label_lambda=0.4, label_sampling=label_sampling)
    family = load_family(str(sd_dir))
    method = RewardPreferenceOptimization(family, ReferenceDenoiser(family.denoiser, frozen_copy=True), config.method.rpo)
    data = method.training_data(config, None)
    dataset, stats = data.dataset, data.stats
    assert len(dataset) == 4 and stats["pairs"] == 4

    # The negatives: the stock pipeline (pretrained weights), two per template, seeded from the run's seed.
    pipeline = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(derived_seed(3, NEGATIVE_STREAM, index)) for index in range(4)]
    with torch.no_grad():
        negatives = pipeline(
            ["a sks circle", "a sks circle", "a red sks", "a red sks"],
            generator=generators,
            num_inference_steps=2,
            guidance_scale=3.0,
            output_type="pt",
        ).images
    prompts = ["a circle", "a circle", "a red", "a red"]
    negative_rewards = harmonic_reward(method.encoder, method.subject_embeddings, negatives, prompts, 0.4)
    subjects = [method.subject.images[index % 3] for index in range(4)]  # pair j of template p: image (2p + j) mod 3
    subject_rewards = harmonic_reward(method.encoder, method.subject_embeddings, as_tensor(subjects), prompts, 0.4)
    expected = torch.sigmoid(subject_rewards - negative_rewards)
    torch.testing.assert_close(dataset.probabilities, expected, atol=1e-5, rtol=1e-4)

    item = dataset[1]
    assert item["caption"] == "a sks circle"
    torch.testing.assert_close(item["chosen_pixels"], as_tensor([subjects[1]])[0] * 2 - 1)
    labels = torch.tensor([dataset[epoch * 4 + 2]["label"] for epoch in range(400)])
    if label_sampling == "soft":
        assert torch.all(labels == dataset.probabilities[2])
    else:  # a fresh Bernoulli(p) draw at every read, reproducible per sample id
        assert set(labels.tolist()) <= {0.0, 1.0} and dataset[6]["label"] == dataset[6]["label"]
        assert abs(labels.mean().item() - dataset.probabilities[2].item()) < 0.08


@pytest.mark.parametrize(
    ("share_noise", "reference_prompt"), [(True, None), (False, None), (False, "a [V] photo")]
)
def test_loss_equals_the_official_formula(sd_dir, clip_dir, subject_dir, share_noise, reference_prompt):
    """similar_loss + preference_loss of andrew-miao/RPO train.py, with soft labels, written out here."""
    family = load_family(str(sd_dir))
    policy = family.denoiser
    make_trainable(policy, DiffusionTrainConfig().model)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    method = RewardPreferenceOptimization(
        family,
        ReferenceDenoiser(policy, frozen_copy=False),
        rpo_config(subject_dir, clip_dir, share_noise=share_noise, reference_prompt=reference_prompt),
    )
    prompts = ["a sks circle", "a red sks", "a sks circle"]
    seeds = [7, 8, 9]
    label = torch.tensor([0.2, 0.9, 0.6])
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = LatentPairBatch(
        chosen_latents=latents[:3],
        rejected_latents=latents[3:],
        prompt_embeds=family.encode_prompts(prompts),
        label=label,
        noise_seeds=seeds,
    )
    scores, _ = method.pair_scores(policy, batch)
    loss = compute_loss(scores, LossConfig(type=["sigmoid", "sft"], weights=[1.0, 2.0], beta=2.0)).loss

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(4, 8, 8, generator=generator), torch.randint(0, 1000, (1,), generator=generator)

    subject_draws = [draw(seed) for seed in seeds]
    generated_draws = subject_draws if share_noise else [draw(derived_seed(s, REJECTED_NOISE_STREAM)) for s in seeds]
    noise = torch.stack([n for n, _ in subject_draws + generated_draws])
    timesteps = torch.cat([t for _, t in subject_draws + generated_draws])
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    generated_prompts = family.encode_prompts(prompts)["prompt_embeds"]
    subject_prompts = generated_prompts
    if reference_prompt is not None:
        subject_prompts = family.encode_prompts(["a sks photo"] * 3)["prompt_embeds"]
    embeds = torch.cat([subject_prompts, generated_prompts])
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    with torch.no_grad():
        model_losses = ((policy(noisy, timesteps, encoder_hidden_states=embeds).sample - noise) ** 2).mean(dim=(1, 2, 3))
        policy.disable_adapters()
        ref_losses = ((policy(noisy, timesteps, encoder_hidden_states=embeds).sample - noise) ** 2).mean(dim=(1, 2, 3))
        policy.enable_adapters()
    model_losses_ref, model_losses_gen = model_losses.chunk(2)
    ref_losses_ref, ref_losses_gen = ref_losses.chunk(2)
    kl_diff = (ref_losses_ref - model_losses_ref) - (ref_losses_gen - model_losses_gen)
    similar_loss = model_losses_ref.mean()
    preference_loss = -(label * F.logsigmoid(kl_diff) + (1 - label) * F.logsigmoid(-kl_diff)).mean()
    torch.testing.assert_close(loss.detach(), similar_loss + preference_loss, atol=1e-6, rtol=1e-5)


def test_early_stopping_keeps_the_best_validated_checkpoint(sd_dir, clip_dir, subject_dir, tmp_path):
    config = training_config(sd_dir, clip_dir, subject_dir, tmp_path / "run")
    metrics = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = {r["step"]: r["eval/rpo/validation_reward"] for r in records if "eval/rpo/validation_reward" in r}
    assert sorted(validated) == [1, 2, 3, 4]
    assert len(set(validated.values())) > 1  # training moved the model
    assert metrics["eval/rpo/validation_reward_base"] == records[-1]["eval/rpo/validation_reward_base"]

    # The saved best model, validated again from disk, scores the best of the logged rewards.
    family = load_family(str(sd_dir))
    family.denoiser.load_lora_adapter(
        str(tmp_path / "run" / "best"), prefix="unet", weight_name="pytorch_lora_weights.safetensors"
    )
    method = RewardPreferenceOptimization(family, ReferenceDenoiser(family.denoiser, frozen_copy=False), config.method.rpo)
    method.seed = config.run.seed
    best = method.validation_reward(family.denoiser)
    assert best == pytest.approx(max(validated.values()), rel=1e-5, abs=1e-6)
