"""Encoders: samples (and, for joint models, texts) to L2-normalised embeddings, one small class per backend.

Backends, chosen by name in configs:

- ``clip``: a transformers dual encoder with ``get_image_features``/``get_text_features`` — CLIP, PickScore
  (a CLIP-H checkpoint), ALIGN.
- ``open_clip``: open-clip-torch checkpoints (HPSv2 is one): :mod:`diffalign.rewards.open_clip_encoder`.
- ``vision``: a transformers image backbone whose CLS token is the embedding (DINO ViT-S/16 for DreamBench).
- ``clap``/``laion_clap``: text–audio models: :mod:`diffalign.rewards.clap`.

Embeddings come back in float32 whatever the model's dtype, so distances and kernels are computed stably.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.rewards.base import Images, Modality, Scorer
from diffalign.rewards.inputs import pixel_values
from diffalign.rewards.weights import (
    MODEL_FILES,
    PREPROCESSOR_FILES,
    TOKENIZER_FILES,
    TRANSFORMERS_WEIGHTS,
    resolve_pretrained_dir,
)

EncoderBackend = Literal["clip", "open_clip", "vision", "clap", "laion_clap"]


class Encoder(nn.Module):
    """Maps a batch of samples of one modality to ``[B, D]`` unit vectors.

    ``identity`` names the backend and weights; reference-statistics caches are keyed by it.
    """

    modality: Modality
    identity: str

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def embed(self, samples: Any) -> Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Texts in the same space as the samples (joint text–image/audio models only)."""
        raise TypeError(f"{type(self).__name__} ({self.identity}) has no text tower to embed prompts with")

    def logit_scale(self) -> float:
        """The learned inverse temperature that turns cosines into the model's training logits."""
        raise TypeError(f"{type(self).__name__} ({self.identity}) has no learned logit scale")


class EncoderScorer(Scorer):
    """A scorer computed from an encoder's embeddings; it lives on the encoder's device, in its dtype."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__(encoder.device, encoder.dtype)
        self.encoder = encoder
        self.modality = encoder.modality


def unit(features: Any) -> Tensor:
    """L2-normalised float32 features from a tensor or a transformers output (``pooler_output``)."""
    if not isinstance(features, Tensor):
        features = features.pooler_output
    return F.normalize(features.float(), dim=-1)


def _freeze(model: nn.Module, device: torch.device | str) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


class TransformersTextImageEncoder(Encoder):
    """CLIP-style dual encoders from transformers (CLIPModel, ALIGN, PickScore checkpoints).

    ``processor`` is the source of the tokenizer and image processor when the model's repository lacks them
    (PickScore loads its processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    """

    modality = "image"

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        processor = processor or model
        model_dir = resolve_pretrained_dir(
            model, MODEL_FILES, f"text-image model {model!r}", TRANSFORMERS_WEIGHTS
        )
        processor_dir = resolve_pretrained_dir(
            processor,
            (*TOKENIZER_FILES, *PREPROCESSOR_FILES),
            f"tokenizer and image processor of {processor!r}",
        )
        self.model = _freeze(AutoModel.from_pretrained(model_dir, dtype=dtype), device)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(
                f"model {model!r} is a {type(self.model).__name__}, not a text-image dual encoder; "
                f"use a CLIP or ALIGN checkpoint (or encoder: vision for image-only backbones)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(processor_dir)
        self.max_text_length = self.model.config.text_config.max_position_embeddings
        self.identity = f"clip:{model}"

    def embed(self, images: Images) -> Tensor:
        pixels = pixel_values(self.image_processor, images).to(self.device, self.dtype)
        return unit(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        return unit(self.model.get_text_features(**tokens))

    def logit_scale(self) -> float:
        if hasattr(self.model, "logit_scale"):  # CLIP: logits = exp(logit_scale) · cos
            return self.model.logit_scale.exp().item()
        if hasattr(self.model, "temperature"):  # ALIGN: logits = cos / temperature
            return 1.0 / self.model.temperature.item()
        return super().logit_scale()


class TransformersImageEncoder(Encoder):
    """An image backbone whose CLS token is the embedding, e.g. DINO ``facebook/dino-vits16`` (DreamBench DINO)."""

    modality = "image"

    def __init__(
        self, model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel

        model_dir = resolve_pretrained_dir(
            model, (*MODEL_FILES, *PREPROCESSOR_FILES), f"image model {model!r}", TRANSFORMERS_WEIGHTS
        )
        self.model = _freeze(AutoModel.from_pretrained(model_dir, dtype=dtype), device)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.identity = f"vision:{model}"

    def embed(self, images: Images) -> Tensor:
        pixels = pixel_values(self.image_processor, images).to(self.device, self.dtype)
        # The CLS token after the final norm: the DINO paper's image descriptor (Caron et al., 2021).
        return unit(self.model(pixel_values=pixels).last_hidden_state[:, 0])


def build_encoder(
    backend: EncoderBackend,
    model: str | None = None,
    checkpoint: str | None = None,
    processor: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    options: dict[str, Any] | None = None,
) -> Encoder:
    """An encoder by backend name; ``options`` are backend-specific keyword arguments (e.g. laion-clap fusion)."""
    options = options or {}
    if backend == "clip":
        return TransformersTextImageEncoder(_required(model, backend), processor, device, dtype, **options)
    if backend == "vision":
        return TransformersImageEncoder(_required(model, backend), device, dtype, **options)
    if backend == "open_clip":
        from diffalign.rewards.open_clip_encoder import OpenClipEncoder

        return OpenClipEncoder(_required(model, backend), checkpoint, device, dtype, **options)
    if backend == "clap":
        from diffalign.rewards.clap import ClapEncoder

        return ClapEncoder(_required(model, backend), device, dtype, **options)
    if backend == "laion_clap":
        from diffalign.rewards.clap import LaionClapEncoder

        if checkpoint is None:
            raise ValueError(
                "encoder laion_clap needs `checkpoint`: a laion-clap .pt file (e.g. 630k-audioset-best.pt)"
            )
        return LaionClapEncoder(checkpoint, device=device, dtype=dtype, **options)
    raise ValueError(f"encoder: {backend!r} is not a backend; choose one of {list(EncoderBackend.__args__)}")


def _required(model: str | None, backend: str) -> str:
    if not model:
        raise ValueError(f"encoder {backend} needs `model`: a local directory or a hub id")
    return model


def embed_reference(encoder: Encoder, reference: Any, batch_size: int = 32) -> Tensor:
    """Embed a reference set in batches: samples of the encoder's modality, or texts (a list of strings)
    embedded by the text tower — DRAGON's cross-modal exemplars, e.g. captions as the reference for audio."""
    if len(reference) == 0:
        raise ValueError("the reference set is empty; pass at least one reference sample or text")
    texts = isinstance(reference, (list, tuple)) and all(isinstance(item, str) for item in reference)
    embed = encoder.embed_texts if texts else encoder.embed
    return torch.cat(
        [embed(reference[start : start + batch_size]) for start in range(0, len(reference), batch_size)]
    )
