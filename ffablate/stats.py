"""Confidence intervals for a handful of seeds: Student-t for a mean, Welch for a difference of two means (and
for a contrast of several, such as a gap's change between two K), paired t for per-seed differences.

Studies run 2-5 seeds per configuration, so normal-approximation intervals would be far too narrow; the t
quantile is what makes "± CI" honest at that n. It comes from scipy, exact at the fractional degrees of freedom
Welch's interval has (a series approximation was 0.5 off at df 1.2 and 0.15 at 1.5, where 2- and 3-seed Welch
intervals land).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """A mean (or difference of means) and the half-width of its confidence interval (nan when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.half_width)

    @property
    def no_spread(self) -> bool:
        """An interval of width 0: every seed gave the same value (on each side of a difference, or the same
        per-seed difference). The arithmetic is right (scipy gives it too), but two or three equal numbers, e.g.
        FF collapsed to exactly chance on every seed, do not show the value is exact. Accuracies are fractions
        of at most millions of images, so a width under 1e-9 is the rounding of equal values, not a spread."""
        return self.has_ci and self.half_width < 1e-9

    def excludes_zero(self) -> bool:
        return self.has_ci and (self.low > 0 or self.high < 0)

    def backs(self, other: Estimate) -> bool:
        """Whether this interval excludes zero on ``other``'s side: a paired interval backing a Welch one. Over the
        seeds both sides share, the paired mean can have the other sign."""
        return self.excludes_zero() and (self.mean > 0) == (other.mean > 0)

    @property
    def decisive(self) -> bool:
        """Whether the interval backs a direction word ("ahead", "behind", "widens"): it exists, excludes zero
        and does not owe its width of zero to seeds without spread."""
        return self.excludes_zero() and not self.no_spread


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (df may be fractional, as Welch's is)."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    from scipy.stats import t  # imported here: the kernels, trainers and audit never need it

    return float(t.ppf(p, df))


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return mean, var


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean of ``values`` with its t-interval half-width; nan half-width for fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        return Estimate(math.nan, math.nan, 0)
    mean, var = _mean_var(values)
    n = len(values)
    if n < 2:
        return Estimate(mean, math.nan, n)
    half = t_quantile(0.5 + level / 2, n - 1) * math.sqrt(var / n)
    return Estimate(mean, half, n)


def welch_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Estimate:
    """mean(a) - mean(b) with Welch's interval (unequal variances, Welch-Satterthwaite degrees of freedom).

    ``n`` of the result is min(len(a), len(b)). With identical zero variances the interval has width 0.
    """
    return contrast_ci([(1.0, a), (-1.0, b)], level)


def contrast_ci(terms: Sequence[tuple[float, Sequence[float]]], level: float = 0.95) -> Estimate:
    """sum(weight * mean(sample)) over independent samples with a Welch-Satterthwaite interval: Welch's for
    (+1, a), (-1, b); a gap's change between two K is (+1, FF at K1), (-1, BP at K1), (-1, FF at K0), (+1, BP at K0).

    ``n`` of the result is the smallest sample's size; with no spread in any sample the interval has width 0.
    """
    samples = [(w, [float(v) for v in values]) for w, values in terms]
    if not all(values for _, values in samples):
        return Estimate(math.nan, math.nan, 0)
    moments = [(w, len(values), *_mean_var(values)) for w, values in samples]
    diff = sum(w * mean for w, _, mean, _ in moments)
    n = min(size for _, size, _, _ in moments)
    if n < 2:
        return Estimate(diff, math.nan, n)
    parts = [(w * w * var / size, size) for w, size, _, var in moments]
    se2 = sum(part for part, _ in parts)
    if not math.isfinite(se2):  # a NaN or inf among the values: no interval, as mean_ci and paired_ci give
        return Estimate(diff, math.nan, n)
    if se2 == 0:
        return Estimate(diff, 0.0, n)
    df = se2**2 / sum(part**2 / (size - 1) for part, size in parts)
    return Estimate(diff, t_quantile(0.5 + level / 2, df) * math.sqrt(se2), n)


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Estimate:
    """mean(a - b) over pairs (a[i], b[i]) with the t interval of the per-seed differences (n - 1 degrees of
    freedom), as scipy.stats.ttest_rel(a, b).confidence_interval() gives it. For FF and BP runs that share a
    seed, and with it initialisation and data order; ``a`` and ``b`` must be in the same seed order."""
    return mean_ci([float(x) - float(y) for x, y in zip(a, b, strict=True)], level)


def fmt(estimate: Estimate, scale: float = 100.0, digits: int = 1, signed: bool = False, unit: str = "") -> str:
    """``"85.3 ± 1.2"`` (percent by default, ``unit`` after the numbers); the CI is "–" when it does not exist
    (n < 2), and a width of 0 says "(no spread across seeds)", not a confident ± 0.0."""
    if not math.isfinite(estimate.mean):
        return "–"
    # An interval that excludes zero must not print as one that reaches it ("+0.1 ± 0.1" for 0.14 ± 0.136, called
    # "ahead"): one more digit until the printed ends exclude zero too (up to 15, where a float's digits end).
    size, half = abs(estimate.mean) * scale, estimate.half_width * scale
    while estimate.decisive and digits < 15 and round(size, digits) <= round(half, digits):
        digits += 1
    mean = fmt_number(estimate.mean, scale, digits, signed)
    if not estimate.has_ci:
        return f"{mean} ± –{unit}"
    text = f"{mean} ± {estimate.half_width * scale:.{digits}f}{unit}"
    return text + " (no spread across seeds)" if estimate.no_spread else text


def fmt_number(value: float, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``value`` in percent (by default) without an interval, as ``fmt`` prints a mean: one that rounds to zero
    prints unsigned, since "-0.0" (a difference of -1e-16, or -0.04 pp) reads as a direction."""
    if not round(abs(value) * scale, digits):
        return f"{0:.{digits}f}"
    return f"{value * scale:{'+' if signed else ''}.{digits}f}"
