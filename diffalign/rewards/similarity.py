"""Embedding-similarity rewards: sample–prompt (CLIP score, CLIP-T, PickScore, HPSv2, CLAP score), sample–reference
(CLIP-I, DINO) and their λ-weighted harmonic mean (λ-Harmonic reward).

One scorer class per kind of similarity; the registered names below differ only in encoder, weights and scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from diffalign.rewards.base import EmbeddedReference, Samples, check_prompts
from diffalign.rewards.encoders import Encoder, EncoderScorer, build_encoder, embed_reference
from diffalign.rewards.registry import register_scorer

HARMONIC_EPS = 1e-8  # as in the λ-Harmonic reward's reference implementation (andrew-miao/RPO)


def mean_cosine_to_reference(embeddings: Tensor, reference_embeddings: Tensor) -> Tensor:
    """``s_i = (1/N) Σ_j cos(e_i, r_j)`` for unit vectors ``embeddings [B,D]`` and ``reference_embeddings [N,D]``."""
    return (embeddings @ reference_embeddings.T).mean(dim=1)


def lambda_harmonic_reward(image_similarity: Tensor, text_similarity: Tensor, lam: float) -> Tensor:
    """λ-Harmonic reward: a weighted harmonic mean of image–image and text–image similarity.

    ``R_λ = 1 / (λ / (s_i2i + 1e-8) + (1 − λ) / (s_t2i + 1e-8))``; λ = 1 rewards subject fidelity only, λ = 0
    prompt fidelity only. Miao et al., "Subject-driven Text-to-Image Generation via Preference-based
    Reinforcement Learning", NeurIPS 2024 (arXiv 2407.12164). Meaningful for positive similarities, as
    ALIGN/CLIP give for natural images.
    """
    return 1.0 / (lam / (image_similarity + HARMONIC_EPS) + (1.0 - lam) / (text_similarity + HARMONIC_EPS))


class TextAlignmentScorer(EncoderScorer):
    """``score = scale · cos(embed(sample), embed_text(prompt))``, optionally clamped at 0 (CLIPScore).

    ``scale="logit_scale"`` uses the model's learned inverse temperature, as PickScore does.
    """

    def __init__(
        self, encoder: Encoder, scale: float | Literal["logit_scale"] = 1.0, clamp_at_zero: bool = False
    ) -> None:
        super().__init__(encoder)
        self.scale = encoder.logit_scale() if scale == "logit_scale" else float(scale)
        self.clamp_at_zero = clamp_at_zero

    def forward(
        self, samples: Samples, prompts: Sequence[str] | None = None, reference: Any = None
    ) -> Tensor:
        prompts = check_prompts(prompts, len(samples), type(self).__name__)
        cosine = (self.encoder.embed(samples) * self.encoder.embed_texts(prompts)).sum(dim=-1)
        if self.clamp_at_zero:
            cosine = cosine.clamp(min=0)
        return self.output(self.scale * cosine)


class ReferenceSimilarityScorer(EncoderScorer):
    """Mean cosine similarity of each sample to a reference set (DreamBench CLIP-I and DINO; Ruiz et al., 2023)."""

    def prepare_reference(self, reference: Any) -> EmbeddedReference:
        if isinstance(reference, EmbeddedReference):
            return reference
        if reference is None:
            raise ValueError(
                f"{type(self).__name__} needs `reference`: the set of reference samples to compare to"
            )
        return EmbeddedReference(embed_reference(self.encoder, reference))

    def forward(
        self, samples: Samples, prompts: Sequence[str] | None = None, reference: Any = None
    ) -> Tensor:
        reference_embeddings = self.prepare_reference(reference).embeddings
        return self.output(mean_cosine_to_reference(self.encoder.embed(samples), reference_embeddings))


class LambdaHarmonicScorer(ReferenceSimilarityScorer):
    """The λ-Harmonic reward of each image given its prompt and the subject's reference images."""

    def __init__(self, encoder: Encoder, lam: float = 0.5) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(
                f"lam: {lam!r} is outside [0, 1]; λ weighs image similarity against text similarity"
            )
        super().__init__(encoder)
        self.lam = lam

    def forward(
        self, samples: Samples, prompts: Sequence[str] | None = None, reference: Any = None
    ) -> Tensor:
        prompts = check_prompts(prompts, len(samples), type(self).__name__)
        reference_embeddings = self.prepare_reference(reference).embeddings
        embeddings = self.encoder.embed(samples)
        image_similarity = mean_cosine_to_reference(embeddings, reference_embeddings)
        text_similarity = (embeddings * self.encoder.embed_texts(prompts)).sum(dim=-1)
        return self.output(lambda_harmonic_reward(image_similarity, text_similarity, self.lam))


# --- registered scorers -------------------------------------------------------------------------------------------


@register_scorer("clip_score")
def clip_score(
    model: str = "openai/clip-vit-large-patch14",
    encoder: Literal["clip", "open_clip"] = "clip",
    checkpoint: str | None = None,
    processor: str | None = None,
    scale: float = 100.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextAlignmentScorer:
    """CLIPScore ``scale · max(cos(image, prompt), 0)`` (Hessel et al., EMNLP 2021, use w = 2.5; torchmetrics 100)."""
    encoder_module = build_encoder(encoder, model, checkpoint, processor, device, dtype)
    return TextAlignmentScorer(encoder_module, scale=scale, clamp_at_zero=True)


@register_scorer("clip_t")
def clip_t(
    model: str = "openai/clip-vit-base-patch16",
    encoder: Literal["clip", "open_clip"] = "clip",
    checkpoint: str | None = None,
    processor: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextAlignmentScorer:
    """DreamBench CLIP-T: cosine of image and prompt embeddings (ViT-B/16 as in andrew-miao/RPO's evaluation)."""
    return TextAlignmentScorer(build_encoder(encoder, model, checkpoint, processor, device, dtype))


@register_scorer("pickscore")
def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextAlignmentScorer:
    """PickScore: ``exp(logit_scale) · cos(image, prompt)`` from a CLIP-H fine-tuned on Pick-a-Pic
    (Kirstain et al., NeurIPS 2023); the checkpoint's processor lives in the LAION CLIP-H repository."""
    return TextAlignmentScorer(
        build_encoder("clip", model, None, processor, device, dtype), scale="logit_scale"
    )


@register_scorer("hpsv2")
def hpsv2(
    checkpoint: str = "xswu/HPSv2/HPS_v2_compressed.pt",
    model: str = "ViT-H-14",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextAlignmentScorer:
    """HPSv2 (Wu et al., 2023): cosine of open_clip ViT-H-14 image and prompt features with the HPS weights
    (``HPS_v2.1_compressed.pt`` for v2.1). The LAION base weights are not needed: the checkpoint is complete."""
    return TextAlignmentScorer(build_encoder("open_clip", model, checkpoint, None, device, dtype))


@register_scorer("clap_score")
def clap_score(
    model: str = "laion/clap-htsat-unfused",
    encoder: Literal["clap", "laion_clap"] = "clap",
    checkpoint: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextAlignmentScorer:
    """CLAP score: cosine of audio and prompt embeddings (Wu et al., ICASSP 2023). ``encoder: laion_clap``
    takes a laion-clap ``checkpoint`` and ``encoder_options`` such as ``{audio_model: HTSAT-base}``."""
    encoder_module = build_encoder(encoder, model, checkpoint, None, device, dtype, encoder_options)
    return TextAlignmentScorer(encoder_module)


@register_scorer("clip_i")
def clip_i(
    model: str = "openai/clip-vit-base-patch16",
    encoder: Literal["clip", "open_clip"] = "clip",
    checkpoint: str | None = None,
    processor: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ReferenceSimilarityScorer:
    """DreamBench CLIP-I: mean cosine of CLIP image embeddings to the subject's reference images."""
    return ReferenceSimilarityScorer(build_encoder(encoder, model, checkpoint, processor, device, dtype))


@register_scorer("dino")
def dino(
    model: str = "facebook/dino-vits16",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ReferenceSimilarityScorer:
    """DreamBench DINO: mean cosine of DINO ViT-S/16 CLS embeddings to the subject's reference images."""
    return ReferenceSimilarityScorer(build_encoder("vision", model, None, None, device, dtype))


@register_scorer("lambda_harmonic")
def lambda_harmonic(
    lam: float = 0.5,
    model: str = "kakaobrain/align-base",
    encoder: Literal["clip", "open_clip"] = "clip",
    checkpoint: str | None = None,
    processor: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LambdaHarmonicScorer:
    """The λ-Harmonic reward with ALIGN as in the paper's code, or any CLIP-style encoder."""
    return LambdaHarmonicScorer(build_encoder(encoder, model, checkpoint, processor, device, dtype), lam=lam)
