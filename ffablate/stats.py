"""Confidence intervals for a handful of seeds: Student-t for a mean, Welch for a difference of two means.

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

    def excludes_zero(self) -> bool:
        return self.has_ci and (self.low > 0 or self.high < 0)


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
    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        return Estimate(math.nan, math.nan, 0)
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    diff, n = mean_a - mean_b, min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Estimate(diff, math.nan, n)
    sa, sb = var_a / len(a), var_b / len(b)
    se2 = sa + sb
    if se2 == 0:
        return Estimate(diff, 0.0, n)
    df = se2**2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    return Estimate(diff, t_quantile(0.5 + level / 2, df) * math.sqrt(se2), n)


def fmt(estimate: Estimate, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``"85.3 ± 1.2"`` (percent by default); the CI is "–" when it does not exist (n < 2)."""
    if not math.isfinite(estimate.mean):
        return "–"
    sign = "+" if signed else ""
    mean = f"{estimate.mean * scale:{sign}.{digits}f}"
    if not estimate.has_ci:
        return f"{mean} ± –"
    return f"{mean} ± {estimate.half_width * scale:.{digits}f}"
