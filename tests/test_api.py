"""The public namespace and bad-input errors shared by every sweep."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest
import torch

import kloc_lens as kl


def _modules() -> list[str]:
    """Every module of the package, ``__main__`` (which runs the CLI) aside."""
    names = [
        info.name
        for info in pkgutil.walk_packages(kl.__path__, "kloc_lens.")
        if not info.name.endswith("__main__")
    ]
    assert "kloc_lens.edit.apply" in names and "kloc_lens.facts" in names
    return names


@pytest.mark.parametrize("package", ["kloc_lens", "kloc_lens.edit"])
def test_the_public_namespace_is_curated(package):
    module = importlib.import_module(package)
    exported = module.__all__
    assert exported == sorted(set(exported)), "__all__ is sorted and has no duplicates"
    for name in exported:
        obj = getattr(module, name)  # raises AttributeError for a name that does not import
        assert obj.__module__.startswith("kloc_lens."), f"{package}.{name} is {obj!r}"
    star: dict[str, object] = {}
    exec(f"from {package} import *", star)
    assert sorted(set(star) - {"__builtins__"}) == exported
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(exported) - {"annotations"} == set(), "public names outside __all__"


@pytest.mark.parametrize("name", _modules())
def test_every_module_exports_what_it_defines(name):
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), f"{name}.{exported} is in __all__ but not defined"


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
    with pytest.raises(kl.SweepError, match="sever must be one of 'mlp', 'attn', got 'resid'"):
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
