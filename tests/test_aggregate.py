"""Dataset aggregation by ROME position bins."""

from __future__ import annotations

import pytest
import torch

import kloc_lens as kl
from kloc_lens.aggregate import (
    aggregate_traces,
    bin_names,
    position_bins,
    span_bin_names,
    span_bins,
    trace_dataset,
)
from kloc_lens.results import TraceResult, TraceSet
from kloc_lens.types import Direction, TraceKind


def test_position_bins():
    bins = position_bins(span=(1, 4), n_tokens=8)
    assert bins == {
        "first subject token": (1,),
        "middle subject tokens": (2,),
        "last subject token": (3,),
        "first subsequent token": (4,),
        "further tokens": (5, 6),
        "last token": (7,),
    }
    one = position_bins(span=(2, 3), n_tokens=4, name="relation")
    assert one["middle relation tokens"] == () and one["first relation token"] == (2,)
    assert one["first subsequent token"] == (3,) and one["further tokens"] == ()
    end = position_bins(span=(1, 3), n_tokens=3)
    assert end["first subsequent token"] == () and end["last token"] == (2,)
    with pytest.raises(kl.SpanError, match="does not fit a prompt of 3 tokens"):
        position_bins(span=(2, 5), n_tokens=3)


def _trace(values, spans, kind=TraceKind.RESID, corrupted=0.1, clean=0.9):
    n_layers, n_pos = values.shape
    return TraceResult(
        values=values,
        layers=tuple(range(n_layers)),
        positions=tuple(range(n_pos)),
        heads=(),
        str_tokens=tuple(f"t{i}" for i in range(n_pos)),
        spans=spans,
        site="resid_post",
        direction=Direction.RESTORE,
        metric="p",
        corruption="n",
        clean_score=clean,
        corrupted_score=corrupted,
        kind=kind,
        window=1,
        severed=None,
        target="x",
    )


def test_aggregate_matches_a_hand_computation():
    a = torch.arange(12.0).reshape(2, 6) / 100  # 2 layers, 6 tokens, subject 1..3
    b = torch.arange(10.0).reshape(2, 5) / 50  # 2 layers, 5 tokens, subject 2..2
    sets = [
        TraceSet((_trace(a, {"subject": (1, 4)}),)),
        TraceSet((_trace(b, {"subject": (2, 3)}, corrupted=0.2, clean=0.6),)),
    ]
    agg = aggregate_traces(sets).get("resid")
    ie_a, ie_b = a - 0.1, b - 0.2
    expected = {
        "first subject token": [ie_a[:, 1], ie_b[:, 2]],
        "middle subject tokens": [ie_a[:, 2]],
        "last subject token": [ie_a[:, 3], ie_b[:, 2]],
        "first subsequent token": [ie_a[:, 4], ie_b[:, 3]],
        "further tokens": [],
        "last token": [ie_a[:, 5], ie_b[:, 4]],
    }
    for i, name in enumerate(bin_names()):
        assert agg.counts[i] == len(expected[name])
        if expected[name]:
            stack = torch.stack(expected[name])
            torch.testing.assert_close(agg.mean[i], stack.mean(0))
            if len(stack) > 1:
                torch.testing.assert_close(agg.stderr[i], stack.std(0) / len(stack) ** 0.5)
        else:
            assert agg.mean[i].abs().max() == 0
    assert agg.clean_score == pytest.approx(0.75) and agg.corrupted_score == pytest.approx(0.15)
    assert agg.n_facts == 2
    frame = agg.to_dataframe()
    assert len(frame) == 6 * 2 and set(frame["kind"]) == {"resid"}


def test_aggregate_refuses_mismatched_traces():
    a = _trace(torch.zeros(2, 4), {"subject": (1, 2)})
    b = _trace(torch.zeros(3, 4), {"subject": (1, 2)})
    with pytest.raises(kl.ResultError, match="share kinds and layers"):
        aggregate_traces([TraceSet((a,)), TraceSet((b,))])
    with pytest.raises(kl.ResultError, match="no traces"):
        aggregate_traces([])
    with pytest.raises(kl.SpanError, match="has no 'relation' span"):
        aggregate_traces([TraceSet((a,))], span="relation")


@pytest.mark.substrate
def test_trace_dataset_finds_the_planted_components(planted, tmp_path):
    model, facts = planted
    prompts = [
        kl.tokenize(model, kl.Prompt.from_text(facts.prompt(i), obj, subject=subject))
        for i, (subject, obj) in enumerate(facts.pairs())
    ]
    result = trace_dataset(model, prompts, window=1, samples=5, progress=False)
    assert len(result.traces) == len(prompts) and "Gaussian noise" in result.corruption
    mlp = result.aggregate.get("mlp")
    assert mlp.peak()[:2] == ("last subject token", facts.mlp_layer)
    attn = result.aggregate.get("attn")
    # "is" is both the first subsequent and the last token of these prompts
    assert attn.peak("last token")[1:] == attn.peak()[1:]
    assert attn.peak("last token")[1] == facts.attn_layer
    assert mlp.counts == (6, 0, 6, 6, 0, 6)  # two-word subjects, "is" right after them
    severed = result.aggregate.get("resid", "mlp").bin("last subject token")
    plain = result.aggregate.get("resid").bin("last subject token")
    assert severed[: facts.mlp_layer].max() < 0.1 * plain[: facts.mlp_layer].min()
    back = kl.load_result(result.aggregate.save(tmp_path / "agg.safetensors"))
    for x, y in zip(result.aggregate, back, strict=True):
        assert torch.equal(x.mean, y.mean) and torch.equal(x.stderr, y.stderr)
        assert (x.label, x.counts, x.bins, x.n_facts) == (y.label, y.counts, y.bins, y.n_facts)


def test_aggregate_figures_show_the_numbers():
    from kloc_lens.plot import aggregate_curves, aggregate_grid

    a = torch.arange(12.0).reshape(2, 6) / 100
    sets = [
        TraceSet(
            (_trace(a, {"subject": (1, 4)}), _trace(a * 2, {"subject": (1, 4)}, kind=TraceKind.MLP))
        )
    ] * 3
    aggs = aggregate_traces(sets)
    grid = aggregate_grid(aggs)
    assert len(grid.data) == 2
    torch.testing.assert_close(torch.tensor(grid.data[1].z), aggs.get("mlp").mean)
    assert grid.data[0].y[0] == "first subject token (n=3)"
    curves = aggregate_curves(aggs)
    torch.testing.assert_close(
        torch.tensor(curves.data[0].y), aggs.get("resid").bin("last subject token")
    )
    assert list(curves.data[0].error_y.array) == [0.0, 0.0]  # three identical facts
    with pytest.raises(kl.ResultError, match="no bin 'nowhere'"):
        aggregate_curves(aggs, bin="nowhere")


def test_span_bins_place_each_span_then_the_rest():
    spans = {"subject": (3, 6), "object": (7, 8), "relation": (0, 1)}
    bins = span_bins(spans, 10, ["subject", "object"])
    assert list(bins) == list(span_bin_names(["subject", "object"]))
    assert bins["first subject token"] == (3,) and bins["middle subject tokens"] == (4,)
    assert bins["last subject token"] == (5,)
    assert bins["first object token"] == bins["last object token"] == (7,)
    assert bins["middle object tokens"] == ()
    # not in either span and not last; the relation span is not binned here
    assert bins["other tokens"] == (0, 1, 2, 6, 8) and bins["last token"] == (9,)
    with pytest.raises(kl.SpanError, match="no 'object' span; spans: subject"):
        span_bins({"subject": (0, 2)}, 4, ["subject", "object"])
    with pytest.raises(kl.SpanError, match="overlaps"):
        span_bins({"subject": (0, 3), "object": (2, 4)}, 5, ["subject", "object"])
    with pytest.raises(kl.SpanError, match="does not fit a prompt of 4 tokens"):
        span_bins({"subject": (3, 6)}, 4, ["subject"])


def test_aggregate_around_two_spans_matches_a_hand_computation():
    a = torch.arange(14.0).reshape(2, 7) / 100  # subject 1..2, object 4..4, last 6
    b = torch.arange(12.0).reshape(2, 6) / 50  # subject 0..0, object 2..3, last 5
    sets = [
        TraceSet((_trace(a, {"subject": (1, 3), "object": (4, 5)}),)),
        TraceSet((_trace(b, {"subject": (0, 1), "object": (2, 4)}),)),
    ]
    agg = aggregate_traces(sets, "object", bin_spans=["subject", "object"]).traces[0]
    assert agg.span == "object" and agg.bins == span_bin_names(["subject", "object"])
    a, b = a - 0.1, b - 0.1  # indirect effects: restored minus corrupted score
    torch.testing.assert_close(agg.bin("last subject token"), (a[:, 2] + b[:, 0]) / 2)
    torch.testing.assert_close(agg.bin("first object token"), (a[:, 4] + b[:, 2]) / 2)
    torch.testing.assert_close(agg.bin("last object token"), (a[:, 4] + b[:, 3]) / 2)
    other = (a[:, [0, 3, 5]].mean(1) + b[:, [1, 4]].mean(1)) / 2
    torch.testing.assert_close(agg.bin("other tokens"), other)
    torch.testing.assert_close(agg.bin("last token"), (a[:, 6] + b[:, 5]) / 2)
    # the middle of the object is empty in both: left out, counted as none
    assert agg.counts[agg.bins.index("middle object tokens")] == 0
    assert agg.counts[agg.bins.index("middle subject tokens")] == 0
