"""The LAION aesthetic predictor v2: an MLP on unit-norm CLIP ViT-L/14 image embeddings, scores roughly 1–10.

Architecture from its published description (christophschuhmann/improved-aesthetic-predictor, trained with MSE
on SAC + LAION-Logos + AVA ratings): linear layers 768 → 1024 → 128 → 64 → 16 → 1 with dropout 0.2, 0.2, 0.1
after the first three and no activations. Layer indices match the released state dict
``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffalign.rewards.base import Images
from diffalign.rewards.encoders import Encoder, EncoderScorer, build_encoder
from diffalign.rewards.registry import register_scorer
from diffalign.rewards.weights import resolve_weights_file

HEAD_FILE_HINT = (
    "the state dict of the LAION aesthetic MLP, sac+logos+ava1-l14-linearMSE.pth from "
    "github.com/christophschuhmann/improved-aesthetic-predictor"
)


class AestheticHead(nn.Module):
    def __init__(self, embedding_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: Path, embedding_dim: int) -> AestheticHead:
    """An :class:`AestheticHead` from a ``.pth``/``.pt``/``.safetensors`` state dict."""
    if path.suffix == ".safetensors":
        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    head = AestheticHead(embedding_dim)
    expected = head.state_dict()
    mismatched = sorted(
        key
        for key in expected.keys() | state_dict.keys()
        if key not in state_dict or key not in expected or state_dict[key].shape != expected[key].shape
    )
    if mismatched:
        raise ValueError(
            f"{path} is not an aesthetic head for {embedding_dim}-d embeddings: keys or shapes differ at "
            f"{mismatched[:4]}; expected {HEAD_FILE_HINT}"
        )
    head.load_state_dict(state_dict)
    return head


class AestheticScorer(EncoderScorer):
    def __init__(self, encoder: Encoder, head: AestheticHead) -> None:
        super().__init__(encoder)
        self.head = head.to(encoder.device, encoder.dtype).eval().requires_grad_(False)

    def forward(self, images: Images, prompts: Sequence[str] | None = None, reference: None = None) -> Tensor:
        embeddings = self.encoder.embed(images).to(self.dtype)
        return self.output(self.head(embeddings).float())


@register_scorer("aesthetic")
def aesthetic(
    head: str | None = None,
    model: str = "openai/clip-vit-large-patch14",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AestheticScorer:
    """LAION aesthetic score; ``head`` is the MLP's state-dict file, ``model`` the CLIP ViT-L/14 it was trained on."""
    if head is None:
        raise ValueError(f"aesthetic needs `head`: {HEAD_FILE_HINT}, as a local path or a hub file reference")
    head_path = resolve_weights_file(head, f"aesthetic head ({HEAD_FILE_HINT})")  # before loading CLIP
    encoder = build_encoder("clip", model, None, None, device, dtype)
    return AestheticScorer(encoder, load_aesthetic_head(head_path, encoder.model.config.projection_dim))
