"""Seeds derived from numbers that name one random draw, so that per-sample randomness is the same in resumed,
accumulated and multi-process runs."""

from __future__ import annotations

import numpy as np


def derived_seed(*numbers: int) -> int:
    """A 64-bit seed mixed from ``numbers`` (NumPy's SeedSequence), e.g. (item seed, stream, sample index).

    Streams of one item (generation, selection, noise) then never overlap, whatever the numbers' sizes.
    """
    high, low = np.random.SeedSequence([int(number) for number in numbers]).generate_state(2)
    return (int(high) << 32) | int(low)
