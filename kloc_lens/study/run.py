"""The study end to end, as work units: plan, run (or find on disk), aggregate, report.

:func:`run_study` reproduces, on any hooked model and fact set, the two halves of Wei et al.
(CIKM 2024, "Does Knowledge Localization Hold True?"), with the controls its critics asked for:

1. **Knowledge.** First-token accuracy on both perspectives (:mod:`.knowledge`); the facts the
   model answers right are studied.
2. **Localization.** ROME causal tracing, plain and severed, of ``n_trace`` known facts from two
   sides of the triplet: the *entity* side corrupts the subject (ROME's setting), the *relation*
   side the relation words of the same prompts (:mod:`.localization`).
3. **Query localization.** Knowledge neurons of every prompt of both perspectives of
   ``n_queries`` facts known from both: do the queries of one fact share their neurons, and
   does suppressing one perspective's neurons touch the other (:mod:`.queries`)?
4. **Editing.** Rank-one edits from the entity and from the relation perspective, each scored
   from both: the 2 x 2 transfer matrix, and a sweep over layers (:mod:`.editing`).

Every number carries a 95% bootstrap interval over facts and its ``n``.

Units, resume, ranks
    Each fact's knowledge, traces and knowledge neurons and each (fact, perspective, layer) edit
    is a unit
    stored under its content key (:mod:`.store`). Re-running the same study on the same output
    directory skips the units found there, so an interrupted run resumes where it stopped and
    its numbers equal those of an uninterrupted run; a directory holding a study with other
    settings, facts or model is refused (:class:`StudyError` naming what differs) unless
    ``overwrite=True``. Under ``torchrun`` (``torch.distributed`` initialised), the units of
    each phase are split over the ranks in plan order, every rank writes its own, and after a
    barrier every rank reads them all; rank 0 writes the report. The numbers are the same for
    any number of ranks, because aggregation reads the units in plan order.

Example (the planted model stands in for a trained one)::

    from kloc_lens.study import StudyConfig, run_study
    result = run_study(model, facts, StudyConfig(n_trace=20), out="out/study")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from kloc_lens.edit.evaluate import EditEvaluation, FactEvaluation
from kloc_lens.edit.guard import (
    CollapseCheck,
    CollapseThresholds,
    check_collapse_each,
    generation_entropy,
    text_loss,
)
from kloc_lens.edit.stats import corpus_hash
from kloc_lens.engine import ExecutionOptions
from kloc_lens.facts import Fact, TokenizedPrompt, tokenize
from kloc_lens.model import device_of, model_identity
from kloc_lens.results import TraceSet, load_result
from kloc_lens.study.config import StudyConfig, StudyError
from kloc_lens.study.editing import Editing, LayerChoice, metric_estimates
from kloc_lens.study.knowledge import Knowledge, fact_knowledge, summarize_knowledge
from kloc_lens.study.localization import KINDS, Localization, localization_numbers
from kloc_lens.study.queries import QueryLocalization, fact_queries, summarize_queries
from kloc_lens.study.store import UnitStore, atomic_write_text, unit_key

__all__ = ["STUDY_FORMAT", "Shard", "StudyResult", "model_fingerprint", "run_study"]

logger = logging.getLogger(__name__)

STUDY_FORMAT = "kloc_lens.study/3"
"""Format of ``results.json`` and of the output directory's manifest (``study.json``)."""

MANIFEST = "study.json"
KNOWLEDGE_CHUNK = 64
"""Facts per knowledge unit."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Ranks.


@dataclass(frozen=True)
class Shard:
    """This process's share of a study: rank ``rank`` of ``world`` processes.

    One process is ``Shard()``; under ``torchrun`` :meth:`from_env` reads the initialised
    ``torch.distributed`` process group.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """The shard of this process (one process unless ``torch.distributed`` is initialised)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.world > 1:
            torch.distributed.barrier()

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th, starting at ``rank`` (deterministic)."""
        return list(items[self.rank :: self.world])


# --------------------------------------------------------------------------------------------
# Identities.


def model_fingerprint(model: Any) -> str:
    """A hash of the model's architecture and weights (a strided sample of every parameter).

    Part of every unit key: units computed on other weights are never reused.
    """
    digest = hashlib.sha256(model_identity(model).encode())
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = parameter.detach().reshape(-1)
            stride = max(1, flat.numel() // 4096)
            sample = flat[::stride].float().cpu().contiguous()
            digest.update(name.encode())
            digest.update(f"{tuple(parameter.shape)} {parameter.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _fact_data(fact: Fact) -> dict[str, Any]:
    return dataclasses.asdict(fact)


def _facts_id(facts: Sequence[Fact]) -> str:
    text = json.dumps([_fact_data(f) for f in facts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# The output directory.


# Edits per batched value fit in the editing phase (RomeEditor.compute_each): enough to save
# most of the per-call overhead on a small model, few enough that one batch of a large model's
# fits (each of ~20 contexts x 2 sequences) stays in memory.
_EDIT_CHUNK = 8

_OUTPUTS = {MANIFEST, "units", "results.json", "report.html", "tensors", "edit_scores.json"}


def _prepare_output(out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Check the output directory before any work; refuse another study's directory."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"output {str(out)!r} is a file, not a directory")
    if out.is_dir():
        present = {p.name for p in out.iterdir()}
        foreign = sorted(present - _OUTPUTS)
        if foreign and not (out / MANIFEST).is_file():
            raise StudyError(
                f"output directory {str(out)!r} holds files that are not a kloc_lens study "
                f"({', '.join(foreign[:5])}); choose an empty or new directory"
            )
        if (out / MANIFEST).is_file():
            try:
                old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            differs = _differences(old, manifest)
            if differs and not overwrite:
                raise StudyError(
                    f"output directory {str(out)!r} holds a study with other "
                    f"{'; '.join(differs)}; use another directory, or overwrite=True "
                    "(--overwrite) to start over"
                )
            if differs:
                for name in present & _OUTPUTS:
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kloc-write-test-{random.getrandbits(32):08x}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise StudyError(f"output directory {str(out)!r} is not writable: {err}") from None
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old.get("format") != new["format"]:
        out.append(f"format ({old.get('format')!r}, not {new['format']!r})")
    if old.get("fingerprint") != new["fingerprint"]:
        out.append(f"model weights ({old.get('model')!r}, not {new['model']!r})")
    if old.get("facts") != new["facts"]:
        out.append("facts")
    if old.get("corpus") != new["corpus"]:
        out.append("key-statistics corpus")
    old_config, new_config = old.get("config") or {}, new["config"]
    changed = sorted(k for k in new_config if old_config.get(k) != new_config[k])
    if changed:
        shown = ", ".join(f"{k}={old_config.get(k)!r} -> {new_config[k]!r}" for k in changed)
        out.append(f"settings ({shown})")
    return out


# --------------------------------------------------------------------------------------------
# Running units.


class _Units:
    """Runs the units of one phase: skips those on disk, splits the rest over the ranks."""

    def __init__(self, store: UnitStore, shard: Shard, progress: bool) -> None:
        self.store = store
        self.shard = shard
        self.progress = progress
        self.computed = 0
        self.found = 0

    def run(
        self,
        kind: str,
        keys: Sequence[str],
        compute: Callable[[int], Any],
        *,
        ext: str,
        save: Callable[[str, Any], object],
        load: Callable[[str], T],
        desc: str,
    ) -> list[T]:
        return self.run_groups(
            kind,
            keys,
            [[i] for i in range(len(keys))],
            lambda group: [compute(i) for i in group],
            ext=ext,
            save=save,
            load=load,
            desc=desc,
        )

    def run_groups(
        self,
        kind: str,
        keys: Sequence[str],
        groups: Sequence[Sequence[int]],
        compute: Callable[[Sequence[int]], list[Any]],
        *,
        ext: str,
        save: Callable[[str, Any], object],
        load: Callable[[str], T],
        desc: str,
    ) -> list[T]:
        """Units computed a group at a time (``compute(group)`` returns one result per index).

        The groups are fixed by the caller's plan, never by what is on disk: a group with any
        unit missing is computed whole (its units on disk are left as they are), so a resumed
        or sharded run computes every unit in the same company as a fresh one, and batched
        arithmetic gives the same numbers.
        """
        if sorted(i for group in groups for i in group) != list(range(len(keys))):
            raise ValueError(f"{kind}: the groups must cover each of the {len(keys)} units once")
        done = [self.store.has(kind, key, ext) for key in keys]
        # Every rank must split the same list: none may write a unit of this phase before all
        # have looked at the disk (a rank that saw a unit another had just written would shift
        # its share, and some unit would be left to nobody).
        self.shard.barrier()
        todo = [group for group in groups if not all(done[i] for i in group)]
        missing = sum(not done[i] for group in todo for i in group)
        self.found += len(keys) - missing
        mine = self.shard.mine(todo)
        bar = tqdm(
            total=len(keys),
            initial=len(keys) - missing,
            desc=desc,
            disable=not self.progress or self.shard.rank != 0,
            unit="unit",
        )
        with bar:
            for group in mine:
                results = compute(group)
                if len(results) != len(group):
                    raise ValueError(f"{kind}: {len(results)} results for {len(group)} units")
                for i, result in zip(group, results, strict=True):
                    if not done[i]:
                        save(keys[i], result)
                        self.computed += 1
                        bar.update(self.shard.world)
        self.shard.barrier()
        return [load(key) for key in keys]

    def json(
        self, kind: str, keys: Sequence[str], compute: Callable[[int], Any], desc: str
    ) -> list[Any]:
        return self.run(
            kind,
            keys,
            compute,
            ext="json",
            save=lambda key, data: self.store.write_json(kind, key, data),
            load=lambda key: self.store.read_json(kind, key),
            desc=desc,
        )


# --------------------------------------------------------------------------------------------
# The result.


@dataclass(frozen=True)
class StudyResult:
    """Everything a study run found (``results.json`` and the report are written from it).

    Attributes:
        model: The model as the user named it (a hub name or a path), else its identity.
        config: The settings.
        knowledge: Accuracy from both perspectives; which facts are known.
        entity: Localization with the subject corrupted.
        relation: Localization with the relation words corrupted (``None`` if no traced prompt
            spells its relation out).
        editing: The editing half (``None`` if skipped).
        queries: Query localization (``None`` if skipped, or no fact is known from both
            perspectives).
        about: What the model is, in one sentence (factworld: how it was trained).
        run: How the run went: seconds per phase, units computed and found on disk (not part
            of the study's numbers: a resumed run differs here only).
    """

    model: str
    config: StudyConfig
    knowledge: Knowledge
    entity: Localization
    relation: Localization | None
    editing: Editing | None
    queries: QueryLocalization | None = None
    about: str | None = None
    run: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The numbers of the run as plain JSON-able data (``results.json``)."""
        out: dict[str, Any] = {
            "format": STUDY_FORMAT,
            "model": self.model,
            "about": self.about,
            "config": self.config.as_dict(),
            "knowledge": self.knowledge.as_dict(),
            "localization": {
                "entity": self.entity.as_dict(),
                "relation": None if self.relation is None else self.relation.as_dict(),
            },
            "queries": None if self.queries is None else self.queries.as_dict(),
            "editing": None if self.editing is None else self.editing.as_dict(),
            "run": self.run,
        }
        return out


# --------------------------------------------------------------------------------------------
# The phases.


def _sample(items: Sequence[T], n: int, seed: int) -> list[T]:
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n]


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def _knowledge(
    model: Any, facts: Sequence[Fact], config: StudyConfig, units: _Units, fingerprint: str
) -> Knowledge:
    chunks = [facts[i : i + KNOWLEDGE_CHUNK] for i in range(0, len(facts), KNOWLEDGE_CHUNK)]
    keys = [
        unit_key(
            "knowledge",
            {
                "model": fingerprint,
                "facts": [_fact_data(f) for f in chunk],
                "none_target": config.none_target,
            },
        )
        for chunk in chunks
    ]
    rows = units.json(
        "knowledge",
        keys,
        lambda i: fact_knowledge(model, chunks[i], config.none_target),
        "knowledge",
    )
    flat = [row for chunk in rows for row in chunk]
    return summarize_knowledge(flat, n_bootstrap=config.n_bootstrap, seed=config.seed)


def _localize(
    model: Any,
    prompts: Sequence[TokenizedPrompt],
    span: str,
    perspective: str,
    config: StudyConfig,
    units: _Units,
    fingerprint: str,
    options: ExecutionOptions | None = None,
) -> Localization:
    from kloc_lens.corrupt import GaussianNoise
    from kloc_lens.trace import causal_trace

    window = config.window_for(int(model.cfg.n_layers))
    noise = GaussianNoise.from_prompts(
        model,
        prompts,
        factor=config.noise_factor,
        samples=config.samples,
        seed=config.seed,
        span=span,
    )
    kinds = [k.value for k, s in KINDS if s is None]
    sever = [s.value for _, s in KINDS if s is not None]
    keys = [
        unit_key(
            "trace",
            {
                "model": fingerprint,
                "prompt": prompt.text,
                "target": prompt.prompt.target,
                "spans": {k: list(v) for k, v in prompt.prompt.char_spans.items()},
                "corruption": repr(noise),
                "window": window,
                "kinds": kinds,
                "sever": sever,
            },
        )
        for prompt in prompts
    ]

    def compute(i: int) -> TraceSet:
        return causal_trace(
            model,
            prompts[i],
            corruption=noise,
            kinds=kinds,
            sever=sever,
            window=window,
            progress=False,
            options=options,
        )

    def load(key: str) -> TraceSet:
        result = load_result(units.store.path("trace", key, "safetensors"))
        if not isinstance(result, TraceSet):
            raise StudyError(f"trace unit {key} holds a {type(result).__name__}, not a TraceSet")
        return result

    traces = units.run(
        "trace",
        keys,
        compute,
        ext="safetensors",
        save=lambda key, ts: units.store.write_file("trace", key, "safetensors", ts.save),
        load=load,
        desc=f"tracing ({span} corrupted)",
    )
    numbers, layers, aggregate = localization_numbers(
        traces, span, n_bootstrap=config.n_bootstrap, seed=config.seed
    )
    return Localization(
        perspective=perspective,
        span=span,
        n_facts=len(traces),
        corruption=noise.describe(),
        window=window,
        numbers=numbers,
        layers=layers,
        aggregate=aggregate,
        example=traces[0],
    )


def _queries(
    model: Any, facts: Sequence[Fact], config: StudyConfig, units: _Units, fingerprint: str
) -> QueryLocalization | None:
    if not facts or config.n_queries == 0:
        return None
    chosen = _sample(facts, config.n_queries, config.seed + 2)
    settings = {
        "steps": config.neuron_steps,
        "threshold": config.neuron_threshold,
        "share": config.neuron_share,
        "seed": config.seed,
    }
    keys = [
        unit_key("queries", {"model": fingerprint, "fact": _fact_data(f), **settings})
        for f in chosen
    ]
    rows = units.json(
        "queries",
        keys,
        lambda i: fact_queries(model, chosen[i], **settings),
        "knowledge neurons (query localization)",
    )
    return summarize_queries(
        rows,
        n_layers=int(model.cfg.n_layers),
        steps=config.neuron_steps,
        threshold=config.neuron_threshold,
        share=config.neuron_share,
        n_bootstrap=config.n_bootstrap,
        seed=config.seed,
    )


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


def _edit(
    model: Any,
    known: Sequence[Fact],
    config: StudyConfig,
    entity: Localization,
    units: _Units,
    fingerprint: str,
    corpus: Sequence[str],
    corpus_name: str,
    progress: bool,
) -> Editing | None:
    from kloc_lens.edit import ContextSpec, EditRequest, RomeEditor, ValueSpec, second_moment
    from kloc_lens.edit.evaluate import evaluate_edit

    guard = _Guard(model, corpus, known)

    candidates = [f for f in known if f.new_object]
    if not candidates or config.n_edit == 0:
        return None
    chosen = _sample(candidates, config.n_edit, config.seed + 1)
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
            stats = second_moment(model, layer, corpus, cache_dir=stats_dir, progress=progress)
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

    def key(layer: int, request: Any) -> str:
        rome, stats = editor(layer)
        return unit_key(
            "edit",
            {
                "model": fingerprint,
                "fact": _fact_data(request.fact),
                "perspective": request.edited.value,
                "layer": layer,
                "editor": _editor_settings(rome),
                "stats": stats.describe(),
                "corpus": stats.corpus,
                "neighbors": [_fact_data(f) for f in request.neighbors],
                "related": [_fact_data(f) for f in request.related],
                "none_target": request.none_target,
                "guard": guard.settings(request),
            },
        )

    keys = [key(layer, request) for layer, request in plan]

    # Edits of one layer are computed a chunk of the plan at a time (their keys in one
    # forward, their value fits in one batch); the chunks are fixed by the plan alone.
    groups: list[list[int]] = []
    for i, (layer, _) in enumerate(plan):
        if groups and plan[groups[-1][0]][0] == layer and len(groups[-1]) < _EDIT_CHUNK:
            groups[-1].append(i)
        else:
            groups.append([i])

    def compute(group: Sequence[int]) -> list[dict[str, Any]]:
        rome, _ = editor(plan[group[0]][0])
        batch = [plan[i][1] for i in group]
        edits = rome.compute_each(model, batch)
        checks = guard.check_each(edits, batch)
        return [
            {**evaluate_edit(model, edit, request).facts[0].as_dict(), "collapse": c.as_dict()}
            for edit, request, c in zip(edits, batch, checks, strict=True)
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
    for (layer, _), data in zip(plan, units_data, strict=True):
        pair = (FactEvaluation.from_dict(data), CollapseCheck.from_dict(data["collapse"]))
        by_layer.setdefault(layer, []).append(pair)
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
    )


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


def run_study(
    model: Any,
    facts: Sequence[Fact],
    config: StudyConfig | None = None,
    *,
    out: str | Path | None = None,
    model_name: str | None = None,
    corpus: Sequence[str] | None = None,
    corpus_name: str | None = None,
    about: str | None = None,
    edit: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    options: ExecutionOptions | None = None,
) -> StudyResult:
    """Run the study and (with ``out``) write ``report.html``, ``results.json`` and tensors.

    Args:
        model: A hooked model in eval mode.
        facts: The fact set (the study keeps the facts the model answers right).
        config: Settings (defaults: :class:`StudyConfig`).
        out: Output directory (its ``units/`` make the run resumable); ``None`` computes in a
            temporary directory and writes no report.
        model_name: How to name the model in the results (as the user gave it).
        corpus: Texts for the key statistics of edits; default: the facts' own prompts.
        corpus_name: The corpus in words, for the report.
        about: What the model is, in one sentence, for the report.
        edit: Run the editing half (also skipped when ``config.n_edit`` is 0).
        overwrite: Start over in a directory that holds a study with other settings.
        progress: Show progress bars.
        shard: This process's rank; default from ``torch.distributed`` (one process if not
            initialised).
        options: How the traces execute (memory budget, batch size; not their numbers, so
            not part of the unit keys); default ``ExecutionOptions()``.

    Raises:
        StudyError: The output directory cannot hold this study, settings that do not fit the
            model, or no fact is known to the model.
    """
    config = config or StudyConfig()
    shard = shard or Shard.from_env()
    n_layers = int(model.cfg.n_layers)
    config.check_for(n_layers)
    if not facts:
        raise StudyError("no facts to study")
    texts = (
        list(corpus)
        if corpus is not None
        else [p.text for f in facts for p in (*f.prompts("entity"), *f.prompts("relation"))]
    )
    name_of_corpus = corpus_name or (
        "the given corpus" if corpus is not None else "the facts' own prompts"
    )
    fingerprint = model_fingerprint(model)
    manifest = {
        "format": STUDY_FORMAT,
        "model": model_name or model_identity(model),
        "fingerprint": fingerprint,
        "facts": _facts_id(facts),
        "corpus": hashlib.sha256("\0".join(texts).encode()).hexdigest()[:32],
        "config": config.as_dict(),
    }
    temporary = tempfile.TemporaryDirectory(prefix="kloc-study-") if out is None else None
    root = Path(temporary.name if temporary is not None else out)  # type: ignore[arg-type]
    try:
        if shard.rank == 0:
            _prepare_output(root, manifest, overwrite)
        shard.barrier()
        units = _Units(UnitStore(root), shard, progress)
        timings: dict[str, float] = {}
        with _timed(timings, "knowledge"):
            knowledge = _knowledge(model, facts, config, units, fingerprint)
        known = [facts[i] for i in knowledge.known]
        logger.info("%d of %d facts known", len(known), len(facts))
        if not known:
            raise StudyError(f"the model answers none of the {len(facts)} facts; nothing to study")
        sample = _sample(known, config.n_trace, config.seed)
        prompts = [tokenize(model, f.entity_prompt()) for f in sample]
        with _timed(timings, "trace_entity"):
            entity = _localize(
                model, prompts, "subject", "entity", config, units, fingerprint, options
            )
        relation_prompts = [p for p in prompts if "relation" in p.spans]
        relation = None
        if relation_prompts:
            with _timed(timings, "trace_relation"):
                relation = _localize(
                    model,
                    relation_prompts,
                    "relation",
                    "relation",
                    config,
                    units,
                    fingerprint,
                    options,
                )
        with _timed(timings, "queries"):
            both = [facts[i] for i in knowledge.known_both]
            queries = _queries(model, both, config, units, fingerprint)
        editing = None
        if edit:
            with _timed(timings, "edit"):
                editing = _edit(
                    model,
                    known,
                    config,
                    entity,
                    units,
                    fingerprint,
                    texts,
                    name_of_corpus,
                    progress,
                )
        result = StudyResult(
            model=manifest["model"],
            config=config,
            knowledge=knowledge,
            entity=entity,
            relation=relation,
            editing=editing,
            queries=queries,
            about=about,
            run={
                "timings_s": timings,
                "units_computed": units.computed,
                "units_found": units.found,
                "ranks": shard.world,
                "device": str(device_of(model)),
                "dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
            },
        )
        if out is not None and shard.rank == 0:
            from kloc_lens.study.report import write_report

            write_report(result, root)
        shard.barrier()
        return result
    finally:
        if temporary is not None:
            temporary.cleanup()
