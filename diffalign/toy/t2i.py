"""The toy text-to-image world: scenes, captions, a programmatic checker and a scripted preference.

A scene is one shape (circle, square or triangle) of one of six colours, small or large, at a random position
on a plain light background, drawn anti-aliased at 32×32. Its caption names shape, colour and size
("a large red circle") but never the position, so a model trained on these scenes places shapes anywhere.

The scripted preference (:func:`toy_reward`) asks for prompt fidelity *and* a shape centred in the frame:
the base model (``assets/toy-t2i``, built by :mod:`diffalign.toy.t2i_build`) is fairly faithful to the
caption but centres shapes only by chance, which leaves preference alignment a visible job to do.

Geometry is expressed in fractions of the image width, so rendering and checking work at any square
resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

TOY_T2I_DIR = Path(__file__).resolve().parents[2] / "assets" / "toy-t2i"
"""Where the built toy pipeline lives in a source checkout (the assets are not part of the wheel)."""

RESOLUTION = 32

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.65, 0.25),
    "blue": (0.15, 0.30, 0.85),
    "yellow": (0.95, 0.80, 0.10),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.95, 0.50, 0.10),
}
SIZES = ("small", "large")

# Every shape is drawn with the area of a circle of radius r, so "size" means the same for all three.
# Radii (fractions of the width) of small and large shapes, and the boundary the checker uses between them
# (the geometric mean of the two areas).
SIZE_RADII = {"small": (3.2 / 32, 3.8 / 32), "large": (5.8 / 32, 6.6 / 32)}
SIZE_BOUNDARY = math.sqrt(SIZE_RADII["small"][1] * SIZE_RADII["large"][0])
SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2  # in units of r: side² = πr²
TRIANGLE_CIRCUMRADIUS = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # equilateral, area (3√3/4)R² = πr²
COS_30 = math.sqrt(3) / 2

# Colour–shape combinations whose captions (both sizes) never appear in preference training data; each
# colour is held out once and each shape twice, so held-out prompts test generalisation of the preference.
HELDOUT_COLOUR_SHAPES = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "triangle"),
    ("purple", "circle"),
    ("orange", "square"),
)

Shape = Literal["circle", "square", "triangle"]
Size = Literal["small", "large"]
RGB = tuple[float, float, float]


# ---------------------------------------------------------------------------------------------- captions


def make_caption(shape: str, colour: str | None = None, size: str | None = None) -> str:
    """``make_caption("circle", "red", "large") == "a large red circle"``; a ``None`` attribute is left out."""
    return " ".join(word for word in ("a", size, colour, shape) if word is not None)


def parse_caption(caption: str) -> dict[str, str | None]:
    """The shape, colour and size a caption asks for (``None`` where it does not say).

    Words outside the toy vocabulary are ignored, so "a small [V] circle" parses as a small circle.
    Raises ``ValueError`` when a caption names two different values of one attribute.
    """
    found: dict[str, str | None] = {"shape": None, "colour": None, "size": None}
    for word in caption.lower().replace(",", " ").split():
        for key, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
            if word in values:
                if found[key] not in (None, word):
                    raise ValueError(f"caption {caption!r} names two {key}s: {found[key]!r} and {word!r}")
                found[key] = word
    return found


def all_captions() -> list[str]:
    """The 36 full captions of the world, in a fixed order."""
    return [make_caption(shape, colour, size) for size in SIZES for colour in COLOURS for shape in SHAPES]


def load_prompts(split: Literal["train", "heldout"]) -> list[str]:
    """Prompts of the preference data: ``"train"`` (24) or ``"heldout"`` (12, colour–shape pairs never seen
    in preference training; the base model was pretrained on all 36)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    heldout = {make_caption(shape, colour, size) for colour, shape in HELDOUT_COLOUR_SHAPES for size in SIZES}
    return [caption for caption in all_captions() if (caption in heldout) == (split == "heldout")]


# --------------------------------------------------------------------------------------------- rendering


def _half_coverages(
    shape_ids: Tensor, centres: Tensor, radii: Tensor, resolution: int, supersample: int = 4
) -> tuple[Tensor, Tensor]:
    """Per-pixel fraction ``[B,H,W]`` covered by the upper and by the lower half of each shape.

    Anti-aliasing by supersampling: inside-tests on a ``supersample``× finer grid, then average pooling.
    The two halves (split at the centroid) let two-tone shapes be drawn with the same code.
    """
    chunk = 256  # bounds the memory of the fine grid
    if len(shape_ids) > chunk:
        parts = [
            _half_coverages(shape_ids[i : i + chunk], centres[i : i + chunk], radii[i : i + chunk], resolution, supersample)
            for i in range(0, len(shape_ids), chunk)
        ]
        return torch.cat([upper for upper, _ in parts]), torch.cat([lower for _, lower in parts])
    fine = resolution * supersample
    grid = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    dx = grid.view(1, 1, fine) - centres[:, 0].view(-1, 1, 1)
    dy = grid.view(1, fine, 1) - centres[:, 1].view(-1, 1, 1)  # image rows grow downwards
    r = radii.view(-1, 1, 1)
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(dx.abs(), dy.abs()) <= SQUARE_HALF_SIDE * r
    # Upright equilateral triangle: inside all three edges, whose outward normals point down, up-left and
    # up-right; each edge lies at the inradius (half the circumradius) from the centroid.
    edge_distance = torch.maximum(dy, (-0.5 * dy - COS_30 * dx).maximum(-0.5 * dy + COS_30 * dx))
    triangle = edge_distance <= 0.5 * TRIANGLE_CIRCUMRADIUS * r
    inside = torch.stack((circle, square, triangle), dim=1)[torch.arange(len(shape_ids)), shape_ids]
    upper = (inside & (dy < 0)).float().unsqueeze(1)
    lower = (inside & (dy >= 0)).float().unsqueeze(1)
    return F.avg_pool2d(upper, supersample).squeeze(1), F.avg_pool2d(lower, supersample).squeeze(1)


def _render(
    shape_ids: Tensor,
    centres: Tensor,
    radii: Tensor,
    upper_colours: Tensor,
    lower_colours: Tensor,
    backgrounds: Tensor,
    resolution: int,
) -> Tensor:
    """Batched renderer: ``[B,3,H,W]`` in [0,1], a shape alpha-blended over a plain background."""
    upper, lower = _half_coverages(shape_ids, centres, radii, resolution)
    background = backgrounds[:, :, None, None]
    return (
        background
        + upper.unsqueeze(1) * (upper_colours[:, :, None, None] - background)
        + lower.unsqueeze(1) * (lower_colours[:, :, None, None] - background)
    )


def _rgb(colour: str | RGB) -> Tensor:
    if isinstance(colour, str):
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; known colours: {', '.join(COLOURS)} (or an RGB triple)")
        colour = COLOURS[colour]
    return torch.tensor(colour, dtype=torch.float32)


def render_scene(
    shape: Shape,
    colour: str | RGB,
    size: Size = "large",
    centre: tuple[float, float] = (0.5, 0.5),
    *,
    radius: float | None = None,
    lower_colour: str | RGB | None = None,
    background: RGB = (0.93, 0.93, 0.93),
    resolution: int = RESOLUTION,
) -> Tensor:
    """One scene as a ``[3,H,W]`` float tensor in [0,1].

    ``centre`` is the shape's centroid as fractions (x, y) of width and height; ``radius`` (fraction of the
    width, the radius of a circle of equal area) overrides the middle radius of ``size``. A ``lower_colour``
    paints the half below the centroid in a second colour (two-tone shapes, not part of the captioned world).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    upper = _rgb(colour)
    image = _render(
        shape_ids=torch.tensor([SHAPES.index(shape)]),
        centres=torch.tensor([centre], dtype=torch.float32),
        radii=torch.tensor([radius if radius is not None else sum(SIZE_RADII[size]) / 2]),
        upper_colours=upper[None],
        lower_colours=(upper if lower_colour is None else _rgb(lower_colour))[None],
        backgrounds=torch.tensor([background], dtype=torch.float32),
        resolution=resolution,
    )
    return image[0]


@dataclass
class SceneBatch:
    """Randomly drawn scenes and what is in them. ``colours`` is ``None`` for off-palette colours."""

    images: Tensor  # [B,3,H,W] in [0,1]
    shapes: list[str]
    colours: list[str | None]
    sizes: list[str]
    centres: Tensor  # [B,2], fractions of width/height

    @property
    def captions(self) -> list[str]:
        return [make_caption(s, c, z) for s, c, z in zip(self.shapes, self.colours, self.sizes)]


def _uniform(count: int, low: float | Tensor, high: float | Tensor, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def sample_scenes(
    count: int,
    generator: torch.Generator,
    *,
    off_palette_fraction: float = 0.0,
    two_tone_fraction: float = 0.0,
    resolution: int = RESOLUTION,
) -> SceneBatch:
    """Draw ``count`` random scenes: uniform shape, colour, size and position (the whole shape in frame).

    Palette colours get a small jitter. ``off_palette_fraction`` of the scenes take a random saturated
    colour instead, and ``two_tone_fraction`` a second random colour for the lower half: the autoencoder
    trains on those so that it can also represent shapes outside the captioned world (e.g. the subject set).
    """
    shape_ids = torch.randint(len(SHAPES), (count,), generator=generator)
    colour_ids = torch.randint(len(COLOURS), (count,), generator=generator)
    large = torch.rand(count, generator=generator) < 0.5
    small_low, small_high = SIZE_RADII["small"]
    large_low, large_high = SIZE_RADII["large"]
    radii = torch.where(
        large,
        _uniform(count, large_low, large_high, generator),
        _uniform(count, small_low, small_high, generator),
    )

    # Extent of each shape from its centroid (left/right, up, down) in units of r, plus a one-pixel margin.
    half_width = torch.tensor([1.0, SQUARE_HALF_SIDE, COS_30 * TRIANGLE_CIRCUMRADIUS])[shape_ids] * radii
    up = torch.tensor([1.0, SQUARE_HALF_SIDE, TRIANGLE_CIRCUMRADIUS])[shape_ids] * radii
    down = torch.tensor([1.0, SQUARE_HALF_SIDE, 0.5 * TRIANGLE_CIRCUMRADIUS])[shape_ids] * radii
    margin = 1.0 / resolution
    centres = torch.stack(
        (
            _uniform(count, half_width + margin, 1 - half_width - margin, generator),
            _uniform(count, up + margin, 1 - down - margin, generator),
        ),
        dim=1,
    )

    palette = torch.tensor(list(COLOURS.values()))
    upper = (palette[colour_ids] + _uniform(count * 3, -0.04, 0.04, generator).view(count, 3)).clamp(0, 1)
    off_palette = torch.rand(count, generator=generator) < off_palette_fraction
    upper = torch.where(off_palette[:, None], _random_saturated(count, generator), upper)
    two_tone = torch.rand(count, generator=generator) < two_tone_fraction
    lower = torch.where(two_tone[:, None], _random_saturated(count, generator), upper)

    grey = _uniform(count, 0.88, 0.97, generator)
    backgrounds = (grey[:, None] + _uniform(count * 3, -0.02, 0.02, generator).view(count, 3)).clamp(0, 1)

    images = _render(shape_ids, centres, radii, upper, lower, backgrounds, resolution)
    plain = ~(off_palette | two_tone)
    return SceneBatch(
        images=images,
        shapes=[SHAPES[i] for i in shape_ids.tolist()],
        colours=[list(COLOURS)[c] if p else None for c, p in zip(colour_ids.tolist(), plain.tolist())],
        sizes=["large" if is_large else "small" for is_large in large.tolist()],
        centres=centres,
    )


def _random_saturated(count: int, generator: torch.Generator) -> Tensor:
    """Random vivid colours: random hue, high saturation, mid-to-high value (HSV → RGB)."""
    hue = torch.rand(count, generator=generator)
    saturation = _uniform(count, 0.6, 0.95, generator)
    value = _uniform(count, 0.55, 0.95, generator)
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    return value[:, None] * (1 - saturation[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1)))


# ---------------------------------------------------------------------------------------------- checking

# Temperatures of the checker's soft decisions, chosen so that clean renders are classified with ≥0.95
# probability while blurry or ambiguous images get graded, smooth scores.
SHAPE_TEMPERATURE = 0.03  # on the soft IoU with a template
COLOUR_TEMPERATURE = 0.02  # on the squared RGB distance to a palette colour
SIZE_TEMPERATURE = 0.006  # on the equal-area radius (fraction of width)
# Centredness exp(-d²/2σ²) of the shape's centroid at distance d (fraction of width) from the image centre.
CENTRE_SIGMA = 0.15


@dataclass
class _Measurements:
    presence: Tensor  # [B] in [0,1]: is there a shape at all
    centres: Tensor  # [B,2]
    radii: Tensor  # [B]
    shape_probs: Tensor  # [B,3]
    colour_probs: Tensor  # [B,6]
    large_prob: Tensor  # [B]


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square images of shape [B,3,H,W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0,1], got dtype {images.dtype}; divide uint8 images by 255")


def _measure(images: Tensor) -> _Measurements:
    """Find the shape in each image and score it against every shape, colour and size.

    The background colour is the median of the border pixels; a pixel's coverage is its colour distance
    from the background relative to the shape's contrast (exact for alpha-blended renders), with the
    lowest and highest 20% clipped so that faint noise does not count. Centre and size come from the
    coverage's centroid and total; the shape from the soft IoU with each template drawn at that centre
    and size; the colour from the shape's core pixels.
    """
    _check_images(images)
    images = images.detach().float().cpu().clamp(0, 1)
    count, _, resolution, _ = images.shape
    border = torch.cat(
        (images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]), dim=2
    )
    background = border.median(dim=2).values  # [B,3]
    distance = (images - background[:, :, None, None]).norm(dim=1)  # [B,H,W]
    peak = distance.flatten(1).amax(1)
    presence = ((peak - 0.15) / 0.2).clamp(0, 1)

    core = (distance >= 0.75 * peak[:, None, None]).unsqueeze(1).float()
    colour = (images * core).sum((2, 3)) / core.sum((2, 3)).clamp_min(1)
    contrast = (colour - background).norm(dim=1).clamp_min(1e-3)
    coverage = ((distance / contrast[:, None, None] - 0.2) / 0.6).clamp(0, 1)

    mass = coverage.sum((1, 2)).clamp_min(1e-6)
    grid = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    centres = torch.stack(
        (
            (coverage * grid.view(1, 1, -1)).sum((1, 2)) / mass,
            (coverage * grid.view(1, -1, 1)).sum((1, 2)) / mass,
        ),
        dim=1,
    )
    radii = (mass / resolution**2 / math.pi).sqrt()

    upper, lower = _half_coverages(
        torch.arange(len(SHAPES)).repeat(count),
        centres.repeat_interleave(len(SHAPES), 0),
        radii.repeat_interleave(len(SHAPES), 0),
        resolution,
    )
    templates = (upper + lower).view(count, len(SHAPES), resolution, resolution)
    observed = coverage.unsqueeze(1)
    # A blank image has no coverage and a vanishing template: clamp so that its IoU is 0, not 0/0.
    union = torch.maximum(observed, templates).sum((2, 3)).clamp_min(1e-6)
    iou = torch.minimum(observed, templates).sum((2, 3)) / union
    palette = torch.tensor(list(COLOURS.values()))
    colour_distance = ((colour[:, None, :] - palette[None]) ** 2).sum(2)
    return _Measurements(
        presence=presence,
        centres=centres,
        radii=radii,
        shape_probs=(iou / SHAPE_TEMPERATURE).softmax(1),
        colour_probs=(-colour_distance / COLOUR_TEMPERATURE).softmax(1),
        large_prob=torch.sigmoid((radii - SIZE_BOUNDARY) / SIZE_TEMPERATURE),
    )


def detect_shape(images: Tensor) -> list[dict]:
    """What the checker sees in each image of a ``[B,3,H,W]`` float batch in [0,1].

    Returns per image ``{"present", "shape", "colour", "size", "centre", "radius"}``: the most likely
    shape, palette colour and size (``None`` when no shape is present), the centroid (x, y) and the
    equal-area radius, both as fractions of the width.
    """
    measured = _measure(images)
    detections = []
    for i in range(len(images)):
        present = bool(measured.presence[i] > 0.5)
        detections.append(
            {
                "present": present,
                "shape": SHAPES[measured.shape_probs[i].argmax()] if present else None,
                "colour": list(COLOURS)[measured.colour_probs[i].argmax()] if present else None,
                "size": ("large" if measured.large_prob[i] > 0.5 else "small") if present else None,
                "centre": (float(measured.centres[i, 0]), float(measured.centres[i, 1])),
                "radius": float(measured.radii[i]),
            }
        )
    return detections


def _fidelity(measured: _Measurements, prompts: list[str]) -> Tensor:
    fidelity = measured.presence.clone()
    for i, prompt in enumerate(prompts):
        asked = parse_caption(prompt)
        if asked["shape"] is not None:
            fidelity[i] *= measured.shape_probs[i, SHAPES.index(asked["shape"])]
        if asked["colour"] is not None:
            fidelity[i] *= measured.colour_probs[i, list(COLOURS).index(asked["colour"])]
        if asked["size"] is not None:
            large = measured.large_prob[i]
            fidelity[i] *= large if asked["size"] == "large" else 1 - large
    return fidelity


def _check_prompts(images: Tensor, prompts: list[str]) -> None:
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise ValueError(f"expected one prompt per image ({len(images)}), got {prompts!r}")


def prompt_fidelity(images: Tensor, prompts: list[str]) -> Tensor:
    """How surely each image shows what its prompt asks for: ``[B]`` in [0,1].

    ``fidelity = presence · p(shape) · p(colour) · p(size)``, the checker's soft probabilities of the
    attributes the prompt names (attributes it leaves out are not scored).
    """
    _check_prompts(images, prompts)
    return _fidelity(_measure(images), prompts)


def _centredness(measured: _Measurements) -> Tensor:
    offset = measured.centres - 0.5
    return torch.exp(-(offset**2).sum(1) / (2 * CENTRE_SIGMA**2))


def centredness(images: Tensor) -> Tensor:
    """``exp(-d² / 2σ²)`` with d the distance of the shape's centroid from the image centre: ``[B]`` in (0,1]."""
    return _centredness(_measure(images))


def toy_reward(images: Tensor, prompts: list[str]) -> Tensor:
    """The scripted preference of the toy world: ``[B]`` in [0,1], higher is better, deterministic.

    ``reward = fidelity · (1 + centredness) / 2``: a faithful image scores between 0.5 (shape at the
    edge) and 1 (shape in the centre); an unfaithful one scores near 0 wherever it is. The base model
    places shapes anywhere, so centring is what preference alignment can add.
    """
    _check_prompts(images, prompts)
    measured = _measure(images)
    return _fidelity(measured, prompts) * (1 + _centredness(measured)) / 2


# ------------------------------------------------------------------------------------------ subject set


@dataclass
class SubjectSet:
    """A few images of one subject outside the captioned world, for subject-driven (DreamBench-style) tuning.

    Prompts are templates with a ``[V]`` placeholder for the subject's identifier (e.g. replace it with
    ``identifier``); ``class_prompt`` names the subject's class for prior preservation.
    """

    root: Path
    description: str
    identifier: str
    class_noun: str
    class_prompt: str
    prompt_templates: list[str]
    image_paths: list[Path]

    def prompts(self, identifier: str | None = None) -> list[str]:
        """The templates with ``[V]`` replaced by ``identifier`` (default: the set's own)."""
        return [t.replace("[V]", identifier or self.identifier) for t in self.prompt_templates]

    def load_images(self) -> Tensor:
        """The subject images as a ``[N,3,H,W]`` float tensor in [0,1]."""
        import numpy as np
        from PIL import Image

        arrays = [np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255 for path in self.image_paths]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def subject_set(root: str | Path | None = None) -> SubjectSet:
    """The subject set shipped in ``<toy-t2i>/subject/`` (``prompts.json`` and the PNG images)."""
    root = Path(root) if root is not None else TOY_T2I_DIR / "subject"
    spec_path = root / "prompts.json"
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"{spec_path} not found; build the toy world with `python -m diffalign.toy build t2i`"
        )
    spec = json.loads(spec_path.read_text())
    image_paths = [root / name for name in spec["images"]]
    missing = [str(path) for path in image_paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{spec_path} lists images that do not exist: {', '.join(missing)}")
    return SubjectSet(
        root=root,
        description=spec["description"],
        identifier=spec["identifier"],
        class_noun=spec["class_noun"],
        class_prompt=spec["class_prompt"],
        prompt_templates=spec["templates"],
        image_paths=image_paths,
    )


def build(output_dir: str | Path, seed: int = 0) -> None:
    """Build the whole toy text-to-image world into ``output_dir`` (see :mod:`diffalign.toy.t2i_build`)."""
    # Imported here: training code (diffusers, transformers) is only needed to build, not to use the world.
    from diffalign.toy.t2i_build import build_toy_t2i

    build_toy_t2i(output_dir, seed)
