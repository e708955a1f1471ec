"""Bad sweep inputs raise named errors that list the valid values; one options value reaches the
engine from every sweep entry point."""

from __future__ import annotations

import math

import pytest
import torch

import kloc_lens as kl
from kloc_lens.aggregate import aggregate_traces, trace_dataset
from kloc_lens.engine import Patch, Run, Source, execute

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


@pytest.fixture(scope="module")
def setup(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    corrupted = kl.TokenReplacement("Lyon Beirut").apply(tiny, prompt).tokens
    target = kl.target_token_ids(tiny, prompt.prompt)[0]
    return prompt, corrupted, kl.TargetProb(target, len(prompt) - 1)


@pytest.fixture(scope="module")
def traces(tiny, setup):
    prompt, _, _ = setup
    noise = kl.GaussianNoise(scale=0.5, samples=2)
    return kl.causal_trace(
        tiny, prompt, corruption=noise, window=1, sever=("mlp",), layers=[0], progress=False
    )


# ---- string options parsed into enums ---------------------------------------------------------


def test_unknown_sweep_and_direction_list_the_choices(tiny, setup):
    prompt, corrupted, metric = setup
    with pytest.raises(
        kl.SweepError,
        match="sweep must be one of 'layer_pos', 'layer_head', 'layer_pos_head', "
        "got 'layer_position'",
    ):
        kl.activation_patching(
            tiny, prompt, corrupted, metric, sweep="layer_position", progress=False
        )
    with pytest.raises(
        kl.SweepError, match="direction must be one of 'restore', 'inject', got 'forward'"
    ):
        kl.activation_patching(tiny, prompt, corrupted, metric, direction="forward", progress=False)


def test_unknown_trace_kinds_list_the_choices(tiny, setup):
    prompt, _, _ = setup
    with pytest.raises(
        kl.SweepError, match="kinds must be one of 'resid', 'mlp', 'attn', got 'mpl'"
    ):
        kl.causal_trace(tiny, prompt, kinds=("resid", "mpl"), progress=False)
    with pytest.raises(kl.SweepError, match="sever must be one of 'mlp', 'attn', got 'resid'"):
        kl.causal_trace(tiny, prompt, sever=("resid",), progress=False)
    with pytest.raises(kl.SweepError, match="sever must be one of 'mlp', 'attn', got 'ffn'"):
        kl.causal_trace(tiny, prompt, sever=("ffn",), progress=False)
    with pytest.raises(kl.SweepError, match="kinds must be one of 'resid', 'mlp', 'attn', got 'x'"):
        trace_dataset(tiny, [prompt], kinds=("x",), progress=False)


def test_a_bare_kind_is_one_kind(tiny, setup):
    prompt, _, _ = setup
    traced = kl.causal_trace(tiny, prompt, kinds="mlp", window=1, layers=[0], progress=False)
    assert [(t.kind, t.severed) for t in traced] == [(kl.TraceKind.MLP, None)]


def test_trace_set_get_lists_the_choices(traces):
    with pytest.raises(
        kl.ResultError, match="kind must be one of 'resid', 'mlp', 'attn', got 'mpl'"
    ):
        traces.get("mpl")
    with pytest.raises(
        kl.ResultError, match="severed must be one of 'resid', 'mlp', 'attn', got 'ffn'"
    ):
        traces.get("resid", "ffn")
    with pytest.raises(kl.ResultError, match="no attn trace"):
        traces.get("attn", "mlp")
    aggregate = aggregate_traces([traces])
    with pytest.raises(
        kl.ResultError, match="kind must be one of 'resid', 'mlp', 'attn', got 'MLP'"
    ):
        aggregate.get("MLP")
    assert traces.get("resid", "mlp").severed is kl.TraceKind.MLP


# ---- layers, positions and heads --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value", "phrase"),
    [
        ("layers", [1.7], r"layers must be integers in 0..2, got 1.7 in \[1.7\]"),
        ("layers", [0, 1.0], "layers must be integers in 0..2, got 1.0"),
        ("positions", ["3"], "positions must be integers in 0..7, got '3'"),
        ("positions", [True], "positions must be integers in 0..7, got True"),
        ("layers", "01", "layers must be a sequence of integers in 0..2, got '01'"),
        ("positions", [8], r"positions \[8\] outside 0..7"),
        ("layers", [-4], r"layers \[-4\] outside 0..2"),
        ("layers", [], r"layers \[\] outside 0..2"),
    ],
)
def test_indices_must_be_integers_in_range(tiny, setup, argument, value, phrase):
    prompt, corrupted, metric = setup
    with pytest.raises(kl.SweepError, match=phrase):
        kl.activation_patching(tiny, prompt, corrupted, metric, progress=False, **{argument: value})
    with pytest.raises(kl.SweepError, match=phrase):
        kl.causal_trace(tiny, prompt, window=1, progress=False, **{argument: value})


def test_integer_like_indices_are_accepted(tiny, setup):
    prompt, corrupted, metric = setup
    result = kl.activation_patching(
        tiny,
        prompt,
        corrupted,
        metric,
        site="z",
        sweep="layer_pos_head",
        layers=torch.tensor([0, -1]),
        positions=range(6, 8),
        heads=[torch.tensor(3)],
        progress=False,
    )
    assert result.layers == (0, 2) and result.positions == (6, 7) and result.heads == (3,)
    with pytest.raises(kl.SweepError, match=r"heads must be integers in 0..3, got 0.5"):
        kl.activation_patching(
            tiny, prompt, corrupted, metric, site="z", sweep="layer_head", heads=[0.5],
            progress=False,
        )  # fmt: skip


def test_heads_or_positions_a_sweep_ignores_are_errors(tiny, setup):
    prompt, corrupted, metric = setup
    with pytest.raises(
        kl.SweepError, match=r"heads=\[0\] is given, but a layer_pos sweep patches every head"
    ):
        kl.activation_patching(tiny, prompt, corrupted, metric, site="z", heads=[0], progress=False)
    with pytest.raises(kl.SweepError, match="but a layer_pos sweep patches every head"):
        kl.activation_patching(
            tiny, prompt, corrupted, metric, site="mlp_out", heads=[1], progress=False
        )
    with pytest.raises(
        kl.SweepError,
        match=r"positions=\[2\] is given, but a layer_head sweep patches every position",
    ):
        kl.activation_patching(
            tiny, prompt, corrupted, metric, site="z", sweep="layer_head", positions=[2],
            progress=False,
        )  # fmt: skip


def test_window_must_be_a_positive_integer(tiny, setup):
    prompt, _, _ = setup
    for window in (0, True):
        with pytest.raises(kl.SweepError, match=f"window must be an integer >= 1, got {window}"):
            kl.causal_trace(tiny, prompt, window=window, progress=False)


# ---- metrics returning NaN or infinities ------------------------------------------------------


class _Poisoned:
    """A metric that returns ``bad`` from its ``after``-th call on (reads the last position)."""

    def __init__(self, metric, bad, after):
        self.metric, self.bad, self.after, self.calls = metric, bad, after, 0
        self.name = "poisoned"

    @property
    def reads_positions(self):
        return self.metric.reads_positions

    def __call__(self, logits):
        self.calls += 1
        value = self.metric(logits)
        return value * self.bad if self.calls >= self.after else value


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_is_a_named_error(tiny, setup, bad):
    prompt, corrupted, metric = setup
    shown = {"nan": "nan", "inf": "inf", "-inf": "-inf"}[str(bad)]
    with pytest.raises(kl.MetricError, match=f"'poisoned' returned {shown} on the clean run"):
        kl.activation_patching(tiny, prompt, corrupted, _Poisoned(metric, bad, 1), progress=False)
    with pytest.raises(kl.MetricError, match=f"'poisoned' returned {shown} on the corrupted run"):
        kl.activation_patching(tiny, prompt, corrupted, _Poisoned(metric, bad, 2), progress=False)
    with pytest.raises(
        kl.MetricError, match=f"'poisoned' returned {shown} for configuration .* finite scores"
    ):
        kl.activation_patching(tiny, prompt, corrupted, _Poisoned(metric, bad, 3), progress=False)
    with pytest.raises(kl.MetricError, match=f"'poisoned' returned {shown} for configuration"):
        kl.causal_trace(tiny, prompt, window=1, metric=_Poisoned(metric, bad, 3), progress=False)


def test_a_non_finite_metric_on_the_plain_path_is_a_named_error(tiny, setup):
    prompt, corrupted, metric = setup
    site = kl.get_site("mlp_out")
    configs = [(Patch(site, layer, 6, None, Source.CLEAN),) for layer in range(3)]
    with pytest.raises(
        kl.MetricError,
        match=r"returned nan for configuration 0 \(blocks.0.hook_mlp_out at position 6",
    ):
        execute(
            tiny, Run(prompt.tokens[None]), Run(corrupted), configs,
            _Poisoned(metric, math.nan, 3), base=Source.CORRUPTED, shortcuts=False,
        )  # fmt: skip


# ---- one execution-options value --------------------------------------------------------------


def _options_seen(monkeypatch):
    seen = []
    original = kl.trace.execute

    def spy(*args, **kwargs):
        seen.append(kwargs["options"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kl.trace, "execute", spy)
    return seen


def test_every_entry_point_passes_the_whole_options_value(tiny, setup, monkeypatch):
    prompt, corrupted, metric = setup
    options = kl.ExecutionOptions(batch_size=3, memory_budget=10**6, precision="bf16")
    quiet = kl.ExecutionOptions(
        batch_size=3, memory_budget=10**6, precision=kl.Precision.BF16, progress=False
    )
    seen = _options_seen(monkeypatch)
    kl.activation_patching(tiny, prompt, corrupted, metric, options=quiet)
    kl.causal_trace(tiny, prompt, window=1, layers=[0], options=quiet)
    trace_dataset(tiny, [prompt, prompt], window=1, samples=2, options=options, progress=False)
    assert seen == [quiet] * 4  # trace_dataset's own bar is over facts: none per fact


def test_shorthand_keywords_override_the_options(tiny, setup, monkeypatch):
    prompt, corrupted, metric = setup
    seen = _options_seen(monkeypatch)
    base = kl.ExecutionOptions(batch_size=3, progress=False)
    kl.activation_patching(tiny, prompt, corrupted, metric, options=base, batch_size=5)
    kl.causal_trace(tiny, prompt, window=1, layers=[0], options=base, precision="bf16")
    trace_dataset(tiny, [prompt], window=1, samples=2, memory_budget=123_456, progress=False)
    assert seen[0] == kl.ExecutionOptions(batch_size=5, progress=False)
    assert seen[1] == kl.ExecutionOptions(batch_size=3, precision="bf16", progress=False)
    # trace_dataset used to drop memory_budget on its way to the engine
    assert seen[2] == kl.ExecutionOptions(memory_budget=123_456, progress=False)


def test_trace_dataset_numbers_do_not_depend_on_the_options(tiny, setup):
    prompt, _, _ = setup
    noise = kl.GaussianNoise(scale=0.5, samples=2)
    small = kl.ExecutionOptions(batch_size=1, memory_budget=20_000, progress=False)
    one = trace_dataset(tiny, [prompt], corruption=noise, window=1, options=small)
    many = trace_dataset(tiny, [prompt], corruption=noise, window=1, progress=False)
    for a, b in zip(one.traces[0], many.traces[0], strict=True):
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"memory_budget": 0}, "memory_budget must be >= 1 byte, got 0"),
        ({"memory_budget": False}, "memory_budget must be an integer >= 1, got False"),
        ({"precision": "fp64"}, "precision must be one of 'fp32', 'tf32', 'bf16', 'fp16', got"),
    ],
)
def test_bad_execution_options_are_named(kwargs, phrase):
    with pytest.raises(kl.SweepError, match=phrase):
        kl.ExecutionOptions(**kwargs)


def test_shorthand_keywords_are_checked_like_the_options(tiny, setup):
    prompt, _, _ = setup
    with pytest.raises(kl.SweepError, match="batch_size must be >= 1, got -1"):
        kl.causal_trace(tiny, prompt, batch_size=-1, progress=False)
    with pytest.raises(kl.SweepError, match="memory_budget must be >= 1 byte, got 0"):
        trace_dataset(tiny, [prompt], memory_budget=0, progress=False)


# ---- the default window -----------------------------------------------------------------------


def test_default_window_is_romes_scaled_to_the_model(tiny, setup):
    assert [kl.default_window(n) for n in (48, 28, 24, 12, 6, 1)] == [10, 6, 5, 2, 2, 2]
    with pytest.raises(kl.SweepError, match="n_layers must be an integer >= 1, got 0"):
        kl.default_window(0)
    prompt, _, _ = setup
    traced = kl.causal_trace(tiny, prompt, kinds=("mlp",), layers=[1], progress=False)
    assert traced.get("mlp").window == kl.default_window(tiny.cfg.n_layers) == 2
