"""Stored media → model inputs: decoding, the Diffusion-DPO image transforms, and per-item randomness.

A pair member is stored as bytes (a JPEG/PNG here; audio later). A *media decoder* turns those bytes into the
tensor the VAE encodes, in two steps so that each can be reused on its own:

* ``load(data)`` decodes the bytes (and raises :class:`CorruptMediaError` when it cannot): the data loader calls
  it to verify rows, the cache calls it once per stored image;
* ``transform(media, augmentation)`` applies the deterministic preprocessing plus one drawn augmentation.

An *augmentation* (a flip, a crop position) is drawn once per pair from the pair's own generator and applied to
both members, so both images of a pair are seen the same way. Augmentations that a cache can enumerate
(plain/flipped) are listed by ``cache_augmentations``; those it cannot (random crops) raise there.

An audio decoder (waveform → resampled log-mel) implements the same five members and reuses the datasets and the
cache unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class CorruptMediaError(ValueError):
    """Stored bytes that cannot be decoded or used (corrupt, truncated, not an image, an extreme shape).

    ``reason`` is the key a skipped pair is counted under (``corrupt_image``, ``corrupt_audio``, ...).
    """

    def __init__(self, message: str, reason: str = "corrupt_image") -> None:
        super().__init__(message)
        self.reason = reason


# PIL signals bad data with several exception types (a broken PNG chunk is a SyntaxError).
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class DecodedMedia:
    values: Tensor  # the VAE's input, scaled to [-1, 1]: an image [3, H, W]
    # Per-sample size conditioning, (height, width) or (top, left) in pixels: SDXL's add_time_ids inputs.
    conditioning: dict[str, tuple[int, int]]


class MediaDecoder(Protocol):
    # Name of the decoded tensor in a dataset item: ``chosen_<name>``, ``rejected_<name>``.
    name: ClassVar[str]

    def settings(self) -> dict[str, Any]:
        """Everything that changes ``transform``'s output; part of the cache key of every stored sample."""
        ...

    def load(self, data: bytes) -> Any: ...

    def draw_augmentation(self, generator: torch.Generator) -> Hashable: ...

    def cache_augmentations(self) -> list[Hashable]:
        """Every augmentation ``draw_augmentation`` can return, for a cache to store them all."""
        ...

    def transform(self, media: Any, augmentation: Hashable) -> DecodedMedia: ...


@dataclass(frozen=True)
class ImageAugmentation:
    flip: bool = False
    # Where the square crop sits within the free margin, as fractions in [0, 1) of (height, width); None: centre.
    crop_position: tuple[float, float] | None = None


@dataclass(frozen=True)
class ImageDecoder:
    """The Diffusion-DPO training transforms (Wallace et al., 2023, github.com/SalesforceAIResearch/DiffusionDPO).

    Resize the shorter side to ``resolution`` (PIL bilinear, as torchvision's ``Resize`` does on PIL images),
    crop a ``resolution``² square (centre, or random with ``crop="random"``), optionally flip horizontally, and
    normalise to [-1, 1] as ``Normalize([0.5], [0.5])`` does; the pixels equal the official torchvision pipeline's.
    Unlike the official code, which flips each image of a pair on its own, the flip and the crop position are
    drawn once per pair.

    SDXL conditions on the original size and the crop's top-left corner (Podell et al., 2023); the corner is
    given in the frame of the final (possibly flipped) image, as the diffusers SDXL training example does.
    """

    resolution: int
    crop: Literal["center", "random"] = "center"
    random_flip: bool = True
    # Longer side / shorter side beyond which an image is refused rather than resized (it only decides what
    # is accepted, so it is not among the settings that key a cache).
    max_aspect_ratio: float = 4.0
    name: ClassVar[str] = "pixels"

    def settings(self) -> dict[str, Any]:
        # "version" names the transform code: bump it when the pixels it produces change.
        return {
            "decoder": "image",
            "version": 1,
            "resolution": self.resolution,
            "crop": self.crop,
            "random_flip": self.random_flip,
        }

    def load(self, data: bytes) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except PIL_ERRORS as error:
            raise CorruptMediaError(f"cannot decode the image ({type(error).__name__}: {error})") from error
        with image:
            width, height = image.size
            if max(width, height) > self.max_aspect_ratio * min(width, height):
                raise CorruptMediaError(
                    f"the image is {width}×{height} pixels, more elongated than data.max_aspect_ratio="
                    f"{self.max_aspect_ratio:g}; crop it or raise data.max_aspect_ratio",
                    reason="extreme_aspect_ratio",
                )
            try:
                return image.convert("RGB")
            except PIL_ERRORS as error:
                raise CorruptMediaError(f"cannot decode the image ({type(error).__name__}: {error})") from error

    def draw_augmentation(self, generator: torch.Generator) -> ImageAugmentation:
        flip = self.random_flip and torch.rand((), generator=generator).item() < 0.5
        crop_position = None
        if self.crop == "random":
            top, left = torch.rand(2, generator=generator).tolist()
            crop_position = (top, left)
        return ImageAugmentation(flip=flip, crop_position=crop_position)

    def cache_augmentations(self) -> list[ImageAugmentation]:
        if self.crop == "random":
            raise ValueError(
                "data.crop: 'random' cannot be cached: a cache stores one encoding per image and view, while random "
                "crops differ at every read. Use data.crop: center, or remove data.cache_dir"
            )
        plain = ImageAugmentation()
        return [plain, ImageAugmentation(flip=True)] if self.random_flip else [plain]

    def transform(self, media: Image.Image, augmentation: ImageAugmentation) -> DecodedMedia:
        size = self.resolution
        original_size = (media.height, media.width)
        # torchvision's Resize(size) on a PIL image: the shorter side to `size`, the longer one truncated.
        if media.height <= media.width:
            height, width = size, int(size * media.width / media.height)
        else:
            height, width = int(size * media.height / media.width), size
        image = media.resize((width, height), Image.BILINEAR)
        if augmentation.crop_position is None:
            top, left = round((height - size) / 2), round((width - size) / 2)
        else:
            top = int(augmentation.crop_position[0] * (height - size + 1))
            left = int(augmentation.crop_position[1] * (width - size + 1))
        image = image.crop((left, top, left + size, top + size))
        if augmentation.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = width - left - size
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
        return DecodedMedia(
            values=(pixels - 0.5) / 0.5,
            conditioning={"original_size": original_size, "crop_top_left": (top, left)},
        )


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index) alone.

    An item's randomness then does not depend on the order items are read in, on data-loader workers, or on
    where a resumed run starts; NumPy's SeedSequence mixes the three numbers into a well-spread seed.
    """
    high, low = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return torch.Generator().manual_seed((int(high) << 32) | int(low))


def draw_pair_randomness(
    seed: int, epoch: int, index: int, caption_dropout: float, decoder: MediaDecoder
) -> tuple[torch.Generator, bool, Hashable]:
    """Draw, in a fixed order, whether pair ``index`` loses its caption and which augmentation it gets.

    Returns the generator too: the cached dataset goes on drawing the latent noise from it. Both datasets use
    this one function, so a pair gets the same caption dropout and flip whether or not it is read from a cache.
    """
    generator = item_generator(seed, epoch, index)
    drop_caption = torch.rand((), generator=generator).item() < caption_dropout
    return generator, drop_caption, decoder.draw_augmentation(generator)
