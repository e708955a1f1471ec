"""The editing phase of a study: the plan of edits, their units, the guard, the aggregation.

The results and their sentences are :mod:`.editing`'s; the regression of edit success on the
trace effect is :mod:`.informs`'s. See :mod:`.editing` for what is edited where.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from kloc_lens.edit.evaluate import EditEvaluation, FactEvaluation, evaluate_edits
from kloc_lens.edit.guard import (
    CollapseCheck,
    CollapseThresholds,
    check_collapse_each,
    generation_entropy,
    text_loss,
)
from kloc_lens.edit.keys import ContextSpec, KeyToken
from kloc_lens.edit.request import EditRequest
from kloc_lens.edit.retrace import retrace_edit
from kloc_lens.edit.rome import RomeEditor
from kloc_lens.edit.stats import corpus_hash, second_moment
from kloc_lens.edit.sweep import EditLayerSweep
from kloc_lens.edit.value import ValueSpec
from kloc_lens.facts import Fact, TokenizedPrompt, tokenize
from kloc_lens.model import model_identity
from kloc_lens.results import TraceSet
from kloc_lens.study.config import StudyConfig, StudyError
from kloc_lens.study.editing import (
    RETRACE_KINDS,
    Editing,
    LayerChoice,
    location_controls,
    metric_estimates,
    retrace_data,
    retrace_summary,
)
from kloc_lens.study.informs import Informs, informs_analysis
from kloc_lens.study.localization import Localization
from kloc_lens.study.store import Units, fact_data, sample_items, unit_key

__all__ = ["edit_phase"]

# Edits per batched value fit in the editing phase (RomeEditor.compute_each): enough to save
# most of the per-call overhead on a small model, few enough that one batch of a large model's
# fits (each of ~20 contexts x 2 sequences) stays in memory.
_EDIT_CHUNK = 8

# The random-position control: the key read (and the value written) at a token outside the
# subject, drawn per fact from the spans every prompt of that perspective has.
_OTHER_KEYS = {
    "entity": (KeyToken.RELATION_LAST, KeyToken.LAST),
    "relation": (KeyToken.OBJECT_LAST, KeyToken.LAST),
}


def _other_key(request: Any, seed: int) -> KeyToken:
    """A non-subject key token for the random-position control, seeded by the fact."""
    prompts = [objective.prompt for objective in request.objectives()]
    options = [
        k
        for k in _OTHER_KEYS[request.edited.value]
        if k is KeyToken.LAST or all(k.span in p.char_spans for p in prompts)
    ]
    name = f"{seed}\0{request.fact.subject}\0{request.fact.relation}\0{request.edited.value}"
    return random.Random(name).choice(options)


def _choose_layer(config: StudyConfig, entity: Localization) -> LayerChoice:
    if config.edit_layer is not None:
        return LayerChoice(config.edit_layer, "setting", f"layer {config.edit_layer} as set")
    layer = entity.layers["mlp_last_span"]
    return LayerChoice(
        layer,
        "trace",
        f"the entity trace's MLP-window peak at the last subject token, layer {layer}",
    )


def _editor_settings(editor: Any) -> dict[str, Any]:
    """The editor's hyperparameters (its statistics are keyed separately)."""
    settings: dict[str, Any] = {}
    for item in dataclasses.fields(editor):
        if item.name == "stats":
            continue
        value = getattr(editor, item.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        settings[item.name] = value.value if isinstance(value, Enum) else value
    return settings


def edit_phase(
    model: Any,
    known: Sequence[Fact],
    config: StudyConfig,
    entity: Localization,
    units: Units,
    fingerprint: str,
    corpus: Sequence[str],
    corpus_name: str,
    progress: bool,
    trace: Callable[[Sequence[TokenizedPrompt], str], list[TraceSet]] | None = None,
    corruption: Any = None,
) -> Editing | None:
    """Plan, run (or find) and aggregate the edits of the study.

    Args:
        model: The hooked model.
        known: The facts the model knows.
        config: The study's settings.
        entity: The entity side's localization (its MLP peak chooses the layer).
        units: The unit runner.
        fingerprint: The model's fingerprint (part of every key).
        corpus: Texts for the key statistics (and the collapse guard's unrelated texts).
        corpus_name: The corpus in words.
        progress: Show progress bars.
        trace: ``(prompts, description) -> traces`` with the entity side's subject noise,
            through the unit store: the sweep's facts are traced for :mod:`.informs`
            (``None``: no regression).
        corruption: The entity side's subject noise, for tracing the first
            ``config.n_retrace`` edited facts again on the edited model (``None``: no
            re-traces).
    """

    guard = _Guard(model, corpus, known)

    candidates = [f for f in known if f.new_object]
    if not candidates or config.n_edit == 0:
        return None
    chosen = sample_items(candidates, config.n_edit, config.seed + 1)
    sweep = chosen[: config.n_layer_sweep]
    choice = _choose_layer(config, entity)
    n_layers = int(model.cfg.n_layers)
    layers = sorted({choice.layer, *config.layers_for(n_layers)}) if sweep else [choice.layer]
    stats_dir = units.store.units / "stats"
    overrides: dict[str, Any] = {}
    if config.edit_contexts is not None:
        overrides["contexts"] = ContextSpec(count=config.edit_contexts)
    if config.edit_steps is not None:
        overrides["value"] = ValueSpec(steps=config.edit_steps)

    editors: dict[int, Any] = {}

    def editor(layer: int) -> Any:
        if layer not in editors:
            # every rank asks for the same layers in the same order (the unit keys below), so
            # the ranks share the corpus and all-reduce the sums
            stats = second_moment(
                model,
                layer,
                corpus,
                cache_dir=stats_dir,
                progress=progress,
                distributed=units.shard.world > 1,
            )
            editors[layer] = (RomeEditor(layer=layer, stats=stats, **overrides), stats)
        return editors[layer]

    def requests(fact: Fact) -> list[Any]:
        neighbors = tuple(
            g
            for g in known
            if g.subject != fact.subject and g.relation == fact.relation and g.object == fact.object
        )[:5]
        related = tuple(g for g in known if g.subject == fact.subject and g is not fact)
        return [
            EditRequest(
                fact,
                perspective=p,
                neighbors=neighbors,
                related=related,
                none_target=config.none_target,
            )
            for p in ("entity", "relation")
        ]

    plan: list[tuple[int, Any]] = []
    for layer in layers:
        facts = chosen if layer == choice.layer else sweep
        plan.extend((layer, request) for fact in facts for request in requests(fact))
    # the random-position control (the sweep's facts, at the chosen layer), after the plan
    n_main = len(plan)
    other = sorted(
        ((_other_key(r, config.seed), r) for f in sweep for r in requests(f)),
        key=lambda item: item[0].value,
    )
    plan.extend((choice.layer, request) for _, request in other)
    keyed: list[KeyToken | None] = [None] * n_main + [k for k, _ in other]

    def editor_of(i: int) -> tuple[Any, Any]:
        rome, stats = editor(plan[i][0])
        if keyed[i] is not None:
            rome = dataclasses.replace(rome, key_token=keyed[i])
        return rome, stats

    def key(i: int) -> str:
        request = plan[i][1]
        rome, stats = editor_of(i)
        layer = plan[i][0]
        return unit_key(
            "edit",
            {
                "model": fingerprint,
                "fact": fact_data(request.fact),
                "perspective": request.edited.value,
                "layer": layer,
                "editor": _editor_settings(rome),
                "stats": stats.describe(),
                "corpus": stats.corpus,
                "neighbors": [fact_data(f) for f in request.neighbors],
                "related": [fact_data(f) for f in request.related],
                "none_target": request.none_target,
                "guard": guard.settings(request),
            },
        )

    keys = [key(i) for i in range(len(plan))]

    # Edits of one editor (layer and key token) are computed a chunk of the plan at a time
    # (their keys in one forward, their value fits in one batch); the chunks are fixed by the
    # plan alone.
    groups: list[list[int]] = []
    for i, (layer, _) in enumerate(plan):
        last = groups[-1][0] if groups else -1
        same = groups and (plan[last][0], keyed[last]) == (layer, keyed[i])
        if same and len(groups[-1]) < _EDIT_CHUNK:
            groups[-1].append(i)
        else:
            groups.append([i])

    def compute(group: Sequence[int]) -> list[dict[str, Any]]:
        rome, _ = editor_of(group[0])
        batch = [plan[i][1] for i in group]
        edits = rome.compute_each(model, batch)
        checks = guard.check_each(edits, batch)
        scores = evaluate_edits(model, edits, batch).facts
        return [
            {**fact.as_dict(), "collapse": c.as_dict()}
            for fact, c in zip(scores, checks, strict=True)
        ]

    units_data = units.run_groups(
        "edit",
        keys,
        groups,
        compute,
        ext="json",
        save=lambda key, data: units.store.write_json("edit", key, data),
        load=lambda key: units.store.read_json("edit", key),
        desc="edits (layer sweep and chosen layer)",
    )
    by_layer: dict[int, list[tuple[FactEvaluation, CollapseCheck]]] = {}
    for (layer, _), data in zip(plan[:n_main], units_data[:n_main], strict=True):
        pair = (FactEvaluation.from_dict(data), CollapseCheck.from_dict(data["collapse"]))
        by_layer.setdefault(layer, []).append(pair)
    at_other = [
        (FactEvaluation.from_dict(data), CollapseCheck.from_dict(data["collapse"]))
        for data in units_data[n_main:]
    ]
    main = by_layer[choice.layer]
    sweep_names = {f.subject + "\0" + f.relation for f in sweep}
    in_sweep = {
        layer: [(e, c) for e, c in pairs if e.subject + "\0" + e.relation in sweep_names]
        for layer, pairs in sorted(by_layer.items())
    }
    layer_sweep = {
        layer: metric_estimates(
            [e for e, c in pairs if not c.disabling],
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
        )
        for layer, pairs in in_sweep.items()
    }
    informs = None
    if len(sweep) >= 2 and trace is not None:  # a regression needs two facts
        informs = _informs(
            model, sweep, layers, plan[:n_main], units_data[:n_main], editor, config, trace
        )
    retraced = []
    if corruption is not None and config.n_retrace:
        retraced = _retraces(
            model, plan[:n_main], keys[:n_main], chosen[: config.n_retrace], choice.layer,
            editor, config,
            corruption, units,
        )  # fmt: skip
    controls = (
        location_controls(
            in_sweep,
            at_other,
            choice.layer,
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
        )
        if sweep
        else {}
    )
    rome, stats = editor(choice.layer)
    return Editing(
        choice=choice,
        editor=rome.name,
        statistics=f"key statistics over {stats.count} keys of {corpus_name}",
        evaluation=EditEvaluation(tuple(e for e, _ in main), rome.name, model_identity(model)),
        metrics=metric_estimates(
            [e for e, c in main if not c.disabling],
            n_bootstrap=config.n_bootstrap,
            seed=config.seed,
        ),
        layer_sweep=layer_sweep if sweep else {},
        sweep_facts=len(sweep),
        collapse=tuple(c for _, c in main),
        thresholds=guard.thresholds,
        sweep_disabling=(
            {layer: sum(c.disabling for _, c in pairs) for layer, pairs in in_sweep.items()}
            if sweep
            else {}
        ),
        informs=informs,
        controls=controls,
        retrace=retrace_summary(retraced, n_bootstrap=config.n_bootstrap, seed=config.seed),
        control_keys={k.value: sum(1 for j, _ in other if j is k) for k in {j for j, _ in other}},
    )


def _retraces(
    model: Any,
    plan: Sequence[tuple[int, Any]],
    keys: Sequence[str],
    facts: Sequence[Fact],
    layer: int,
    editor: Callable[[int], Any],
    config: StudyConfig,
    corruption: Any,
    units: Units,
) -> list[dict[str, Any]]:
    """The first edited facts, both perspectives, traced before and after their edit (units of
    their own; the edits are recomputed in chunks of the same size as the plan's)."""
    wanted = {(f.subject, f.relation) for f in facts}
    picked = [
        i
        for i, (at, request) in enumerate(plan)
        if at == layer and (request.fact.subject, request.fact.relation) in wanted
    ]
    window = config.window_for(int(model.cfg.n_layers))
    settings = {"corruption": repr(corruption), "window": window, "kinds": list(RETRACE_KINDS)}
    retrace_keys = [unit_key("retrace", {"edit": keys[i], **settings}) for i in picked]
    groups = [
        list(range(start, min(start + _EDIT_CHUNK, len(picked))))
        for start in range(0, len(picked), _EDIT_CHUNK)
    ]

    def compute(group: Sequence[int]) -> list[dict[str, Any]]:
        rome, _ = editor(layer)
        batch = [plan[picked[j]][1] for j in group]
        out = []
        for edit, request in zip(rome.compute_each(model, batch), batch, strict=True):
            again = retrace_edit(
                model, edit, request, corruption=corruption, kinds=RETRACE_KINDS, window=window
            )
            out.append(retrace_data(again))
        return out

    return units.run_groups(
        "retrace",
        retrace_keys,
        groups,
        compute,
        ext="json",
        save=lambda key, data: units.store.write_json("retrace", key, data),
        load=lambda key: units.store.read_json("retrace", key),
        desc="tracing edited facts again on the edited model",
    )


def _informs(
    model: Any,
    sweep: Sequence[Fact],
    layers: Sequence[int],
    plan: Sequence[tuple[int, Any]],
    units_data: Sequence[dict[str, Any]],
    editor: Callable[[int], Any],
    config: StudyConfig,
    trace: Callable[[Sequence[TokenizedPrompt], str], list[TraceSet]],
) -> Informs:
    """The sweep's edits as one [fact, layer] table per perspective, its facts traced on the
    prompts their edits key on, and the regressions of :mod:`.informs`."""
    where = {
        (layer, request.fact.subject, request.fact.relation, request.edited.value): i
        for i, (layer, request) in enumerate(plan)
    }
    sweeps: dict[str, EditLayerSweep] = {}
    for perspective in ("entity", "relation"):
        cells = [
            [where[layer, f.subject, f.relation, perspective] for layer in layers] for f in sweep
        ]
        sweeps[perspective] = EditLayerSweep(
            requests=tuple(plan[row[0]][1] for row in cells),
            layers=tuple(layers),
            evaluations=tuple(
                tuple(FactEvaluation.from_dict(units_data[i]) for i in row) for row in cells
            ),
            collapse=tuple(
                tuple(CollapseCheck.from_dict(units_data[i]["collapse"]) for i in row)
                for row in cells
            ),
            editors=tuple(editor(layer)[0].name for layer in layers),
            model=model_identity(model),
        )
    traces = {
        "entity": trace([tokenize(model, f.entity_prompt()) for f in sweep], "entity prompts"),
        "relation": trace(
            [tokenize(model, f.relation_prompt()) for f in sweep], "relation prompts"
        ),
    }
    return informs_analysis(sweeps, traces, n_bootstrap=config.n_bootstrap, seed=config.seed)


class _Guard:
    """The collapse guard of the study's edits: unrelated texts (biographies or prompts that
    do not name the edited subject) and prompts of other subjects to continue, fixed by the
    corpus and the facts alone; the unedited model's numbers are computed once per set."""

    n_texts = 4
    n_prompts = 4
    n_tokens = 8

    def __init__(self, model: Any, corpus: Sequence[str], known: Sequence[Fact]) -> None:
        self.model = model
        self.thresholds = CollapseThresholds()
        self.texts = list(corpus[: 2 * self.n_texts])
        seen: dict[str, str] = {}
        for fact in known:
            seen.setdefault(fact.subject, fact.entity_prompt().text)
            if len(seen) > 2 * self.n_prompts:
                break
        self.prompts = list(seen.items())
        self.before: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[float, float]] = {}

    def sets(self, request: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        subject = request.fact.subject
        texts = tuple(t for t in self.texts if subject not in t)[: self.n_texts]
        prompts = tuple(p for s, p in self.prompts if s != subject)[: self.n_prompts]
        if not texts or not prompts:
            raise StudyError(
                f"the collapse guard has no text or prompt without {subject!r}: the corpus "
                f"({len(self.texts)} texts checked) or the facts name no one else"
            )
        return texts, prompts

    def settings(self, request: Any) -> dict[str, Any]:
        texts, prompts = self.sets(request)
        return {
            "texts": corpus_hash(list(texts)),
            "prompts": list(prompts),
            "n_tokens": self.n_tokens,
            "thresholds": [
                self.thresholds.update_ratio,
                self.thresholds.loss_increase,
                self.thresholds.entropy_share,
            ],
        }

    def check_each(self, edits: Sequence[Any], requests: Sequence[Any]) -> list[CollapseCheck]:
        sets = [self.sets(request) for request in requests]
        for texts, prompts in sets:
            if (texts, prompts) not in self.before:
                self.before[texts, prompts] = (
                    text_loss(self.model, texts),
                    generation_entropy(self.model, prompts, self.n_tokens),
                )
        return check_collapse_each(
            self.model,
            edits,
            texts=[texts for texts, _ in sets],
            prompts=[prompts for _, prompts in sets],
            n_tokens=self.n_tokens,
            thresholds=self.thresholds,
            before=[self.before[key] for key in sets],
        )
