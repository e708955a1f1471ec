"""Bootstrap intervals: coverage on known distributions, aligned resampling, named errors."""

from __future__ import annotations

import math

import pytest
import torch

from kloc_lens.intervals import Estimate, IntervalError, bootstrap, bootstrap_all


def test_interval_of_a_mean_matches_the_normal_approximation():
    values = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    est = bootstrap(lambda x: x.mean(), values, seed=0)
    half = 1.96 * float(values.std()) / math.sqrt(len(values))
    assert est.value == pytest.approx(float(values.mean()))
    assert (est.high - est.low) / 2 == pytest.approx(half, rel=0.12)
    assert est.low < est.value < est.high


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(0)
    hits = 0
    trials = 200
    for trial in range(trials):
        wins = (torch.rand(100, generator=generator) < 0.3).double()
        est = bootstrap(lambda x: x.mean(), wins, n_resamples=400, seed=trial)
        hits += est.low <= 0.3 <= est.high
    assert 0.88 <= hits / trials <= 0.99


def test_aligned_arrays_are_resampled_together():
    # a ratio of means of two perfectly proportional arrays has no spread at all
    x = torch.rand(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    est = bootstrap(lambda a, b: a.mean() / b.mean(), 3 * x, x, seed=0)
    assert est.low == pytest.approx(3.0) and est.high == pytest.approx(3.0)


def test_several_statistics_on_the_same_resamples():
    x = torch.arange(20, dtype=torch.float64)
    both = bootstrap_all(lambda a: {"mean": a.mean(), "twice": 2 * a.mean()}, x, seed=4)
    assert both["twice"].low == pytest.approx(2 * both["mean"].low)
    assert both["twice"].high == pytest.approx(2 * both["mean"].high)


def test_same_seed_same_interval_and_round_trip():
    x = torch.rand(30, generator=torch.Generator().manual_seed(3))
    first, again = (bootstrap(lambda a: a.mean(), x, seed=7) for _ in range(2))
    assert first == again
    assert Estimate.from_dict(first.as_dict()) == first


def test_undefined_statistics_stay_undefined():
    zeros = torch.zeros(10)
    est = bootstrap(lambda a: a.mean() / a.sum(), zeros)
    assert math.isnan(est.value) and math.isnan(est.low)
    assert est.as_dict()["value"] is None
    assert est.percent() == "undefined (n=10)"
    empty = bootstrap(lambda a: a.mean(), torch.zeros(0))
    assert empty.n == 0 and math.isnan(empty.value)


def test_text_forms():
    est = Estimate(0.612, 0.551, 0.663, 200)
    assert est.number() == "0.61 (95% CI 0.55-0.66, n=200)"
    assert est.percent() == "61% (95% CI 55-66, n=200)"


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda: bootstrap(lambda a: a.mean()), "at least one array"),
        (lambda: bootstrap(lambda a, b: a.mean(), torch.ones(3), torch.ones(4)), "lengths [3, 4]"),
        (lambda: bootstrap(lambda a: a.mean(), torch.ones(3), level=1.5), "level=1.5"),
        (lambda: bootstrap(lambda a: a.mean(), torch.ones(3), n_resamples=0), "n_resamples=0"),
    ],
)
def test_bad_input_is_named(call, phrase):
    with pytest.raises(IntervalError, match=__import__("re").escape(phrase)):
        call()
