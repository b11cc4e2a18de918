"""ImageReward (Xu et al., NeurIPS 2023): a BLIP-based reward model, run through the ``image-reward`` package.

Built only from an explicit checkpoint (``ImageReward.pt``; hub file ``THUDM/ImageReward/ImageReward.pt``) with
its ``med_config.json`` in the same directory, where the package looks for it before downloading. BLIP's
text side loads the ``bert-base-uncased`` tokenizer by name, so offline it must be in the hub cache. The
package scores PIL images one by one: no gradient.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.rewards.base import Images, Scorer, check_prompts
from diffalign.rewards.inputs import to_pil
from diffalign.rewards.registry import register_scorer
from diffalign.rewards.weights import WeightsNotFoundError, require_cached_hub_files, resolve_weights_file


class ImageRewardScorer(Scorer):
    modality = "image"

    def __init__(
        self, checkpoint: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(device, dtype)
        path = resolve_weights_file(checkpoint, "ImageReward checkpoint (ImageReward.pt)")
        if not (path.parent / "med_config.json").is_file():
            raise WeightsNotFoundError(
                f"ImageReward needs med_config.json beside its checkpoint: place THUDM/ImageReward's "
                f"med_config.json in {path.parent}"
            )
        try:
            image_reward = importlib.import_module("ImageReward")
        except ImportError as error:
            raise ImportError(
                f"the image_reward scorer needs the image-reward package: pip install image-reward ({error})"
            ) from error
        require_cached_hub_files({"bert-base-uncased": ["vocab.txt"]}, "ImageReward (BLIP)")
        self.model = image_reward.load(str(path), device=str(device), download_root=str(path.parent))
        self.model.eval().requires_grad_(False)

    def forward(self, images: Images, prompts: Sequence[str] | None = None, reference: None = None) -> Tensor:
        prompts = check_prompts(prompts, len(images), type(self).__name__)
        with torch.no_grad():
            scores = [self.model.score(prompt, image) for prompt, image in zip(prompts, to_pil(images))]
        return self.output(torch.tensor(scores, dtype=torch.float32))


@register_scorer("image_reward")
def image_reward(
    checkpoint: str | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ImageRewardScorer:
    if checkpoint is None:
        raise ValueError(
            "image_reward needs `checkpoint`: ImageReward.pt (hub file THUDM/ImageReward/ImageReward.pt) with "
            "med_config.json beside it"
        )
    return ImageRewardScorer(checkpoint, device, dtype)
