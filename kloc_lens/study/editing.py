"""The editing half: rank-one edits from each perspective, each scored from both.

Every (fact, perspective, layer) is one unit: ROME's edit of the fact computed at that layer
(key at the subject's last token, the editor's defaults unless the study's settings say
otherwise), applied as hooks (the model never changes) and scored on every metric of
:mod:`kloc_lens.edit.evaluate` before and after. The study edits ``n_edit`` facts per
perspective at the chosen layer, and the first ``n_layer_sweep`` of them at every layer of the
sweep, which shows what the choice of layer trades: early layers edit the subject's identity
(efficacy high, the subject's other relations dragged along), later ones only the fact. The
sweep's facts are traced too, and :mod:`.informs` asks Hase et al.'s question of them: does the
trace effect at a layer predict the edit's success there, once the layer is known?

The layer is the study's setting if given, else the entity trace's: the layer of the peak of
the MLP-window restore at the last subject token (ROME's choice, layer 17 on GPT-2 XL, came from
the same peak). Every result records where its layer came from.

Numbers are means over facts with bootstrap intervals over facts: per perspective and metric
the success before and after, and the 2 x 2 transfer matrix (edited perspective x evaluated
perspective, headline metric per evaluated side).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kloc_lens.edit.evaluate import HEADLINE, EditEvaluation, EditMetric, FactEvaluation
from kloc_lens.edit.guard import CollapseCheck, CollapseThresholds
from kloc_lens.edit.retrace import Retrace
from kloc_lens.facts import Perspective
from kloc_lens.intervals import Estimate, bootstrap
from kloc_lens.study.informs import Informs

__all__ = ["Editing", "LayerChoice", "metric_estimates"]

PERSPECTIVES = (Perspective.ENTITY, Perspective.RELATION)


@dataclass(frozen=True)
class LayerChoice:
    """The layer the study edits, and where that choice came from.

    Attributes:
        layer: The layer.
        source: ``"setting"`` (``StudyConfig.edit_layer``) or ``"trace"``.
        reason: The choice in words.
    """

    layer: int
    source: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"layer": self.layer, "source": self.source, "reason": self.reason}


def _post_pre(
    evaluations: Sequence[FactEvaluation], metric: EditMetric, n_bootstrap: int, seed: int
) -> dict[str, Estimate]:
    scores = [f.score(metric) for f in evaluations if f.score(metric).n_prompts > 0]
    out: dict[str, Estimate] = {}
    # generated first: what the edited model says, then the teacher-forced scores
    for field in ("pre_generated", "post_generated", "pre", "post"):
        values = [getattr(s, field) for s in scores]
        values = [v for v in values if not math.isnan(v)]  # generated: NaN in older results
        tensor = torch.tensor(values, dtype=torch.float64)
        out[field] = bootstrap(lambda x: x.mean(), tensor, n_resamples=n_bootstrap, seed=seed)
    change = torch.tensor([s.post - s.pre for s in scores], dtype=torch.float64)
    out["change"] = bootstrap(lambda x: x.mean(), change, n_resamples=n_bootstrap, seed=seed)
    return out


def metric_estimates(
    evaluations: Sequence[FactEvaluation], *, n_bootstrap: int, seed: int
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """``[edited perspective][metric][field]``: means over facts with intervals, for the
    fields ``pre_generated``, ``post_generated`` (greedy generation gives the answer),
    ``pre``, ``post`` (teacher-forced) and ``change`` (``post - pre``); facts on which a metric
    has no prompt are left out of it."""
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    for perspective in PERSPECTIVES:
        facts = [f for f in evaluations if f.edited is perspective]
        if not facts:
            continue
        out[perspective.value] = {
            metric.value: _post_pre(facts, metric, n_bootstrap, seed) for metric in EditMetric
        }
    return out


RETRACE_KINDS = ("resid", "mlp")
"""The traces of a fact re-traced after its edit."""


def retrace_data(again: Retrace) -> dict[str, Any]:
    """A re-trace unit: per kind, before and after, the effect at the subject's last token per
    layer, the MLP peaks and the clean scores."""
    return {
        "subject": again.request.fact.subject,
        "relation": again.request.fact.relation,
        "edited": again.request.edited.value,
        "layers": list(again.before.get("mlp").layers),
        "effects": {
            which: {kind: again.subject_last_effects(which, kind) for kind in RETRACE_KINDS}
            for which in ("before", "after")
        },
        "peak_before": again.peak_layer("before"),
        "peak_after": again.peak_layer("after"),
        "clean_before": again.before.clean_score,
        "clean_after": again.after.clean_score,
    }


def retrace_summary(
    units: Sequence[dict[str, Any]], *, n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """Per edited perspective: how many facts were traced again; of those with a site at the
    subject's last token before and after (:meth:`~kloc_lens.edit.Retrace.peak_layer`), the
    share whose MLP peak moved layer; the share with no site after the edit; each with its
    interval; the mean effect per layer before and after, and the units themselves."""
    out: dict[str, Any] = {}
    for perspective in PERSPECTIVES:
        mine = [u for u in units if u["edited"] == perspective.value]
        if not mine:
            continue
        sited = [u for u in mine if u["peak_before"] is not None and u["peak_after"] is not None]
        moved = torch.tensor(
            [float(u["peak_before"] != u["peak_after"]) for u in sited], dtype=torch.float64
        )
        unsited = torch.tensor([float(u["peak_after"] is None) for u in mine], dtype=torch.float64)
        mean = {
            which: {
                kind: torch.tensor([u["effects"][which][kind] for u in mine]).mean(0).tolist()
                for kind in RETRACE_KINDS
            }
            for which in ("before", "after")
        }
        out[perspective.value] = {
            "n_facts": len(mine),
            "layers": mine[0]["layers"],
            "moved": bootstrap(
                lambda x: x.mean(), moved, n_resamples=n_bootstrap, seed=seed
            ).as_dict(),
            "no_site_after": bootstrap(
                lambda x: x.mean(), unsited, n_resamples=n_bootstrap, seed=seed
            ).as_dict(),
            "mean_effects": mean,
            "facts": list(mine),
        }
    return out


LOCATIONS = ("traced", "random_layer", "best_layer", "random_position")
"""The edit locations of :func:`location_controls`, the traced one first."""


def location_controls(
    sweep: dict[int, list[tuple[FactEvaluation, CollapseCheck]]],
    other: Sequence[tuple[FactEvaluation, CollapseCheck]],
    layer: int,
    *,
    n_bootstrap: int,
    seed: int,
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """Wang & Veitch's controls: is the traced location better than an arbitrary one?

    ``[edited perspective][location][field]`` for the edited side's headline metric, the
    fields ``post_generated`` and ``post``, over the layer sweep's facts. Locations (one edit
    per fact each, with the same editor):

    - ``traced``: the chosen layer, key at the subject's last token;
    - ``random_layer``: a layer drawn uniformly from the sweep's, in expectation (each fact's
      mean over its layers);
    - ``best_layer``: each fact's best layer of the sweep (an oracle, for scale);
    - ``random_position``: the chosen layer with the key at a non-subject token drawn per fact
      (``other``).

    Disabling edits are left out (of a fact's layers, or the fact).

    Args:
        sweep: Per layer, the sweep's evaluations and their collapse checks.
        other: The random-position edits.
        layer: The chosen layer.
        n_bootstrap: Resamples of the intervals.
        seed: Their seed.
    """
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    for perspective in PERSPECTIVES:

        def values(
            pairs: Sequence[tuple[FactEvaluation, CollapseCheck]],
            field: str,
            perspective: Perspective = perspective,
        ) -> dict[tuple[str, str], float]:
            metric = HEADLINE[perspective]
            return {
                (e.subject, e.relation): (
                    math.nan if c.disabling else getattr(e.score(metric), field)
                )
                for e, c in pairs
                if e.edited is perspective
            }

        by_location: dict[str, dict[str, Estimate]] = {}
        for field in ("post_generated", "post"):
            tables = {at: values(pairs, field) for at, pairs in sweep.items()}
            facts = list(tables.get(layer, {}))
            if not facts:
                continue
            grid = torch.tensor(
                [[tables[at].get(f, math.nan) for at in sorted(tables)] for f in facts],
                dtype=torch.float64,
            )
            placed = values(other, field)
            columns = {
                "traced": grid[:, sorted(tables).index(layer)],
                "random_layer": grid.nanmean(1),
                "best_layer": grid.nan_to_num(-math.inf).amax(1),
                "random_position": torch.tensor(
                    [placed.get(f, math.nan) for f in facts], dtype=torch.float64
                ),
            }
            for at, column in columns.items():
                kept = column[torch.isfinite(column)]
                by_location.setdefault(at, {})[field] = bootstrap(
                    lambda x: x.mean(), kept, n_resamples=n_bootstrap, seed=seed
                )
        if by_location:
            out[perspective.value] = by_location
    return out


@dataclass(frozen=True)
class Editing:
    """The editing half's results.

    Attributes:
        choice: The edited layer and where it came from.
        editor: The editor's label.
        statistics: How the key statistics were obtained.
        evaluation: Every edit at the chosen layer, scored.
        metrics: :func:`metric_estimates` of those edits.
        layer_sweep: Per layer of the sweep, :func:`metric_estimates` of the sweep's facts.
        sweep_facts: Facts per perspective in the sweep.
        collapse: The collapse guard's check of each edit of ``evaluation``, in order
            (:func:`~kloc_lens.edit.guard.check_collapse`; empty: not checked).
        thresholds: The guard's thresholds.
        sweep_disabling: Per layer of the sweep, how many of its edits were disabling.
        informs: Does the trace predict edit success on the sweep's facts (Hase et al.'s
            regression, :mod:`.informs`); ``None`` without a sweep.
        controls: :func:`location_controls` on the sweep's facts (empty without a sweep).
        control_keys: How many random-position edits read their key at each token.
        retrace: :func:`retrace_summary` of the facts traced again after their edit (empty:
            none).

    Disabling edits are kept in ``evaluation`` and ``edit_scores.json``, flagged, and left out
    of ``metrics``, ``layer_sweep`` and the figures: a broken model's scores are not averaged
    into the editor's.
    """

    choice: LayerChoice
    editor: str
    statistics: str
    evaluation: EditEvaluation
    metrics: dict[str, dict[str, dict[str, Estimate]]]
    layer_sweep: dict[int, dict[str, dict[str, dict[str, Estimate]]]]
    sweep_facts: int
    collapse: tuple[CollapseCheck, ...] = ()
    thresholds: CollapseThresholds = dataclasses.field(default_factory=CollapseThresholds)
    sweep_disabling: dict[int, int] = dataclasses.field(default_factory=dict)
    informs: Informs | None = None
    controls: dict[str, dict[str, dict[str, Estimate]]] = dataclasses.field(default_factory=dict)
    control_keys: dict[str, int] = dataclasses.field(default_factory=dict)
    retrace: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.collapse and len(self.collapse) != len(self.evaluation.facts):
            raise ValueError(
                f"{len(self.collapse)} collapse checks for {len(self.evaluation.facts)} edits"
            )

    @property
    def kept(self) -> EditEvaluation:
        """The edits that were not disabling (every edit when none was checked)."""
        if not self.collapse:
            return self.evaluation
        facts = tuple(
            f for f, c in zip(self.evaluation.facts, self.collapse, strict=True) if not c.disabling
        )
        return EditEvaluation(facts, self.evaluation.editor, self.evaluation.model)

    @property
    def layer(self) -> int:
        """The edited layer."""
        return self.choice.layer

    def transfer(self) -> dict[str, Any]:
        """The 2 x 2 transfer matrix with intervals: ``cells[edited][evaluated]`` holds the
        headline metric of the evaluated side, pre, post and change."""
        cells: dict[str, dict[str, Any]] = {}
        for edited, by_metric in self.metrics.items():
            cells[edited] = {}
            for evaluated in PERSPECTIVES:
                metric = HEADLINE[evaluated].value
                cell = by_metric[metric]
                cells[edited][evaluated.value] = {
                    "metric": metric,
                    **{k: v.as_dict() for k, v in cell.items()},
                }
        return cells

    def sentences(self) -> list[str]:
        """The report's sentences about the edits."""
        lines = [
            f"{self.editor} at layer {self.layer} ({self.choice.reason}); key at the subject's "
            f"last token; {self.statistics}. Numbers are means over edited facts with 95% "
            "bootstrap intervals over facts."
        ]
        entity = self.metrics.get("entity")
        if entity is not None and "post_generated" in entity["efficacy"]:
            lines.append(
                "Generated without teacher forcing, entity edits make the model say the new "
                f"object on {entity['efficacy']['post_generated'].percent()} of edited prompts "
                f"(from {entity['efficacy']['pre_generated'].percent()}) and "
                f"{entity['paraphrase']['post_generated'].percent()} of paraphrases; other "
                f"subjects still say their own object on "
                f"{entity['neighborhood']['post_generated'].percent()}."
            )
        if entity is not None:
            lines.append(
                f"Teacher-forced, entity edits reach {entity['efficacy']['post'].percent()} "
                f"efficacy (from {entity['efficacy']['pre'].percent()}), "
                f"{entity['paraphrase']['post'].percent()} "
                f"on paraphrases, keep {entity['neighborhood']['post'].percent()} of other "
                f"subjects' answers and {entity['same_subject']['post'].percent()} of the "
                "subject's other relations; the relation side (relation_add) moves by "
                f"{_points(entity['relation_add']['change'])}."
            )
        relation = self.metrics.get("relation")
        if relation is not None:
            add = relation["relation_add"]
            said = (
                "Relation edits make the model generate the relation on "
                f"{add['post_generated'].percent()} of relation prompts with the new object "
                f"(from {add['pre_generated'].percent()}); teacher-forced, they"
                if "post_generated" in add
                else "Relation edits"
            )
            lines.append(
                f"{said} raise relation_add from {add['pre'].percent()} to "
                f"{add['post'].percent()} and relation_remove from "
                f"{relation['relation_remove']['pre'].percent()} to "
                f"{relation['relation_remove']['post'].percent()}; entity efficacy moves by "
                f"{_points(relation['efficacy']['change'])}."
            )
        if self.collapse:
            lines.append(self.collapse_sentence())
        lines.extend(self.control_sentences())
        lines.extend(self.retrace_sentences())
        if self.informs is not None:
            lines.extend(self.informs.sentences())
        return lines

    def retrace_sentences(self) -> list[str]:
        """Per perspective: did the causal site move after the edit?"""
        lines = []
        for perspective, side in self.retrace.items():
            moved = Estimate.from_dict(side["moved"])
            unsited = Estimate.from_dict(side["no_site_after"])
            peaks = sorted(
                {(u["peak_before"], u["peak_after"]) for u in side["facts"]},
                key=lambda pair: tuple(-1 if x is None else x for x in pair),
            )
            shown = ", ".join(
                f"{'none' if a is None else a}->{'none' if b is None else b}" for a, b in peaks
            )
            lines.append(
                f"Traced again after the edit ({perspective} edits, {side['n_facts']} facts, "
                "subject corrupted, the new answer on the edited model): where both traces "
                "have a site at the subject's last token, the MLP-window peak moved layer for "
                f"{moved.percent()} of facts; {unsited.percent()} of edits leave no site there "
                f"(the new answer survives the corruption). Before -> after peaks: {shown}."
            )
        return lines

    def control_sentences(self) -> list[str]:
        """Per perspective: the traced location beside a random layer, the best layer and a
        random non-subject key token (generated scores, then teacher-forced)."""
        lines = []
        keys = ", ".join(f"{k} for {n}" for k, n in sorted(self.control_keys.items()))
        for perspective, by_location in self.controls.items():
            metric = HEADLINE[Perspective(perspective)].value
            parts = []
            for field, how in (("post_generated", "generated"), ("post", "teacher-forced")):
                cells = {at: by_location[at][field] for at in LOCATIONS if field in by_location[at]}
                if len(cells) < len(LOCATIONS):
                    continue
                parts.append(
                    f"{how} {cells['traced'].percent()} at the traced layer {self.layer}, "
                    f"{cells['random_layer'].percent()} at a random layer, "
                    f"{cells['best_layer'].percent()} at each fact's best layer and "
                    f"{cells['random_position'].percent()} with the key at a random "
                    "non-subject token"
                )
            if parts:
                lines.append(
                    f"Controls on the layer sweep's facts ({perspective} edits, {metric}): "
                    + "; ".join(parts)
                    + (f" (key tokens drawn: {keys})." if keys else ".")
                )
        return lines

    def collapse_sentence(self) -> str:
        """The collapse guard's count, in words."""
        n = len(self.collapse)
        bad = sum(c.disabling for c in self.collapse)
        largest = _largest(c.update_ratio for c in self.collapse)
        rise = _largest(c.loss_change for c in self.collapse)
        limits = self.thresholds
        head = (
            f"{bad} of {n} edits at layer {self.layer} were disabling and are left out of the "
            "numbers above"
            if bad
            else f"None of the {n} edits at layer {self.layer} was disabling"
        )
        return (
            f"{head} (limits: |dW|/|W| {limits.update_ratio:g}, loss rise on unrelated texts "
            f"{limits.loss_increase:g} nats/token, generation entropy at least "
            f"{limits.entropy_share:g} of the unedited model's); the largest update was "
            f"|dW|/|W| = {largest:.3g}, the largest loss rise {rise:+.3g} nats/token."
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (per-fact scores are written separately)."""
        return {
            "layer": self.layer,
            "layer_choice": self.choice.as_dict(),
            "editor": self.editor,
            "key_token": "subject_last",
            "statistics": self.statistics,
            "n_facts": {p: sum(1 for f in self.evaluation.facts if f.edited.value == p)
                        for p in ("entity", "relation")},
            "metrics": _nested(self.metrics),
            "transfer": self.transfer(),
            "layer_sweep": {
                "n_facts_per_perspective": self.sweep_facts,
                "layers": {str(layer): _nested(m) for layer, m in self.layer_sweep.items()},
                "n_disabling": {str(layer): n for layer, n in self.sweep_disabling.items()},
            },
            "collapse": {
                "thresholds": {
                    "update_ratio": self.thresholds.update_ratio,
                    "loss_increase": self.thresholds.loss_increase,
                    "entropy_share": self.thresholds.entropy_share,
                },
                "checked": len(self.collapse),
                "n_disabling": sum(c.disabling for c in self.collapse),
                "largest_update_ratio": _finite(_largest(c.update_ratio for c in self.collapse)),
                "largest_loss_change": _finite(_largest(c.loss_change for c in self.collapse)),
                "disabling": [
                    {"subject": f.subject, "relation": f.relation, "edited": f.edited.value,
                     "reasons": list(c.reasons)}
                    for f, c in zip(self.evaluation.facts, self.collapse, strict=True)
                    if c.disabling
                ],
            },
            "informs": None if self.informs is None else self.informs.as_dict(),
            "controls": {"locations": _nested(self.controls), "key_tokens": self.control_keys},
            "retrace": self.retrace,
            "text": self.sentences(),
        }  # fmt: skip


def _largest(values: Any) -> float:
    """The largest value; NaN if any is NaN or there is none (a NaN loss is a collapse)."""
    items = list(values)
    if not items or any(math.isnan(v) for v in items):
        return math.nan
    return max(items)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _nested(metrics: dict[str, dict[str, dict[str, Estimate]]]) -> dict[str, Any]:
    return {
        p: {m: {k: e.as_dict() for k, e in cell.items()} for m, cell in by_metric.items()}
        for p, by_metric in metrics.items()
    }


def _points(change: Estimate) -> str:
    if math.isnan(change.value):
        return "an undefined amount"
    text = f"{100 * change.value:+.1f} points"
    if not math.isnan(change.low):
        text += f" (95% CI {100 * change.low:+.1f} to {100 * change.high:+.1f})"
    return text
