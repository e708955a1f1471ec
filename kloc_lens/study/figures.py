"""The study report's figures: plotly figures built from a :class:`~kloc_lens.study.StudyResult`.

:func:`report_figures` lists them in report order as ``(id, caption, figure)``; the page embeds
each as plotly JSON. Every figure is built from the typed result, so a study read back with
:func:`~kloc_lens.study.load_study` draws the same figures.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

from kloc_lens import plot

__all__ = [
    "headline_figure",
    "informs_figure",
    "layer_sweep_figure",
    "report_figures",
    "retrace_figure",
    "signature_figure",
]


def headline_figure(result: Any) -> go.Figure:
    """Peak MLP- and attention-window effects at the last corrupted token, per side, as shares
    of the total effect with their 95% intervals."""
    sides = list(result.sides().values())
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
    for key, side in result.sides().items():
        figures.append(
            (
                f"{key}-grid",
                f"{key.replace('_', ' ')} side: average indirect effect by bin and layer",
                plot.aggregate_grid(side.aggregate),
            )
        )
        figures.append(
            (
                f"{key}-curves",
                f"{key.replace('_', ' ')} side: at the last {side.span} token",
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
        if not evaluation.summary().empty:  # (every edit disabling: the text says so)
            figures.append(
                (
                    "transfer",
                    "Transfer matrix: edited perspective x evaluated perspective",
                    transfer_heatmap(evaluation.transfer()),
                )
            )
            figures.append(
                (
                    "edit-metrics",
                    "Every metric before and after the edits",
                    metric_bars(evaluation),
                )
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
