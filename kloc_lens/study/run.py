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

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from kloc_lens.engine import ExecutionOptions
from kloc_lens.facts import Fact, TokenizedPrompt, tokenize
from kloc_lens.model import device_of, model_identity
from kloc_lens.results import TraceSet, load_result
from kloc_lens.study.config import StudyConfig, StudyError
from kloc_lens.study.editing import Editing
from kloc_lens.study.edits import edit_phase
from kloc_lens.study.knowledge import Knowledge, fact_knowledge, summarize_knowledge
from kloc_lens.study.localization import KINDS, Localization, localization_numbers
from kloc_lens.study.queries import QueryLocalization, fact_queries, summarize_queries
from kloc_lens.study.store import (
    Shard,
    Units,
    UnitStore,
    atomic_write_text,
    fact_data,
    sample_items,
    unit_key,
)

__all__ = ["STUDY_FORMAT", "Shard", "StudyResult", "model_fingerprint", "run_study"]

logger = logging.getLogger(__name__)

STUDY_FORMAT = "kloc_lens.study/3"
"""Format of ``results.json`` and of the output directory's manifest (``study.json``)."""

MANIFEST = "study.json"
KNOWLEDGE_CHUNK = 64
"""Facts per knowledge unit."""

T = TypeVar("T")


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


def _facts_id(facts: Sequence[Fact]) -> str:
    text = json.dumps([fact_data(f) for f in facts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# The output directory.


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
        relation_prompts: Localization of relation-perspective prompts, by corrupted span
            (``"subject"``, ``"object"``; empty when skipped).
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
    relation_prompts: dict[str, Localization] = field(default_factory=dict)

    def sides(self) -> dict[str, Localization]:
        """Every traced side by its key in ``results.json``: ``entity``, ``relation``,
        ``relation_prompt_subject``, ``relation_prompt_object`` (those that were traced)."""
        out = {"entity": self.entity}
        if self.relation is not None:
            out["relation"] = self.relation
        for span, side in self.relation_prompts.items():
            out[f"relation_prompt_{span}"] = side
        return out

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
                **{
                    f"relation_prompt_{span}": side.as_dict()
                    for span, side in self.relation_prompts.items()
                },
            },
            "queries": None if self.queries is None else self.queries.as_dict(),
            "editing": None if self.editing is None else self.editing.as_dict(),
            "run": self.run,
        }
        return out


# --------------------------------------------------------------------------------------------
# The phases.


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def _knowledge(
    model: Any, facts: Sequence[Fact], config: StudyConfig, units: Units, fingerprint: str
) -> Knowledge:
    chunks = [facts[i : i + KNOWLEDGE_CHUNK] for i in range(0, len(facts), KNOWLEDGE_CHUNK)]
    keys = [
        unit_key(
            "knowledge",
            {
                "model": fingerprint,
                "facts": [fact_data(f) for f in chunk],
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


def _noise(model: Any, prompts: Sequence[TokenizedPrompt], span: str, config: StudyConfig) -> Any:
    """ROME's Gaussian noise on ``span``, its scale from the prompts' span embeddings."""
    from kloc_lens.corrupt import GaussianNoise

    return GaussianNoise.from_prompts(
        model,
        prompts,
        factor=config.noise_factor,
        samples=config.samples,
        seed=config.seed,
        span=span,
    )


def _traces(
    model: Any,
    prompts: Sequence[TokenizedPrompt],
    noise: Any,
    config: StudyConfig,
    units: Units,
    fingerprint: str,
    options: ExecutionOptions | None,
    desc: str,
) -> list[TraceSet]:
    """One trace unit per prompt (found on disk when any phase traced it before)."""
    from kloc_lens.trace import causal_trace

    window = config.window_for(int(model.cfg.n_layers))
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

    return units.run(
        "trace",
        keys,
        compute,
        ext="safetensors",
        save=lambda key, ts: units.store.write_file("trace", key, "safetensors", ts.save),
        load=load,
        desc=desc,
    )


def _localize(
    model: Any,
    prompts: Sequence[TokenizedPrompt],
    span: str,
    perspective: str,
    config: StudyConfig,
    units: Units,
    fingerprint: str,
    options: ExecutionOptions | None = None,
    noise: Any = None,
    bin_spans: Sequence[str] | None = None,
    desc: str | None = None,
) -> Localization:
    window = config.window_for(int(model.cfg.n_layers))
    noise = noise if noise is not None else _noise(model, prompts, span, config)
    traces = _traces(
        model,
        prompts,
        noise,
        config,
        units,
        fingerprint,
        options,
        desc or f"tracing ({span} corrupted)",
    )
    numbers, layers, aggregate = localization_numbers(
        traces, span, n_bootstrap=config.n_bootstrap, seed=config.seed, bin_spans=bin_spans
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


RELATION_PROMPT_SPANS = ("subject", "object")
"""The spans of a relation-perspective prompt that are corrupted in turn (and binned around)."""


def _relation_prompts(
    model: Any,
    facts: Sequence[Fact],
    config: StudyConfig,
    units: Units,
    fingerprint: str,
    options: ExecutionOptions | None,
) -> dict[str, Localization]:
    """Relation-perspective prompts traced with the subject, then the object corrupted; the
    aggregate is binned around both spans and the last token (where the relation is answered)."""
    if not facts or config.n_trace_relation_prompts == 0:
        return {}
    chosen = sample_items(facts, config.n_trace_relation_prompts, config.seed + 3)
    prompts = [tokenize(model, f.relation_prompt()) for f in chosen]
    prompts = [p for p in prompts if all(s in p.spans for s in RELATION_PROMPT_SPANS)]
    if not prompts:
        return {}
    return {
        span: _localize(
            model,
            prompts,
            span,
            "relation_prompt",
            config,
            units,
            fingerprint,
            options,
            bin_spans=RELATION_PROMPT_SPANS,
            desc=f"tracing relation-perspective prompts ({span} corrupted)",
        )
        for span in RELATION_PROMPT_SPANS
    }


def _queries(
    model: Any, facts: Sequence[Fact], config: StudyConfig, units: Units, fingerprint: str
) -> QueryLocalization | None:
    if not facts or config.n_queries == 0:
        return None
    chosen = sample_items(facts, config.n_queries, config.seed + 2)
    settings = {
        "steps": config.neuron_steps,
        "threshold": config.neuron_threshold,
        "share": config.neuron_share,
        "seed": config.seed,
    }
    keys = [
        unit_key("queries", {"model": fingerprint, "fact": fact_data(f), **settings})
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
        units = Units(UnitStore(root), shard, progress)
        timings: dict[str, float] = {}
        with _timed(timings, "knowledge"):
            knowledge = _knowledge(model, facts, config, units, fingerprint)
        known = [facts[i] for i in knowledge.known]
        logger.info("%d of %d facts known", len(known), len(facts))
        if not known:
            raise StudyError(f"the model answers none of the {len(facts)} facts; nothing to study")
        sample = sample_items(known, config.n_trace, config.seed)
        prompts = [tokenize(model, f.entity_prompt()) for f in sample]
        subject_noise = _noise(model, prompts, "subject", config)
        with _timed(timings, "trace_entity"):
            entity = _localize(
                model,
                prompts,
                "subject",
                "entity",
                config,
                units,
                fingerprint,
                options,
                subject_noise,
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
        both = [facts[i] for i in knowledge.known_both]
        with _timed(timings, "trace_relation_prompts"):
            relation_prompts = _relation_prompts(model, both, config, units, fingerprint, options)
        with _timed(timings, "queries"):
            queries = _queries(model, both, config, units, fingerprint)
        editing = None
        if edit:
            with _timed(timings, "edit"):
                editing = edit_phase(
                    model,
                    known,
                    config,
                    entity,
                    units,
                    fingerprint,
                    texts,
                    name_of_corpus,
                    progress,
                    trace=lambda ps, desc: _traces(
                        model,
                        ps,
                        subject_noise,
                        config,
                        units,
                        fingerprint,
                        options,
                        f"tracing the layer sweep's {desc} (subject corrupted)",
                    ),
                    corruption=subject_noise,
                )
        result = StudyResult(
            model=manifest["model"],
            config=config,
            knowledge=knowledge,
            entity=entity,
            relation=relation,
            relation_prompts=relation_prompts,
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
