"""Bootstrap intervals over facts: every headline number of a study carries one.

A study's numbers (an efficacy, a peak average indirect effect, an MLP share) are statistics of
per-fact measurements. :func:`bootstrap` resamples the facts with replacement, recomputes the
statistic on each resample and reports the percentile interval (Efron's percentile bootstrap)
next to the statistic on all facts, with the number of facts ``n``:

    >>> import torch
    >>> wins = torch.tensor([1.0] * 45 + [0.0] * 5)
    >>> est = bootstrap(lambda x: x.mean(), wins, seed=0)
    >>> round(est.value, 6), est.n, est.low < 0.9 < est.high <= 1.0
    (0.9, 50, True)
    >>> est.percent()
    '90% (95% CI 80-98, n=50)'

Statistics of several aligned arrays (the same facts in the same order) resample them together:
``bootstrap(lambda ie, te: ie.mean(0).max() / te.mean(), effects, totals)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kloc_lens.errors import KlocLensError

__all__ = ["Estimate", "IntervalError", "bootstrap", "bootstrap_all"]

N_RESAMPLES = 1000
"""Resamples per interval (the percentile interval's error is well under a point at 1000)."""


class IntervalError(KlocLensError):
    """A bootstrap that cannot be computed as asked."""


@dataclass(frozen=True)
class Estimate:
    """A statistic over facts with its bootstrap interval.

    Attributes:
        value: The statistic on all facts (NaN when undefined, e.g. a share of no effect).
        low: Lower end of the interval (NaN when undefined).
        high: Upper end.
        n: Number of facts.
        level: Coverage of the interval.
    """

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: undefined numbers as ``None``."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "value": clean(self.value),
            "ci_low": clean(self.low),
            "ci_high": clean(self.high),
            "n": self.n,
            "level": self.level,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        """Read :meth:`as_dict` back."""

        def number(x: Any) -> float:
            return math.nan if x is None else float(x)

        return cls(
            number(data["value"]),
            number(data["ci_low"]),
            number(data["ci_high"]),
            int(data["n"]),
            float(data["level"]),
        )

    def _format(self, scale: float, digits: int, unit: str) -> str:
        if math.isnan(self.value):
            return f"undefined (n={self.n})"
        level = round(100 * self.level)
        value = f"{scale * self.value:.{digits}f}{unit}"
        if math.isnan(self.low):
            return f"{value} (n={self.n})"
        low, high = f"{scale * self.low:.{digits}f}", f"{scale * self.high:.{digits}f}"
        return f"{value} ({level}% CI {low}-{high}, n={self.n})"

    def percent(self, digits: int = 0) -> str:
        """``"90% (95% CI 82-98, n=50)"``."""
        return self._format(100.0, digits, "%")

    def number(self, digits: int = 2) -> str:
        """``"0.61 (95% CI 0.55-0.66, n=200)"``."""
        return self._format(1.0, digits, "")


def bootstrap(
    statistic: Callable[..., Tensor | float],
    *arrays: Tensor,
    n_resamples: int = N_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The statistic on all facts and its percentile bootstrap interval over facts.

    Args:
        statistic: Maps the arrays (facts along dimension 0) to a number.
        *arrays: Per-fact measurements, all with the same first dimension (the facts).
        n_resamples: Resamples drawn.
        level: Coverage of the interval.
        seed: Seed of the resampling (same seed, same interval).

    Returns:
        The estimate. Resamples on which the statistic is undefined (NaN) are left out; if more
        than half are, the interval is NaN (the statistic is too unstable to bound).

    Raises:
        IntervalError: No arrays, arrays of different lengths, or a level outside (0, 1).
    """
    estimates = bootstrap_all(
        lambda *a: {"value": float(statistic(*a))},
        *arrays,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
    )
    return estimates["value"]


def bootstrap_all(
    statistics: Callable[..., dict[str, float]],
    *arrays: Tensor,
    n_resamples: int = N_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """:func:`bootstrap` of several statistics computed together on the same resamples.

    Args:
        statistics: Maps the arrays to named numbers.
        *arrays: Per-fact measurements (facts along dimension 0).
        n_resamples: Resamples drawn.
        level: Coverage of the intervals.
        seed: Seed of the resampling.

    Returns:
        One estimate per name.

    Raises:
        IntervalError: As :func:`bootstrap`.
    """
    if not arrays:
        raise IntervalError("bootstrap needs at least one array of per-fact values")
    n = int(arrays[0].shape[0])
    if any(int(a.shape[0]) != n for a in arrays):
        lengths = [int(a.shape[0]) for a in arrays]
        raise IntervalError(f"bootstrap arrays must have one row per fact; got lengths {lengths}")
    if not 0.0 < level < 1.0:
        raise IntervalError(f"bootstrap level={level!r}: use a value in (0, 1)")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise IntervalError(f"bootstrap n_resamples={n_resamples!r}: use an integer >= 1")
    if n == 0:
        names = statistics(*arrays).keys() if arrays else ()
        return {name: Estimate(math.nan, math.nan, math.nan, 0, level) for name in names}
    values = {name: float(v) for name, v in statistics(*arrays).items()}
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (n_resamples, n), generator=generator)
    draws: dict[str, list[float]] = {name: [] for name in values}
    for rows in picks:
        for name, v in statistics(*(a[rows.to(a.device)] for a in arrays)).items():
            draws[name].append(float(v))
    tail = (1.0 - level) / 2
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    out: dict[str, Estimate] = {}
    for name, value in values.items():
        samples = torch.tensor(draws[name], dtype=torch.float64)
        samples = samples[~torch.isnan(samples)]
        if math.isnan(value) or len(samples) < n_resamples / 2:
            out[name] = Estimate(value, math.nan, math.nan, n, level)
            continue
        low, high = torch.quantile(samples, quantiles)
        out[name] = Estimate(value, float(low), float(high), n, level)
    return out
