"""Does localization inform editing? Hase et al.'s regression, with intervals over facts.

Hase et al. (2023) edit every fact at every layer and regress edit success on the layer alone
(layer fixed effects), then on the layer and the causal-trace effect at the edited site. If the
trace told us where to edit, the second model would explain clearly more of the variance; on
GPT-J they found it adds almost nothing (an R^2 increment of a few points at most), although
the trace effect and edit success are both high in the same early-middle layers.

:func:`trace_edit_regression` computes both fits in closed form (the trace coefficient is the
within-layer slope, by Frisch-Waugh-Lovell: the effect and the success each centred on their
layer's mean), their R^2 and the increment, and asks the practical question too: is the traced
peak layer of a fact a best layer to edit it at (share of facts), and how much success does
editing at the traced peak give away (mean gap to the fact's best layer)? Every number carries
a percentile bootstrap interval over facts (a fact's whole row of layers is resampled).

Cells that are NaN in either table (a disabling edit left out, a metric without prompts) are
left out of every number; facts with no valid cell are left out of the counts.

Example (success constructed from the layer plus the trace effect):
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> effect = torch.randn(400, 4, generator=g, dtype=torch.float64)
    >>> layer = torch.tensor([0.0, 0.5, 1.0, 0.2], dtype=torch.float64)
    >>> success = layer + 0.5 * effect + 0.1 * torch.randn(400, 4, generator=g, dtype=torch.float64)
    >>> fit = trace_edit_regression(success, effect, n_resamples=200)
    >>> round(fit.slope.value, 1), fit.increment.value > 0.5
    (0.5, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.edit._errors import EditError
from kloc_lens.intervals import N_RESAMPLES, Estimate, bootstrap_all

__all__ = ["NUMBERS", "TraceEditRegression", "trace_edit_regression"]

NUMBERS: tuple[str, ...] = (
    "r2_layer",
    "r2_layer_trace",
    "increment",
    "slope",
    "peak_is_best",
    "peak_gap",
)
"""The regression's numbers, in report order."""


@dataclass(frozen=True)
class TraceEditRegression:
    """Edit success regressed on layer fixed effects, then also on the trace effect.

    Attributes:
        n_facts: Facts with at least one valid cell.
        n_cells: Valid (fact, layer) cells.
        layers: The layers (columns of the tables).
        r2_layer: R^2 of success on the layer alone.
        r2_layer_trace: R^2 of success on the layer and the trace effect.
        increment: ``r2_layer_trace - r2_layer``: what the trace adds once the layer is known.
        slope: The trace effect's coefficient (success per unit of effect, within layers).
        peak_is_best: Share of facts whose traced peak layer scores within ``tolerance`` of
            their best layer.
        peak_gap: Mean over facts of (best layer's success - traced peak layer's success).
    """

    n_facts: int
    n_cells: int
    layers: tuple[int, ...]
    r2_layer: Estimate
    r2_layer_trace: Estimate
    increment: Estimate
    slope: Estimate
    peak_is_best: Estimate
    peak_gap: Estimate

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "n_facts": self.n_facts,
            "n_cells": self.n_cells,
            "layers": list(self.layers),
            **{name: getattr(self, name).as_dict() for name in NUMBERS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceEditRegression:
        """Read :meth:`as_dict` back."""
        return cls(
            n_facts=int(data["n_facts"]),
            n_cells=int(data["n_cells"]),
            layers=tuple(int(layer) for layer in data["layers"]),
            **{name: Estimate.from_dict(data[name]) for name in NUMBERS},
        )

    def sentence(self, success: str = "edit success", effect: str = "the trace effect") -> str:
        """The finding in words, with intervals."""
        return (
            f"Layer alone explains R^2 = {self.r2_layer.number()} of {success}; adding "
            f"{effect} explains {self.r2_layer_trace.number()}, an increment of "
            f"{self.increment.number(3)}. The traced peak layer is a best edit layer for "
            f"{self.peak_is_best.percent()} of facts; editing there gives up "
            f"{self.peak_gap.number()} on average."
        )


def _statistics(success: Tensor, effect: Tensor, tolerance: float) -> dict[str, float]:
    valid = ~(success.isnan() | effect.isnan())
    weight = valid.double()
    y = torch.where(valid, success, 0.0)
    e = torch.where(valid, effect, 0.0)
    count = weight.sum(0)
    total = float(count.sum())
    nan = dict.fromkeys(NUMBERS, math.nan)
    if total < 2:
        return nan
    per_layer = count.clamp(min=1)
    y_layer = y.sum(0) / per_layer
    e_layer = e.sum(0) / per_layer
    y_all = y.sum() / total
    dy = (y - y_layer) * weight
    de = (e - e_layer) * weight
    ss_total = float((((y - y_all) * weight) ** 2).sum())
    ss_layer = float((dy**2).sum())
    sxx = float((de**2).sum())
    sxy = float((de * dy).sum())
    out = dict(nan)
    if ss_total > 0:
        out["r2_layer"] = 1 - ss_layer / ss_total
        if sxx > 0:
            slope = sxy / sxx
            out["slope"] = slope
            out["r2_layer_trace"] = 1 - (ss_layer - slope * sxy) / ss_total
            out["increment"] = out["r2_layer_trace"] - out["r2_layer"]
    rows = valid.any(1)
    if bool(rows.any()):
        scored = success.masked_fill(~valid, -math.inf)[rows]
        peak = effect.masked_fill(~valid, -math.inf)[rows].argmax(1)
        best = scored.max(1).values
        at_peak = scored.gather(1, peak[:, None])[:, 0]
        gap = best - at_peak
        out["peak_is_best"] = float((gap <= tolerance).double().mean())
        out["peak_gap"] = float(gap.mean())
    return out


def _table(values: Any, what: str) -> Tensor:
    table = torch.as_tensor(values, dtype=torch.float64)
    if table.ndim != 2:
        raise EditError(f"{what} must be a [fact, layer] table; got shape {tuple(table.shape)}")
    if bool(table.isinf().any()):
        raise EditError(f"{what} holds an infinite value; use NaN for a missing cell")
    return table


def trace_edit_regression(
    success: Float[Tensor, "fact layer"] | Any,
    effect: Float[Tensor, "fact layer"] | Any,
    *,
    layers: Sequence[int] | None = None,
    tolerance: float = 1e-9,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> TraceEditRegression:
    """Regress edit success on the layer, then on the layer and the trace effect.

    Args:
        success: ``[fact, layer]`` edit success (e.g. :meth:`EditLayerSweep.margin`).
        effect: ``[fact, layer]`` trace effect at each layer's edited site (e.g. the indirect
            effect of restoring the MLP window or the residual at the subject's last token).
        layers: The layers of the columns (default ``0 .. n - 1``), for the record.
        tolerance: How close to a fact's best success the traced peak must score to count as
            a best layer.
        n_resamples: Bootstrap resamples over facts.
        seed: Seed of the resampling.

    Raises:
        EditError: Tables of other shapes than ``[fact, layer]`` or of different shapes, an
            infinite value, fewer than two facts, or ``layers`` that do not name the columns.
    """
    y = _table(success, "success")
    e = _table(effect, "effect")
    if y.shape != e.shape:
        raise EditError(
            f"success {tuple(y.shape)} and effect {tuple(e.shape)} must have the same shape"
        )
    if y.shape[0] < 2 or y.shape[1] < 1:
        raise EditError(f"the regression needs at least 2 facts and 1 layer; got {tuple(y.shape)}")
    names = tuple(range(y.shape[1])) if layers is None else tuple(int(x) for x in layers)
    if len(names) != y.shape[1]:
        raise EditError(f"layers names {len(names)} columns; the tables have {y.shape[1]}")
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise EditError(f"tolerance={tolerance!r}: use a finite number >= 0")
    valid = ~(y.isnan() | e.isnan())
    estimates = bootstrap_all(
        lambda s, t: _statistics(s, t, tolerance), y, e, n_resamples=n_resamples, seed=seed
    )
    n_facts = int(valid.any(1).sum())
    return TraceEditRegression(
        n_facts=n_facts,
        n_cells=int(valid.sum()),
        layers=names,
        **{
            name: Estimate(est.value, est.low, est.high, n_facts, est.level)
            for name, est in estimates.items()
        },
    )
