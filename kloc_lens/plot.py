"""Plotly figures of sweep results: causal-tracing heatmaps, effect curves, head maps.

Every function here takes a result from :mod:`kloc_lens.results` and returns a
``plotly.graph_objects.Figure``; nothing is computed beyond picking the quantity to show, nothing
is shown, and no global plotly setting is touched. Call ``fig.show()``, ``fig.write_html(...)`` or
``fig.write_image(...)`` yourself.

The figures:

- :func:`trace_heatmap`: the familiar causal-tracing picture of Meng et al. (2022). Tokens run
  down the y axis in prompt order (``"5: Danielle*"``, span tokens starred and the span outlined),
  layers run along the x axis, and the colour is the chosen quantity: purple for residual states,
  green for MLP windows, red for attention windows (as in ROME), blue for plain activation
  patching. The heatmap's ``z`` is ``quantity(result, value).T`` (positions x layers).
- :func:`trace_grid`: every trace of a :class:`~kloc_lens.results.TraceSet` side by side.
- :func:`effect_curves`: the traces of a set as per-layer curves at one token (severed traces
  dashed), e.g. at the last subject token.
- :func:`head_heatmap`: a layer x head sweep; :func:`pos_head_heatmap`: positions x heads of a
  layer x position x head sweep at one layer.

The quantity (``value=``) is one of ``"effect"`` (the result's
:attr:`~kloc_lens.results.PatchResult.effect`: restored minus corrupted score, ROME's indirect
effect), ``"value"`` (the raw metric) or ``"normalized"`` (effect over the total effect).

Example:
    >>> import torch
    >>> from kloc_lens.results import LayerPosResult
    >>> from kloc_lens.types import Direction
    >>> r = LayerPosResult(values=torch.tensor([[0.5, 1.0, 0.75], [0.5, 0.75, 1.0]]),
    ...     layers=(0, 1), positions=(0, 1, 2), heads=(), str_tokens=("The", " cat", " sat"),
    ...     spans={"subject": (1, 2)}, site="resid_pre", direction=Direction.RESTORE,
    ...     metric="p(target)", corruption="noise", clean_score=1.0, corrupted_score=0.5)
    >>> fig = trace_heatmap(r)
    >>> list(fig.data[0].y)
    ['0: The', '1: cat*', '2: sat']
    >>> list(fig.data[0].x)
    [0, 1]
    >>> fig.data[0].z.tolist()  # quantity(r, "effect").T: positions x layers
    [[0.0, 0.0], [0.5, 0.25], [0.25, 0.5]]
    >>> page = fig.to_html(include_plotlyjs=False)
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Literal

import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from kloc_lens.errors import ResultError
from kloc_lens.results import (
    AggregateSet,
    AggregateTrace,
    LayerHeadResult,
    LayerPosHeadResult,
    LayerPosResult,
    PatchResult,
    TraceResult,
    TraceSet,
)
from kloc_lens.types import TraceKind

__all__ = [
    "Value",
    "aggregate_curves",
    "aggregate_grid",
    "effect_curves",
    "head_heatmap",
    "pos_head_heatmap",
    "quantity",
    "token_labels",
    "trace_grid",
    "trace_heatmap",
]

Value = Literal["effect", "value", "normalized"]
"""Which quantity a figure shows: ``effect`` (the result's effect: restored minus corrupted
score for restore sweeps, clean score minus patched score for inject sweeps), ``value`` (the raw
metric after each patch) or ``normalized`` (effect divided by clean minus corrupted score)."""

_VALUES: tuple[str, ...] = ("effect", "value", "normalized")

_KIND_SCALE = {TraceKind.RESID: "Purples", TraceKind.MLP: "Greens", TraceKind.ATTN: "Reds"}
"""Heatmap colour scales per trace kind (ROME's colours); plain patching results get Blues."""
_PLAIN_SCALE = "Blues"
_KIND_COLOR = {TraceKind.RESID: "#6a3d9a", TraceKind.MLP: "#238b45", TraceKind.ATTN: "#cb181d"}
"""Line colours per trace kind in :func:`effect_curves` (a severed trace takes the colour of
the component it severs)."""
_KIND_TEXT = {
    TraceKind.RESID: "residual state",
    TraceKind.MLP: "MLP outputs",
    TraceKind.ATTN: "attention outputs",
}


def quantity(result: PatchResult, value: Value = "effect") -> Float[Tensor, "..."]:
    """The numbers a figure of ``result`` shows, detached, as float32 on the CPU.

    Args:
        result: Any sweep result.
        value: ``"effect"`` (:attr:`PatchResult.effect`), ``"value"`` (the raw metric) or
            ``"normalized"`` (:attr:`PatchResult.normalized`).

    Returns:
        A tensor of the shape of ``result.values``.

    Raises:
        ResultError: ``value`` is none of the three, or ``"normalized"`` is asked of a result
            whose clean and corrupted scores are equal.

    Example:
        >>> import torch
        >>> from kloc_lens.results import LayerPosResult
        >>> from kloc_lens.types import Direction
        >>> r = LayerPosResult(values=torch.tensor([[0.5, 0.9]]), layers=(0,), positions=(0, 1),
        ...     heads=(), str_tokens=("The", " cat"), spans={}, site="resid_pre",
        ...     direction=Direction.RESTORE, metric="p(target)", corruption="noise",
        ...     clean_score=1.0, corrupted_score=0.5)
        >>> quantity(r, "normalized")
        tensor([[0.0000, 0.8000]])
    """
    if value == "effect":
        out = result.effect
    elif value == "value":
        out = result.values
    elif value == "normalized":
        out = result.normalized
    else:
        raise ResultError(f"value must be one of {list(_VALUES)}, got {value!r}")
    return out.detach().cpu().float()


def token_labels(result: PatchResult, spans: Sequence[str] | None = None) -> list[str]:
    """The y-axis labels of ``result``'s positions: ``"<pos>: <token>"``, marked tokens starred.

    The token is shown stripped of surrounding whitespace (``repr`` if nothing is left) and
    HTML-escaped, because plotly reads ``<...>`` in labels as markup (``<bos>`` would vanish).
    Without token strings the label is the position alone.

    Args:
        result: A result with a ``pos`` axis.
        spans: Names of the spans whose tokens get a ``*``; default: ``"subject"`` if the result
            has such a span, else none.

    Returns:
        One label per entry of ``result.positions``.

    Raises:
        ResultError: A span named in ``spans`` is not in ``result.spans``.

    Example:
        >>> import torch
        >>> from kloc_lens.results import LayerPosResult
        >>> from kloc_lens.types import Direction
        >>> r = LayerPosResult(values=torch.zeros(1, 3), layers=(0,), positions=(0, 1, 2),
        ...     heads=(), str_tokens=("<bos>", " Danielle", " is"), spans={"subject": (1, 2)},
        ...     site="resid_pre", direction=Direction.RESTORE, metric="p(target)",
        ...     corruption="noise", clean_score=1.0, corrupted_score=0.5)
        >>> token_labels(r)
        ['0: &lt;bos&gt;', '1: Danielle*', '2: is']
    """
    marked = _marked_positions(result, spans)
    labels = []
    for pos in result.positions:
        if result.str_tokens:
            token = result.str_tokens[pos]
            label = f"{pos}: {html.escape(token.strip() or repr(token), quote=False)}"
        else:
            label = str(pos)
        labels.append(label + ("*" if pos in marked else ""))
    return labels


def trace_heatmap(
    result: LayerPosResult | TraceResult,
    *,
    value: Value = "effect",
    title: str | None = None,
    spans: Sequence[str] | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """The causal-tracing heatmap: tokens (rows, prompt order) by layers (columns).

    Args:
        result: A layer x position sweep or causal trace.
        value: The quantity to colour by (see :data:`Value`).
        title: Figure title; default: what was restored, the corruption, the target and the clean
            and corrupted scores.
        spans: Spans whose tokens are starred and outlined; default ``"subject"`` if present.
        colorscale: Any plotly colour scale; default per trace kind (purple resid, green MLP,
            red attention, blue for plain patching results).

    Returns:
        A figure with one heatmap whose ``z`` is ``quantity(result, value).T`` (positions x
        layers), ``x`` the layers and ``y`` the :func:`token_labels`.

    Raises:
        ResultError: The result has no ``pos`` axis, or a span in ``spans`` is missing.

    Example:
        >>> import torch
        >>> from kloc_lens.results import LayerPosResult
        >>> from kloc_lens.types import Direction
        >>> r = LayerPosResult(values=torch.tensor([[0.5, 0.75]]), layers=(0,), positions=(0, 1),
        ...     heads=(), str_tokens=("The", " cat"), spans={}, site="resid_pre",
        ...     direction=Direction.RESTORE, metric="p(target)", corruption="noise",
        ...     clean_score=1.0, corrupted_score=0.5)
        >>> trace_heatmap(r, value="value").data[0].z.tolist()
        [[0.5], [0.75]]
    """
    _need_positions(result)
    fig = go.Figure()
    fig.add_trace(_heatmap(result, value, spans, colorscale, showscale=True))
    _mark_spans(fig, result, spans, axis="")
    fig.update_layout(
        title={"text": title if title is not None else _title(result)},
        xaxis={"title": {"text": _layer_axis_title(result)}},
        yaxis={"title": {"text": "token"}, "type": "category", "autorange": "reversed"},
    )
    return fig


def trace_grid(
    traces: TraceSet,
    *,
    value: Value = "effect",
    title: str | None = None,
    spans: Sequence[str] | None = None,
) -> go.Figure:
    """Every trace of a set as a heatmap, side by side, sharing the token axis.

    Args:
        traces: Causal traces of one prompt (as :func:`kloc_lens.causal_trace` returns).
        value: The quantity to colour by (see :data:`Value`).
        title: Figure title; default: the corruption, the target and the scores.
        spans: Spans whose tokens are starred and outlined; default ``"subject"`` if present.

    Returns:
        A figure with one heatmap (and colour bar) per trace, in the set's order; subplot ``i``
        uses axes ``x{i}``/``y{i}`` and is titled by the trace's label.

    Raises:
        ResultError: The set is empty, or its traces differ in positions or tokens.
    """
    items = _check_set(traces)
    first = items[0]
    fig = make_subplots(
        rows=1,
        cols=len(items),
        shared_yaxes=True,
        horizontal_spacing=min(0.1, 0.4 / len(items)),
        subplot_titles=[_short_label(t) for t in items],
    )
    for col, trace in enumerate(items, start=1):
        axis = "" if col == 1 else str(col)
        heat = _heatmap(trace, value, spans, None, showscale=True)
        domain = fig.layout[f"xaxis{axis}"].domain  # type: ignore[index]
        heat.colorbar = {"x": float(domain[1]) + 0.005, "thickness": 10, "xpad": 0}
        fig.add_trace(heat, row=1, col=col)
        _mark_spans(fig, trace, spans, axis=axis)
        fig.update_xaxes(title_text=_layer_axis_title(trace), row=1, col=col)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title_text="token", row=1, col=1)
    fig.update_layout(
        title={"text": title if title is not None else _set_title(first)},
        width=max(500, 320 * len(items)),
    )
    return fig


def effect_curves(
    traces: TraceSet,
    *,
    position: int | str = "subject_last",
    value: Value = "effect",
    title: str | None = None,
) -> go.Figure:
    """The traces of a set as per-layer curves at one token.

    One line per trace (resid purple, MLP green, attention red; a severed trace dashed, in the
    colour of the component it severs), plus dotted reference lines at the corrupted baseline and
    at full recovery of the clean score.

    Args:
        traces: Causal traces of one prompt.
        position: A traced token position, or a name: ``"last"`` (the prompt's last token),
            ``"<span>_first"`` / ``"<span>_last"`` (first / last token of any span of the prompt,
            e.g. ``"subject_last"``).
        value: The quantity on the y axis (see :data:`Value`).
        title: Figure title; default: the token, the corruption, the target and the scores.

    Returns:
        A figure with one scatter trace per trace of the set, named by its label; ``x`` are the
        layers and ``y`` the column of ``quantity(trace, value)`` at the position.

    Raises:
        ResultError: The set is empty or inconsistent, ``position`` names a span the prompt
            lacks or is malformed, or the position was not traced.
    """
    items = _check_set(traces)
    first = items[0]
    pos = _resolve_position(first, position)
    column = first.positions.index(pos)
    fig = go.Figure()
    for trace in items:
        component = trace.severed if trace.severed is not None else trace.kind
        fig.add_trace(
            go.Scatter(
                x=list(trace.layers),
                y=quantity(trace, value)[:, column].numpy(),
                mode="lines+markers",
                name=_short_label(trace),
                line={
                    "color": _KIND_COLOR[component],
                    "dash": "dash" if trace.severed is not None else "solid",
                },
                hovertemplate=f"layer %{{x}}<br>{value} %{{y:.4g}}",
            )
        )
    low, high = _reference_levels(first, value)
    fig.add_hline(y=low, line={"dash": "dot", "color": "gray"}, annotation_text="corrupted")
    fig.add_hline(y=high, line={"dash": "dot", "color": "gray"}, annotation_text="clean")
    token = token_labels(first, spans=())[column]
    fig.update_layout(
        title={"text": title if title is not None else f"At token {token}<br>" + _set_title(first)},
        xaxis={"title": {"text": "layer (window centre for mlp / attn)"}},
        yaxis={"title": {"text": _value_title(first, value)}},
        legend={"title": {"text": "restored"}},
    )
    return fig


def head_heatmap(
    result: LayerHeadResult,
    *,
    value: Value = "effect",
    title: str | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """A layer x head sweep: layers down the y axis (layer 0 on top), heads along the x axis.

    Args:
        result: A layer x head sweep.
        value: The quantity to colour by (see :data:`Value`).
        title: Figure title; default: the site, the corruption and the scores.
        colorscale: Any plotly colour scale (default Blues).

    Returns:
        A figure with one heatmap whose ``z`` is ``quantity(result, value)`` (layers x heads),
        ``x`` the heads and ``y`` the layers.

    Raises:
        ResultError: The result has no head axis.
    """
    if not result.heads:
        raise ResultError(f"result on site {result.site!r} has no heads to plot")
    fig = go.Figure(
        go.Heatmap(
            z=quantity(result, value).numpy(),
            x=list(result.heads),
            y=list(result.layers),
            colorscale=colorscale or _PLAIN_SCALE,
            colorbar={"title": {"text": value}},
            hovertemplate=f"layer %{{y}}<br>head %{{x}}<br>{value} %{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title if title is not None else _title(result)},
        xaxis={"title": {"text": "head"}},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed"},
    )
    return fig


def pos_head_heatmap(
    result: LayerPosHeadResult,
    *,
    layer: int,
    value: Value = "effect",
    title: str | None = None,
    spans: Sequence[str] | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """One layer of a layer x position x head sweep: tokens down the y axis, heads along x.

    Args:
        result: A layer x position x head sweep.
        layer: The layer to show (one of ``result.layers``).
        value: The quantity to colour by (see :data:`Value`).
        title: Figure title; default: the layer, site, corruption and scores.
        spans: Spans whose tokens are starred and outlined; default ``"subject"`` if present.
        colorscale: Any plotly colour scale (default Blues).

    Returns:
        A figure with one heatmap whose ``z`` is ``quantity(result, value)[i]`` for
        ``i = result.layers.index(layer)`` (positions x heads).

    Raises:
        ResultError: ``layer`` was not swept, or a span in ``spans`` is missing.
    """
    if layer not in result.layers:
        raise ResultError(f"layer {layer} is not in the result; it holds layers {result.layers}")
    _need_positions(result)
    index = result.layers.index(layer)
    fig = go.Figure(
        go.Heatmap(
            z=quantity(result, value)[index].numpy(),
            x=list(result.heads),
            y=token_labels(result, spans),
            colorscale=colorscale or _PLAIN_SCALE,
            colorbar={"title": {"text": value}},
            hovertemplate=f"token %{{y}}<br>head %{{x}}<br>{value} %{{z:.4g}}<extra></extra>",
        )
    )
    _mark_spans(fig, result, spans, axis="")
    default = f"Layer {layer}: " + _title(result)
    fig.update_layout(
        title={"text": title if title is not None else default},
        xaxis={"title": {"text": "head"}},
        yaxis={"title": {"text": "token"}, "type": "category", "autorange": "reversed"},
    )
    return fig


# --- helpers -------------------------------------------------------------------------------------


def aggregate_grid(aggregates: AggregateSet, *, title: str | None = None) -> go.Figure:
    """Dataset-averaged indirect effects: one bins x layers heatmap per trace kind.

    Args:
        aggregates: What :func:`kloc_lens.aggregate.aggregate_traces` returns.
        title: Figure title; default: the span, the number of facts and the mean scores.

    Returns:
        A figure with one heatmap per aggregate whose ``z`` is its ``mean`` (bins x layers),
        ``x`` the layers and ``y`` the bin names with their fact counts.

    Raises:
        ResultError: The set is empty.
    """
    items = tuple(aggregates)
    if not items:
        raise ResultError("no aggregates to plot")
    first = items[0]
    fig = make_subplots(
        rows=1,
        cols=len(items),
        shared_yaxes=True,
        horizontal_spacing=min(0.1, 0.4 / len(items)),
        subplot_titles=[_aggregate_label(a) for a in items],
    )
    for col, agg in enumerate(items, start=1):
        axis = "" if col == 1 else str(col)
        domain = fig.layout[f"xaxis{axis}"].domain  # type: ignore[index]
        fig.add_trace(
            go.Heatmap(
                z=agg.mean.detach().cpu().float().numpy(),
                x=list(agg.layers),
                y=_bin_labels(agg),
                customdata=agg.stderr.detach().cpu().float().numpy(),
                colorscale=_KIND_SCALE[agg.kind],
                colorbar={"x": float(domain[1]) + 0.005, "thickness": 10, "xpad": 0},
                name=_aggregate_label(agg),
                hovertemplate="layer %{x}<br>%{y}<br>AIE %{z:.4g} ± %{customdata:.2g}"
                "<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(
        title={"text": title if title is not None else _aggregate_title(first)},
        width=max(500, 320 * len(items)),
    )
    return fig


def aggregate_curves(
    aggregates: AggregateSet, *, bin: str | None = None, title: str | None = None
) -> go.Figure:
    """Per-layer average indirect effect of every kind at one bin, with standard-error bars.

    Args:
        aggregates: What :func:`kloc_lens.aggregate.aggregate_traces` returns.
        bin: The bin (default: the last token of the corrupted span, e.g. "last subject token").
        title: Figure title.

    Returns:
        One scatter per aggregate (severed ones dashed) whose ``y`` is ``aggregate.bin(bin)`` and
        whose error bars are the matching ``stderr`` row.

    Raises:
        ResultError: The set is empty or has no such bin.
    """
    items = tuple(aggregates)
    if not items:
        raise ResultError("no aggregates to plot")
    first = items[0]
    name = bin if bin is not None else f"last {first.span} token"
    fig = go.Figure()
    for agg in items:
        row = agg.bins.index(name) if name in agg.bins else -1
        values = agg.bin(name)
        component = agg.severed if agg.severed is not None else agg.kind
        fig.add_trace(
            go.Scatter(
                x=list(agg.layers),
                y=values.detach().cpu().float().numpy(),
                error_y={"type": "data", "array": agg.stderr[row].detach().cpu().float().numpy()},
                mode="lines+markers",
                name=_aggregate_label(agg),
                line={
                    "color": _KIND_COLOR[component],
                    "dash": "dash" if agg.severed is not None else "solid",
                },
            )
        )
    fig.update_layout(
        title={
            "text": title if title is not None else f"At the {name}<br>" + _aggregate_title(first)
        },
        xaxis={"title": {"text": "layer (window centre for mlp / attn)"}},
        yaxis={"title": {"text": "average indirect effect"}},
        legend={"title": {"text": "restored"}},
    )
    return fig


def _aggregate_label(agg: AggregateTrace) -> str:
    window = f", window {agg.window}" if agg.kind is not TraceKind.RESID else ""
    return agg.label + window


def _bin_labels(agg: AggregateTrace) -> list[str]:
    return [f"{name} (n={count})" for name, count in zip(agg.bins, agg.counts, strict=True)]


def _aggregate_title(agg: AggregateTrace) -> str:
    return (
        f"Average indirect effect over {agg.n_facts} facts, {agg.span} corrupted<br><sup>"
        f"mean clean p {agg.clean_score:.3g}, mean corrupted p {agg.corrupted_score:.3g}</sup>"
    )


def _need_positions(result: PatchResult) -> None:
    if not result.positions:
        raise ResultError(f"result on site {result.site!r} has no positions to plot")


def _marked_positions(result: PatchResult, spans: Sequence[str] | None) -> set[int]:
    names = _span_names(result, spans)
    marked: set[int] = set()
    for name in names:
        start, end = result.spans[name]
        marked.update(range(start, end))
    return marked


def _span_names(result: PatchResult, spans: Sequence[str] | None) -> tuple[str, ...]:
    if spans is None:
        return ("subject",) if "subject" in result.spans else ()
    missing = [name for name in spans if name not in result.spans]
    if missing:
        raise ResultError(f"no span {missing[0]!r} in the result; it has {sorted(result.spans)}")
    return tuple(spans)


def _mark_spans(
    fig: go.Figure, result: PatchResult, spans: Sequence[str] | None, *, axis: str
) -> None:
    """Outline the rows of each marked span (contiguous runs of traced positions)."""
    for name in _span_names(result, spans):
        start, end = result.spans[name]
        rows = [i for i, pos in enumerate(result.positions) if start <= pos < end]
        runs: list[list[int]] = []
        for row in rows:
            if runs and runs[-1][-1] == row - 1:
                runs[-1].append(row)
            else:
                runs.append([row])
        for run in runs:
            fig.add_shape(
                type="rect",
                xref=f"x{axis} domain",
                yref=f"y{axis}",
                x0=0,
                x1=1,
                y0=run[0] - 0.5,
                y1=run[-1] + 0.5,
                line={"color": "black", "width": 2},
                fillcolor="rgba(0,0,0,0)",
                name=name,
            )


def _heatmap(
    result: PatchResult,
    value: Value,
    spans: Sequence[str] | None,
    colorscale: str | None,
    *,
    showscale: bool,
) -> go.Heatmap:
    return go.Heatmap(
        z=quantity(result, value).T.numpy(),
        x=list(result.layers),
        y=token_labels(result, spans),
        colorscale=colorscale or _colorscale(result),
        showscale=showscale,
        colorbar={"title": {"text": value}},
        name=_short_label(result),
        hovertemplate=f"layer %{{x}}<br>token %{{y}}<br>{value} %{{z:.4g}}<extra></extra>",
    )


def _colorscale(result: PatchResult) -> str:
    if isinstance(result, TraceResult):
        return _KIND_SCALE[result.kind]
    return _PLAIN_SCALE


def _short_label(result: PatchResult) -> str:
    if isinstance(result, TraceResult):
        window = f", window {result.window}" if result.kind is not TraceKind.RESID else ""
        return result.label + window
    return result.site


def _layer_axis_title(result: PatchResult) -> str:
    if isinstance(result, TraceResult) and result.kind is not TraceKind.RESID:
        return f"centre of {result.window} restored {result.kind.value} layers"
    return "layer"


def _scores(result: PatchResult) -> str:
    metric = result.metric
    if isinstance(result, TraceResult):
        metric = f"{metric} of {result.target!r}"
    return f"{metric}: clean {result.clean_score:.3g}, corrupted {result.corrupted_score:.3g}"


def _title(result: PatchResult) -> str:
    if isinstance(result, TraceResult):
        what = f"{_KIND_TEXT[result.kind]} ({result.site})"
        if result.kind is not TraceKind.RESID:
            what += f", window of {result.window} layers"
        if result.severed is not None:
            what += f", {_KIND_TEXT[result.severed]} severed"
        head = f"Restoring {what}"
    else:
        head = f"Patching {result.site} ({result.direction.value})"
    return f"{head}<br><sup>after {result.corruption}; {_scores(result)}</sup>"


def _set_title(result: TraceResult) -> str:
    return f"Causal trace<br><sup>after {result.corruption}; {_scores(result)}</sup>"


def _value_title(result: PatchResult, value: Value) -> str:
    if value == "value":
        return result.metric
    if value == "normalized":
        return "normalized effect"
    return f"effect on {result.metric}"


def _reference_levels(result: PatchResult, value: Value) -> tuple[float, float]:
    """Corrupted baseline and full recovery in the units of ``value``."""
    if value == "value":
        return result.corrupted_score, result.clean_score
    if value == "normalized":
        return 0.0, 1.0
    return 0.0, result.total_effect


def _check_set(traces: TraceSet) -> tuple[TraceResult, ...]:
    items = tuple(traces)
    if not items:
        raise ResultError("the trace set is empty; nothing to plot")
    first = items[0]
    for trace in items[1:]:
        if trace.positions != first.positions or trace.str_tokens != first.str_tokens:
            raise ResultError(
                f"traces {first.label!r} and {trace.label!r} differ in positions or tokens; "
                "plot them one by one with trace_heatmap"
            )
    return items


def _resolve_position(result: PatchResult, position: int | str) -> int:
    """A token position from an int or a name (``last``, ``<span>_first``, ``<span>_last``)."""
    if isinstance(position, str):
        if position == "last":
            pos = len(result.str_tokens) - 1 if result.str_tokens else max(result.positions)
        else:
            span, _, end = position.rpartition("_")
            if not span or end not in ("first", "last"):
                raise ResultError(
                    f"position {position!r} is neither 'last' nor '<span>_first' / '<span>_last'"
                )
            if span not in result.spans:
                raise ResultError(
                    f"position {position!r} names span {span!r}, which the prompt lacks; "
                    f"it has {sorted(result.spans)}"
                )
            start, stop = result.spans[span]
            pos = start if end == "first" else stop - 1
    else:
        pos = int(position)
    if pos not in result.positions:
        raise ResultError(
            f"position {position!r} (token {pos}) was not traced; traced positions: "
            f"{list(result.positions)}"
        )
    return pos
