"""A labelled sample grid: one row per model, one column per prompt, the prompt under each column, the row's
name at its left and each sample's score under it.

Tiles keep the images' aspect ratio. Small images are enlarged by a whole factor (nearest neighbour, so pixels
stay pixels) until a tile is about ``min_tile`` pixels; the whole grid is kept within ``max_width`` pixels by
shrinking the tiles, so that 8 prompts of 1024-pixel SDXL samples make a 4096-pixel-wide PNG, not a 32k one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MAX_WIDTH = 4096
MIN_TILE = 128
PAD = 6
FONT_SIZE = 14
LINE = FONT_SIZE + 4
PROMPT_LINES = 3
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)
BETTER, WORSE = (0, 120, 40), (190, 30, 30)  # a score above / below the first row's in its column


@cache
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` pixels (FreeType builds), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow built without FreeType
        return ImageFont.load_default()


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid of ``rows`` × ``columns`` tiles of ``tile_height`` × ``tile_width`` lies."""

    rows: int
    columns: int
    tile_height: int
    tile_width: int
    label_width: int
    score_lines: int  # 1 when each tile has a score under it, else 0

    @classmethod
    def fit(
        cls, rows: int, columns: int, height: int, width: int, label_width: int, scores: bool,
        max_width: int = MAX_WIDTH, min_tile: int = MIN_TILE,
    ) -> GridLayout:
        scale = max(1, min_tile // max(height, width))
        tile_width = width * scale
        widest = (max_width - label_width - PAD) // columns - PAD
        if tile_width > widest:
            tile_width = max(1, widest)
        tile_height = max(1, round(height * tile_width / width))
        return cls(rows, columns, tile_height, tile_width, label_width, int(scores))

    @property
    def row_height(self) -> int:
        return self.tile_height + self.score_lines * LINE + PAD

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_width + PAD + self.columns * (self.tile_width + PAD)
        height = PAD + self.rows * self.row_height + PROMPT_LINES * LINE + PAD
        return width, height

    def tile_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of tile (row, column) in the grid, PIL's crop box."""
        left = self.label_width + PAD + column * (self.tile_width + PAD)
        top = PAD + row * self.row_height
        return left, top, left + self.tile_width, top + self.tile_height


def wrap(text: str, width: int, lines: int) -> list[str]:
    """``text`` broken into at most ``lines`` lines of at most ``width`` pixels; a cut-off end gets an ellipsis."""
    face, out, current = font(), [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if face.getlength(candidate) <= width or not current:
            current = candidate
        else:
            out.append(current)
            current = word
    out.append(current)
    if len(out) > lines:
        out = out[:lines]
        out[-1] += " …"
    for index, line in enumerate(out):  # a single long word: cut by characters
        while face.getlength(line) > width and len(line) > 1:
            line = line[:-2] + "…"
        out[index] = line
    return out


def to_pil(image: Tensor, size: tuple[int, int]) -> Image.Image:
    """A ``[3, H, W]`` image in [0, 1] as an RGB PIL image of ``size`` (width, height)."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if picture.size == size:
        return picture
    enlarging = size[0] >= picture.width
    return picture.resize(size, Image.NEAREST if enlarging else Image.LANCZOS)


def labelled_grid(
    rows: dict[str, Tensor],
    prompts: list[str],
    scores: dict[str, Tensor] | None = None,
    score_name: str = "reward",
    *,
    higher_is_better: bool = True,
    max_width: int = MAX_WIDTH,
    min_tile: int = MIN_TILE,
) -> tuple[Image.Image, GridLayout]:
    """The grid of ``rows`` (``{"base": [N,3,H,W], "aligned": [N,3,H,W]}`` in [0, 1]) with ``prompts[n]`` under
    column n and, when given, ``scores[row][n]`` under each tile, in green where it beats the first row's score of
    its column and in red where it loses; returns the image and its layout."""
    images = list(rows.values())
    count, height, width = images[0].shape[0], images[0].shape[-2], images[0].shape[-1]
    if any(row.shape[0] != count for row in images) or len(prompts) < count:
        raise ValueError(
            f"a grid needs as many samples in every row and as many prompts: rows "
            f"{[row.shape[0] for row in images]}, {len(prompts)} prompts"
        )
    labels = [*rows, score_name] if scores is not None else list(rows)
    label_width = max(int(font().getlength(label)) for label in labels) + 2 * PAD
    layout = GridLayout.fit(len(rows), count, height, width, label_width, scores is not None, max_width, min_tile)
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for row, (name, samples) in enumerate(rows.items()):
        top = layout.tile_box(row, 0)[1]
        draw.text((PAD, top + layout.tile_height // 2), name, fill=INK, font=font(), anchor="lm")
        if scores is not None:  # the scorer's name beside the row of scores
            draw.text((PAD, top + layout.tile_height + 2), score_name, fill=INK, font=font())
        for column in range(count):
            left, tile_top, _, bottom = layout.tile_box(row, column)
            grid.paste(to_pil(samples[column], (layout.tile_width, layout.tile_height)), (left, tile_top))
            if scores is not None:
                value, first = float(scores[name][column]), float(next(iter(scores.values()))[column])
                gain = (value - first) if higher_is_better else (first - value)
                colour = BETTER if gain > 0 else WORSE if gain < 0 else INK
                draw.text((left, bottom + 2), f"{value:.3f}", fill=colour, font=font())
    prompt_top = PAD + layout.rows * layout.row_height
    for column, prompt in enumerate(prompts[:count]):
        left = layout.tile_box(0, column)[0]
        for number, line in enumerate(wrap(prompt, layout.tile_width, PROMPT_LINES)):
            draw.text((left, prompt_top + number * LINE), line, fill=INK, font=font())
    return grid, layout
