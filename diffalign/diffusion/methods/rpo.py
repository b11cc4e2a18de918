"""λ-Harmonic reward and Reward Preference Optimization for subject-driven generation (Miao, Loh, Kothawade,
Poupart, Rashwan, Li, "Subject-driven Text-to-Image Generation via Preference-based Reinforcement Learning",
NeurIPS 2024, arXiv 2407.12164; code andrew-miao/RPO, ``train.py``, ``train_sdxl.py``, ``datasets_utils.py``).

Data: a few images of a subject and prompt templates with a ``[V]`` placeholder for its identifier. Before
training, the pretrained model generates ``negatives_per_prompt`` images per template (16 officially). Each
pair is (subject image, generated image) for one template, with the Bradley–Terry probability that the
subject image is preferred,

    p = σ(R_λ(x_subject, c) − R_λ(x_generated, c)),
    R_λ(x, c) = 1 / (λ / s_i2i(x) + (1 − λ) / s_t2i(x, c))

where s_i2i is the mean cosine of x to the subject images and s_t2i the cosine of x to the prompt c without its
identifier, both on a dual encoder (ALIGN officially). ``rescale_similarity`` maps cosines to (s + 1)/2 first,
as the official ``RewardModel`` does. The loss on (subject, generated) pairs with per-sample denoising errors e:

    kl_diff = (e_ref^subject − e_θ^subject) − (e_ref^generated − e_θ^generated)
    L = −[p·log σ(β'·kl_diff) + (1 − p)·log σ(−β'·kl_diff)] + mean e_θ^subject

i.e. the core's soft-label ``sigmoid`` plus its ``sft`` term: with scores −½·e the core's margin is kl_diff/2
and its ``sft`` is ½·e_θ^subject, so ``loss.type: [sigmoid, sft]``, ``loss.weights: [1, 2]``,
``loss.beta: 2β'`` is exactly the official loss (β' = 1: ``train.py`` applies none, ``train_sdxl.py`` its
``--beta`` 1.0). Validation every ``run.eval_every`` steps generates ``validation_images`` per template and
averages R_λ with λ = ``validation_lambda``; the loop keeps the best checkpoint in ``output_dir/best``.

Choices where the paper and the official code differ or the paper is silent (defaults follow the paper):

- ``label_sampling``: ``soft`` uses p itself (the paper's soft Bradley–Terry label); ``bernoulli`` draws a hard
  label ~ Bernoulli(p) at every read, as ``datasets_utils.py`` does. ``label_lambda``: the λ of the training
  labels (the official code uses 0, text similarity only).
- ``share_noise``: ε and t shared within a pair (Diffusion-DPO's estimator and ``train_sdxl.py``); false draws
  them per image, as ``train.py`` does.
- ``reference_prompt``: subject images are conditioned on their pair's template by default; ``train.py``
  conditions them on one instance prompt ("a photo of [V] dog"), set here to reproduce it.
- The official dataset visits only max(#GPUs, #subject images) of the (template, negative) combinations per
  epoch; here every template's every negative forms a pair, with subject image (template·N + j) mod #images.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffalign.config import require_at_least_one
from diffalign.diffusion.data import collate_pairs, image_decoder, split_index
from diffalign.diffusion.families import DiffusionFamily
from diffalign.diffusion.methods.base import (
    LatentPairBatch,
    PreferenceMethod,
    TrainingContext,
    TrainingData,
    denoising_error,
    pair_noise,
    register_method,
)
from diffalign.diffusion.methods.dpo import scores_from_errors
from diffalign.diffusion.methods.online import decode_samples, derived_seed, sample_latents
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.transforms import MediaDecoder, draw_pair_randomness
from diffalign.losses import PairScores
from diffalign.rewards import Encoder, Images, build_scorer, lambda_harmonic_reward, mean_cosine_to_reference
from diffalign.rewards.inputs import to_pil

if TYPE_CHECKING:
    from diffalign.diffusion.config import DiffusionTrainConfig

PLACEHOLDER = "[V]"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

NEGATIVE_STREAM = 1  # the negatives generated before training (seeded from the run's seed)
VALIDATION_STREAM = 2  # validation samples: the same seeds at every evaluation, for base and policy alike
REJECTED_NOISE_STREAM = 3  # the generated image's own ε and t when share_noise is false


@dataclass
class Subject:
    images: list[Image.Image]
    templates: list[str]  # with the [V] placeholder
    identifier: str

    def prompts(self) -> list[str]:
        """The templates with the identifier in place of [V]: what the model is conditioned on."""
        return [template.replace(PLACEHOLDER, self.identifier) for template in self.templates]

    def reward_prompts(self) -> list[str]:
        """The templates without the placeholder, for text similarity (the official ``remove_unique_token``)."""
        return [re.sub(r"\s+", " ", template.replace(PLACEHOLDER, " ")).strip() for template in self.templates]


def load_subject(directory: str, templates: list[str], identifier: str | None) -> Subject:
    """Subject images from ``directory`` (those listed in its ``prompts.json``, else every image file in it);
    templates and identifier from the settings, else from ``prompts.json`` (``templates``, ``identifier``)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"method.rpo.subject_dir: {root} is not a folder of subject images")
    spec_path = root / "prompts.json"
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    paths = [root / name for name in spec["images"]] if "images" in spec else sorted(
        path for path in root.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES
    )
    missing = [str(path) for path in paths if not path.is_file()]
    if missing or not paths:
        raise FileNotFoundError(
            f"method.rpo.subject_dir: {root} " + (f"lists missing images {missing}" if missing else "has no images")
        )
    templates = list(templates) or list(spec.get("templates", []))
    if not templates:
        raise ValueError(
            f"method.rpo.templates is empty and {spec_path} gives none; list prompts with a {PLACEHOLDER} placeholder"
        )
    without_placeholder = [template for template in templates if PLACEHOLDER not in template]
    if without_placeholder:
        raise ValueError(f"method.rpo.templates {without_placeholder} lack the {PLACEHOLDER} placeholder")
    identifier = identifier or spec.get("identifier")
    if not identifier:
        raise ValueError(f"method.rpo.identifier is not set and {spec_path} gives none; e.g. identifier: sks")
    return Subject([Image.open(path).convert("RGB") for path in paths], templates, identifier)


def harmonic_reward(
    encoder: Encoder,
    subject_embeddings: Tensor,
    images: Images,
    prompts: list[str],
    lam: float,
    rescale_similarity: bool = True,
    batch_size: int = 32,
) -> Tensor:
    """R_λ of each image for its prompt ``[N]`` (fp32, CPU); cosines mapped to (s + 1)/2 with ``rescale_similarity``."""
    rewards = []
    for start in range(0, len(prompts), batch_size):
        embeddings = encoder.embed(images[start : start + batch_size])
        image_similarity = mean_cosine_to_reference(embeddings, subject_embeddings)
        text_similarity = (embeddings * encoder.embed_texts(prompts[start : start + batch_size])).sum(dim=-1)
        if rescale_similarity:
            image_similarity, text_similarity = (image_similarity + 1) / 2, (text_similarity + 1) / 2
        rewards.append(lambda_harmonic_reward(image_similarity, text_similarity, lam).float().cpu())
    return torch.cat(rewards)


class SubjectPairDataset(Dataset):
    """(subject image, generated image) pairs: ``{"caption", "chosen_pixels", "rejected_pixels", "label", ...}``,
    the item layout of the preference-pair datasets, so the recipe encodes them the same way."""

    reads_sample_ids = True

    def __init__(
        self,
        subject_images: list[Image.Image],
        negatives: list[Image.Image],
        prompts: list[str],
        pairs: list[tuple[int, int, int]],  # (prompt, negative, subject image)
        probabilities: Tensor,  # [len(pairs)]: P(subject image ≻ negative)
        decoder: MediaDecoder,
        *,
        label_sampling: Literal["soft", "bernoulli"],
        seed: int,
    ) -> None:
        self.subject_images = subject_images
        self.negatives = negatives
        self.prompts = prompts
        self.pairs = pairs
        self.probabilities = probabilities
        self.decoder = decoder
        self.label_sampling = label_sampling
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        index, epoch = split_index(sample_id, len(self))
        generator, _, augmentation = draw_pair_randomness(self.seed, epoch, index, 0.0, self.decoder)
        prompt, negative, subject = self.pairs[index]
        probability = self.probabilities[index : index + 1]
        label = torch.bernoulli(probability, generator=generator) if self.label_sampling == "bernoulli" else probability
        item: dict[str, Any] = {"caption": self.prompts[prompt], "label": float(label), "index": index}
        for role, media in (("chosen", self.subject_images[subject]), ("rejected", self.negatives[negative])):
            decoded = self.decoder.transform(media, augmentation)
            item[f"{role}_{self.decoder.name}"] = decoded.values
            item.update({f"{role}_{key}": value for key, value in decoded.conditioning.items()})
        return item


@dataclass
class RpoSettings:
    """λ-Harmonic RPO (methods/rpo.py): subject images preferred over the pretrained model's generations."""

    subject_dir: str = ""  # subject images, optionally with prompts.json ("templates", "identifier", "images")
    templates: list[str] = field(default_factory=list)  # prompts with a [V] placeholder; default: prompts.json's
    identifier: str | None = None  # what replaces [V]; default: prompts.json's
    # The condition of the subject images; None: their pair's prompt. The official train.py: "a photo of [V] dog".
    reference_prompt: str | None = None
    negatives_per_prompt: int = 16
    sampling_steps: int = 50  # DDIM steps for the negatives and for validation
    guidance_scale: float = 7.5
    generation_batch_size: int = 16
    label_lambda: float = 0.0  # λ of the training labels (official: 0, text similarity only)
    label_sampling: Literal["soft", "bernoulli"] = "soft"  # bernoulli: hard labels ~ Bernoulli(p), as the official
    validation_lambda: float = 0.5  # λ_val of the early-stopping reward
    validation_images: int = 4  # per template
    reward_model: str = "kakaobrain/align-base"
    reward_encoder: Literal["clip", "open_clip"] = "clip"
    reward_options: dict[str, Any] = field(default_factory=dict)  # device, dtype, processor, checkpoint
    rescale_similarity: bool = True  # cosines mapped to (s + 1)/2 before the harmonic mean, as the official
    share_noise: bool = True  # one ε and t per pair; false: per image, as the official train.py

    def __post_init__(self) -> None:
        for name in ("label_lambda", "validation_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"method.rpo.{name} must be in [0, 1], got {getattr(self, name)}")
        counts = ("negatives_per_prompt", "sampling_steps", "generation_batch_size", "validation_images")
        require_at_least_one(self, "method.rpo", counts)


@register_method("rpo", settings=RpoSettings)
class RewardPreferenceOptimization(PreferenceMethod):
    """Soft-label preference loss of subject images over the pretrained model's generations, plus their
    denoising loss; validated with the λ-Harmonic reward (early stopping)."""

    selection_metric = "rpo/validation_reward"
    settings: RpoSettings
    reference: ReferenceDenoiser

    def __init__(
        self, family: DiffusionFamily, reference: ReferenceDenoiser | None, settings: RpoSettings
    ) -> None:
        super().__init__(family, reference, settings)
        self.subject = load_subject(self.settings.subject_dir, self.settings.templates, self.settings.identifier)
        scorer = build_scorer(
            "lambda_harmonic",
            lam=self.settings.validation_lambda,
            model=self.settings.reward_model,
            encoder=self.settings.reward_encoder,
            **self.settings.reward_options,
        ).eval()
        self.encoder = scorer.encoder
        with torch.no_grad():  # the subject's embeddings serve every reward of the run
            self.subject_embeddings = scorer.prepare_reference(self.subject.images).embeddings
        self.reference_prompt_embeds = None
        if self.settings.reference_prompt is not None:
            prompt = self.settings.reference_prompt.replace(PLACEHOLDER, self.subject.identifier)
            self.reference_prompt_embeds = family.encode_prompts([prompt])
        self.seed = 0
        self._base_validation_reward: float | None = None

    @torch.no_grad()
    def reward(self, images: Images, prompts: list[str], lam: float) -> Tensor:
        return harmonic_reward(
            self.encoder, self.subject_embeddings, images, prompts, lam, self.settings.rescale_similarity
        )

    def generate(self, denoiser: nn.Module, count: int, stream: int) -> Tensor:
        """``count`` images per template from ``denoiser``, template-major, as ``[P·count, 3, H, W]`` in [0, 1]."""
        prompts = [prompt for prompt in self.subject.prompts() for _ in range(count)]
        seeds = [derived_seed(self.seed, stream, index) for index in range(len(prompts))]
        latents = sample_latents(
            self.family,
            denoiser,
            prompts,
            seeds,
            num_inference_steps=self.settings.sampling_steps,
            guidance_scale=self.settings.guidance_scale,
            batch_size=self.settings.generation_batch_size,
        )
        return decode_samples(self.family, latents, self.settings.generation_batch_size)

    @classmethod
    def check_config(cls, config: DiffusionTrainConfig) -> None:
        if not config.uses_reference:
            raise ValueError(
                "method.name: rpo contrasts the policy with the frozen pretrained model, but loss.type "
                f"{config.loss.type} has no reference loss; use loss.type: [sigmoid, sft]"
            )

    def training_data(self, config: DiffusionTrainConfig, accelerator: Any) -> TrainingData:
        """Generate the negatives with the pretrained model and label every (subject, negative) pair."""
        self.seed = config.run.seed
        count = self.settings.negatives_per_prompt
        device = next(self.family.denoiser.parameters()).device
        with self.reference.use(device) as pretrained:
            negatives = self.generate(pretrained, count, NEGATIVE_STREAM)
        reward_prompts = self.subject.reward_prompts()
        lam = self.settings.label_lambda
        negative_rewards = self.reward(negatives, [prompt for prompt in reward_prompts for _ in range(count)], lam)
        subject_count = len(self.subject.images)
        subject_rewards = torch.stack(
            [self.reward(self.subject.images, [prompt] * subject_count, lam) for prompt in reward_prompts]
        )
        pairs = [
            (prompt, prompt * count + j, (prompt * count + j) % subject_count)
            for prompt in range(len(reward_prompts))
            for j in range(count)
        ]
        probabilities = torch.sigmoid(
            torch.stack([subject_rewards[prompt, subject] - negative_rewards[negative] for prompt, negative, subject in pairs])
        )
        dataset = SubjectPairDataset(
            self.subject.images,
            to_pil(negatives),
            self.subject.prompts(),
            pairs,
            probabilities,
            image_decoder(config.data),
            label_sampling=self.settings.label_sampling,
            seed=config.run.seed,
        )
        stats = {
            "subject_images": subject_count,
            "prompts": len(reward_prompts),
            "pairs": len(pairs),
            "mean_label": round(probabilities.mean().item(), 4),
        }
        return TrainingData(dataset, collate_pairs, stats)

    def make_pairs(
        self, denoiser: nn.Module, batch: dict[str, Any], context: TrainingContext
    ) -> tuple[LatentPairBatch, dict[str, Tensor]]:
        pairs = context.encode(batch)
        label = batch["label"].float()
        return dataclasses.replace(pairs, label=label), {"rpo/label": label.mean()}

    def pair_scores(
        self, denoiser: nn.Module, batch: LatentPairBatch, reference_errors: Tensor | None = None
    ) -> tuple[PairScores, dict[str, Tensor]]:
        family = self.family
        latents = batch.both_latents()
        noise, timesteps = pair_noise(family, batch)
        generated_noise, generated_timesteps = noise, timesteps
        if not self.settings.share_noise:
            seeds = None if batch.noise_seeds is None else [derived_seed(s, REJECTED_NOISE_STREAM) for s in batch.noise_seeds]
            generated_noise, generated_timesteps = pair_noise(family, dataclasses.replace(batch, noise_seeds=seeds))
        noise, timesteps = torch.cat([noise, generated_noise]), torch.cat([timesteps, generated_timesteps])
        noisy_latents = family.add_noise(latents, noise, timesteps)
        target = family.target(latents, noise, timesteps)

        subject_embeds = batch.prompt_embeds
        if self.reference_prompt_embeds is not None:
            subject_embeds = {
                name: value.to(batch.prompt_embeds[name].dtype).expand(batch.size, *value.shape[1:])
                for name, value in self.reference_prompt_embeds.items()
            }
        prompt_embeds = {name: torch.cat([subject_embeds[name], value]) for name, value in batch.prompt_embeds.items()}
        inputs = family.denoiser_inputs(prompt_embeds, batch.extras or {})

        policy_errors = denoising_error(family, denoiser, noisy_latents, timesteps, target, inputs)
        with self.reference.use(latents.device) as reference:
            reference_errors = denoising_error(family, reference, noisy_latents, timesteps, target, inputs)
        return scores_from_errors(policy_errors, reference_errors, batch.label)

    def validation_reward(self, denoiser: nn.Module) -> float:
        """Mean R_λ (λ = ``validation_lambda``) of ``validation_images`` samples per template."""
        count = self.settings.validation_images
        images = self.generate(denoiser, count, VALIDATION_STREAM)
        prompts = [prompt for prompt in self.subject.reward_prompts() for _ in range(count)]
        return self.reward(images, prompts, self.settings.validation_lambda).mean().item()

    def evaluate(self, denoiser: nn.Module, step: int) -> dict[str, float]:
        if self._base_validation_reward is None:  # the pretrained model does not change: validate it once
            with self.reference.use(next(denoiser.parameters()).device) as pretrained:
                self._base_validation_reward = self.validation_reward(pretrained)
        return {
            "rpo/validation_reward": self.validation_reward(denoiser),
            "rpo/validation_reward_base": self._base_validation_reward,
        }
