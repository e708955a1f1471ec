"""Plotly figures of edit evaluations: the transfer matrix, metric bars, loss curves.

Every function takes a result and returns a ``plotly.graph_objects.Figure``; nothing is computed
beyond picking what to show, nothing is shown, no global plotly setting is touched.

- :func:`transfer_heatmap`: the 2 x 2 matrix of the study, edited perspective (rows) x evaluated
  perspective (columns), coloured by the mean headline score after the edits, each cell labelled
  with its score, the change from the unedited model and the number of facts.
- :func:`metric_bars`: every metric before and after, one panel per edited perspective.
- :func:`loss_curves`: the value optimisation's loss per step, one line per fitted value.

Example:
    >>> import torch
    >>> from kloc_lens.edit.evaluate import EditMetric, TransferMatrix
    >>> from kloc_lens.facts import Perspective
    >>> matrix = TransferMatrix(pre=torch.tensor([[0.25, 0.5], [0.25, 0.5]]),
    ...     post=torch.tensor([[1.0, 0.5], [0.25, 0.75]]), counts=torch.tensor([4, 4]),
    ...     perspectives=(Perspective.ENTITY, Perspective.RELATION),
    ...     metrics=(EditMetric.EFFICACY, EditMetric.RELATION_ADD))
    >>> fig = transfer_heatmap(matrix)
    >>> [list(row) for row in fig.data[0].z]
    [[1.0, 0.5], [0.25, 0.75]]
    >>> list(fig.data[0].y), list(fig.data[0].x)
    (['entity edit', 'relation edit'], ['entity: efficacy', 'relation: relation_add'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kloc_lens.edit._errors import EditError
from kloc_lens.edit.evaluate import EditEvaluation, TransferMatrix
from kloc_lens.edit.value import ValueFit

__all__ = ["loss_curves", "metric_bars", "transfer_heatmap"]

TransferValue = Literal["post", "pre", "change"]
"""What the transfer heatmap colours by: the score after the edits, before, or the change."""


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def transfer_heatmap(
    matrix: TransferMatrix, *, value: TransferValue = "post", title: str | None = None
) -> go.Figure:
    """The 2 x 2 transfer matrix: edited perspective (rows) x evaluated perspective (columns).

    Args:
        matrix: From :meth:`EditEvaluation.transfer`.
        value: Colour by the score with the edits (``"post"``), before (``"pre"``) or the change.
        title: Figure title; default says what the cells are.

    Returns:
        A figure with one heatmap; ``z`` is the chosen quantity (rows: edited perspective),
        each cell's text the score with the edits, the change and the number of facts.

    Raises:
        EditError: ``value`` is none of the three.
    """
    if value not in ("post", "pre", "change"):
        raise EditError(f"value must be 'post', 'pre' or 'change', got {value!r}")
    z = {"post": matrix.post, "pre": matrix.pre, "change": matrix.change}[value]
    text = []
    for i in range(len(matrix.perspectives)):
        row = []
        for j in range(len(matrix.perspectives)):
            change = float(matrix.change[i, j])
            sign = "" if math.isnan(change) else ("+" if change >= 0 else "")
            row.append(
                f"{_fmt(float(matrix.post[i, j]))} ({sign}{_fmt(change)})<br>"
                f"n={int(matrix.counts[i])}"
            )
        text.append(row)
    diverging = value == "change"
    fig = go.Figure(
        go.Heatmap(
            z=z.detach().cpu().tolist(),
            x=[
                f"{p.value}: {m.value}"
                for p, m in zip(matrix.perspectives, matrix.metrics, strict=True)
            ],
            y=[f"{p.value} edit" for p in matrix.perspectives],
            text=text,
            texttemplate="%{text}",
            colorscale="RdBu" if diverging else "Blues",
            zmid=0.0 if diverging else None,
            zmin=None if diverging else 0.0,
            zmax=None if diverging else 1.0,
            colorbar={"title": {"text": value}},
            hovertemplate="%{y} evaluated on %{x}<br>%{text}<extra></extra>",
        )
    )
    default = (
        "Cross-perspective transfer<br><sup>mean score with the edits (change from the "
        "unedited model), n = facts edited</sup>"
    )
    fig.update_layout(
        title={"text": title if title is not None else default},
        xaxis={"title": {"text": "evaluated perspective"}, "side": "top"},
        yaxis={"title": {"text": "edited perspective"}, "autorange": "reversed"},
    )
    return fig


def metric_bars(evaluation: EditEvaluation, *, title: str | None = None) -> go.Figure:
    """Every metric before and after the edits, one panel per edited perspective.

    Args:
        evaluation: From :func:`evaluate_editor` or :func:`evaluate_edit`.
        title: Figure title; default names the editor.

    Returns:
        A figure with two bar traces (``before``, ``after``) per panel; ``x`` are the metrics,
        ``y`` the mean scores over the facts (:meth:`EditEvaluation.summary`).

    Raises:
        EditError: The evaluation holds no facts.
    """
    summary = evaluation.summary()
    if summary.empty:
        raise EditError("the evaluation holds no scored facts to plot")
    edited = list(dict.fromkeys(summary["edited"]))
    fig = make_subplots(rows=1, cols=len(edited), subplot_titles=[f"{e} edits" for e in edited])
    for col, name in enumerate(edited, start=1):
        part = summary[summary["edited"] == name]
        counts = [f"n={n}" for n in part["n_facts"]]
        for label, column, color in (("before", "pre", "#9ecae1"), ("after", "post", "#08519c")):
            fig.add_trace(
                go.Bar(
                    x=list(part["metric"]),
                    y=list(part[column]),
                    name=label,
                    marker={"color": color},
                    text=counts,
                    showlegend=col == 1,
                    hovertemplate="%{x}<br>" + label + " %{y:.3f}<br>%{text}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(range=[0, 1], title_text="score", row=1, col=1)
    fig.update_layout(
        barmode="group",
        title={"text": title if title is not None else f"Edit evaluation: {evaluation.editor}"},
    )
    return fig


def loss_curves(
    fits: ValueFit | Sequence[ValueFit],
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """The value optimisation's loss per step, one line per fit.

    Args:
        fits: One fit (``edit.fit``) or several (``edit.fits``).
        labels: A name per fit; default ``"fit 0"``, ``"fit 1"``, ...
        title: Figure title.

    Returns:
        A figure with one scatter trace per fit: ``x`` the step, ``y`` the total loss.

    Raises:
        EditError: ``labels`` does not match the fits.
    """
    items = [fits] if isinstance(fits, ValueFit) else list(fits)
    names = list(labels) if labels is not None else [f"fit {i}" for i in range(len(items))]
    if len(names) != len(items):
        raise EditError(f"{len(names)} labels for {len(items)} fits")
    fig = go.Figure()
    for fit, name in zip(items, names, strict=True):
        fig.add_trace(
            go.Scatter(
                x=list(range(len(fit.losses))),
                y=list(fit.losses),
                mode="lines+markers",
                name=name,
                hovertemplate="step %{x}<br>loss %{y:.4g}<extra></extra>",
            )
        )
    layout: dict[str, Any] = {
        "title": {"text": title if title is not None else "Value optimisation"},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": "loss"}, "type": "log"},
    }
    fig.update_layout(**layout)
    return fig
