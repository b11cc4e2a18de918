"""Build the toy text-to-image world from procedurally drawn scenes, on a CPU, reproducibly from a seed.

Stages, each small enough to read on its own:

1. a ``CLIPTokenizer`` whose vocab/merges are learnt (BPE) from the caption vocabulary;
2. a toy ``CLIPModel`` trained contrastively on scenes and (full or partial) captions;
3. an ``AutoencoderKL`` (32×32×3 → 8×8×4) trained as an autoencoder with a small KL weight;
4. a ``UNet2DConditionModel`` (ε-prediction, SD1.5's noise schedule) on the frozen toy-CLIP text tower,
   with 10% empty captions so that classifier-free guidance works;
5. the assembled ``StableDiffusionPipeline`` (DDIM scheduler), saved in the standard layout;
6. Pick-a-Pic-style preference pairs sampled from that pipeline and labelled by :func:`toy_reward`
   (with ties and label noise), plus the checker's accuracy on those samples;
7. a small subject set for subject-driven tuning.

Run it with ``python -m diffalign.toy build t2i``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from torch import Tensor, nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
    CLIPTokenizer,
)

from diffalign.diffusion.families.base import DiffusionFamily
from diffalign.diffusion.families.stable_diffusion import StableDiffusionFamily
from diffalign.toy import t2i
from diffalign.toy.bpe import train_bpe
from diffalign.toy.prompts import write_prompt_files
from diffalign.toy.stages import (
    BuildStages,
    check_build_settings,
    cosine_schedule,
    log_interval,
    unit_variance_scaling_factor,
    write_build_info,
)
from diffalign.toy.t2i import COLOURS, RESOLUTION, SHAPES, SIZES, SceneBatch

log = logging.getLogger(__name__)

MAX_TOKENS = 77  # as SD1.5, so code written for real pipelines pads prompts the same way
TEXT_WIDTH = 64
# Characters that get a token of their own, so that any prompt (identifiers like "sks", "[V]") tokenizes.
TOKENIZER_ALPHABET = list(string.ascii_lowercase + string.digits + "[]().,;:'\"-!?&/")
# SD1.5's noise schedule (scheduler_config.json of stable-diffusion-v1-5/stable-diffusion-v1-5).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


@dataclass
class ImageBuildSettings:
    """What the toy image builders share: the scenes the denoiser learns from, its captions, and how the
    preference data are sampled from the built pipeline and labelled."""

    scenes: int = 24_000  # rendered captioned scenes (the t2i build also trains CLIP on them)
    empty_caption_fraction: float = 0.1  # unconditional training for classifier-free guidance
    partial_caption_fraction: float = 0.15  # captions without size and/or colour ("a red circle", "a circle")
    train_images_per_prompt: int = 32
    heldout_images_per_prompt: int = 16
    sampling_steps: int = 20
    guidance_scale: float = 4.0
    tie_fraction: float = 0.05  # pairs with the closest rewards get label 0.5
    label_flip_fraction: float = 0.1  # of the other pairs, labels flipped at random
    threads: int = 1  # a busy shared CPU runs small models faster on one thread than on contended two

    def __post_init__(self) -> None:
        check_build_settings(self, paired=("train_images_per_prompt", "heldout_images_per_prompt"), unit="images")


@dataclass
class DenoiserTraining:
    """How long and how fast a toy denoiser trains; the weights kept are the EMA of the trained ones."""

    steps: int
    batch_size: int
    learning_rate: float
    ema_decay: float
    warmup_steps: int = 100


@dataclass
class T2IBuildConfig(ImageBuildSettings):
    """How much of everything to train and sample. The defaults build the shipped assets (see
    ``assets/README.md`` for their time and size); tiny values give a quick smoke build."""

    autoencoder_scenes: int = 8_000  # scenes for the VAE, a third of them off-palette or two-tone
    clip_steps: int = 500
    clip_batch_size: int = 256
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2500
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    unet_ema_decay: float = 0.998
    subject_images: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.unet_ema_decay < 1:
            raise ValueError(f"unet_ema_decay must be in [0, 1), got {self.unet_ema_decay!r}")

    @property
    def unet_training(self) -> DenoiserTraining:
        return DenoiserTraining(self.unet_steps, self.unet_batch_size, self.unet_learning_rate, self.unet_ema_decay)


# ------------------------------------------------------------------------------------------ text side


def build_tokenizer(directory: Path) -> CLIPTokenizer:
    """Learn BPE merges on the caption vocabulary and save vocab.json/merges.txt (+ tokenizer.json)."""
    tokenizer = CLIPTokenizer()  # CLIP's normalizer and pre-tokenizer around an empty BPE model
    words = ["a", *SIZES, *COLOURS, *SHAPES]
    # Each character also appears as a word of its own so that it gets an end-of-word token ("s</w>").
    train_bpe(
        tokenizer.backend_tokenizer,
        [" ".join(words + TOKENIZER_ALPHABET)],
        vocab_size=1000,  # more than enough: merging stops once every word is one token
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        alphabet=TOKENIZER_ALPHABET,
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.model.save(str(directory))
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(directory)
    for word in words:
        if len(tokenizer.tokenize(word)) != 1:
            raise RuntimeError(f"tokenizer splits the vocabulary word {word!r}: {tokenizer.tokenize(word)}")
    return tokenizer


def caption_variants() -> list[tuple[str, str | None, str | None]]:
    """Every (shape, colour, size) a caption can name; ``None`` where it leaves the attribute out."""
    return [(s, c, z) for s in SHAPES for c in (*COLOURS, None) for z in (*SIZES, None)]


def _consistent(variants: list[tuple], scenes: SceneBatch) -> Tensor:
    """``[len(variants), len(scenes)]``: does caption variant v truly describe scene i."""
    def ids(values: list, vocabulary: tuple | dict) -> Tensor:
        return torch.tensor([list(vocabulary).index(v) if v is not None else -1 for v in values])

    scene_attributes = (ids(scenes.shapes, SHAPES), ids(scenes.colours, COLOURS), ids(scenes.sizes, SIZES))
    variant_attributes = (
        ids([v[0] for v in variants], SHAPES), ids([v[1] for v in variants], COLOURS), ids([v[2] for v in variants], SIZES)
    )
    table = torch.ones(len(variants), len(scenes.shapes), dtype=torch.bool)
    for asked, actual in zip(variant_attributes, scene_attributes):
        table &= (asked[:, None] == -1) | (asked[:, None] == actual[None, :])
    return table


def _tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> Tensor:
    return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


def _to_model_range(images: Tensor) -> Tensor:
    return images * 2 - 1


def train_clip(tokenizer: CLIPTokenizer, scenes: SceneBatch, config: T2IBuildConfig, generator: torch.Generator) -> CLIPModel:
    """A tiny CLIP trained with the symmetric contrastive loss of Radford et al. (2021, arXiv 2103.00020).

    Captions may be partial ("a circle" describes every circle), so a batch has several true captions per
    image: each direction's cross-entropy uses a target spread evenly over all true matches. The text side
    scores every caption variant each step (63 short texts), the image side a batch of scenes.
    """
    clip_config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=RESOLUTION,
            patch_size=4,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    clip = CLIPModel(clip_config)
    variants = caption_variants()
    input_ids = _tokenize(tokenizer, [t2i.make_caption(*variant) for variant in variants])
    consistent = _consistent(variants, scenes)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = cosine_schedule(optimizer, config.clip_steps, warmup=50)
    clip.train()
    for step in range(config.clip_steps):
        indices = torch.randint(len(scenes.images), (config.clip_batch_size,), generator=generator)
        pixel_values = _to_model_range(scenes.images[indices])
        logits = clip(input_ids=input_ids, pixel_values=pixel_values).logits_per_image  # [images, variants]
        match = consistent[:, indices].T.float()
        image_to_text = F.cross_entropy(logits, match / match.sum(1, keepdim=True))
        present = match.sum(0) > 0  # variants with at least one true image in the batch
        text_to_image = F.cross_entropy(logits.T[present], (match.T / match.sum(0)[:, None].clamp_min(1))[present])
        loss = (image_to_text + text_to_image) / 2
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))  # as CLIP: temperature capped at 100
        if step % log_interval(config.clip_steps) == 0 or step == config.clip_steps - 1:
            log.info("  clip step %d/%d  loss %.3f", step + 1, config.clip_steps, loss.item())
    return clip.eval()


def save_clip(clip: CLIPModel, tokenizer: CLIPTokenizer, directory: Path) -> None:
    """Save the toy CLIP with a processor that leaves 32×32 images at their size."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION},
        crop_size={"height": RESOLUTION, "width": RESOLUTION},
        image_mean=[0.5, 0.5, 0.5],  # the toy CLIP sees images in [-1, 1], like the VAE
        image_std=[0.5, 0.5, 0.5],
    )
    clip.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The pipeline's text encoder: the toy CLIP's text tower, as SD1.5 uses CLIP ViT-L/14's."""
    tower = clip.text_model
    if isinstance(tower, CLIPTextModel):  # transformers >= 5.2x: the tower is already a CLIPTextModel
        return copy.deepcopy(tower).eval()
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.text_model.load_state_dict(tower.state_dict())
    return text_encoder.eval()


# ------------------------------------------------------------------------------------------ autoencoder


def train_vae(scenes: SceneBatch, config: T2IBuildConfig, generator: torch.Generator) -> AutoencoderKL:
    """An SD-style KL autoencoder, 32×32×3 ↔ 8×8×4, trained on MSE plus a small KL term (no GAN/LPIPS:
    flat-coloured shapes need neither)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.vae_steps, warmup=50)
    vae.train()
    for step in range(config.vae_steps):
        indices = torch.randint(len(scenes.images), (config.vae_batch_size,), generator=generator)
        images = _to_model_range(scenes.images[indices])
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = (_foreground_weights(images) * (reconstruction - images) ** 2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + config.vae_kl_weight * kl
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % log_interval(config.vae_steps) == 0 or step == config.vae_steps - 1:
            log.info("  vae step %d/%d  mse %.5f  kl %.2f", step + 1, config.vae_steps, mse.item(), kl.item())
    return vae.eval()


def _foreground_weights(images: Tensor, foreground_weight: float = 10.0) -> Tensor:
    """``[B,1,H,W]`` loss weights: 1 on the background, up to ``foreground_weight`` on the shape.

    A small shape covers a few percent of the pixels; without the weight the autoencoder learns the
    background long before the shape's colour. The background is each image's median border colour.
    """
    border = torch.cat((images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]), dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    distance = (images - background).norm(dim=1, keepdim=True)
    return 1 + (foreground_weight - 1) * (distance / 0.5).clamp(max=1)


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std ``[N,4,8,8]`` of each image (unscaled)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(_to_model_range(images[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------------------- unet


def make_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """A tiny SD-layout UNet for 8×8×4 latents (~1.5M parameters)."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=16,  # 2–4 heads: many 4-wide heads cost more on a CPU and gain nothing here
    )


def training_captions(scenes: SceneBatch, config: ImageBuildSettings, generator: torch.Generator) -> list[str]:
    """Each scene's caption: full, partial (size and/or colour left out) or empty."""
    draw = torch.rand(len(scenes.shapes), generator=generator).tolist()
    drop = torch.randint(3, (len(scenes.shapes),), generator=generator).tolist()  # 0: size, 1: colour, 2: both
    captions = []
    for i, (shape, colour, size) in enumerate(zip(scenes.shapes, scenes.colours, scenes.sizes)):
        if draw[i] < config.empty_caption_fraction:
            captions.append("")
        elif draw[i] < config.empty_caption_fraction + config.partial_caption_fraction:
            captions.append(
                t2i.make_caption(shape, None if drop[i] >= 1 else colour, None if drop[i] != 1 else size)
            )
        else:
            captions.append(t2i.make_caption(shape, colour, size))
    return captions


def train_denoiser(
    family: DiffusionFamily,
    denoiser: nn.Module,
    latent_means: Tensor,
    latent_stds: Tensor,
    text_inputs: dict[str, Tensor],
    text_index: Tensor,
    training: DenoiserTraining,
    generator: torch.Generator,
) -> nn.Module:
    """Denoising training with the family's own objective (noise levels, noising, target and denoiser call, as
    the alignment methods use them), on posterior samples of the scaled VAE latents; ``text_inputs`` hold the
    denoiser's conditioning per distinct caption and ``text_index`` each scene's caption. Returns the EMA
    weights."""
    ema_denoiser = copy.deepcopy(denoiser).requires_grad_(False)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=training.learning_rate, weight_decay=0.01)
    schedule = cosine_schedule(optimizer, training.steps, warmup=training.warmup_steps)
    name = type(denoiser).__name__
    denoiser.train()
    for step in range(training.steps):
        indices = torch.randint(len(latent_means), (training.batch_size,), generator=generator)
        latents = latent_means[indices] + latent_stds[indices] * torch.randn(
            latent_means[indices].shape, generator=generator
        )
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = family.sample_timesteps(len(indices), latents.device, generator)
        inputs = {key: value[text_index[indices]] for key, value in text_inputs.items()}
        noisy = family.add_noise(latents, noise, timesteps)
        prediction = family.predict(denoiser, noisy, timesteps, inputs)
        loss = F.mse_loss(prediction, family.target(latents, noise, timesteps))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema_denoiser.parameters(), denoiser.parameters()):
                ema_parameter.lerp_(parameter, 1 - training.ema_decay)
        if step % log_interval(training.steps) == 0 or step == training.steps - 1:
            log.info("  %s step %d/%d  loss %.4f", name, step + 1, training.steps, loss.item())
    return ema_denoiser.eval()


def train_unet(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latent_means: Tensor,
    latent_stds: Tensor,
    captions: list[str],
    config: T2IBuildConfig,
    generator: torch.Generator,
) -> UNet2DConditionModel:
    """ε-prediction denoising training as SD (Rombach et al., 2022), on scaled VAE latents with the
    frozen text tower's last hidden states as cross-attention context. Returns the EMA weights."""
    texts = sorted(set(captions))
    with torch.no_grad():
        context = text_encoder(_tokenize(tokenizer, texts))[0]  # [texts, 77, 64]
    text_index = torch.tensor([texts.index(caption) for caption in captions])
    family = StableDiffusionFamily.from_modules(noise_scheduler=DDPMScheduler(**NOISE_SCHEDULE))
    unet = make_unet(text_encoder.config.hidden_size)
    return train_denoiser(
        family,
        unet,
        latent_means,
        latent_stds,
        {"encoder_hidden_states": context},
        text_index,
        config.unet_training,
        generator,
    )


def make_scheduler() -> DDIMScheduler:
    """DDIM with SD1.5's schedule and its inference conventions (``steps_offset=1``, no clipping)."""
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ------------------------------------------------------------------------------------- preference data


# A loaded toy pipeline, or one with some call arguments bound (functools.partial): called with prompts,
# num_inference_steps, guidance_scale, generator and output_type="pt".
ImagePipeline = Callable[..., Any]


@torch.no_grad()
def sample_images(
    pipeline: ImagePipeline,
    prompts: list[str],
    generator: torch.Generator,
    config: ImageBuildSettings,
    batch_size: int = 256,
) -> Tensor:
    """``[N,3,32,32]`` images in [0,1] for ``prompts``, quantised to 8 bits as they will be stored."""
    batches = []
    for start in range(0, len(prompts), batch_size):
        batches.append(
            pipeline(
                prompts[start : start + batch_size],
                num_inference_steps=config.sampling_steps,
                guidance_scale=config.guidance_scale,
                generator=generator,
                output_type="pt",
            ).images
        )
    return (torch.cat(batches) * 255).round() / 255


def png_bytes(image: Tensor) -> bytes:
    """A ``[3,H,W]`` image in [0,1] as PNG bytes."""
    array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def preference_labels(
    reward_0: Tensor, reward_1: Tensor, tie_fraction: float, flip_fraction: float, generator: torch.Generator
) -> Tensor:
    """``label_0`` per pair: 1.0 if image 0 has the higher reward, 0.0 if lower, 0.5 for the
    ``tie_fraction`` of pairs with the closest rewards; then ``flip_fraction`` of the non-tie labels are
    flipped at random, as careless human raters would."""
    gap = (reward_0 - reward_1).abs()
    tie_count = round(tie_fraction * len(gap))
    ties = torch.zeros(len(gap), dtype=torch.bool)
    ties[gap.argsort()[:tie_count]] = True
    labels = (reward_0 > reward_1).float()
    flips = (torch.rand(len(gap), generator=generator) < flip_fraction) & ~ties
    labels = torch.where(flips, 1 - labels, labels)
    return torch.where(ties, torch.full_like(labels, 0.5), labels)


def _pairings(count: int, generator: torch.Generator) -> Iterator[tuple[int, int]]:
    """``count`` pairs over ``count`` images, each image in two pairs (two random perfect matchings)."""
    for _ in range(2):
        order = torch.randperm(count, generator=generator).tolist()
        yield from zip(order[0::2], order[1::2])


def build_preference_split(
    pipeline: ImagePipeline,
    prompts: list[str],
    images_per_prompt: int,
    config: ImageBuildSettings,
    generator: torch.Generator,
) -> tuple[pa.Table, Tensor, list[str]]:
    """Sample ``images_per_prompt`` images per prompt, pair them, label the pairs.

    Returns the Pick-a-Pic-schema table and the sampled images with their prompts (for quality stats).
    """
    sample_prompts = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    images = sample_images(pipeline, sample_prompts, generator, config)
    rewards = t2i.toy_reward(images, sample_prompts)
    encoded = [png_bytes(image) for image in images]
    first, second = [], []
    for p in range(len(prompts)):
        offset = p * images_per_prompt
        for i, j in _pairings(images_per_prompt, generator):
            first.append(offset + i)
            second.append(offset + j)
    labels = preference_labels(
        rewards[first], rewards[second], config.tie_fraction, config.label_flip_fraction, generator
    )
    table = pa.table(
        {
            "caption": pa.array([sample_prompts[i] for i in first], pa.string()),
            "jpg_0": pa.array([encoded[i] for i in first], pa.binary()),
            "jpg_1": pa.array([encoded[i] for i in second], pa.binary()),
            "label_0": pa.array(labels.tolist(), pa.float64()),
            "label_1": pa.array((1 - labels).tolist(), pa.float64()),
        }
    )
    return table, images, sample_prompts


def sample_quality(images: Tensor, prompts: list[str]) -> dict[str, float]:
    """How often the checker finds the asked attributes, and the mean reward and centredness."""
    detections = t2i.detect_shape(images)
    asked = [t2i.parse_caption(prompt) for prompt in prompts]

    def rate(keys: tuple[str, ...]) -> float:
        return float(np.mean([all(d[k] == a[k] for k in keys) for d, a in zip(detections, asked)]))

    return {
        "samples": len(images),
        "shape_accuracy": rate(("shape",)),
        "colour_accuracy": rate(("colour",)),
        "size_accuracy": rate(("size",)),
        "shape_and_colour_accuracy": rate(("shape", "colour")),
        "all_three_accuracy": rate(("shape", "colour", "size")),
        "mean_reward": float(t2i.toy_reward(images, prompts).mean()),
        "mean_centredness": float(t2i.centredness(images).mean()),
    }


def write_preference_data(
    pipeline: ImagePipeline, output_dir: Path, config: ImageBuildSettings, stages: BuildStages
) -> dict[str, dict[str, float]]:
    """The train and held-out preference splits in ``output_dir/data`` (random streams 8 and 9 of the build) and
    the prompt files; returns the checker's quality on each split's samples."""
    data_dir = output_dir / "data"
    data_dir.mkdir(exist_ok=True)
    quality = {}
    for offset, (split, per_prompt) in enumerate(
        (("train", config.train_images_per_prompt), ("heldout", config.heldout_images_per_prompt))
    ):
        table, images, prompts = build_preference_split(
            pipeline, t2i.load_prompts(split), per_prompt, config, stages.generator(8 + offset)
        )
        pq.write_table(table, data_dir / f"{split}.parquet")
        quality[split] = sample_quality(images, prompts)
        log.info("[%s] %s: %d pairs; checker on the samples: %s", stages.label, split, table.num_rows, quality[split])
    write_prompt_files(output_dir / "prompts", t2i.load_prompts)
    return quality


# ------------------------------------------------------------------------------------------ subject set

SUBJECT_COLOURS = ((0.10, 0.60, 0.60), (0.95, 0.45, 0.70))  # teal over pink: neither is a caption colour
SUBJECT_TEMPLATES = ["a [V] circle", "a small [V] circle", "a large [V] circle", "a [V]"]


def build_subject_set(directory: Path, count: int, generator: torch.Generator) -> None:
    """``count`` views (positions, sizes, backgrounds) of one two-tone circle, with prompt templates."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        size = SIZES[index % 2]
        low, high = t2i.SIZE_RADII[size]
        radius = low + (high - low) * torch.rand(1, generator=generator).item()
        centre = tuple((0.3 + 0.4 * torch.rand(2, generator=generator)).tolist())
        grey = 0.88 + 0.09 * torch.rand(1, generator=generator).item()
        image = t2i.render_scene(
            "circle",
            SUBJECT_COLOURS[0],
            size,
            centre,
            radius=radius,
            lower_colour=SUBJECT_COLOURS[1],
            background=(grey, grey, grey),
        )
        names.append(f"{index:02d}.png")
        (directory / names[-1]).write_bytes(png_bytes(image))
    spec = {
        "description": "a two-tone circle, teal above and pink below; neither colour nor two-tone shapes "
        "appear in the captioned world",
        "identifier": "sks",
        "class_noun": "circle",
        "class_prompt": "a circle",
        "templates": SUBJECT_TEMPLATES,
        "images": names,
    }
    (directory / "prompts.json").write_text(json.dumps(spec, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ build


def build_toy_t2i(output_dir: str | Path, seed: int = 0, config: T2IBuildConfig | None = None) -> dict:
    """Build everything into ``output_dir``; returns (and saves as ``build_info.json``) timings, sizes
    and the checker's accuracy on the pipeline's samples."""
    config = config or T2IBuildConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    stages = BuildStages("t2i", seed)
    generator = stages.generator

    with stages.stage("scenes and tokenizer"):
        scenes = t2i.sample_scenes(config.scenes, generator(1))
        autoencoder_scenes = t2i.sample_scenes(
            config.autoencoder_scenes, generator(2), off_palette_fraction=0.2, two_tone_fraction=0.15
        )
        tokenizer = build_tokenizer(output_dir / "tokenizer")

    with stages.stage("clip", init_seed=0):
        clip = train_clip(tokenizer, scenes, config, generator(3))
        save_clip(clip, tokenizer, output_dir / "clip")
        text_encoder = text_encoder_from_clip(clip)

    with stages.stage("vae", init_seed=1):
        vae = train_vae(autoencoder_scenes, config, generator(4))
        latent_means, latent_stds = encode_scenes(vae, scenes.images)
        scaling_factor = unit_variance_scaling_factor(latent_means, latent_stds, generator(5))
        vae.register_to_config(scaling_factor=scaling_factor)

    with stages.stage("unet", init_seed=2):
        unet = train_unet(
            text_encoder,
            tokenizer,
            latent_means * scaling_factor,
            latent_stds * scaling_factor,
            training_captions(scenes, config, generator(6)),
            config,
            generator(7),
        )

    with stages.stage("preference data"):
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=make_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(output_dir)
        # The preference data come from the pipeline exactly as saved and loaded.
        pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
        pipeline.set_progress_bar_config(disable=True)
        quality = write_preference_data(pipeline, output_dir, config, stages)

    build_subject_set(output_dir / "subject", config.subject_images, generator(10))

    folders = ("unet", "vae", "text_encoder", "tokenizer", "clip", "data", "subject")
    sampling = {"scheduler": "DDIM", "steps": config.sampling_steps, "guidance_scale": config.guidance_scale}
    return write_build_info(output_dir, stages, config, folders, quality, sampling=sampling)
