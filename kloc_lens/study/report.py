"""The study's HTML report and machine-readable results.

:func:`write_report` turns a :class:`~kloc_lens.study.StudyResult` into

- ``report.html``: one self-contained page (plotly.js inlined, so it works offline) with a short
  summary of what was found, the settings, the figures and the timings. The numbers shown come
  from ``result.summary()``, which the page also carries as JSON (``<script id="kloc-results">``),
  and every figure is stored as plotly JSON (``<script class="kloc-figure">``) drawn on load;
- ``results.json``: ``result.summary()``;
- ``tensors/``: the aggregates (and the example trace) as safetensors, readable with
  :func:`kloc_lens.load_result`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from kloc_lens import plot

__all__ = ["headline_figure", "report_figures", "summary_text", "write_report"]


def headline_figure(result: Any) -> go.Figure:
    """Peak MLP and attention AIE at the last token of the corrupted span, per perspective."""
    sides = [s for s in (result.entity, result.relation) if s is not None]
    names = [f"{s.perspective} ({s.span} corrupted)" for s in sides]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(name="MLP window", x=names, y=[s.mlp_peak[0] for s in sides], marker_color="#238b45")
    )
    fig.add_trace(
        go.Bar(
            name="attention window",
            x=names,
            y=[s.attn_peak[0] for s in sides],
            marker_color="#cb181d",
        )
    )
    fig.update_layout(
        barmode="group",
        title={
            "text": "Where the effect runs: peak average indirect effect at the last "
            "corrupted token"
        },
        yaxis={"title": {"text": "peak AIE"}},
    )
    return fig


def report_figures(result: Any) -> list[tuple[str, str, go.Figure]]:
    """``(id, caption, figure)`` of every figure in the report, in order."""
    figures: list[tuple[str, str, go.Figure]] = [
        ("headline", "MLP versus attention, per perspective", headline_figure(result))
    ]
    for side in (result.entity, result.relation):
        if side is None:
            continue
        key = side.perspective
        figures.append(
            (
                f"{key}-grid",
                f"{key} perspective: average indirect effect by bin and layer",
                plot.aggregate_grid(side.aggregate),
            )
        )
        figures.append(
            (
                f"{key}-curves",
                f"{key} perspective: at the last {side.span} token",
                plot.aggregate_curves(side.aggregate),
            )
        )
    example = result.entity.trace.traces[0]
    figures.append(
        ("example-trace", "One fact, traced (entity perspective)", plot.trace_grid(example))
    )
    if result.editing is not None:
        figures.extend(result.editing.figures())
    return figures


def summary_text(summary: dict[str, Any]) -> list[str]:
    """The report's summary sentences, from ``StudyResult.summary()``."""
    known = summary["known_facts"]
    lines = [
        f"The model answers {known['kept']} of {known['checked']} facts from the entity "
        f"perspective ({100 * known['accuracy']:.1f}%); the study uses those."
    ]
    shares = {}
    for key, side in summary["localization"].items():
        if side is None:
            lines.append(f"No fact spells its relation out in the prompt: no {key}-side trace.")
            continue
        lines.append(
            f"With the {side['span']} corrupted ({side['n_facts']} facts; clean p "
            f"{side['clean_p']:.3f}, corrupted p {side['corrupted_p']:.3f}), restoring MLP outputs "
            f"peaks at layer {side['mlp_peak_layer']} (AIE {side['mlp_peak_aie']:.3f}) and "
            f"attention outputs at layer {side['attn_peak_layer']} (AIE "
            f"{side['attn_peak_aie']:.3f}) at the last {side['span']} token; at the last token "
            f"of the prompt, MLP at layer {side['mlp_peak_layer_last_token']} (AIE "
            f"{side['mlp_peak_aie_last_token']:.3f}) and attention at layer "
            f"{side['attn_peak_layer_last_token']} (AIE {side['attn_peak_aie_last_token']:.3f})."
        )
        if side["mlp_share"] is not None:
            shares[key] = side["mlp_share"]
            lines.append(
                f"At the last {side['span']} token the MLP share is {side['mlp_share']:.2f}; "
                f"severing MLP removes {_percent(side['severed_mlp_drop'])} of the residual effect "
                f"there, severing attention {_percent(side['severed_attn_drop'])}."
            )
        else:
            lines.append(
                f"Neither MLP nor attention restores at the last {side['span']} token carry a "
                "measurable effect (under 1% of the total effect): no MLP share there."
            )
    if len(shares) == 2:
        more = "more" if shares["relation"] < shares["entity"] else "less"
        lines.append(
            f"Relational information runs {more} through attention than entity information "
            f"(MLP share {shares['relation']:.2f} against {shares['entity']:.2f})."
        )
    editing = summary.get("editing")
    if editing and "text" in editing:
        lines.extend(editing["text"])
    return lines


def _percent(value: float | None) -> str:
    return "an undefined share" if value is None else f"{100 * value:.0f}%"


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


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


def write_report(result: Any, out: str | Path) -> Path:
    """Write ``report.html``, ``results.json`` and ``tensors/`` for a study result.

    Returns:
        The path of ``report.html``.
    """
    out = Path(out)
    tensors = out / "tensors"
    tensors.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (out / "results.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    result.entity.aggregate.save(tensors / "entity_aggregate.safetensors")
    result.entity.trace.traces[0].save(tensors / "entity_example_trace.safetensors")
    if result.relation is not None:
        result.relation.aggregate.save(tensors / "relation_aggregate.safetensors")
    if result.editing is not None:
        result.editing.save(tensors)

    body = ["<h1>kloc_lens study</h1>", f"<p>Model: <code>{html.escape(result.model)}</code></p>"]
    body.append("<h2>Summary</h2>")
    body += [f"<p>{html.escape(line)}</p>" for line in summary_text(summary)]
    body.append("<h2>Settings</h2>" + _table(summary["config"]))
    for key, side in summary["localization"].items():
        if side is not None:
            body.append(f"<h2>Localization, {key} perspective</h2>" + _table(side))
    if result.editing is not None:
        body.append("<h2>Editing</h2>" + result.editing.table_html())
    body.append("<h2>Figures</h2>")
    for fig_id, caption, fig in report_figures(result):
        spec = (fig.to_json() or "{}").replace("</", "<\\/")
        body.append(
            f'<figure><figcaption>{html.escape(caption)}</figcaption><div id="fig-{fig_id}" '
            f'class="kloc-plot"></div><script type="application/json" class="kloc-figure" '
            f'data-target="fig-{fig_id}">{spec}</script></figure>'
        )
    body.append("<h2>Timings (s)</h2>" + _table(summary["timings_s"]))
    data = json.dumps(summary, allow_nan=False).replace("</", "<\\/")
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>kloc_lens study</title>"
        f"<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        + "\n".join(body)
        + f'<script type="application/json" id="kloc-results">{data}</script>'
        + f"<script>{_DRAW}</script></body></html>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
