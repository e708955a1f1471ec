"""Does localization inform editing? The study's answer on the facts of its layer sweep.

The layer sweep edits ``n_layer_sweep`` facts per perspective at every layer. Each of those facts
is also traced on the prompt its edits key on, with the subject corrupted (the entity side's
noise): the entity prompt for entity edits, the relation prompt with the true object for relation
edits. Per perspective, per metric and per effect (the MLP-window and the residual restore at the
subject's last token, where the edit's key is read), :func:`~kloc_lens.edit.trace_edit_regression`
regresses the edit's success (its probability margin after the edit: continuous, as Hase et
al.'s rewrite score) on layer fixed effects, then adds the trace effect at the edited layer.
Disabling edits are left out (NaN cells). The report's verdict reads the interval of the
increment: under 0.05 of R^2 at its upper end, the trace "adds little once the layer is known";
over 0.05 at its lower end, it adds; anything else is not settled at the study's n. A sweep of
fewer than two facts has no regression.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kloc_lens.edit.evaluate import HEADLINE, EditMetric
from kloc_lens.edit.informs import TraceEditRegression, trace_edit_regression
from kloc_lens.edit.sweep import EditLayerSweep
from kloc_lens.facts import Perspective
from kloc_lens.results import TraceSet
from kloc_lens.study.localization import trace_effects

__all__ = ["EFFECTS", "METRICS", "Informs", "informs_analysis"]

METRICS: dict[str, tuple[EditMetric, ...]] = {
    "entity": (EditMetric.EFFICACY, EditMetric.PARAPHRASE, EditMetric.NEIGHBORHOOD),
    "relation": (EditMetric.RELATION_ADD, EditMetric.RELATION_PARAPHRASE,
                 EditMetric.RELATION_REMOVE),
}  # fmt: skip
"""The metrics regressed per edited perspective (the edited side's own)."""

EFFECTS = ("mlp", "resid")
"""The trace effects regressed on: MLP-window restore, residual restore (last subject token)."""

_KIND = {"resid": 0, "mlp": 1}  # rows of trace_effects' kinds
_LAST_SPAN = 2  # the last-span bin of trace_effects


def edited_site_effects(traces: Sequence[TraceSet], layers: Sequence[int]) -> dict[str, Tensor]:
    """Per effect, the ``[fact, layer]`` indirect effect at the subject's last token."""
    effects, _ = trace_effects(traces, "subject")
    columns = list(layers)
    return {name: effects[:, _KIND[name], _LAST_SPAN][:, columns] for name in EFFECTS}


@dataclass(frozen=True)
class Informs:
    """The regressions of one study, and the tables behind them (for the scatter plot).

    Attributes:
        layers: The sweep's layers.
        n_facts: Facts per perspective.
        regressions: ``regressions[perspective][effect][metric]``.
        success: ``success[perspective]``: the headline metric's margin, ``[fact, layer]``
            (NaN: a disabling edit).
        effects: ``effects[perspective][effect]``: the trace effect, ``[fact, layer]``.
    """

    layers: tuple[int, ...]
    n_facts: int
    regressions: dict[str, dict[str, dict[str, TraceEditRegression]]]
    success: dict[str, Tensor]
    effects: dict[str, dict[str, Tensor]]

    def sentences(self) -> list[str]:
        """One sentence per perspective: the headline metric against the MLP effect."""
        lines = []
        for perspective, by_effect in self.regressions.items():
            metric = HEADLINE[Perspective(perspective)].value
            fit = by_effect["mlp"][metric]
            verdict = (
                "the trace adds little once the layer is known"
                if not math.isnan(fit.increment.high) and fit.increment.high < 0.05
                else "the trace adds to what the layer explains"
                if not math.isnan(fit.increment.low) and fit.increment.low > 0.05
                else "whether the trace adds to the layer is not settled at this n"
            )
            lines.append(
                f"Does localization inform editing ({perspective} edits, {metric} margin on "
                f"{self.n_facts} facts x {len(self.layers)} layers, MLP-window effect at the "
                f"subject's last token)? {fit.sentence(f'{metric}', 'the trace effect')} "
                f"So {verdict}."
            )
        return lines

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, tables included (NaN as ``None``)."""

        def rows(table: Tensor) -> list[list[float | None]]:
            return [[None if math.isnan(x) else float(x) for x in row] for row in table.tolist()]

        return {
            "layers": list(self.layers),
            "n_facts_per_perspective": self.n_facts,
            "regressions": {
                p: {e: {m: fit.as_dict() for m, fit in by_m.items()} for e, by_m in by_e.items()}
                for p, by_e in self.regressions.items()
            },
            "success": {p: rows(t) for p, t in self.success.items()},
            "effects": {p: {e: rows(t) for e, t in by.items()} for p, by in self.effects.items()},
            "text": self.sentences(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Informs:
        """Read :meth:`as_dict` back."""

        def table(rows: list[list[float | None]]) -> Tensor:
            return torch.tensor(
                [[math.nan if x is None else x for x in row] for row in rows], dtype=torch.float64
            )

        return cls(
            layers=tuple(int(x) for x in data["layers"]),
            n_facts=int(data["n_facts_per_perspective"]),
            regressions={
                p: {
                    e: {m: TraceEditRegression.from_dict(fit) for m, fit in by_m.items()}
                    for e, by_m in by_e.items()
                }
                for p, by_e in data["regressions"].items()
            },
            success={p: table(rows) for p, rows in data["success"].items()},
            effects={
                p: {e: table(rows) for e, rows in by.items()} for p, by in data["effects"].items()
            },
        )


def informs_analysis(
    sweeps: Mapping[str, EditLayerSweep],
    traces: Mapping[str, Sequence[TraceSet]],
    *,
    n_bootstrap: int,
    seed: int,
) -> Informs:
    """The regressions of every perspective, metric and effect.

    Args:
        sweeps: Per edited perspective, the layer sweep of its requests (rows: facts).
        traces: Per perspective, one trace per row of its sweep, on the prompt its edits key
            on, with the subject corrupted.
        n_bootstrap: Resamples of the intervals.
        seed: Their seed.
    """
    regressions: dict[str, dict[str, dict[str, TraceEditRegression]]] = {}
    success: dict[str, Tensor] = {}
    effects: dict[str, dict[str, Tensor]] = {}
    layers: tuple[int, ...] = ()
    n_facts = 0
    for perspective, sweep in sweeps.items():
        layers, n_facts = sweep.layers, sweep.shape[0]
        effects[perspective] = edited_site_effects(traces[perspective], sweep.layers)
        broken = sweep.disabling()
        regressions[perspective] = {}
        for effect, table in effects[perspective].items():
            regressions[perspective][effect] = {
                metric.value: trace_edit_regression(
                    sweep.margin(metric).masked_fill(broken, math.nan),
                    table,
                    layers=sweep.layers,
                    n_resamples=n_bootstrap,
                    seed=seed,
                )
                for metric in METRICS[perspective]
            }
        headline = HEADLINE[Perspective(perspective)]
        success[perspective] = sweep.margin(headline).masked_fill(broken, math.nan)
    return Informs(layers, n_facts, regressions, success, effects)
