"""Metrics: token ids are checked where the metric is made and against the logits it reads."""

from __future__ import annotations

import pytest
import torch

import kloc_lens as kl

pytestmark = pytest.mark.substrate

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


def test_negative_or_non_integer_ids_are_refused_where_the_metric_is_made():
    with pytest.raises(kl.MetricError, match="TargetProb.target holds negative token ids \\[-1\\]"):
        kl.TargetProb(-1)
    with pytest.raises(kl.MetricError, match="TargetProb.target holds negative token ids \\[-2\\]"):
        kl.TargetProb([3, -2])
    with pytest.raises(kl.MetricError, match="LogitDiff.wrong holds negative token ids"):
        kl.LogitDiff(3, -4)
    with pytest.raises(kl.MetricError, match="must hold integer token ids, got a torch.float32"):
        kl.TargetProb(torch.tensor([1.0, 2.0]))
    with pytest.raises(kl.MetricError, match="TargetProb.target holds no token ids"):
        kl.TargetProb([])


def test_ids_of_the_wrong_type_are_refused(unchecked):
    with pytest.raises(kl.MetricError, match="TargetProb.target must hold integer token ids, got"):
        kl.TargetProb(2.5)  # type: ignore[arg-type]
    with pytest.raises(kl.MetricError, match="got str '3'"):
        kl.TargetProb(["3"])  # type: ignore[list-item]
    with pytest.raises(kl.MetricError, match="got True"):
        kl.LogitDiff(True, 2)


def test_ids_outside_the_vocabulary_are_refused_with_the_vocabulary_size(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    d_vocab = tiny.cfg.d_vocab
    with pytest.raises(kl.MetricError, match=f"TargetProb.target id {d_vocab} is outside the mod"):
        kl.activation_patching(
            tiny, prompt, kl.ZeroAblation(), kl.TargetProb(d_vocab), progress=False
        )
    with pytest.raises(kl.MetricError, match=f"vocabulary of {d_vocab} tokens \\(0..{d_vocab - 1}"):
        kl.causal_trace(tiny, prompt, target=10**6, progress=False)
    with pytest.raises(kl.MetricError, match="LogitDiff token id 60 is outside"):
        kl.LogitDiff(3, 60)(torch.zeros(1, 2, d_vocab))
    torch.testing.assert_close(
        kl.TargetProb(torch.tensor([d_vocab - 1]))(torch.zeros(1, 2, d_vocab)),
        torch.tensor(1 / d_vocab),
    )
