"""The labelled sample grid: sizes bounded at any resolution, tiles that hold the samples, labels drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.diffusion.sampling import save_samples
from diffalign.eval.grid import BETTER, MAX_WIDTH, PAD, WORSE, labelled_grid
from diffalign.rewards import Audio

PROMPTS = [f"prompt number {index} with a few words to wrap under its column" for index in range(8)]


def images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tile(grid: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.array(grid.crop(box)).astype(np.int64)


@pytest.mark.parametrize("size", [512, 1024])
def test_eight_prompts_at_full_resolution_fit_in_4096_pixels(size):
    rows = {"base": images(8, size), "aligned": images(8, size, seed=1)}
    grid, layout = labelled_grid(rows, PROMPTS, {"base": torch.rand(8), "aligned": torch.rand(8)})
    assert grid.size == layout.size and grid.width <= MAX_WIDTH
    # Shrunk, not upscaled: the widest tiles that fit (8 tiles, 6-pixel gaps, the label column), square.
    assert layout.tile_width == (MAX_WIDTH - layout.label_width - PAD) // 8 - PAD == layout.tile_height
    assert layout.tile_width < size
    # A shrunk tile is the image resized (its mean colour is kept).
    original = rows["aligned"][3].permute(1, 2, 0).numpy() * 255
    assert np.abs(tile(grid, layout.tile_box(1, 3)).mean((0, 1)) - original.mean((0, 1))).max() < 2


def test_small_images_are_enlarged_by_a_whole_factor_and_kept_exactly():
    rows = {"base": images(3, 32), "aligned": images(3, 32, seed=1)}
    grid, layout = labelled_grid(rows, PROMPTS[:3])
    assert (layout.tile_height, layout.tile_width) == (128, 128) and layout.score_lines == 0
    for row, samples in enumerate(rows.values()):
        for column in range(3):
            expected = (samples[column].permute(1, 2, 0).numpy() * 255).round()
            enlarged = np.repeat(np.repeat(expected, 4, axis=0), 4, axis=1)  # nearest neighbour, ×4
            np.testing.assert_array_equal(tile(grid, layout.tile_box(row, column)), enlarged)


def test_row_labels_scores_and_prompts_are_drawn_where_the_layout_puts_them():
    rows = {"base": torch.ones(2, 3, 64, 64), "aligned": torch.ones(2, 3, 64, 64)}  # white tiles
    plain, _ = labelled_grid(rows, ["a", "b"])
    scored, layout = labelled_grid(rows, ["a red circle", "a blue square"], {"base": torch.tensor([0.1, 0.2]),
                                   "aligned": torch.tensor([0.3, 0.4])}, "toy_t2i")
    array = np.array(scored)
    ink = array.min(axis=2) < 128
    left, top, right, bottom = layout.tile_box(0, 0)
    assert ink[top:bottom, :left].any()  # the row's name left of its first tile
    assert ink[bottom : bottom + 18, left:right].any()  # the score under the tile
    prompt_top = layout.size[1] - 3 * 18 - PAD
    assert ink[prompt_top:, left:right].any() and ink[prompt_top:, layout.tile_box(0, 1)[0] :].any()
    assert not ink[top:bottom, left:right].any()  # the tiles themselves are the samples (white)
    assert scored.height == plain.height + 2 * 18  # one score line per row


def test_audio_rows_become_spectrograms_with_their_clips_beside_the_grid(tmp_path):
    clips = {
        "base": Audio(0.1 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(0)), 8000),
        "aligned": Audio(0.1 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(1)), 8000),
    }
    grid = save_samples(clips, tmp_path / "grid.png", ["low notes", "high notes"], None)
    assert Image.open(tmp_path / "grid.png").size == grid.size and grid.width <= MAX_WIDTH
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == [
        "aligned-000.wav", "aligned-001.wav", "base-000.wav", "base-001.wav"
    ]


def test_rows_of_unequal_length_are_refused():
    with pytest.raises(ValueError, match="as many samples in every row"):
        labelled_grid({"base": images(2, 8), "aligned": images(3, 8)}, PROMPTS)


def test_scores_that_beat_the_first_row_are_green_and_those_that_lose_red():
    rows = {"base": torch.ones(2, 3, 64, 64), "aligned": torch.ones(2, 3, 64, 64)}
    scores = {"base": torch.tensor([0.5, 0.5]), "aligned": torch.tensor([0.7, 0.3])}

    def colours(higher_is_better: bool) -> list[set[tuple[int, int, int]]]:
        grid, layout = labelled_grid(rows, ["a", "b"], scores, higher_is_better=higher_is_better)
        found = []
        for column in range(2):
            left, _, right, bottom = layout.tile_box(1, column)
            band = np.array(grid)[bottom : bottom + 18, left:right].reshape(-1, 3)
            found.append({tuple(pixel) for pixel in band if pixel.min() < 200})
        return found

    better, worse = colours(higher_is_better=True)
    assert BETTER in better and WORSE not in better and WORSE in worse and BETTER not in worse
    better, worse = colours(higher_is_better=False)  # lower is better (a distance): the other way round
    assert WORSE in better and BETTER in worse
