"""Results: DataFrames and lossless save/load."""

from __future__ import annotations

import jaxtyping
import pytest
import torch

import kloc_lens as kl

pytestmark = pytest.mark.substrate

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


@pytest.fixture(scope="module")
def prompt(tiny):
    return kl.tokenize(tiny, FACT.entity_prompt())


@pytest.fixture(scope="module")
def metric(tiny, prompt):
    return kl.TargetProb(kl.target_token_ids(tiny, prompt.prompt)[0])


def _same(a, b):
    assert type(a) is type(b)
    assert torch.equal(a.values, b.values)
    for name in a.__dataclass_fields__:
        if name != "values":
            assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize(
    ("site", "sweep", "cls"),
    [
        ("resid_pre", "layer_pos", kl.LayerPosResult),
        ("z", "layer_head", kl.LayerHeadResult),
        ("z", "layer_pos_head", kl.LayerPosHeadResult),
    ],
)
def test_save_load_roundtrip_and_dataframe(tiny, prompt, metric, tmp_path, site, sweep, cls):
    result = kl.activation_patching(
        tiny, prompt, kl.ZeroAblation(), metric, site=site, sweep=sweep, progress=False
    )
    assert isinstance(result, cls)
    back = kl.load_result(result.save(tmp_path / "r.safetensors"))
    _same(result, back)
    frame = result.to_dataframe()
    assert len(frame) == result.values.numel()
    assert list(frame.columns[: len(cls.dims)]) == list(cls.dims)
    first = frame.iloc[-1]
    index = tuple(int(first[d]) for d in cls.dims)
    local = tuple(
        getattr(result, {"layer": "layers", "pos": "positions", "head": "heads"}[d]).index(index[i])
        for i, d in enumerate(cls.dims)
    )
    assert first["value"] == pytest.approx(float(result.values[local]))
    assert first["effect"] == pytest.approx(float(result.effect[local]))
    if "pos" in cls.dims:
        assert first["token"] == prompt.str_tokens[int(first["pos"])]


def test_trace_set_roundtrip(tiny, prompt, tmp_path):
    traces = kl.causal_trace(
        tiny,
        prompt,
        corruption=kl.GaussianNoise(scale=0.4),
        window=3,
        sever=("mlp",),
        layers=[0, 2],
        positions=[5, 6, 7],
        progress=False,
    )
    back = kl.load_result(traces.save(tmp_path / "t.safetensors"))
    assert isinstance(back, kl.TraceSet) and len(back) == 4
    for a, b in zip(traces, back, strict=True):
        _same(a, b)
    frame = traces.to_dataframe()
    assert set(frame["kind"]) == {"resid", "mlp", "attn", "resid (mlp severed)"}
    assert len(frame) == 4 * 2 * 3
    assert traces.get("mlp").layers == (0, 2) and traces.get("mlp").positions == (5, 6, 7)


def test_normalized_and_effects(tiny, prompt, metric):
    result = kl.activation_patching(tiny, prompt, kl.ZeroAblation(), metric, progress=False)
    gap = result.clean_score - result.corrupted_score
    torch.testing.assert_close(result.normalized, (result.values - result.corrupted_score) / gap)
    # restoring every position at layer 0 of resid_pre... each single position's normalised
    # effect at layer 0 outside the subject is 0 (those embeddings were not ablated)
    assert result.normalized[0, :5].abs().max() < 1e-5


def test_load_errors(tmp_path):
    with pytest.raises(kl.ResultError, match="no result file"):
        kl.load_result(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(kl.ResultError, match="is not a safetensors result file"):
        kl.load_result(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(kl.ResultError, match="carries no kloc_lens result metadata"):
        kl.load_result(tmp_path / "plain.safetensors")


def test_results_are_frozen_and_shape_checked(tiny, prompt, metric):
    result = kl.activation_patching(tiny, prompt, kl.ZeroAblation(), metric, progress=False)
    with pytest.raises(AttributeError):
        result.site = "x"  # type: ignore[misc]
    # the jaxtyping hook checks annotated shapes at construction (tests run with it on)
    with pytest.raises(jaxtyping.TypeCheckError, match="values"):
        kl.LayerPosResult(**{**result.__dict__, "values": torch.zeros(2, 3, 4)})
