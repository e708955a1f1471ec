"""Query localization: do the queries of one fact use the same knowledge neurons?

Chen et al. (2024, "Knowledge Localization: Mission Not Accomplished? Enter Query
Localization!") questioned an assumption of knowledge localization: that the neurons found for
one query of a fact are the fact's neurons, whatever the query. The study measures it on each
fact the model knows from both perspectives (canonical entity and relation prompts right):

1. **Neurons per query.** Knowledge neurons (:func:`kloc_lens.knowledge_neurons`: integrated
   gradients of p(answer) over the MLP neurons of every layer at the prediction position, Dai et
   al. 2022) for each of the fact's prompts the model answers right (top-1), entity prompts
   (canonical and paraphrases, answer: the object) and relation prompts (answer: the relation).
   A prompt's neurons are those with at least ``threshold`` times its largest attribution; a
   perspective's *selected* neurons are those kept on more than ``share`` of its prompts (Dai
   et al.'s rule).
2. **Overlap.** Jaccard index ``|A & B| / |A | B|`` of the per-prompt sets: the mean over pairs
   of prompts of one perspective (``within``, across paraphrases) and over (entity, relation)
   pairs (``across``); and of the two perspectives' selected sets. ``within_minus_across`` is,
   per fact, the mean within-perspective overlap minus the across one: above zero when a fact's
   neurons depend on the perspective of the query more than on its wording.
3. **Suppression.** Each perspective's selected neurons are set to zero at the prediction
   position and p(answer) is read on the prompts of both perspectives; the number is the mean
   relative drop ``(p - p_suppressed) / p``. The control suppresses as many random neurons of the
   same layers (:meth:`~kloc_lens.KnowledgeNeurons.random_control`).

Every number is a mean over the facts where it is defined (a fact with fewer than two known
prompts of a perspective has no within overlap there; an empty selection has no suppression
effect), with its 95% bootstrap interval over facts and its ``n``; the per-fact values are kept
so the report can show distributions, not only means.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
import torch

from kloc_lens.facts import Fact, Prompt, target_token_ids, tokenize_batch
from kloc_lens.intervals import Estimate, bootstrap
from kloc_lens.model import device_of
from kloc_lens.neurons import KnowledgeNeurons, knowledge_neurons
from kloc_lens.study.knowledge import top1_right

__all__ = [
    "DROPS",
    "OVERLAPS",
    "QueryLocalization",
    "fact_queries",
    "jaccard",
    "query_figures",
    "query_lines",
    "summarize_queries",
]

PERSPECTIVES = ("entity", "relation")

OVERLAPS = (
    "jaccard_entity",
    "jaccard_relation",
    "jaccard_across",
    "jaccard_across_selected",
    "within_minus_across",
)
"""Overlap numbers: within each perspective (per-prompt sets), across the perspectives
(per-prompt sets, and the selected sets), and the paired difference per fact."""

DROPS = (
    "drop_entity_on_entity",
    "drop_entity_on_relation",
    "drop_relation_on_relation",
    "drop_relation_on_entity",
    "drop_random_entity_on_entity",
    "drop_random_relation_on_relation",
)
"""Suppression numbers ``drop_<neurons>_on_<prompts>``: the mean relative drop of p(answer) on
one perspective's prompts with the neurons selected on a perspective (or the random control of
the same size and layers) suppressed."""

COUNTS = ("neurons_entity", "neurons_relation")
"""Selected neurons per fact, per perspective."""

Neuron = tuple[int, int]


def jaccard(a: Sequence[Neuron] | set[Neuron], b: Sequence[Neuron] | set[Neuron]) -> float | None:
    """``|a & b| / |a | b|``; ``None`` when both are empty (undefined, not 1 or 0)."""
    first, second = set(map(tuple, a)), set(map(tuple, b))
    union = first | second
    if not union:
        return None
    return len(first & second) / len(union)


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _answer_probs(
    model: Any, prompts: Sequence[Prompt], answer: str, neurons: KnowledgeNeurons | None
) -> list[float]:
    """p(answer's first token) at each prompt's last position in one right-padded batch, with
    ``neurons`` set to zero at each row's own last position."""
    device = device_of(model)
    batch = tokenize_batch(model, list(prompts))
    last = batch.last.to(device)
    rows = torch.arange(len(prompts), device=device)
    ids = torch.tensor([target_token_ids(model, p, answer)[0] for p in prompts], device=device)
    suppressed = (
        contextlib.nullcontext()
        if neurons is None or not neurons.neurons
        else neurons.suppressed(model, positions=last)
    )
    with torch.no_grad(), suppressed:
        logits = model(batch.tokens.to(device))
    probs = torch.softmax(logits[rows, last].double(), -1)[rows, ids]
    return [float(p) for p in probs]


def _relative_drop(clean: Sequence[float], suppressed: Sequence[float]) -> float:
    return sum((c - s) / c for c, s in zip(clean, suppressed, strict=True)) / len(clean)


def fact_queries(
    model: Any,
    fact: Fact,
    *,
    steps: int = 20,
    threshold: float = 0.2,
    share: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """One fact's query localization (a study unit; JSON-ready).

    Args:
        model: A hooked model in eval mode.
        fact: The fact (its entity and relation prompts, paraphrases included).
        steps: Integrated-gradient steps.
        threshold: Per-prompt attribution threshold, relative to the prompt's maximum.
        share: Share of a perspective's prompts a selected neuron must be kept on.
        seed: Seed of the random control (mixed with the fact, so facts differ).

    Returns:
        Per perspective: the prompts answered right, p(answer) on them, the per-prompt and the
        selected neurons, the random control; the overlaps; the suppression drops (``None``
        where undefined).
    """
    sides: dict[str, dict[str, Any]] = {}
    selected: dict[str, KnowledgeNeurons | None] = {}
    controls: dict[str, KnowledgeNeurons | None] = {}
    prompts_of: dict[str, list[Prompt]] = {}
    answers = {"entity": fact.object, "relation": fact.relation}
    mixed = seed * 1_000_003 + zlib.crc32(f"{fact.subject}\0{fact.relation}".encode())
    for index, perspective in enumerate(PERSPECTIVES):
        answer = answers[perspective]
        candidates = fact.prompts(perspective)
        right = top1_right(model, [(p, answer) for p in candidates])
        prompts = [p for p, ok in zip(candidates, right, strict=True) if ok]
        prompts_of[perspective] = prompts
        if not prompts:
            sides[perspective] = {
                "prompts": [], "probs": [], "per_prompt": [], "selected": [], "random": []
            }  # fmt: skip
            selected[perspective] = controls[perspective] = None
            continue
        attribution = knowledge_neurons(model, prompts, answer, steps=steps)
        chosen = attribution.select(threshold=threshold, share=share)
        control = chosen.random_control(model, seed=(mixed + index) % 2**31) if chosen else None
        selected[perspective], controls[perspective] = chosen, control
        sides[perspective] = {
            "prompts": [p.text for p in prompts],
            "probs": [float(p) for p in attribution.probs],
            "per_prompt": [[list(n) for n in row] for row in attribution.prompt_neurons(threshold)],
            "selected": [list(n) for n in chosen.neurons],
            "random": [] if control is None else [list(n) for n in control.neurons],
        }

    def per_prompt(perspective: str) -> list[set[Neuron]]:
        return [{(a, b) for a, b in row} for row in sides[perspective]["per_prompt"]]

    within = {
        p: _mean([jaccard(a, b) for a, b in itertools.combinations(per_prompt(p), 2)])
        for p in PERSPECTIVES
    }
    across = _mean([jaccard(a, b) for a in per_prompt("entity") for b in per_prompt("relation")])
    both_selected = all(selected[p] is not None for p in PERSPECTIVES)
    across_selected = (
        jaccard(selected["entity"].neurons, selected["relation"].neurons)  # type: ignore[union-attr]
        if both_selected
        else None
    )
    within_mean = _mean([within["entity"], within["relation"]])
    overlaps = {
        "jaccard_entity": within["entity"],
        "jaccard_relation": within["relation"],
        "jaccard_across": across,
        "jaccard_across_selected": across_selected,
        "within_minus_across": (
            None if within_mean is None or across is None else within_mean - across
        ),
    }

    clean = {
        p: _answer_probs(model, prompts_of[p], answers[p], None) if prompts_of[p] else []
        for p in PERSPECTIVES
    }

    def drop(neurons: KnowledgeNeurons | None, on: str) -> float | None:
        if neurons is None or not neurons.neurons or not prompts_of[on]:
            return None
        suppressed = _answer_probs(model, prompts_of[on], answers[on], neurons)
        return _relative_drop(clean[on], suppressed)

    drops = {
        "drop_entity_on_entity": drop(selected["entity"], "entity"),
        "drop_entity_on_relation": drop(selected["entity"], "relation"),
        "drop_relation_on_relation": drop(selected["relation"], "relation"),
        "drop_relation_on_entity": drop(selected["relation"], "entity"),
        "drop_random_entity_on_entity": drop(controls["entity"], "entity"),
        "drop_random_relation_on_relation": drop(controls["relation"], "relation"),
    }
    return {
        "subject": fact.subject,
        "relation": fact.relation,
        "sides": sides,
        "overlaps": overlaps,
        "drops": drops,
        "counts": {
            "neurons_entity": len(sides["entity"]["selected"]) if prompts_of["entity"] else None,
            "neurons_relation": (
                len(sides["relation"]["selected"]) if prompts_of["relation"] else None
            ),
        },
    }


@dataclass(frozen=True)
class QueryLocalization:
    """The study's query-localization results.

    Attributes:
        n_facts: Facts studied (known from both perspectives).
        steps: Integrated-gradient steps.
        threshold: Per-prompt attribution threshold.
        share: Selection share.
        numbers: Every number of :data:`OVERLAPS`, :data:`DROPS` and :data:`COUNTS` with its
            interval over the facts where it is defined.
        per_fact: The per-fact values of each number (``None``: undefined for that fact).
        layer_counts: Per perspective, the selected neurons of all facts in each layer.
        n_layers: Layers of the model.
    """

    n_facts: int
    steps: int
    threshold: float
    share: float
    numbers: dict[str, Estimate]
    per_fact: dict[str, tuple[float | None, ...]]
    layer_counts: dict[str, tuple[int, ...]]
    n_layers: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "n_facts": self.n_facts,
            "steps": self.steps,
            "threshold": self.threshold,
            "share": self.share,
            "n_layers": self.n_layers,
            "numbers": {name: est.as_dict() for name, est in self.numbers.items()},
            "per_fact": {name: list(values) for name, values in self.per_fact.items()},
            "layer_counts": {name: list(c) for name, c in self.layer_counts.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueryLocalization:
        """Read :meth:`as_dict` back."""
        return cls(
            n_facts=int(data["n_facts"]),
            steps=int(data["steps"]),
            threshold=float(data["threshold"]),
            share=float(data["share"]),
            numbers={k: Estimate.from_dict(v) for k, v in data["numbers"].items()},
            per_fact={
                k: tuple(None if x is None else float(x) for x in v)
                for k, v in data["per_fact"].items()
            },
            layer_counts={k: tuple(int(x) for x in v) for k, v in data["layer_counts"].items()},
            n_layers=int(data["n_layers"]),
        )


def summarize_queries(
    rows: Sequence[dict[str, Any]],
    *,
    n_layers: int,
    steps: int,
    threshold: float,
    share: float,
    n_bootstrap: int,
    seed: int,
) -> QueryLocalization:
    """The study's numbers from :func:`fact_queries` rows: means over the facts where each is
    defined, with bootstrap intervals over those facts."""
    per_fact: dict[str, tuple[float | None, ...]] = {}
    for group, names in (("overlaps", OVERLAPS), ("drops", DROPS), ("counts", COUNTS)):
        for name in names:
            per_fact[name] = tuple(
                None if row[group][name] is None else float(row[group][name]) for row in rows
            )
    numbers = {}
    for name, values in per_fact.items():
        defined = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        numbers[name] = bootstrap(lambda x: x.mean(), defined, n_resamples=n_bootstrap, seed=seed)
    layer_counts = {}
    for perspective in PERSPECTIVES:
        counts = [0] * n_layers
        for row in rows:
            for layer, _ in row["sides"][perspective]["selected"]:
                counts[int(layer)] += 1
        layer_counts[perspective] = tuple(counts)
    return QueryLocalization(
        n_facts=len(rows),
        steps=steps,
        threshold=threshold,
        share=share,
        numbers=numbers,
        per_fact=per_fact,
        layer_counts=layer_counts,
        n_layers=n_layers,
    )


# --------------------------------------------------------------------------------------------
# Sentences and figures (from results.json alone).


def _est(data: dict[str, Any], kind: str = "number") -> str:
    estimate = Estimate.from_dict(data)
    return estimate.percent() if kind == "percent" else estimate.number()


def query_lines(data: dict[str, Any]) -> list[str]:
    """The report's sentences on query localization, from its ``results.json`` section."""
    n = data["numbers"]
    lines = [
        f"Query localization (knowledge neurons by integrated gradients, {data['steps']} steps; "
        f"a prompt's neurons have at least {data['threshold']:g} of its largest attribution, a "
        f"perspective's selected neurons are kept on more than {data['share']:.0%} of its "
        f"prompts; {data['n_facts']} facts known from both perspectives): the entity "
        f"perspective selects {_est(n['neurons_entity'])} neurons per fact, the relation "
        f"perspective {_est(n['neurons_relation'])}.",
        f"Paraphrases of the entity query share {_est(n['jaccard_entity'])} of their neurons "
        f"(Jaccard), paraphrases of the relation query {_est(n['jaccard_relation'])}; an "
        f"entity and a relation query of the same fact share {_est(n['jaccard_across'])} "
        f"(the two perspectives' selected sets {_est(n['jaccard_across_selected'])}); within "
        f"minus across, per fact: {_est(n['within_minus_across'])}.",
        f"Suppressing the entity neurons lowers p(object) on entity prompts by "
        f"{_est(n['drop_entity_on_entity'], 'percent')} (as many random neurons of the same "
        f"layers: {_est(n['drop_random_entity_on_entity'], 'percent')}) and p(relation) on "
        f"relation prompts by {_est(n['drop_entity_on_relation'], 'percent')}; suppressing the "
        f"relation neurons lowers p(relation) by {_est(n['drop_relation_on_relation'], 'percent')}"
        f" (random: {_est(n['drop_random_relation_on_relation'], 'percent')}) and p(object) by "
        f"{_est(n['drop_relation_on_entity'], 'percent')}.",
    ]
    gap = n["within_minus_across"]
    if gap["ci_low"] is None or gap["ci_high"] is None:
        lines.append("The overlap difference has no interval: too few facts to judge.")
    elif gap["ci_low"] > 0:
        lines.append(
            "The queries of one fact do not share their neurons: an entity and a relation query "
            "overlap less than two wordings of one perspective, with an interval above zero, as "
            "Chen et al. found (the knowledge-localization assumption fails across perspectives)."
        )
    else:
        lines.append(
            "The overlap across perspectives is not lower than within one with an interval "
            "above zero: on this model the queries of a fact do not measurably differ in their "
            "neurons."
        )
    return lines


_DROP_LABELS = {
    "drop_entity_on_entity": "entity neurons, entity prompts",
    "drop_random_entity_on_entity": "random (entity's layers), entity prompts",
    "drop_entity_on_relation": "entity neurons, relation prompts",
    "drop_relation_on_relation": "relation neurons, relation prompts",
    "drop_random_relation_on_relation": "random (relation's layers), relation prompts",
    "drop_relation_on_entity": "relation neurons, entity prompts",
}

_OVERLAP_LABELS = {
    "jaccard_entity": "within entity (paraphrases)",
    "jaccard_relation": "within relation (paraphrases)",
    "jaccard_across": "across perspectives (prompts)",
    "jaccard_across_selected": "across perspectives (selected sets)",
}


def _boxes(data: dict[str, Any], labels: dict[str, str], title: str, axis: str) -> go.Figure:
    fig = go.Figure()
    for name, label in labels.items():
        values = [v for v in data["per_fact"][name] if v is not None and math.isfinite(v)]
        fig.add_trace(go.Box(y=values, name=f"{label} (n={len(values)})", boxpoints="all"))
    fig.update_layout(title={"text": title}, yaxis={"title": {"text": axis}}, showlegend=False)
    return fig


def query_figures(data: dict[str, Any]) -> list[tuple[str, str, go.Figure]]:
    """``(id, caption, figure)``: the distributions over facts of the overlaps and of the
    suppression drops, and the layers of the selected neurons, from the ``results.json``
    section."""
    overlap = _boxes(
        data,
        _OVERLAP_LABELS,
        "Do the queries of one fact share their knowledge neurons?",
        "Jaccard overlap per fact",
    )
    drops = _boxes(
        data,
        _DROP_LABELS,
        "Suppressing one perspective's neurons: effect on both perspectives",
        "relative drop of p(answer) per fact",
    )
    layers = go.Figure()
    for perspective in PERSPECTIVES:
        counts = data["layer_counts"][perspective]
        total = sum(counts) or 1
        layers.add_trace(
            go.Bar(
                name=f"{perspective} ({sum(counts)} neurons)",
                x=list(range(data["n_layers"])),
                y=[c / total for c in counts],
            )
        )
    layers.update_layout(
        barmode="group",
        title={"text": "Where the selected knowledge neurons sit"},
        xaxis={"title": {"text": "layer"}},
        yaxis={"title": {"text": "share of the perspective's selected neurons"}},
    )
    return [
        ("queries-overlap", "Knowledge-neuron overlap within and across perspectives", overlap),
        ("queries-suppression", "Suppression of knowledge neurons", drops),
        ("queries-layers", "Layers of the selected knowledge neurons", layers),
    ]
