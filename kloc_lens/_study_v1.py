"""The study, end to end: where is a fact stored, and do edits transfer between perspectives?

:func:`run_study` reproduces, on any hooked model and fact set, the two halves of Wei et al.
(CIKM 2024, "Does Knowledge Localization Hold True?"):

1. **Localization.** ROME causal tracing, plain and severed, aggregated over the facts the model
   knows, from two sides of the triplet: the *entity* side corrupts the subject (ROME's setting)
   and the *relation* side corrupts the relation words of the same prompts ("The **mother
   tongue** of Danielle Darrieux is"). The headline compares how much of each side's effect runs
   through MLP and through attention: the peak average indirect effect (AIE) of MLP-window
   and attention-window restores at the last token of the corrupted span, and the share of the
   residual effect removed by severing MLP or attention there.
2. **Editing.** Rank-one edits made from the entity perspective and from the relation perspective,
   each evaluated from both: the 2 x 2 transfer matrix (edited perspective x evaluated one).

It writes an HTML report (figures embedded, works offline), ``results.json`` and the tensors.

Example (the planted model stands in for a trained one; the report needs ``out``)::

    from kloc_lens.study import StudyConfig, run_study
    result = run_study(model, facts, StudyConfig(n_trace=20), out="out/study")
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kloc_lens.aggregate import DatasetTrace, trace_dataset
from kloc_lens.datasets import KnownFacts, filter_known
from kloc_lens.errors import KlocLensError
from kloc_lens.facts import Fact, TokenizedPrompt, tokenize
from kloc_lens.model import model_identity
from kloc_lens.results import AggregateSet
from kloc_lens.types import TraceKind

__all__ = [
    "EditingHalf",
    "LocalizationSide",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "edit_half",
    "edit_site",
    "headline",
    "run_study",
]

logger = logging.getLogger(__name__)


class StudyError(KlocLensError):
    """The study cannot run on the given model and facts."""


@dataclass(frozen=True)
class StudyConfig:
    """Settings of a study run (all recorded in the report).

    Attributes:
        n_trace: Facts traced per perspective (sampled from the known facts).
        n_edit: Facts edited per perspective.
        window: MLP/attention window; ``None`` scales ROME's 10-of-48 layers to the model.
        samples: Noise samples per trace.
        noise_factor: Noise scale in standard deviations of the span's token embeddings.
        seed: Seed of the fact sampling and of the noise.
        edit_layer: Layer edited; ``None`` takes the layer where the entity-side MLP AIE peaks
            at the edit token.
        edit_token: Where edits read their key and write their value: ``"subject_last"``
            (ROME), ``"last"`` (the prompt's last token), ``"relation_last"``; ``None`` takes
            the one of the subject's last token and the prompt's last token where the
            entity-side MLP AIE peaks higher (edit where the trace finds the lookup).
        edit_steps: Cap on the value fit's steps. ROME's 20 were tuned on GPT-2 XL and stop
            short on small models; the fit stops as soon as its loss is met, so a higher cap
            only costs where it is needed.
        edit_contexts: Generated contexts per length that keys are averaged over (ROME: 10);
            0 reads keys from the bare prompt only (for models trained on single sentences,
            like factworld, whose own samples are out of their distribution).
        none_target: The relation-perspective answer meaning "no relation" (the study's
            ``"None"``).
    """

    n_trace: int = 50
    n_edit: int = 20
    window: int | None = None
    samples: int = 10
    noise_factor: float = 3.0
    seed: int = 0
    edit_layer: int | None = None
    edit_token: str | None = None
    edit_steps: int = 100
    edit_contexts: int = 10
    none_target: str = "None"

    def window_for(self, n_layers: int) -> int:
        """The window used on a model with ``n_layers`` layers."""
        if self.window is not None:
            return self.window
        return max(1, round(n_layers * 10 / 48))


@dataclass(frozen=True)
class LocalizationSide:
    """The localization result of one perspective.

    Attributes:
        perspective: ``"entity"`` (subject corrupted) or ``"relation"`` (relation corrupted).
        span: The corrupted span.
        trace: Every traced fact and the aggregate.
        mlp_peak: Peak MLP-window AIE at the span's last token, and its layer.
        attn_peak: Peak attention-window AIE at the span's last token, and its layer.
        mlp_share: ``mlp_peak / (mlp_peak + attn_peak)``.
        severed_mlp_drop: Fraction of the residual AIE at the span's last token (summed over
            layers) removed by severing MLP.
        severed_attn_drop: The same for severing attention.
        mlp_peak_last: Peak MLP-window AIE at the prompt's last token, and its layer.
        attn_peak_last: Peak attention-window AIE at the prompt's last token, and its layer.
    """

    perspective: str
    span: str
    trace: DatasetTrace
    mlp_peak: tuple[float, int]
    attn_peak: tuple[float, int]
    mlp_share: float
    severed_mlp_drop: float
    severed_attn_drop: float
    mlp_peak_last: tuple[float, int]
    attn_peak_last: tuple[float, int]

    @property
    def aggregate(self) -> AggregateSet:
        """The aggregated traces."""
        return self.trace.aggregate

    def summary(self) -> dict[str, Any]:
        """The headline numbers as plain data (undefined numbers as ``None``)."""
        numbers = {
            "perspective": self.perspective,
            "span": self.span,
            "n_facts": len(self.trace.traces),
            "corruption": self.trace.corruption,
            "mlp_peak_aie": self.mlp_peak[0],
            "mlp_peak_layer": self.mlp_peak[1],
            "attn_peak_aie": self.attn_peak[0],
            "attn_peak_layer": self.attn_peak[1],
            "mlp_share": self.mlp_share,
            "severed_mlp_drop": self.severed_mlp_drop,
            "severed_attn_drop": self.severed_attn_drop,
            "mlp_peak_aie_last_token": self.mlp_peak_last[0],
            "mlp_peak_layer_last_token": self.mlp_peak_last[1],
            "attn_peak_aie_last_token": self.attn_peak_last[0],
            "attn_peak_layer_last_token": self.attn_peak_last[1],
            "clean_p": self.aggregate.traces[0].clean_score,
            "corrupted_p": self.aggregate.traces[0].corrupted_score,
        }
        return {k: None if isinstance(v, float) and v != v else v for k, v in numbers.items()}


def headline(aggregate: AggregateSet, span: str) -> dict[str, Any]:
    """MLP versus attention numbers of one aggregate at the last token of ``span``.

    Effects below 1% of the total effect count as none: the share and the severed drops are then
    undefined (NaN) rather than ratios of noise.

    Returns:
        ``mlp_peak``/``attn_peak`` as ``(aie, layer)``, ``mlp_share``, the severed drops, and
        the same peaks at the prompt's last token (``mlp_peak_last``/``attn_peak_last``).
    """
    bin_name = f"last {span} token"
    mlp_agg = aggregate.get(TraceKind.MLP)
    floor = 0.01 * abs(mlp_agg.total_effect)

    def peak(kind: TraceKind, name: str) -> tuple[float, int]:
        values = aggregate.get(kind).bin(name)
        return float(values.max()), mlp_agg.layers[int(values.argmax())]

    mlp_peak, attn_peak = peak(TraceKind.MLP, bin_name), peak(TraceKind.ATTN, bin_name)
    positive = max(mlp_peak[0], 0.0) + max(attn_peak[0], 0.0)
    share = max(mlp_peak[0], 0.0) / positive if positive > floor else float("nan")
    plain = float(aggregate.get(TraceKind.RESID).bin(bin_name).clamp(min=0).sum())

    def drop(component: TraceKind) -> float:
        severed = float(aggregate.get(TraceKind.RESID, component).bin(bin_name).clamp(min=0).sum())
        return 1 - severed / plain if plain > floor else float("nan")

    return {
        "mlp_peak": mlp_peak,
        "attn_peak": attn_peak,
        "mlp_share": share,
        "severed_mlp_drop": drop(TraceKind.MLP),
        "severed_attn_drop": drop(TraceKind.ATTN),
        "mlp_peak_last": peak(TraceKind.MLP, "last token"),
        "attn_peak_last": peak(TraceKind.ATTN, "last token"),
    }


@dataclass(frozen=True)
class StudyResult:
    """Everything a study run found (the report is written from this object).

    Attributes:
        model: The model's identity string.
        config: The settings.
        known: The known-fact filter (counts).
        entity: Localization with the subject corrupted.
        relation: Localization with the relation words corrupted (``None`` if no fact's prompt
            spells the relation out).
        editing: The editing half (``None`` if it was skipped).
        timings: Seconds per stage.
    """

    model: str
    config: StudyConfig
    known: KnownFacts
    entity: LocalizationSide
    relation: LocalizationSide | None
    editing: EditingHalf | None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The numbers of the run as plain JSON-able data."""
        out: dict[str, Any] = {
            "model": self.model,
            "config": asdict(self.config),
            "known_facts": {
                "checked": self.known.total,
                "kept": self.known.kept,
                "accuracy": self.known.accuracy,
            },
            "localization": {
                "entity": self.entity.summary(),
                "relation": None if self.relation is None else self.relation.summary(),
            },
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if self.editing is not None:
            out["editing"] = self.editing.summary()
        return out


@dataclass(frozen=True)
class EditingHalf:
    """The editing half: the same facts edited from each perspective, scored on both.

    Attributes:
        evaluation: Every edit's scores (both perspectives, before and after).
        transfer: The 2 x 2 matrix: edited perspective x evaluated perspective.
        layer: The edited layer.
        editor: The editor's label.
        statistics: How the key statistics were obtained.
        key_token: Where keys were read and values written.
    """

    evaluation: Any
    transfer: Any
    layer: int
    editor: str
    statistics: str
    key_token: str = "subject_last"

    def summary(self) -> dict[str, Any]:
        """The numbers as plain data (with ``text``: the report's sentences)."""
        pre, post = self.transfer.pre, self.transfer.post
        entity_on_relation = float(post[0, 1] - pre[0, 1])
        relation_on_entity = float(post[1, 0] - pre[1, 0])
        text = [
            f"{self.editor} at the {self.key_token.replace('_', ' ')} token "
            f"({self.statistics}): entity edits reach "
            f"{_pct(post[0, 0])} efficacy (from {_pct(pre[0, 0])}) and move the relation-side "
            f"success by {100 * entity_on_relation:+.1f} points; relation edits reach "
            f"{_pct(post[1, 1])} relation-side success (from {_pct(pre[1, 1])}) and move entity "
            f"efficacy by {100 * relation_on_entity:+.1f} points."
        ]
        return {
            "layer": self.layer,
            "editor": self.editor,
            "key_token": self.key_token,
            "statistics": self.statistics,
            "perspectives": [p.value for p in self.transfer.perspectives],
            "metrics": [m.value for m in self.transfer.metrics],
            "counts": [int(c) for c in self.transfer.counts],
            "transfer_pre": _matrix(pre),
            "transfer_post": _matrix(post),
            "metrics_summary": self.evaluation.summary().to_dict(orient="records"),
            "text": text,
        }

    def figures(self) -> list[tuple[str, str, Any]]:
        """The report's editing figures: the transfer matrix and every metric."""
        from kloc_lens.edit.plot import metric_bars, transfer_heatmap

        return [
            (
                "transfer",
                "Transfer matrix: edited perspective x evaluated perspective",
                transfer_heatmap(self.transfer),
            ),
            (
                "edit-metrics",
                "Every metric before and after the edits",
                metric_bars(self.evaluation),
            ),
        ]

    def table_html(self) -> str:
        """The per-metric summary as an HTML table."""
        return self.evaluation.summary().to_html(index=False, float_format="%.3f")

    def save(self, directory: Path) -> None:
        """Per-fact scores as CSV and the transfer matrix as safetensors."""
        from safetensors.torch import save_file

        self.evaluation.to_dataframe().to_csv(directory / "edit_scores.csv", index=False)
        save_file(
            {
                "pre": self.transfer.pre.contiguous(),
                "post": self.transfer.post.contiguous(),
                "counts": self.transfer.counts.contiguous(),
            },
            str(directory / "transfer.safetensors"),
        )


def _pct(value: Any) -> str:
    return f"{100 * float(value):.0f}%"


def _matrix(tensor: Any) -> list[list[float | None]]:
    return [[None if v != v else float(v) for v in row.tolist()] for row in tensor]


def edit_half(
    model: Any,
    facts: Sequence[Fact],
    config: StudyConfig,
    layer: int,
    *,
    key_token: str = "subject_last",
    corpus: Sequence[str] | None = None,
    progress: bool = True,
) -> EditingHalf:
    """Edit ``config.n_edit`` facts from each perspective (ROME at ``layer``) and score both.

    Args:
        model: The hooked model (never changed: edits are applied as hooks).
        facts: Known facts; those with a ``new_object`` are candidates.
        config: Settings (``n_edit``, ``seed``, ``none_target``, ``edit_steps``,
            ``edit_contexts``).
        layer: The edited layer.
        key_token: Where keys are read and values written (see :class:`StudyConfig`).
        corpus: Texts for the key statistics; default: the facts' own prompts.
        progress: Show progress bars.

    Raises:
        StudyError: No fact has a new object.
    """
    from kloc_lens.edit import (
        ContextSpec,
        EditRequest,
        RomeEditor,
        ValueSpec,
        evaluate_editor,
        second_moment,
    )

    candidates = [f for f in facts if f.new_object]
    if not candidates:
        raise StudyError("no fact has a new_object to edit towards")
    chosen = _sample(candidates, config.n_edit, config.seed + 1)
    texts = (
        list(corpus)
        if corpus is not None
        else [p.text for f in facts for p in (*f.prompts("entity"), *f.prompts("relation"))]
    )
    stats = second_moment(model, layer, texts, progress=progress)
    editor = RomeEditor(
        layer=layer,
        stats=stats,
        key_token=key_token,
        contexts=ContextSpec(count=config.edit_contexts),
        value=ValueSpec(steps=config.edit_steps),
    )
    requests = []
    for fact in chosen:
        neighbors = tuple(
            g
            for g in facts
            if g.subject != fact.subject and g.relation == fact.relation and g.object == fact.object
        )[:5]
        for perspective in ("entity", "relation"):
            requests.append(
                EditRequest(
                    fact,
                    perspective=perspective,
                    neighbors=neighbors,
                    none_target=config.none_target,
                )
            )
    evaluation = evaluate_editor(model, requests, editor, progress=progress)
    source = "the given corpus" if corpus is not None else "the facts' own prompts"
    return EditingHalf(
        evaluation=evaluation,
        transfer=evaluation.transfer(),
        layer=layer,
        editor=editor.name,
        key_token=key_token,
        statistics=f"key statistics over {len(texts)} texts of {source}",
    )


def edit_site(
    config: StudyConfig, subject_peak: tuple[float, int], last_peak: tuple[float, int]
) -> tuple[str, int]:
    """The key token and layer the editing half edits, from the settings or the entity trace.

    Args:
        config: The settings (``edit_token``, ``edit_layer``).
        subject_peak: The entity-side MLP AIE peak at the subject's last token, and its layer.
        last_peak: The same at the prompt's last token.

    Without ``config.edit_token``, the token is the subject's last token or the prompt's last
    token, whichever has the higher peak (ties: the subject's, as ROME); without
    ``config.edit_layer``, the layer is that peak's (the subject's for other tokens).
    """
    peaks = {"subject_last": subject_peak, "last": last_peak}
    token = config.edit_token
    if token is None:
        token = "last" if peaks["last"][0] > peaks["subject_last"][0] else "subject_last"
    if config.edit_layer is not None:
        return token, config.edit_layer
    return token, peaks.get(token, subject_peak)[1]


def _sample(facts: Sequence[Fact], n: int, seed: int) -> list[Fact]:
    items = list(facts)
    random.Random(seed).shuffle(items)
    return items[:n]


def _localize(
    model: Any,
    prompts: Sequence[TokenizedPrompt],
    span: str,
    perspective: str,
    config: StudyConfig,
    window: int,
    progress: bool,
) -> LocalizationSide:
    from kloc_lens.corrupt import GaussianNoise

    def noise(items: Sequence[TokenizedPrompt]) -> GaussianNoise:
        return GaussianNoise.from_prompts(
            model,
            items,
            factor=config.noise_factor,
            samples=config.samples,
            seed=config.seed,
            span=span,
        )

    trace = trace_dataset(
        model,
        prompts,
        span=span,
        corruption=noise,
        window=window,
        sever=(TraceKind.MLP, TraceKind.ATTN),
        progress=progress,
    )
    numbers = headline(trace.aggregate, span)
    return LocalizationSide(perspective=perspective, span=span, trace=trace, **numbers)


def run_study(
    model: Any,
    facts: Sequence[Fact],
    config: StudyConfig | None = None,
    *,
    out: str | Path | None = None,
    corpus: Sequence[str] | None = None,
    edit: bool = True,
    progress: bool = True,
) -> StudyResult:
    """Run both halves of the study and (with ``out``) write the report and results.

    Args:
        model: A hooked model in eval mode.
        facts: The fact set (filtered to the facts the model knows first).
        config: Settings (defaults: :class:`StudyConfig`).
        out: Directory for ``report.html``, ``results.json`` and the tensors.
        corpus: Texts for the editing half's key statistics (default: the facts' prompts).
        edit: Run the editing half (also skipped when ``config.n_edit`` is 0).
        progress: Show progress bars.

    Raises:
        StudyError: No fact is known to the model.
    """
    config = config or StudyConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    known = filter_known(model, facts)
    timings["filter"] = time.perf_counter() - start
    logger.info("%s", known)
    if not known.facts:
        raise StudyError(f"the model answers none of the {len(facts)} facts; nothing to study")
    window = config.window_for(int(model.cfg.n_layers))

    start = time.perf_counter()
    sample = _sample(known.facts, config.n_trace, config.seed)
    entity_prompts = [tokenize(model, f.entity_prompt()) for f in sample]
    entity = _localize(model, entity_prompts, "subject", "entity", config, window, progress)
    timings["trace_entity"] = time.perf_counter() - start

    start = time.perf_counter()
    relation_prompts = [p for p in entity_prompts if "relation" in p.spans]
    relation = (
        _localize(model, relation_prompts, "relation", "relation", config, window, progress)
        if relation_prompts
        else None
    )
    timings["trace_relation"] = time.perf_counter() - start

    edit_result = None
    if edit and config.n_edit > 0:
        start = time.perf_counter()
        token, layer = edit_site(config, entity.mlp_peak, entity.mlp_peak_last)
        edit_result = edit_half(
            model, known.facts, config, layer, key_token=token, corpus=corpus, progress=progress
        )
        timings["edit"] = time.perf_counter() - start
    result = StudyResult(
        model=model_identity(model),
        config=config,
        known=known,
        entity=entity,
        relation=relation,
        editing=edit_result,
        timings=timings,
    )
    if out is not None:
        from kloc_lens.report import write_report

        write_report(result, out)
    return result
