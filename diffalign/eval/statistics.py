"""Confidence intervals for evaluation reports: a score's mean, the paired difference, the win rate.

Samples are the unit of analysis: sample ``i`` of the base and of the aligned model share prompt and seed,
and different samples are treated as independent draws.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats
from torch import Tensor


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval; ``low``/``high`` are ``None`` for fewer than two values."""

    value: float
    low: float | None
    high: float | None
    count: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WinRate(Interval):
    wins: int = 0
    ties: int = 0
    losses: int = 0


def mean_interval(values: Tensor, confidence: float = 0.95) -> Interval:
    """Mean with the Student-t interval ``x̄ ± t_{(1+c)/2, n−1} · s / √n`` (``s``: sample standard deviation)."""
    values = values.double().flatten()
    count = values.numel()
    if count == 0:
        raise ValueError("cannot average an empty set of scores")
    mean = values.mean().item()
    if count < 2:
        return Interval(mean, None, None, count)
    half_width = stats.t.ppf((1 + confidence) / 2, count - 1) * values.std().item() / math.sqrt(count)
    return Interval(mean, mean - half_width, mean + half_width, count)


def win_rate_interval(
    aligned: Tensor, base: Tensor, higher_is_better: bool = True, confidence: float = 0.95
) -> WinRate:
    """How often the aligned sample beats the base sample of the same prompt and seed; a tie counts one half.

    The interval is Wilson's score interval (Wilson, JASA 1927) for the proportion ``p̂ = (wins + ties/2) / n``::

        (p̂ + z²/2n ± z · √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n),   z = Φ⁻¹((1 + c)/2)

    Unlike the normal approximation it stays inside [0, 1] and does not collapse when every pair is won.
    Ties make the per-pair outcome less variable than a coin flip, so with ties the interval is conservative.
    """
    if aligned.shape != base.shape or aligned.ndim != 1:
        raise ValueError(
            f"win rate needs one aligned and one base score per sample, got shapes "
            f"{tuple(aligned.shape)} and {tuple(base.shape)}"
        )
    count = aligned.numel()
    if count == 0:
        raise ValueError("cannot compute a win rate without samples")
    better, worse = (aligned, base) if higher_is_better else (base, aligned)
    wins = int((better > worse).sum())
    ties = int((better == worse).sum())
    rate = (wins + ties / 2) / count
    z = stats.norm.ppf((1 + confidence) / 2)
    shrink = 1 + z**2 / count
    centre = (rate + z**2 / (2 * count)) / shrink
    half_width = z * math.sqrt(rate * (1 - rate) / count + z**2 / (4 * count**2)) / shrink
    # At p̂ = 0 or 1 a bound equals p̂ exactly; clamping keeps rounding from moving it outside [0, 1].
    low, high = max(0.0, centre - half_width), min(1.0, centre + half_width)
    return WinRate(rate, min(low, rate), max(high, rate), count, wins, ties, count - wins - ties)


def win_rate(aligned_scores: Tensor, base_scores: Tensor) -> float:
    """Fraction of prompts where the aligned sample scores higher; ties count one half."""
    wins = (aligned_scores > base_scores).float() + 0.5 * (aligned_scores == base_scores).float()
    return wins.mean().item()


@dataclass
class ScorerResult:
    """The scores one scorer gave both models: ``[N]`` per sample, or 0-dim for a set-level scorer."""

    key: str
    name: str
    higher_is_better: bool
    set_level: bool
    base: Tensor
    aligned: Tensor

    def summary(self, confidence: float) -> dict[str, Any]:
        if self.set_level:
            base, aligned = self.base.item(), self.aligned.item()
            better = aligned > base if self.higher_is_better else aligned < base
            return {"base": {"value": base}, "aligned": {"value": aligned}, "aligned_better": better}
        return {
            "base": mean_interval(self.base, confidence).to_dict(),
            "aligned": mean_interval(self.aligned, confidence).to_dict(),
            "difference": mean_interval(self.aligned - self.base, confidence).to_dict(),
            "win_rate": win_rate_interval(
                self.aligned, self.base, self.higher_is_better, confidence
            ).to_dict(),
        }


def format_interval(interval: dict[str, Any], signed: bool = False) -> str:
    """``value ± half-width`` of an :class:`Interval` as ``to_dict`` wrote it (the value alone without one)."""
    value = f"{interval['value']:+.4g}" if signed else f"{interval['value']:.4g}"
    if interval["low"] is None:
        return value
    return f"{value} ± {(interval['high'] - interval['low']) / 2:.2g}"
