"""Figures show exactly the numbers and labels of the result they plot, and never show anything."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from numpy.testing import assert_allclose

import kloc_lens
from kloc_lens.errors import ResultError
from kloc_lens.plot import (
    effect_curves,
    head_heatmap,
    pos_head_heatmap,
    quantity,
    token_labels,
    trace_grid,
    trace_heatmap,
)
from kloc_lens.results import (
    LayerHeadResult,
    LayerPosHeadResult,
    LayerPosResult,
    TraceResult,
    TraceSet,
)
from kloc_lens.types import Direction, TraceKind

TOKENS = ("<bos>", " Danielle", " Darrieux", " is")
SPANS = {"subject": (1, 3), "last": (3, 4)}
LAYERS = (0, 1, 2)
POSITIONS = (0, 1, 2, 3)
LABELS = ["0: &lt;bos&gt;", "1: Danielle*", "2: Darrieux*", "3: is"]
CLEAN, CORRUPTED = 0.9, 0.1


def _trace(kind: TraceKind, severed: TraceKind | None = None, seed: int = 0) -> TraceResult:
    generator = torch.Generator().manual_seed(seed)
    return TraceResult(
        values=torch.rand(len(LAYERS), len(POSITIONS), generator=generator),
        layers=LAYERS,
        positions=POSITIONS,
        heads=(),
        str_tokens=TOKENS,
        spans=SPANS,
        site="resid_post" if kind is TraceKind.RESID else f"{kind.value}_out",
        direction=Direction.RESTORE,
        metric="p(target)",
        corruption="noise",
        clean_score=CLEAN,
        corrupted_score=CORRUPTED,
        kind=kind,
        window=1 if kind is TraceKind.RESID else 3,
        severed=severed,
        target="Paris",
    )


@pytest.fixture
def trace_set() -> TraceSet:
    return TraceSet(
        (
            _trace(TraceKind.RESID, seed=0),
            _trace(TraceKind.MLP, seed=1),
            _trace(TraceKind.ATTN, seed=2),
            _trace(TraceKind.RESID, TraceKind.MLP, seed=3),
            _trace(TraceKind.RESID, TraceKind.ATTN, seed=4),
        )
    )


def _common(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "layers": LAYERS,
        "positions": POSITIONS,
        "heads": (),
        "str_tokens": TOKENS,
        "spans": SPANS,
        "site": "resid_pre",
        "direction": Direction.RESTORE,
        "metric": "logit diff",
        "corruption": "corrupted prompt",
        "clean_score": 2.0,
        "corrupted_score": -1.0,
    }
    return {**fields, **overrides}


def _z(fig: go.Figure, index: int = 0) -> np.ndarray:
    return np.asarray(fig.data[index].z, dtype=np.float64)


def _rects(fig: go.Figure) -> list[Any]:
    return [shape for shape in fig.layout.shapes if shape.type == "rect"]


# --- quantity ------------------------------------------------------------------------------------


def test_quantity_picks_values_effect_normalized() -> None:
    trace = _trace(TraceKind.RESID)
    assert_allclose(quantity(trace, "value").numpy(), trace.values.numpy())
    assert_allclose(quantity(trace, "effect").numpy(), (trace.values - CORRUPTED).numpy())
    assert_allclose(
        quantity(trace, "normalized").numpy(),
        ((trace.values - CORRUPTED) / (CLEAN - CORRUPTED)).numpy(),
        rtol=1e-6,
    )


def test_normalized_without_gap_raises() -> None:
    result = LayerPosResult(values=torch.zeros(3, 4), **_common(corrupted_score=2.0))
    with pytest.raises(ResultError):
        trace_heatmap(result, value="normalized")


# --- trace_heatmap -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["effect", "value", "normalized"])
def test_trace_heatmap_data_is_quantity_transposed(value: Any) -> None:
    trace = _trace(TraceKind.MLP)
    fig = trace_heatmap(trace, value=value)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 1
    heat = fig.data[0]
    assert heat.type == "heatmap"
    assert _z(fig).shape == (len(POSITIONS), len(LAYERS))
    assert_allclose(_z(fig), quantity(trace, value).T.numpy())
    assert list(heat.x) == list(LAYERS)
    assert list(heat.y) == LABELS
    assert value in heat.hovertemplate
    assert "layer" in heat.hovertemplate and "token" in heat.hovertemplate


def test_trace_heatmap_effect_equals_indirect_effect() -> None:
    trace = _trace(TraceKind.RESID)
    fig = trace_heatmap(trace)
    assert_allclose(_z(fig), trace.indirect_effect.T.numpy())


def test_tokens_run_top_to_bottom_in_prompt_order() -> None:
    fig = trace_heatmap(_trace(TraceKind.RESID))
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.yaxis.type == "category"


def test_subject_span_is_starred_and_outlined() -> None:
    fig = trace_heatmap(_trace(TraceKind.RESID))
    starred = [label for label in fig.data[0].y if label.endswith("*")]
    assert starred == ["1: Danielle*", "2: Darrieux*"]
    rects = _rects(fig)
    assert len(rects) == 1
    # rows 1 and 2 of the category axis, the whole width of the plot
    assert (rects[0].y0, rects[0].y1) == (0.5, 2.5)
    assert (rects[0].x0, rects[0].x1) == (0, 1)
    assert rects[0].xref == "x domain" and rects[0].yref == "y"


def test_other_spans_can_be_marked_and_missing_span_raises() -> None:
    trace = _trace(TraceKind.RESID)
    fig = trace_heatmap(trace, spans=("subject", "last"))
    assert list(fig.data[0].y) == [*LABELS[:3], "3: is*"]
    assert len(_rects(fig)) == 2
    assert [label for label in trace_heatmap(trace, spans=()).data[0].y if "*" in label] == []
    with pytest.raises(ResultError, match="relation"):
        trace_heatmap(trace, spans=("relation",))


def test_subset_of_positions_labels_and_outlines() -> None:
    result = LayerPosResult(
        values=torch.arange(6.0).reshape(2, 3),
        **_common(layers=(1, 2), positions=(0, 2, 3), spans={"subject": (2, 4)}),
    )
    fig = trace_heatmap(result)
    assert list(fig.data[0].x) == [1, 2]
    assert list(fig.data[0].y) == ["0: &lt;bos&gt;", "2: Darrieux*", "3: is*"]
    assert_allclose(_z(fig), (result.values + 1.0).T.numpy())
    (rect,) = _rects(fig)
    assert (rect.y0, rect.y1) == (0.5, 2.5)


def test_colour_scale_per_kind_and_blues_for_patching() -> None:
    def scale(fig: go.Figure) -> tuple[str, ...]:
        return tuple(color for _, color in fig.data[0].colorscale)

    assert scale(trace_heatmap(_trace(TraceKind.RESID))) == scale(
        go.Figure(go.Heatmap(colorscale="Purples"))
    )
    for kind, name in ((TraceKind.MLP, "Greens"), (TraceKind.ATTN, "Reds")):
        expected = scale(go.Figure(go.Heatmap(colorscale=name)))
        assert scale(trace_heatmap(_trace(kind))) == expected
    plain = LayerPosResult(values=torch.zeros(3, 4), **_common())
    assert scale(trace_heatmap(plain)) == scale(go.Figure(go.Heatmap(colorscale="Blues")))
    viridis = scale(go.Figure(go.Heatmap(colorscale="Viridis")))
    assert scale(trace_heatmap(plain, colorscale="Viridis")) == viridis


def test_default_title_is_informative_and_title_overrides() -> None:
    trace = _trace(TraceKind.MLP)
    text = trace_heatmap(trace).layout.title.text
    for piece in ("MLP", "mlp_out", "window of 3", "noise", "'Paris'", "0.9", "0.1"):
        assert piece in text
    assert trace_heatmap(trace, title="mine").layout.title.text == "mine"
    plain = LayerPosResult(values=torch.zeros(3, 4), **_common())
    text = trace_heatmap(plain).layout.title.text
    for piece in ("resid_pre", "restore", "corrupted prompt", "logit diff", "2", "-1"):
        assert piece in text


def test_labels_without_token_strings_are_positions() -> None:
    result = LayerPosResult(values=torch.zeros(3, 4), **_common(str_tokens=(), spans={}))
    fig = trace_heatmap(result)
    assert list(fig.data[0].y) == ["0", "1", "2", "3"]
    assert _rects(fig) == []


def test_heatmap_of_result_without_positions_raises() -> None:
    result = LayerPosResult(values=torch.zeros(3, 0), **_common(positions=()))
    with pytest.raises(ResultError, match="no positions"):
        trace_heatmap(result)


# --- trace_grid ----------------------------------------------------------------------------------


def test_trace_grid_has_one_heatmap_per_trace(trace_set: TraceSet) -> None:
    fig = trace_grid(trace_set)
    assert len(fig.data) == len(trace_set)
    for index, (heat, trace) in enumerate(zip(fig.data, trace_set, strict=True)):
        suffix = "" if index == 0 else str(index + 1)
        assert heat.xaxis == f"x{suffix}" and heat.yaxis == f"y{suffix}"
        assert_allclose(_z(fig, index), trace.effect.T.numpy())
        assert list(heat.x) == list(LAYERS)
        assert list(heat.y) == LABELS
    titles = [annotation.text for annotation in fig.layout.annotations]
    assert titles[:2] == ["resid", "mlp, window 3"]
    assert "resid (mlp severed)" in titles
    # shared token axis, prompt order top to bottom, one outline per subplot
    assert fig.layout.yaxis2.matches == "y"
    assert fig.layout.yaxis.autorange == "reversed"
    assert len(_rects(fig)) == len(trace_set)
    assert {rect.yref for rect in _rects(fig)} == {"y", "y2", "y3", "y4", "y5"}


def test_trace_grid_value_and_inconsistent_set(trace_set: TraceSet) -> None:
    fig = trace_grid(trace_set, value="value")
    for index, trace in enumerate(trace_set):
        assert_allclose(_z(fig, index), trace.values.T.numpy())
    with pytest.raises(ResultError, match="empty"):
        trace_grid(TraceSet(()))
    other = TraceResult(
        **{**_trace(TraceKind.MLP).__dict__, "positions": (0, 1, 2), "values": torch.zeros(3, 3)}
    )
    with pytest.raises(ResultError, match="differ"):
        trace_grid(TraceSet((_trace(TraceKind.RESID), other)))


# --- effect_curves -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "pos"),
    [("subject_last", 2), ("subject_first", 1), ("last", 3), ("last_first", 3), (0, 0), (2, 2)],
)
def test_effect_curves_are_the_column_at_the_position(
    trace_set: TraceSet, position: int | str, pos: int
) -> None:
    fig = effect_curves(trace_set, position=position)
    assert len(fig.data) == len(trace_set)
    for curve, trace in zip(fig.data, trace_set, strict=True):
        assert curve.type == "scatter"
        assert curve.name.startswith(trace.label)
        assert list(curve.x) == list(LAYERS)
        assert_allclose(np.asarray(curve.y), trace.effect[:, pos].numpy())


def test_severed_curves_are_dashed_and_coloured_by_component(trace_set: TraceSet) -> None:
    fig = effect_curves(trace_set, value="value")
    dashes = {curve.name: curve.line.dash for curve in fig.data}
    assert dashes == {
        "resid": "solid",
        "mlp, window 3": "solid",
        "attn, window 3": "solid",
        "resid (mlp severed)": "dash",
        "resid (attn severed)": "dash",
    }
    colors = {curve.name: curve.line.color for curve in fig.data}
    assert colors["resid (mlp severed)"] == colors["mlp, window 3"]
    assert colors["resid (attn severed)"] == colors["attn, window 3"]
    assert len({colors["resid"], colors["mlp, window 3"], colors["attn, window 3"]}) == 3
    for curve, trace in zip(fig.data, trace_set, strict=True):
        assert_allclose(np.asarray(curve.y), trace.values[:, 2].numpy())
    # reference lines at the corrupted and clean scores
    levels = sorted(shape.y0 for shape in fig.layout.shapes)
    assert levels == pytest.approx([CORRUPTED, CLEAN])


@pytest.mark.parametrize(
    ("position", "match"),
    [
        ("relation_last", "relation"),
        ("subject_middle", "subject_middle"),
        ("subject", "subject"),
        (7, "not traced"),
    ],
)
def test_bad_position_raises(trace_set: TraceSet, position: int | str, match: str) -> None:
    with pytest.raises(ResultError, match=match):
        effect_curves(trace_set, position=position)


# --- head heatmaps -------------------------------------------------------------------------------


def test_head_heatmap_is_layers_by_heads() -> None:
    values = torch.arange(12.0).reshape(3, 4) / 12
    result = LayerHeadResult(values=values, **_common(positions=(), heads=(0, 1, 2, 3)))
    fig = head_heatmap(result)
    assert_allclose(_z(fig), result.effect.numpy())
    assert list(fig.data[0].x) == [0, 1, 2, 3]
    assert list(fig.data[0].y) == list(LAYERS)
    assert fig.layout.yaxis.autorange == "reversed"
    assert_allclose(_z(head_heatmap(result, value="value")), values.numpy())
    assert head_heatmap(result, title="heads").layout.title.text == "heads"


def test_pos_head_heatmap_is_one_layer() -> None:
    values = torch.arange(24.0).reshape(3, 4, 2)
    result = LayerPosHeadResult(values=values, **_common(layers=(0, 2, 5), heads=(0, 1)))
    fig = pos_head_heatmap(result, layer=2, value="value")
    assert_allclose(_z(fig), values[1].numpy())
    assert list(fig.data[0].x) == [0, 1]
    assert list(fig.data[0].y) == LABELS
    assert len(_rects(fig)) == 1
    assert "Layer 2" in fig.layout.title.text
    assert_allclose(_z(pos_head_heatmap(result, layer=5)), result.effect[2].numpy())
    with pytest.raises(ResultError, match="layer 1"):
        pos_head_heatmap(result, layer=1)


# --- output --------------------------------------------------------------------------------------


def test_figures_render_to_html(trace_set: TraceSet) -> None:
    head = LayerHeadResult(values=torch.zeros(3, 2), **_common(positions=(), heads=(0, 1)))
    figures = [
        trace_heatmap(_trace(TraceKind.RESID)),
        trace_grid(trace_set),
        effect_curves(trace_set),
        head_heatmap(head),
    ]
    for fig in figures:
        page = fig.to_html(include_plotlyjs=False)
        assert "</html>" in page
        assert "Plotly.newPlot" in page
        assert '<script src="https://cdn.plot.ly' not in page


def test_token_labels_escape_markup() -> None:
    assert token_labels(_trace(TraceKind.RESID)) == LABELS
    assert token_labels(_trace(TraceKind.RESID), spans=()) == [
        label.rstrip("*") for label in LABELS
    ]


# --- on a real trace -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_traces() -> TraceSet:
    sys.path.insert(0, "tests")
    from models import tiny_model

    model = tiny_model()
    return kloc_lens.causal_trace(
        model,
        kloc_lens.Fact("Danielle Darrieux", "mother tongue", "French"),
        corruption=kloc_lens.GaussianNoise(scale=0.3),
        window=3,
        sever=("mlp",),
        progress=False,
    )


def test_plots_of_a_real_causal_trace(real_traces: TraceSet) -> None:
    resid = real_traces.get("resid")
    fig = trace_heatmap(resid)
    assert_allclose(_z(fig), resid.indirect_effect.detach().cpu().T.numpy())
    assert list(fig.data[0].x) == list(resid.layers)
    start, end = resid.spans["subject"]
    labels = list(fig.data[0].y)
    assert len(labels) == len(resid.positions)
    assert [i for i, label in enumerate(labels) if label.endswith("*")] == list(range(start, end))
    assert labels[start] == f"{start}: Danielle*"
    assert "&lt;bos&gt;" in labels[0]

    grid = trace_grid(real_traces)
    assert len(grid.data) == len(real_traces) == 4
    for index, trace in enumerate(real_traces):
        assert_allclose(_z(grid, index), trace.effect.detach().cpu().T.numpy())

    curves = effect_curves(real_traces, position="subject_last")
    for curve, trace in zip(curves.data, real_traces, strict=True):
        assert_allclose(np.asarray(curve.y), trace.effect[:, end - 1].detach().cpu().numpy())
    assert [curve.line.dash for curve in curves.data] == ["solid", "solid", "solid", "dash"]
    assert "French" in fig.layout.title.text
    grid.to_html(include_plotlyjs=False)
