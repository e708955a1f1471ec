"""Hase et al.'s regression on planted tables whose answer is constructed: success that depends
on the trace effect beyond the layer, success that does not (although both peak in the same
layers), the closed form against a least-squares fit, and the peak-layer numbers."""

from __future__ import annotations

import math

import pytest
import torch

from kloc_lens.edit import EditError, TraceEditRegression, trace_edit_regression

LAYER = torch.tensor([0.0, 0.2, 0.5, 0.6, 0.3, 0.1], dtype=torch.float64)


def _noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _lstsq_r2(success: torch.Tensor, effect: torch.Tensor) -> tuple[float, float]:
    """R^2 of the layer-dummies fit and of dummies plus effect, by an explicit design matrix."""
    valid = ~(success.isnan() | effect.isnan())
    rows, cols = valid.nonzero(as_tuple=True)
    y = success[rows, cols]
    dummies = torch.nn.functional.one_hot(cols, success.shape[1]).double()
    full = torch.cat([dummies, effect[rows, cols][:, None]], 1)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = []
    for design in (dummies, full):
        beta = torch.linalg.lstsq(design, y[:, None]).solution
        r2.append(1 - float(((y - (design @ beta)[:, 0]) ** 2).sum()) / total)
    return r2[0], r2[1]


def test_success_that_depends_on_the_trace_gives_the_constructed_increment():
    n, beta, sigma = 4000, 0.4, 0.3
    effect = _noise((n, 6), 1)
    success = LAYER + beta * effect + sigma * _noise((n, 6), 2)
    var_layer = float(LAYER.var(unbiased=False))
    total = var_layer + beta**2 + sigma**2
    fit = trace_edit_regression(success, effect, n_resamples=200)
    assert fit.r2_layer.value == pytest.approx(var_layer / total, abs=0.01)
    assert fit.r2_layer_trace.value == pytest.approx((var_layer + beta**2) / total, abs=0.01)
    assert fit.increment.value == pytest.approx(beta**2 / total, abs=0.01)
    assert fit.slope.value == pytest.approx(beta, abs=0.01)
    assert fit.increment.low < beta**2 / total < fit.increment.high
    assert fit.n_facts == n and fit.n_cells == 6 * n


def test_success_that_only_shares_the_trace_s_layers_gives_no_increment():
    # the trace effect peaks in the layers where edits work (so the two correlate over all
    # cells), but within a layer it says nothing about success: Hase et al.'s finding
    n = 4000
    effect = 2 * LAYER + 0.2 * _noise((n, 6), 3)
    success = LAYER + 0.3 * _noise((n, 6), 4)
    correlation = torch.corrcoef(torch.stack([effect.flatten(), success.flatten()]))[0, 1]
    assert correlation > 0.3
    fit = trace_edit_regression(success, effect, n_resamples=200)
    assert 0 <= fit.increment.value < 0.002  # a regressor never lowers R^2
    assert fit.increment.high < 0.005
    assert fit.slope.low < 0 < fit.slope.high


def test_closed_form_equals_a_least_squares_fit_with_missing_cells():
    effect = _noise((60, 5), 5)
    success = LAYER[:5] + 0.5 * effect**2 + 0.2 * _noise((60, 5), 6)
    success[3, 1] = math.nan  # a disabling edit left out
    effect[7, 4] = math.nan  # a layer without a trace
    r2_layer, r2_full = _lstsq_r2(success, effect)
    fit = trace_edit_regression(success, effect, layers=[2, 3, 4, 5, 6], n_resamples=50)
    assert fit.r2_layer.value == pytest.approx(r2_layer, abs=1e-10)
    assert fit.r2_layer_trace.value == pytest.approx(r2_full, abs=1e-10)
    assert fit.n_cells == 60 * 5 - 2 and fit.layers == (2, 3, 4, 5, 6)
    assert TraceEditRegression.from_dict(fit.as_dict()) == fit
    assert "R^2" in fit.sentence() and "95% CI" in fit.sentence()


def test_the_traced_peak_is_a_best_layer_for_the_constructed_share():
    # 10 facts: the first 7 have their trace peak at their best edit layer, the other 3 at a
    # layer scoring 0.25 below their best
    success = torch.tensor([[0.1, 0.9, 0.5, 0.65]] * 10, dtype=torch.float64)
    effect = torch.tensor([[0.0, 1.0, 0.2, 0.1]] * 7 + [[0.0, 0.1, 0.2, 1.0]] * 3)
    fit = trace_edit_regression(success, effect, n_resamples=100)
    assert fit.peak_is_best.value == pytest.approx(0.7)
    assert fit.peak_gap.value == pytest.approx(0.3 * 0.25)
    assert fit.peak_is_best.low <= 0.7 <= fit.peak_is_best.high
    ties = trace_edit_regression(torch.ones(4, 3), torch.eye(4, 3), n_resamples=20)
    assert ties.peak_is_best.value == 1.0  # a tie for best counts as best
    assert math.isnan(ties.r2_layer.value)  # no variance to explain


def test_bad_tables_are_named_errors():
    with pytest.raises(EditError, match=r"success must be a \[fact, layer\] table"):
        trace_edit_regression(torch.ones(5), torch.ones(5))
    with pytest.raises(EditError, match="same shape"):
        trace_edit_regression(torch.ones(5, 2), torch.ones(5, 3))
    with pytest.raises(EditError, match="infinite"):
        trace_edit_regression(torch.tensor([[1.0, math.inf]] * 3), torch.ones(3, 2))
    with pytest.raises(EditError, match="at least 2 facts"):
        trace_edit_regression(torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(EditError, match="layers names 2 columns"):
        trace_edit_regression(torch.ones(3, 3), torch.ones(3, 3), layers=[0, 1])
    with pytest.raises(EditError, match="tolerance"):
        trace_edit_regression(torch.ones(3, 3), torch.ones(3, 3), tolerance=-1.0)


def test_edited_site_effects_read_the_last_subject_token(planted):
    import kloc_lens as kl
    from kloc_lens.study.informs import edited_site_effects

    model, facts = planted
    prompts = [kl.Fact(s, "home", o, entity_template=facts.template) for s, o in facts.pairs()]
    noise = kl.GaussianNoise(scale=3.0, samples=4, seed=0)
    traces = [
        kl.causal_trace(model, p, corruption=noise, window=1, sever=("mlp", "attn"), progress=False)
        for p in prompts[:3]
    ]
    effects = edited_site_effects(traces, [2, 1])
    for f, trace_set in enumerate(traces):
        for name in ("mlp", "resid"):
            trace = trace_set.get(name)
            last = trace.positions.index(trace.spans["subject"][1] - 1)
            expected = trace.indirect_effect[[2, 1], last].double()
            assert torch.allclose(effects[name][f], expected)
        # the planted fact is written by the MLP of layer 1 at the last subject token
        assert effects["mlp"][f, 1] > 0.5 > abs(float(effects["mlp"][f, 0]))
