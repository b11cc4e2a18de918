"""open-clip-torch checkpoints as an :class:`~diffalign.rewards.encoders.Encoder` (HPSv2 is one).

``model`` is a built-in open_clip architecture (``"ViT-H-14"``) or a directory / hub repository in open_clip's
format (``open_clip_config.json`` plus weights). ``checkpoint`` is a state-dict file loaded on top (HPSv2's
``HPS_v2_compressed.pt`` stores its weights under ``"state_dict"``). A model with neither weights in its directory
nor a checkpoint is refused rather than silently left random. ``import open_clip`` needs a working torchvision,
so it happens only when this encoder is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.rewards.base import Images
from diffalign.rewards.encoders import Encoder, unit
from diffalign.rewards.inputs import pixel_values
from diffalign.rewards.weights import (
    OPEN_CLIP_FILES,
    OPEN_CLIP_WEIGHTS,
    WeightsNotFoundError,
    resolve_pretrained_dir,
    resolve_weights_file,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL resampling codes, as transformers takes them


class OpenClipEncoder(Encoder):
    modality = "image"

    def __init__(
        self,
        model: str,
        checkpoint: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as error:
            raise ImportError(
                f"the open_clip encoder needs open-clip-torch (and torchvision): pip install 'diffalign[clip]' ({error})"
            ) from error

        if model in open_clip.list_models():
            name, has_weights = model, False
        else:
            # With a checkpoint the directory's own weights are not used, so not downloaded either.
            weights = OPEN_CLIP_WEIGHTS if checkpoint is None else ()
            directory = resolve_pretrained_dir(model, OPEN_CLIP_FILES, f"open_clip model {model!r}", weights)
            name = f"local-dir:{directory}"
            has_weights = any(path.suffix in _WEIGHT_SUFFIXES for path in directory.iterdir())
        # Resolved before building: a missing file should fail in a second, not after building a ViT-H.
        path = None
        if checkpoint is not None:
            path = resolve_weights_file(checkpoint, f"open_clip checkpoint for {model!r}")
        elif not has_weights:
            raise WeightsNotFoundError(
                f"open_clip model {model!r} has no weights: pass `checkpoint` (a state-dict file such as HPSv2's "
                f"HPS_v2_compressed.pt) or a directory holding open_clip_config.json and its weights"
            )
        self.model = open_clip.create_model(name, pretrained=None, load_weights=path is None, device=device)
        if path is not None:
            open_clip.load_checkpoint(self.model, str(path))
        self.model.to(dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.image_processor = _image_processor(open_clip.get_model_preprocess_cfg(self.model))
        self.identity = f"open_clip:{model}:{checkpoint}"

    def embed(self, images: Images) -> Tensor:
        pixels = pixel_values(self.image_processor, images).to(self.device, self.dtype)
        return unit(self.model.encode_image(pixels, normalize=True))

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return unit(self.model.encode_text(tokens, normalize=True))

    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()


def _image_processor(preprocess: dict):
    """open_clip's eval transform (resize, centre crop, normalise) as a torch-based transformers processor."""
    from transformers import CLIPImageProcessor

    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else size
    resize_mode = preprocess.get("resize_mode", "shortest")
    interpolation = preprocess.get("interpolation", "bicubic")
    if resize_mode not in ("shortest", "squash") or interpolation not in _RESAMPLE:
        raise ValueError(
            f"open_clip preprocess resize_mode={resize_mode!r}, interpolation={interpolation!r} is not supported; "
            f"supported: resize_mode shortest or squash, interpolation {sorted(_RESAMPLE)}"
        )
    squash = resize_mode == "squash"
    return CLIPImageProcessor(
        size={"height": height, "width": width} if squash else {"shortest_edge": min(height, width)},
        crop_size={"height": height, "width": width},
        do_center_crop=not squash,
        image_mean=list(preprocess["mean"]),
        image_std=list(preprocess["std"]),
        resample=_RESAMPLE[interpolation],
    )
