"""The study's HTML report and machine-readable results, and reading them back.

:func:`write_report` turns a :class:`~kloc_lens.study.StudyResult` into

- ``results.json``: ``result.summary()``, every headline number with its 95% bootstrap interval
  over facts and its ``n``;
- ``report.html``: one self-contained page (plotly.js inlined, so it works offline): what was
  found in sentences (:func:`summary_text`, from ``results.json`` alone), the settings, the
  tables and the figures. The page carries the summary as JSON (``<script id="kloc-results">``)
  and every figure as plotly JSON (``<script class="kloc-figure">``) drawn on load;
- ``tensors/``: the aggregates and an example trace (safetensors, :func:`kloc_lens.load_result`)
  and ``edit_scores.json``, the per-fact edit scores.

Everything is written to temporary names first and renamed into place, so a failure while writing
leaves the previous report whole, never half of each. :func:`load_study` reads a study directory
back into a typed :class:`~kloc_lens.study.StudyResult` (re-plot, compare) without recomputing.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from kloc_lens.study.config import StudyError
from kloc_lens.study.figures import report_figures

__all__ = ["load_study", "report_figures", "summary_text", "write_report"]


# --------------------------------------------------------------------------------------------
# Sentences (from results.json alone).


def _est(data: dict[str, Any] | None, kind: str = "percent", digits: int | None = None) -> str:
    from kloc_lens.intervals import Estimate

    if data is None:
        return "undefined"
    estimate = Estimate.from_dict(data)
    if kind == "percent":
        return estimate.percent(0 if digits is None else digits)
    return estimate.number(2 if digits is None else digits)


_SIDE_TITLES = {
    "entity": "Entity side (entity prompts",
    "relation": "Relation side (entity prompts",
    "relation_prompt": "Relation-perspective prompts (the relation is the answer",
}


def _localization_lines(side: dict[str, Any]) -> list[str]:
    n = side["numbers"]
    layers = side["layers"]
    span = side["span"]
    early = side["early_layers"]
    title = _SIDE_TITLES.get(side["perspective"], side["perspective"])
    lines = [
        f"{title}, {span} corrupted by {side['corruption']}; "
        f"{side['n_facts']} facts; window {side['window']}; shares of the total effect "
        f"{_est(n['total_effect'], 'number', 3)}): restoring the residual stream at the last "
        f"{span} token recovers {_est(n['resid_last_span'])} of it at best in the first half "
        f"(layer {layers['resid_last_span']}), {_est(n['last_to_first'], 'number')} times the "
        f"peak at the first {span} token; {_est(n['facts_half_te'])} of the facts reach half "
        f"their own total effect there.",
        f"At the last {span} token the MLP-window restore peaks at layer "
        f"{layers['mlp_last_span']} with {_est(n['mlp_last_span'])} of the total effect and the "
        f"attention window at layer {layers['attn_last_span']} with "
        f"{_est(n['attn_last_span'])} (MLP share {_est(n['mlp_share'], 'number')}); severing "
        f"the MLPs removes {_est(n['severed_mlp_drop'])} of the residual effect there in the "
        f"first {early} layers, severing attention {_est(n['severed_attn_drop'])}.",
        f"At the prompt's last token, attention carries {_est(n['attn_last_token_early'])} "
        f"of the effect before layer {early} and {_est(n['attn_last_token_late'])} from layer "
        f"{early} on (peak at layer {layers['attn_last_token_late']}); the MLP window peaks "
        f"there with {_est(n['mlp_last_token'])} (MLP share at the last token "
        f"{_est(n.get('mlp_share_last_token'), 'number')}).",
    ]
    return lines


def summary_text(summary: dict[str, Any]) -> list[str]:
    """The report's sentences, from ``results.json`` (``StudyResult.summary()``)."""
    lines: list[str] = []
    if summary.get("about"):
        lines.append(summary["about"])
    knowledge = summary["knowledge"]
    acc = knowledge["accuracy"]
    lines.append(
        f"The model answers {_est(acc['entity'])} of canonical entity prompts right "
        f"({_est(acc['entity_paraphrase'])} of held-out entity paraphrases) and "
        f"{_est(acc['relation'])} of canonical relation prompts "
        f"({_est(acc['relation_paraphrase'])} of relation paraphrases; {_est(acc['none'])} of "
        "relation prompts about unrelated pairs "
        f"answer the 'no relation' answer); the study traces and edits the "
        f"{knowledge['known']} of {knowledge['checked']} facts it answers right. Every number "
        "comes with its 95% bootstrap interval over facts and its n."
    )
    sides = summary["localization"]
    for key in ("entity", "relation"):
        side = sides.get(key)
        if side is None:
            lines.append(f"No traced prompt spells its relation out: no {key}-side trace.")
            continue
        lines.extend(_localization_lines(side))
    for key, side in sides.items():
        if key.startswith("relation_prompt_") and side is not None:
            lines.extend(_localization_lines(side))
    if sides.get("entity") is not None and sides.get("relation") is not None:
        lines.extend(_second_claim(sides))
    queries = summary.get("queries")
    if queries:
        from kloc_lens.study.queries import query_lines

        lines.extend(query_lines(queries))
    editing = summary.get("editing")
    if editing:
        lines.extend(editing["text"])
    return lines


def _compare(r: dict[str, Any] | None, e: dict[str, Any] | None) -> str | None:
    """``"lower"``, ``"higher"`` (intervals apart), ``"overlap"``, or ``None`` (undefined)."""
    if r is None or e is None or None in (r["ci_low"], r["ci_high"], e["ci_low"], e["ci_high"]):
        return None
    if r["ci_high"] < e["ci_low"]:
        return "lower"
    if r["ci_low"] > e["ci_high"]:
        return "higher"
    return "overlap"


_SAID = {
    "lower": "lower, intervals apart",
    "higher": "higher, intervals apart",
    "overlap": "intervals overlap",
    None: "undefined",
}


def _second_claim(sides: dict[str, Any]) -> list[str]:
    """Whether relational knowledge runs more through attention than entity knowledge does:
    MLP shares (MLP / (MLP + attention) window peaks) of the relation readings against the
    entity side's, at the last corrupted token and at the last token, and the severed traces."""
    entity, relation = sides["entity"]["numbers"], sides["relation"]["numbers"]
    comparisons = [
        (
            "entity prompts, relation words corrupted, at the last relation token",
            relation["mlp_share"],
            "at the last subject token",
            entity["mlp_share"],
        ),
        (
            "entity prompts, relation words corrupted, at the last token",
            relation.get("mlp_share_last_token"),
            "at the last token",
            entity.get("mlp_share_last_token"),
        ),
    ]
    for span in ("subject", "object"):
        side = sides.get(f"relation_prompt_{span}")
        if side is not None:
            comparisons.append(
                (
                    f"relation-perspective prompts, {span} corrupted, at the last token",
                    side["numbers"].get("mlp_share_last_token"),
                    "at the last token",
                    entity.get("mlp_share_last_token"),
                )
            )
    verdicts = [_compare(r, e) for _, r, _, e in comparisons]
    said = [
        f"{reading} {_est(r, 'number')} against the entity side's {_est(e, 'number')} {where} "
        f"({_SAID[verdict]})"
        for (reading, r, where, e), verdict in zip(comparisons, verdicts, strict=True)
    ]
    lines = [
        "The seed study's second claim, that relational knowledge runs substantially through "
        "attention, as MLP shares (the MLP-window peak over the MLP plus the attention-window "
        "peak; lower means more attention): " + "; ".join(said) + ".",
        f"Severed traces: severing attention removes {_est(relation['severed_attn_drop'])} of "
        "the relation side's early residual effect at the last relation token and severing the "
        f"MLPs {_est(relation['severed_mlp_drop'])}; on the entity side, at the last subject "
        f"token, {_est(entity['severed_attn_drop'])} and {_est(entity['severed_mlp_drop'])}.",
    ]
    lower = [c[0] for c, v in zip(comparisons, verdicts, strict=True) if v == "lower"]
    higher = [c[0] for c, v in zip(comparisons, verdicts, strict=True) if v == "higher"]
    if all(v is None for v in verdicts):
        lines.append("The intervals are undefined: this model cannot test the claim.")
    elif lower and not higher:
        lines.append(
            "The claim holds on this model where the relation reading's MLP share is lower "
            f"with intervals apart ({'; '.join(lower)}), and no reading contradicts it."
        )
    elif lower:
        lines.append(
            "The evidence on this model is mixed: the relation reading's MLP share is lower "
            f"({'; '.join(lower)}) but higher elsewhere ({'; '.join(higher)}), intervals apart "
            "in both."
        )
    else:
        lines.append(
            "The claim does not hold on this model at this resolution: no relation reading has "
            "a lower MLP share than the entity side with intervals apart."
        )
    return lines


# --------------------------------------------------------------------------------------------
# Tables and the page.


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def _informs_table(informs: dict[str, Any]) -> str:
    """One row per (edited perspective, effect, metric) of the regressions."""
    from kloc_lens.edit.informs import NUMBERS

    head = "".join(f"<th>{name}</th>" for name in ("edited", "effect", "metric", *NUMBERS))
    rows = []
    for perspective, by_effect in informs["regressions"].items():
        for effect, by_metric in by_effect.items():
            for metric, fit in by_metric.items():
                cells = "".join(
                    f"<td>{html.escape(_est(fit[name], 'number', 3))}</td>" for name in NUMBERS
                )
                rows.append(
                    f"<tr><td>{perspective}</td><td>{effect}</td><td>{metric}</td>{cells}</tr>"
                )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _numbers_table(numbers: dict[str, Any], layers: dict[str, int] | None = None) -> str:
    """Named estimates, with the layer of each peak when ``layers`` is given."""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(_est(est, 'number', 3))}</td>"
        + ("" if layers is None else f"<td>{layers.get(name, '')}</td>")
        + "</tr>"
        for name, est in numbers.items()
    )
    layer = "" if layers is None else "<th>layer</th>"
    return f"<table><tr><th>number</th><th>value (95% CI, n)</th>{layer}</tr>{rows}</table>"


def _metrics_table(metrics: dict[str, Any]) -> str:
    """Generated scores first (what the edited model says), then teacher-forced ones."""
    fields = ("pre_generated", "post_generated", "pre", "post")
    rows = []
    for perspective, by_metric in metrics.items():
        for metric, cell in by_metric.items():
            if cell["post"]["n"] == 0:
                continue
            cells = "".join(
                f"<td>{html.escape(_est(cell[f]))}</td>" if f in cell else "<td></td>"
                for f in fields
            )
            rows.append(f"<tr><td>{perspective}</td><td>{metric}</td>{cells}</tr>")
    head = (
        "<tr><th>edited</th><th>metric</th><th>generated before</th><th>generated after</th>"
        "<th>teacher-forced before</th><th>teacher-forced after</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _controls_table(controls: dict[str, Any]) -> str:
    """The headline metric per edit location (the layer sweep's facts), generated first."""
    names = {
        "traced": "traced layer",
        "random_layer": "random layer (expected)",
        "best_layer": "best layer per fact",
        "random_position": "random non-subject key token",
    }
    rows = []
    for perspective, by_location in controls.items():
        for location, cell in by_location.items():
            rows.append(
                f"<tr><td>{perspective}</td><td>{names.get(location, location)}</td>"
                f"<td>{html.escape(_est(cell.get('post_generated')))}</td>"
                f"<td>{html.escape(_est(cell.get('post')))}</td></tr>"
            )
    head = "<tr><th>edited</th><th>edit location</th><th>generated</th><th>teacher-forced</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _sweep_table(sweep: dict[str, Any]) -> str:
    columns = [
        ("entity", "efficacy"),
        ("entity", "paraphrase"),
        ("entity", "neighborhood"),
        ("entity", "same_subject"),
        ("relation", "relation_add"),
        ("relation", "relation_remove"),
    ]
    head = "<tr><th>layer</th>" + "".join(f"<th>{p}: {m}</th>" for p, m in columns) + "</tr>"
    rows = []
    for layer, metrics in sweep["layers"].items():
        cells = "".join(
            f"<td>{html.escape(_est(metrics[p][m]['post']))}</td>"
            if p in metrics and m in metrics[p]
            else "<td></td>"
            for p, m in columns
        )
        rows.append(f"<tr><td>{layer}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; font-size: 0.9em; }
figure { margin: 2em 0; } figcaption { font-weight: 600; }
"""

_DRAW = """
document.querySelectorAll("script.kloc-figure").forEach(function (node) {
  var spec = JSON.parse(node.textContent);
  Plotly.newPlot(node.dataset.target, spec.data, spec.layout, {responsive: true});
});
"""


def _page(result: Any, summary: dict[str, Any]) -> str:
    body = [
        "<h1>kloc_lens study</h1>",
        f"<p>Model: <code>{html.escape(result.model)}</code></p>",
        "<h2>Summary</h2>",
    ]
    body += [f"<p>{html.escape(line)}</p>" for line in summary_text(summary)]
    body.append("<h2>Settings</h2>" + _table(summary["config"]))
    for key, side in summary["localization"].items():
        if side is not None:
            body.append(
                f"<h2>Localization, {key} side</h2>"
                + _numbers_table(side["numbers"], side["layers"])
            )
    queries = summary.get("queries")
    if queries:
        body.append("<h2>Query localization</h2>" + _numbers_table(queries["numbers"]))
    editing = summary.get("editing")
    if editing:
        body.append("<h2>Editing at the chosen layer</h2>" + _metrics_table(editing["metrics"]))
        if editing["layer_sweep"]["layers"]:
            body.append("<h2>Edits per layer</h2>" + _sweep_table(editing["layer_sweep"]))
        controls = editing.get("controls", {}).get("locations")
        if controls:
            body.append(
                "<h2>Is the traced location better than an arbitrary one?</h2>"
                + _controls_table(controls)
            )
        if editing.get("informs"):
            body.append(
                "<h2>Does localization inform editing?</h2>"
                + "".join(f"<p>{html.escape(line)}</p>" for line in editing["informs"]["text"])
                + _informs_table(editing["informs"])
            )
    body.append("<h2>Figures</h2>")
    for fig_id, caption, fig in report_figures(result):
        spec = (fig.to_json() or "{}").replace("</", "<\\/")
        body.append(
            f'<figure><figcaption>{html.escape(caption)}</figcaption><div id="fig-{fig_id}" '
            f'class="kloc-plot"></div><script type="application/json" class="kloc-figure" '
            f'data-target="fig-{fig_id}">{spec}</script></figure>'
        )
    body.append("<h2>Run</h2>" + _table({**summary["run"].get("timings_s", {}), **{
        k: v for k, v in summary["run"].items() if k != "timings_s"}}))  # fmt: skip
    data = json.dumps(summary, allow_nan=False).replace("</", "<\\/")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>kloc_lens study</title>"
        f"<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        + "\n".join(body)
        + f'<script type="application/json" id="kloc-results">{data}</script>'
        + f"<script>{_DRAW}</script></body></html>"
    )


def write_report(result: Any, out: str | Path) -> Path:
    """Write ``results.json``, ``report.html`` and ``tensors/`` for a study result.

    Everything is written under temporary names and renamed into place at the end.

    Returns:
        The path of ``report.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".report-"))
    try:
        tensors = staging / "tensors"
        tensors.mkdir()
        for key, side in result.sides().items():
            side.aggregate.save(tensors / f"{key}_aggregate.safetensors")
            side.example.save(tensors / f"{key}_example_trace.safetensors")
        if result.editing is not None:
            scores = [f.as_dict() for f in result.editing.evaluation.facts]
            for item, check in zip(scores, result.editing.collapse, strict=False):
                item["collapse"] = check.as_dict()
            (tensors / "edit_scores.json").write_text(json.dumps(scores, allow_nan=False))
        (staging / "results.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        (staging / "report.html").write_text(_page(result, summary), encoding="utf-8")
        old = out / "tensors"
        if old.exists():
            shutil.rmtree(old)
        for name in ("tensors", "results.json", "report.html"):
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "report.html"


# --------------------------------------------------------------------------------------------
# Reading a study back.


def load_study(directory: str | Path) -> Any:
    """Read a study directory (``results.json`` and ``tensors/``) into a ``StudyResult``.

    Raises:
        StudyError: The directory holds no study, a study of another format, or a damaged one.
    """
    from kloc_lens.edit.evaluate import EditEvaluation, FactEvaluation
    from kloc_lens.edit.guard import CollapseCheck, CollapseThresholds
    from kloc_lens.intervals import Estimate
    from kloc_lens.results import AggregateSet, TraceSet, load_result
    from kloc_lens.study.config import StudyConfig
    from kloc_lens.study.editing import Editing, LayerChoice
    from kloc_lens.study.informs import Informs
    from kloc_lens.study.knowledge import Knowledge
    from kloc_lens.study.localization import Localization
    from kloc_lens.study.queries import QueryLocalization
    from kloc_lens.study.run import STUDY_FORMAT, StudyResult

    root = Path(directory)
    path = root / "results.json"
    if not path.is_file():
        raise StudyError(f"{str(root)!r} holds no study (no results.json)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StudyError(f"{str(path)!r} is not JSON: {err}") from None
    if not isinstance(summary, dict) or summary.get("format") != STUDY_FORMAT:
        found = summary.get("format") if isinstance(summary, dict) else None
        raise StudyError(
            f"{str(path)!r} is format {found!r}; this kloc_lens reads {STUDY_FORMAT!r}"
        )

    def estimates(data: dict[str, Any]) -> dict[str, Estimate]:
        return {k: Estimate.from_dict(v) for k, v in data.items()}

    def side(key: str) -> Localization | None:
        data = summary["localization"].get(key)
        if data is None:
            return None
        aggregate = load_result(root / "tensors" / f"{key}_aggregate.safetensors")
        example = load_result(root / "tensors" / f"{key}_example_trace.safetensors")
        if not isinstance(aggregate, AggregateSet) or not isinstance(example, TraceSet):
            raise StudyError(f"the {key} tensors of {str(root)!r} are of the wrong kind")
        return Localization(
            perspective=data["perspective"],
            span=data["span"],
            n_facts=int(data["n_facts"]),
            corruption=data["corruption"],
            window=int(data["window"]),
            numbers=estimates(data["numbers"]),
            layers={k: int(v) for k, v in data["layers"].items()},
            aggregate=aggregate,
            example=example,
        )

    def nested(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Estimate]]]:
        return {p: {m: estimates(cell) for m, cell in by.items()} for p, by in data.items()}

    try:
        entity = side("entity")
        if entity is None:
            raise StudyError(f"{str(path)!r} has no entity-side localization")
        editing = None
        data = summary.get("editing")
        if data:
            scores = json.loads((root / "tensors" / "edit_scores.json").read_text())
            facts = tuple(FactEvaluation.from_dict(item) for item in scores)
            collapse = tuple(
                CollapseCheck.from_dict(item["collapse"]) for item in scores if "collapse" in item
            )
            limits = data["collapse"]["thresholds"]
            editing = Editing(
                choice=LayerChoice(**data["layer_choice"]),
                editor=data["editor"],
                statistics=data["statistics"],
                evaluation=EditEvaluation(facts, data["editor"], summary["model"]),
                metrics=nested(data["metrics"]),
                layer_sweep={
                    int(layer): nested(m) for layer, m in data["layer_sweep"]["layers"].items()
                },
                sweep_facts=int(data["layer_sweep"]["n_facts_per_perspective"]),
                collapse=collapse,
                thresholds=CollapseThresholds(**limits),
                sweep_disabling={
                    int(layer): int(n) for layer, n in data["layer_sweep"]["n_disabling"].items()
                },
                informs=Informs.from_dict(data["informs"]) if data.get("informs") else None,
                controls=nested(data.get("controls", {}).get("locations", {})),
                retrace=dict(data.get("retrace") or {}),
                control_keys={
                    str(k): int(n)
                    for k, n in data.get("controls", {}).get("key_tokens", {}).items()
                },
            )
        return StudyResult(
            model=summary["model"],
            config=StudyConfig.from_dict(summary["config"]),
            knowledge=Knowledge.from_dict(summary["knowledge"]),
            entity=entity,
            relation=side("relation"),
            relation_prompts={
                span: loaded
                for span in ("subject", "object")
                if (loaded := side(f"relation_prompt_{span}")) is not None
            },
            editing=editing,
            queries=(
                QueryLocalization.from_dict(summary["queries"]) if summary["queries"] else None
            ),
            about=summary.get("about"),
            run=summary.get("run", {}),
        )
    except (KeyError, TypeError, ValueError, FileNotFoundError) as err:
        raise StudyError(f"study {str(root)!r} is damaged or incomplete: {err!r}") from None
