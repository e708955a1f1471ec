"""The localization half: causal traces of many facts, and the numbers that say where a fact is.

Each traced fact is one unit: ROME's causal trace (residual, MLP-window and attention-window
restores, and the residual with MLP or attention severed) of its entity prompt with one span
corrupted by Gaussian noise. :func:`localization_numbers` turns the traces into the study's
headline numbers, each a share of the total effect ``TE = p(clean) - p(corrupted)`` (ratios of
means over facts, as ROME averages) with a bootstrap interval over facts. With ``L`` layers,
*early* means the first half, layers ``0 .. L/2 - 1``, and *late* the rest.

===========================  =======================================================================
number                       definition
===========================  =======================================================================
``total_effect``             mean ``TE``
``resid_last_span``          peak over early layers of the residual restore at the span's last token
``resid_first_span``         peak over all layers of the residual restore at the span's first token
``last_to_first``            ``resid_last_span / resid_first_span``
``facts_half_te``            share of facts whose own early peak at the span's last token reaches
                             half their own ``TE``
``mlp_last_span``            peak of the MLP-window restore at the span's last token (layer given)
``attn_last_span``           peak of the attention-window restore there
``mlp_to_attn``              ``mlp_last_span / attn_last_span``
``mlp_share``                ``mlp / (mlp + attn)`` of those peaks
``attn_last_token_early``    peak of the attention-window restore at the prompt's last token, early
``attn_last_token_late``     the same, late layers
``mlp_last_token``           peak of the MLP-window restore at the prompt's last token
``mlp_share_last_token``     ``mlp / (mlp + attn)`` of the MLP- and attention-window peaks (all
                             layers) at the prompt's last token
``severed_mlp_drop``         share of the early residual effect at the span's last token (summed
                             over early layers) removed by severing MLP (ROME's severed trace)
``severed_attn_drop``        the same, severing attention
===========================  =======================================================================

Effects under 1% of the total effect count as none: shares and drops of them are undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kloc_lens.aggregate import aggregate_traces, position_bins
from kloc_lens.intervals import Estimate, bootstrap_all
from kloc_lens.results import AggregateSet, TraceSet
from kloc_lens.types import TraceKind

__all__ = ["KINDS", "Localization", "localization_numbers", "trace_effects"]

KINDS: tuple[tuple[TraceKind, TraceKind | None], ...] = (
    (TraceKind.RESID, None),
    (TraceKind.MLP, None),
    (TraceKind.ATTN, None),
    (TraceKind.RESID, TraceKind.MLP),
    (TraceKind.RESID, TraceKind.ATTN),
)
"""The traces of every unit: residual, MLP window, attention window, residual with MLP severed,
residual with attention severed."""

_RESID, _MLP, _ATTN, _SEV_MLP, _SEV_ATTN = range(5)
_FIRST, _MIDDLE, _LAST_SPAN, _SUBSEQUENT, _FURTHER, _LAST = range(6)

NUMBERS = (
    "total_effect",
    "resid_last_span",
    "resid_first_span",
    "last_to_first",
    "facts_half_te",
    "mlp_last_span",
    "attn_last_span",
    "mlp_to_attn",
    "mlp_share",
    "attn_last_token_early",
    "attn_last_token_late",
    "mlp_last_token",
    "mlp_share_last_token",
    "severed_mlp_drop",
    "severed_attn_drop",
)
"""The headline numbers, in report order."""


def trace_effects(traces: Sequence[TraceSet], span: str) -> tuple[Tensor, Tensor]:
    """Per-fact indirect effects by kind, bin and layer, and per-fact total effects.

    Returns:
        ``effects[fact, kind, bin, layer]`` (kinds in :data:`KINDS` order, bins as
        :func:`~kloc_lens.aggregate.bin_names`; NaN where a fact has no token in a bin) and
        ``totals[fact]``.
    """
    n_layers = len(traces[0].traces[0].layers)
    effects = torch.full((len(traces), len(KINDS), 6, n_layers), math.nan, dtype=torch.float64)
    totals = torch.zeros(len(traces), dtype=torch.float64)
    for f, trace_set in enumerate(traces):
        totals[f] = trace_set.clean_score - trace_set.corrupted_score
        for k, (kind, severed) in enumerate(KINDS):
            trace = trace_set.get(kind, severed)
            bins = position_bins(span=trace.spans[span], n_tokens=len(trace.str_tokens), name=span)
            ie = trace.indirect_effect.double()
            for b, positions in enumerate(bins.values()):
                columns = [trace.positions.index(p) for p in positions if p in trace.positions]
                if columns:
                    effects[f, k, b] = ie[:, columns].mean(1)
    return effects, totals


def _numbers(effects: Tensor, totals: Tensor) -> dict[str, float]:
    """Every headline number of one (re)sample of facts."""
    n_layers = effects.shape[-1]
    early = max(1, n_layers // 2)
    te = float(totals.mean())
    floor = 0.01 * abs(te)
    mean = effects.nanmean(0)  # kind, bin, layer

    def share(x: float) -> float:
        return x / te if abs(te) > floor and te != 0 else math.nan

    resid_last = float(mean[_RESID, _LAST_SPAN, :early].max())
    resid_first = float(mean[_RESID, _FIRST].max())
    mlp = float(mean[_MLP, _LAST_SPAN].max())
    attn = float(mean[_ATTN, _LAST_SPAN].max())
    positive = max(mlp, 0.0) + max(attn, 0.0)
    own_peak = effects[:, _RESID, _LAST_SPAN, :early].max(1).values
    reached = (own_peak >= 0.5 * totals) & (totals > 0)
    plain = mean[_RESID, _LAST_SPAN, :early].clamp(min=0).sum()
    mlp_final = max(float(mean[_MLP, _LAST].max()), 0.0)
    final = mlp_final + max(float(mean[_ATTN, _LAST].max()), 0.0)

    def drop(kind: int) -> float:
        severed = mean[kind, _LAST_SPAN, :early].clamp(min=0).sum()
        return float(1 - severed / plain) if float(plain) > floor else math.nan

    return {
        "total_effect": te,
        "resid_last_span": share(resid_last),
        "resid_first_span": share(resid_first),
        "last_to_first": resid_last / resid_first if resid_first > floor else math.nan,
        "facts_half_te": float(reached.double().mean()),
        "mlp_last_span": share(mlp),
        "attn_last_span": share(attn),
        "mlp_to_attn": mlp / attn if attn > floor else math.nan,
        "mlp_share": max(mlp, 0.0) / positive if positive > floor else math.nan,
        "attn_last_token_early": share(float(mean[_ATTN, _LAST, :early].max())),
        "attn_last_token_late": share(float(mean[_ATTN, _LAST, early:].max()))
        if early < n_layers
        else math.nan,
        "mlp_last_token": share(float(mean[_MLP, _LAST].max())),
        "mlp_share_last_token": mlp_final / final if final > floor else math.nan,
        "severed_mlp_drop": drop(_SEV_MLP),
        "severed_attn_drop": drop(_SEV_ATTN),
    }


def _peak_layers(effects: Tensor) -> dict[str, int]:
    mean = effects.nanmean(0)
    early = max(1, effects.shape[-1] // 2)
    return {
        "resid_last_span": int(mean[_RESID, _LAST_SPAN, :early].argmax()),
        "resid_first_span": int(mean[_RESID, _FIRST].argmax()),
        "mlp_last_span": int(mean[_MLP, _LAST_SPAN].argmax()),
        "attn_last_span": int(mean[_ATTN, _LAST_SPAN].argmax()),
        "attn_last_token_early": int(mean[_ATTN, _LAST, :early].argmax()),
        "attn_last_token_late": early + int(mean[_ATTN, _LAST, early:].argmax())
        if early < effects.shape[-1]
        else -1,
        "mlp_last_token": int(mean[_MLP, _LAST].argmax()),
    }


@dataclass(frozen=True)
class Localization:
    """The localization result of one side of the study.

    Attributes:
        perspective: Which side: ``"entity"`` (entity prompts, subject corrupted),
            ``"relation"`` (entity prompts, the relation words corrupted) or
            ``"relation_prompt"`` (relation-perspective prompts, ``span`` corrupted).
        span: The corrupted span.
        n_facts: Facts traced.
        corruption: The corruption, in words.
        window: The MLP/attention window.
        numbers: The headline numbers (:data:`NUMBERS`) with their intervals.
        layers: The layer of each peak (on all facts).
        aggregate: ROME's average indirect effects by bin and layer.
        example: The first fact's traces.
    """

    perspective: str
    span: str
    n_facts: int
    corruption: str
    window: int
    numbers: dict[str, Estimate]
    layers: dict[str, int]
    aggregate: AggregateSet
    example: TraceSet

    @property
    def early_layers(self) -> int:
        """How many layers count as early (the first half)."""
        return max(1, len(self.aggregate.traces[0].layers) // 2)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the aggregate and example are stored as tensors)."""
        return {
            "perspective": self.perspective,
            "span": self.span,
            "n_facts": self.n_facts,
            "corruption": self.corruption,
            "window": self.window,
            "early_layers": self.early_layers,
            "clean_p": self.aggregate.traces[0].clean_score,
            "corrupted_p": self.aggregate.traces[0].corrupted_score,
            "numbers": {name: est.as_dict() for name, est in self.numbers.items()},
            "layers": dict(self.layers),
        }


def localization_numbers(
    traces: Sequence[TraceSet],
    span: str,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    bin_spans: Sequence[str] | None = None,
) -> tuple[dict[str, Estimate], dict[str, int], AggregateSet]:
    """The headline numbers with bootstrap intervals over facts, their layers and the aggregate.

    Args:
        traces: One trace set per fact (kinds as :data:`KINDS`).
        span: The corrupted span (the numbers are read at its last token and the last token).
        n_bootstrap: Resamples per interval.
        seed: Seed of the resampling.
        bin_spans: Bin the aggregate around these spans (:func:`~kloc_lens.aggregate.span_bins`)
            rather than around ``span`` alone.
    """
    effects, totals = trace_effects(traces, span)
    estimates = bootstrap_all(_numbers, effects, totals, n_resamples=n_bootstrap, seed=seed)
    aggregate = aggregate_traces(traces, span, bin_spans=bin_spans)
    return estimates, _peak_layers(effects), aggregate
