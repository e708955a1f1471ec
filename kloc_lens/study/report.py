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
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from kloc_lens import plot
from kloc_lens.study.config import StudyError

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


def _localization_lines(side: dict[str, Any]) -> list[str]:
    n = side["numbers"]
    layers = side["layers"]
    span = side["span"]
    early = side["early_layers"]
    lines = [
        f"{side['perspective'].capitalize()} side ({span} corrupted by {side['corruption']}; "
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
        f"{early} on (peak at layer {layers['attn_last_token_late']}).",
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
    entity, relation = sides.get("entity"), sides.get("relation")
    if entity is not None and relation is not None:
        lines.append(_second_claim(entity, relation))
    queries = summary.get("queries")
    if queries:
        from kloc_lens.study.queries import query_lines

        lines.extend(query_lines(queries))
    editing = summary.get("editing")
    if editing:
        lines.extend(editing["text"])
    return lines


def _second_claim(entity: dict[str, Any], relation: dict[str, Any]) -> str:
    """Whether relational knowledge runs more through attention than entity knowledge does."""
    e, r = entity["numbers"]["mlp_share"], relation["numbers"]["mlp_share"]
    text = (
        f"MLP share at the last corrupted token: relation side {_est(r, 'number')}, entity side "
        f"{_est(e, 'number')}. "
    )
    if None in (e["ci_low"], e["ci_high"], r["ci_low"], r["ci_high"]):
        return text + "The intervals are undefined: this model cannot test the claim."
    if r["ci_high"] < e["ci_low"]:
        return text + (
            "The seed study's claim that relational knowledge runs substantially through "
            "attention holds on this model: the relation side's MLP share is lower, and the "
            "intervals do not overlap."
        )
    return text + (
        "The seed study's claim that relational knowledge runs more through attention does not "
        "hold on this model at this resolution: the relation side's MLP share is not lower with "
        "non-overlapping intervals."
    )


# --------------------------------------------------------------------------------------------
# Figures.


def headline_figure(result: Any) -> go.Figure:
    """Peak MLP- and attention-window effects at the last corrupted token, per side, as shares
    of the total effect with their 95% intervals."""
    sides = [s for s in (result.entity, result.relation) if s is not None]
    names = [f"{s.perspective} ({s.span} corrupted)" for s in sides]
    fig = go.Figure()
    for label, key, color in (
        ("MLP window", "mlp_last_span", "#238b45"),
        ("attention window", "attn_last_span", "#cb181d"),
    ):
        values = [s.numbers[key] for s in sides]
        fig.add_trace(
            go.Bar(
                name=label,
                x=names,
                y=[v.value for v in values],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [_gap(v.high - v.value) for v in values],
                    "arrayminus": [_gap(v.value - v.low) for v in values],
                },
                marker_color=color,
            )
        )
    fig.update_layout(
        barmode="group",
        title={"text": "Where the effect runs: peak restore at the last corrupted token"},
        yaxis={"title": {"text": "share of the total effect (95% CI)"}},
    )
    return fig


def _gap(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def signature_figure(result: Any) -> go.Figure:
    """Residual restore per layer at the first and last subject token and the last token, and
    the MLP/attention windows at the last subject token: ROME's signature, as shares of TE."""
    agg = result.entity.aggregate
    te = agg.traces[0].total_effect or 1.0
    fig = go.Figure()
    rows = (
        ("resid", None, "last subject token", "#08519c", "solid"),
        ("resid", None, "first subject token", "#6baed6", "dot"),
        ("resid", None, "last token", "#525252", "dash"),
        ("mlp", None, "last subject token", "#238b45", "solid"),
        ("attn", None, "last subject token", "#cb181d", "solid"),
        ("attn", None, "last token", "#fb6a4a", "dash"),
    )
    for kind, severed, bin_name, color, dash in rows:
        trace = agg.get(kind, severed)
        fig.add_trace(
            go.Scatter(
                x=list(trace.layers),
                y=(trace.bin(bin_name) / te).tolist(),
                mode="lines+markers",
                name=f"{kind} @ {bin_name}",
                line={"color": color, "dash": dash},
            )
        )
    fig.update_layout(
        title={"text": "Entity side: restored share of the total effect per layer"},
        xaxis={"title": {"text": "layer"}},
        yaxis={"title": {"text": "AIE / TE"}},
    )
    return fig


def layer_sweep_figure(editing: Any) -> go.Figure:
    """Edit success per layer of the sweep, with 95% intervals: the layer trade-off."""
    fig = go.Figure()
    layers = sorted(editing.layer_sweep)
    series = (
        ("entity", "efficacy", "#08519c"),
        ("entity", "paraphrase", "#6baed6"),
        ("entity", "neighborhood", "#525252"),
        ("entity", "same_subject", "#ff7f00"),
        ("relation", "relation_add", "#238b45"),
        ("relation", "relation_remove", "#cb181d"),
    )
    for perspective, metric, color in series:
        points = [editing.layer_sweep[layer].get(perspective, {}).get(metric) for layer in layers]
        if any(p is None for p in points):
            continue
        post = [p["post"] for p in points]
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[e.value for e in post],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [_gap(e.high - e.value) for e in post],
                    "arrayminus": [_gap(e.value - e.low) for e in post],
                },
                mode="lines+markers",
                name=f"{perspective} edits: {metric}",
                line={"color": color},
            )
        )
    fig.add_vline(x=editing.layer, line={"dash": "dot", "color": "#999"})
    fig.update_layout(
        title={"text": f"Edits per layer ({editing.sweep_facts} facts per perspective)"},
        xaxis={"title": {"text": "edited layer"}},
        yaxis={"title": {"text": "success after the edit (95% CI)"}, "range": [0, 1.05]},
    )
    return fig


def informs_figure(informs: Any) -> go.Figure:
    """Edit success against the MLP-window trace effect at the edited layer, one panel per
    edited perspective, one colour per layer (Hase et al.'s scatter)."""
    from plotly.colors import sample_colorscale
    from plotly.subplots import make_subplots

    perspectives = list(informs.success)
    fig = make_subplots(rows=1, cols=len(perspectives), subplot_titles=perspectives)
    n = len(informs.layers)
    palette = sample_colorscale("Viridis", [j / max(1, n - 1) for j in range(n)])
    for col, perspective in enumerate(perspectives, start=1):
        success = informs.success[perspective]
        effect = informs.effects[perspective]["mlp"]
        for j, layer in enumerate(informs.layers):
            fig.add_trace(
                go.Scatter(
                    x=[_plain(x) for x in effect[:, j].tolist()],
                    y=[_plain(y) for y in success[:, j].tolist()],
                    mode="markers",
                    name=f"layer {layer}",
                    legendgroup=f"layer {layer}",
                    showlegend=col == 1,
                    marker={"color": palette[j], "size": 6},
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="MLP-window effect at the last subject token", row=1, col=col)
    fig.update_yaxes(title_text="headline margin after the edit", row=1, col=1)
    fig.update_layout(title={"text": "Does the trace effect at a layer predict edit success?"})
    return fig


def _plain(x: float) -> float | None:
    return None if math.isnan(x) else x


def report_figures(result: Any) -> list[tuple[str, str, go.Figure]]:
    """``(id, caption, figure)`` of every figure in the report, in order."""
    figures: list[tuple[str, str, go.Figure]] = [
        ("headline", "MLP versus attention, per side", headline_figure(result)),
        ("signature", "The entity side per layer (shares of the total effect)",
         signature_figure(result)),
    ]  # fmt: skip
    for side in (result.entity, result.relation):
        if side is None:
            continue
        key = side.perspective
        figures.append(
            (
                f"{key}-grid",
                f"{key} side: average indirect effect by bin and layer",
                plot.aggregate_grid(side.aggregate),
            )
        )
        figures.append(
            (
                f"{key}-curves",
                f"{key} side: at the last {side.span} token",
                plot.aggregate_curves(side.aggregate),
            )
        )
    figures.append(
        ("example-trace", "One fact, traced (entity side)", plot.trace_grid(result.entity.example))
    )
    if result.queries is not None:
        from kloc_lens.study.queries import query_figures

        figures.extend(query_figures(result.queries.as_dict()))
    if result.editing is not None:
        from kloc_lens.edit.plot import metric_bars, transfer_heatmap

        evaluation = result.editing.kept  # disabling edits are counted, not averaged in
        figures.append(
            (
                "transfer",
                "Transfer matrix: edited perspective x evaluated perspective",
                transfer_heatmap(evaluation.transfer()),
            )
        )
        figures.append(
            ("edit-metrics", "Every metric before and after the edits", metric_bars(evaluation))
        )
        if result.editing.layer_sweep:
            figures.append(
                (
                    "layer-sweep",
                    "Edit success per layer: efficacy against the subject's other relations",
                    layer_sweep_figure(result.editing),
                )
            )
        if result.editing.informs is not None:
            figures.append(
                (
                    "informs",
                    "Edit success against the trace effect, per layer (Hase et al.)",
                    informs_figure(result.editing.informs),
                )
            )
        if result.editing.retrace:
            figures.append(
                (
                    "retrace",
                    "Traced again after the edit: MLP-window effect at the subject's last token, "
                    "before (old answer, unedited model) and after (new answer, edited model)",
                    retrace_figure(result.editing.retrace),
                )
            )
    return figures


def retrace_figure(retrace: dict[str, Any]) -> go.Figure:
    """Per edited perspective, the mean MLP-window effect at the subject's last token per
    layer, before and after the edit, and each traced fact's curves faintly."""
    figure = go.Figure()
    colors = {"entity": "#08519c", "relation": "#a63603"}
    for perspective, side in retrace.items():
        layers = side["layers"]
        color = colors.get(perspective, "#444")
        for which, dash in (("before", "dot"), ("after", "solid")):
            for unit in side["facts"]:
                figure.add_trace(
                    go.Scatter(
                        x=layers,
                        y=unit["effects"][which]["mlp"],
                        mode="lines",
                        line={"color": color, "width": 0.5, "dash": dash},
                        opacity=0.25,
                        showlegend=False,
                        hovertext=f"{unit['subject']} / {unit['relation']} ({which})",
                    )
                )
            figure.add_trace(
                go.Scatter(
                    x=layers,
                    y=side["mean_effects"][which]["mlp"],
                    mode="lines+markers",
                    line={"color": color, "width": 3, "dash": dash},
                    name=f"{perspective} edits, {which} (mean of {side['n_facts']})",
                )
            )
    figure.update_layout(
        xaxis_title="layer (MLP window centre)",
        yaxis_title="indirect effect at the subject's last token",
        template="plotly_white",
    )
    return figure


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
        result.entity.aggregate.save(tensors / "entity_aggregate.safetensors")
        result.entity.example.save(tensors / "entity_example_trace.safetensors")
        if result.relation is not None:
            result.relation.aggregate.save(tensors / "relation_aggregate.safetensors")
            result.relation.example.save(tensors / "relation_example_trace.safetensors")
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
            editing=editing,
            queries=(
                QueryLocalization.from_dict(summary["queries"]) if summary["queries"] else None
            ),
            about=summary.get("about"),
            run=summary.get("run", {}),
        )
    except (KeyError, TypeError, ValueError, FileNotFoundError) as err:
        raise StudyError(f"study {str(root)!r} is damaged or incomplete: {err!r}") from None
