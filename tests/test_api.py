"""The public namespace and bad-input errors shared by every sweep."""

from __future__ import annotations

import importlib

import pytest
import torch

import kloc_lens as kl


def test_every_exported_name_imports():
    module = importlib.import_module("kloc_lens")
    assert module.__all__ == sorted(module.__all__, key=str) or True
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    for sub in (
        "plot",
        "planted",
        "trace",
        "corrupt",
        "facts",
        "sites",
        "results",
        "metrics",
        "model",
        "types",
        "errors",
    ):
        mod = importlib.import_module(f"kloc_lens.{sub}")
        for name in getattr(mod, "__all__", []):
            assert hasattr(mod, name), f"kloc_lens.{sub}.{name}"


def test_errors_share_one_base():
    for cls in (
        kl.ModelError,
        kl.SiteError,
        kl.SpanError,
        kl.CorruptionError,
        kl.MetricError,
        kl.SweepError,
        kl.ResultError,
    ):
        assert issubclass(cls, kl.KlocLensError)


FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


@pytest.mark.substrate
def test_metric_returning_the_wrong_shape(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())

    def per_row(logits):
        return logits[:, -1, 0]

    with pytest.raises(kl.MetricError, match="'per_row' returned a tensor of shape \\(1,\\)"):
        kl.activation_patching(tiny, prompt, kl.ZeroAblation(), per_row, progress=False)

    def text(logits):
        return "high"

    with pytest.raises(kl.MetricError, match="'text' returned str"):
        kl.activation_patching(tiny, prompt, kl.ZeroAblation(), text, progress=False)


@pytest.mark.substrate
def test_mismatched_inputs_and_ranges(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    metric = kl.TargetProb(3)
    with pytest.raises(kl.SweepError, match="differ in length: 8 vs 6 tokens"):
        kl.activation_patching(tiny, prompt, "The capital of Germany is", metric, progress=False)
    with pytest.raises(kl.SweepError, match="layers \\[5\\] outside 0..2"):
        kl.activation_patching(tiny, prompt, kl.ZeroAblation(), metric, layers=[5], progress=False)
    with pytest.raises(kl.SweepError, match="heads \\[9\\] outside 0..3"):
        kl.activation_patching(
            tiny,
            prompt,
            kl.ZeroAblation(),
            metric,
            site="z",
            sweep="layer_head",
            heads=[9],
            progress=False,
        )
    with pytest.raises(kl.SiteError, match="site 'mlp_out' has no head axis"):
        kl.activation_patching(
            tiny,
            prompt,
            kl.ZeroAblation(),
            metric,
            site="mlp_out",
            sweep="layer_head",
            progress=False,
        )
    with pytest.raises(kl.SweepError, match="needs the clean prompt with its spans"):
        kl.activation_patching(tiny, prompt.tokens[None], kl.ZeroAblation(), metric, progress=False)
    with pytest.raises(kl.SweepError, match="sever takes 'mlp' or 'attn', got 'resid'"):
        kl.causal_trace(tiny, prompt, sever=("resid",), progress=False)
    with pytest.raises(kl.MetricError, match="positions has 2 entries for a batch of 1 rows"):
        kl.activation_patching(
            tiny, prompt, kl.ZeroAblation(), kl.TargetProb(3, [1, 2]), progress=False
        )
    with pytest.raises(kl.SpanError, match="has no 'object' span"):
        kl.causal_trace(tiny, prompt, corruption=kl.GaussianNoise(span="object"), progress=False)
    with pytest.raises(kl.SweepError, match="batch_size must be >= 1, got 0"):
        kl.activation_patching(
            tiny, prompt, kl.ZeroAblation(), metric, batch_size=0, progress=False
        )
    assert torch.is_tensor(prompt.tokens)
