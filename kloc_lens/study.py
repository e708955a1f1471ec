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
from collections.abc import Callable, Sequence
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
    "LocalizationSide",
    "StudyConfig",
    "StudyError",
    "StudyResult",
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
        edit_layer: Layer edited; ``None`` takes the layer where the entity-side MLP AIE peaks.
        edit_steps: Optimisation steps of each edit's value vector.
    """

    n_trace: int = 50
    n_edit: int = 20
    window: int | None = None
    samples: int = 10
    noise_factor: float = 3.0
    seed: int = 0
    edit_layer: int | None = None
    edit_steps: int = 20

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
    """

    perspective: str
    span: str
    trace: DatasetTrace
    mlp_peak: tuple[float, int]
    attn_peak: tuple[float, int]
    mlp_share: float
    severed_mlp_drop: float
    severed_attn_drop: float

    @property
    def aggregate(self) -> AggregateSet:
        """The aggregated traces."""
        return self.trace.aggregate

    def summary(self) -> dict[str, Any]:
        """The headline numbers as plain data."""
        return {
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
            "clean_p": self.aggregate.traces[0].clean_score,
            "corrupted_p": self.aggregate.traces[0].corrupted_score,
        }


def headline(aggregate: AggregateSet, span: str) -> dict[str, Any]:
    """MLP versus attention numbers of one aggregate at the last token of ``span``.

    Returns:
        ``mlp_peak``/``attn_peak`` as ``(aie, layer)``, ``mlp_share``, and the severed drops.
    """
    bin_name = f"last {span} token"
    mlp = aggregate.get(TraceKind.MLP).bin(bin_name)
    attn = aggregate.get(TraceKind.ATTN).bin(bin_name)
    layers = aggregate.get(TraceKind.MLP).layers
    mlp_peak = (float(mlp.max()), layers[int(mlp.argmax())])
    attn_peak = (float(attn.max()), layers[int(attn.argmax())])
    positive = max(mlp_peak[0], 0.0) + max(attn_peak[0], 0.0)
    share = max(mlp_peak[0], 0.0) / positive if positive > 0 else float("nan")
    plain = aggregate.get(TraceKind.RESID).bin(bin_name).clamp(min=0).sum()

    def drop(component: TraceKind) -> float:
        severed = aggregate.get(TraceKind.RESID, component).bin(bin_name).clamp(min=0).sum()
        return float(1 - severed / plain) if plain > 0 else float("nan")

    return {
        "mlp_peak": mlp_peak,
        "attn_peak": attn_peak,
        "mlp_share": share,
        "severed_mlp_drop": drop(TraceKind.MLP),
        "severed_attn_drop": drop(TraceKind.ATTN),
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
    editing: Any | None
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
    editing: Callable[..., Any] | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run both halves of the study and (with ``out``) write the report and results.

    Args:
        model: A hooked model in eval mode.
        facts: The fact set (filtered to the facts the model knows first).
        config: Settings (defaults: :class:`StudyConfig`).
        out: Directory for ``report.html``, ``results.json`` and the tensors.
        editing: The editing half: ``editing(model, facts, config, layer, progress) -> result``
            with ``summary()``; default: :func:`kloc_lens.edit.study.edit_study` when available.
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
    if editing is not None and config.n_edit > 0:
        start = time.perf_counter()
        layer = config.edit_layer if config.edit_layer is not None else entity.mlp_peak[1]
        edit_result = editing(model, known.facts, config, layer, progress)
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
