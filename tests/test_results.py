"""Results: DataFrames and lossless save/load."""

from __future__ import annotations

import dataclasses

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


def _layer_pos() -> kl.LayerPosResult:
    return kl.LayerPosResult(
        values=torch.tensor([[0.5, 0.9, 0.1]]),
        layers=(0,),
        positions=(0, 1, 2),
        heads=(),
        str_tokens=("The", " cat", " sat"),
        spans={"subject": (1, 2)},
        site="resid_pre",
        direction=kl.Direction.RESTORE,
        metric="p(target)",
        corruption="noise",
        clean_score=1.0,
        corrupted_score=0.5,
    )


def _rewrite(path, *, tensors=None, **meta):
    """Rewrite a saved result with some tensors or metadata entries replaced (None: dropped)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        old = dict(handle.metadata())
    old.update(meta)
    old = {k: v for k, v in old.items() if v is not None}
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=old)
    return path


def _labels(path):
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["labels"])


def test_saved_results_carry_their_format_and_version(tmp_path):
    from safetensors import safe_open

    path = _layer_pos().save(tmp_path / "r.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "kloc_lens.result/1" and meta["class"] == "LayerPosResult"
    _same(_layer_pos(), kl.LayerPosResult.load(path))
    # a file written before the tag existed (class and labels only) still reads
    _same(_layer_pos(), kl.load_result(_rewrite(path, format=None)))


def test_other_formats_newer_versions_and_truncated_files_are_refused(tmp_path):
    path = _layer_pos().save(tmp_path / "r.safetensors")
    with pytest.raises(kl.ResultError, match="format version 2, newer than this kloc_lens reads"):
        kl.load_result(_rewrite(path, format="kloc_lens.result/2"))
    with pytest.raises(kl.ResultError, match="is a 'kloc_lens.SecondMoment' file, not a"):
        kl.load_result(_rewrite(path, format="kloc_lens.SecondMoment/1"))
    with pytest.raises(kl.ResultError, match="format tag 'result', expected 'kloc_lens.result/"):
        kl.load_result(_rewrite(path, format="result"))
    with pytest.raises(kl.ResultError, match="format version 'one'; expected a positive integer"):
        kl.load_result(_rewrite(path, format="kloc_lens.result/one"))
    whole = _layer_pos().save(tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) - 5])
    with pytest.raises(kl.ResultError, match="damaged or truncated"):
        kl.load_result(tmp_path / "cut.safetensors")


def test_a_file_of_another_class_is_refused(tmp_path):
    path = _layer_pos().save(tmp_path / "r.safetensors")
    with pytest.raises(kl.ResultError, match="holds a LayerPosResult, not a TraceSet"):
        kl.TraceSet.load(path)
    with pytest.raises(kl.ResultError, match="holds a LayerPosResult, not a LayerHeadResult"):
        kl.LayerHeadResult.load(path)
    with pytest.raises(kl.ResultError, match="unknown result class 'Mystery'"):
        kl.load_result(_rewrite(path, **{"class": "Mystery"}))


def test_labels_must_be_json_of_the_right_types_and_match_the_tensor(tmp_path):
    import json

    path = _layer_pos().save(tmp_path / "r.safetensors")
    good = _labels(path)
    with pytest.raises(kl.ResultError, match="labels are not valid JSON"):
        kl.load_result(_rewrite(path, labels='{"layers": [0,'))
    cases = [
        ({"layers": ["0"]}, "label 'layers' is \\['0'\\], expected a list of integers"),
        ({"layers": [True]}, "expected a list of integers"),
        ({"direction": "sideways"}, "label 'direction' is 'sideways', expected one of 'restore'"),
        ({"clean_score": "1.0"}, "label 'clean_score' is '1.0', expected a number"),
        ({"site": 3}, "label 'site' is 3, expected a string"),
        ({"spans": {"subject": [1]}}, "label 'spans' .* expected an object of \\[start, end\\]"),
        ({"str_tokens": ["The", 2, " sat"]}, "expected a list of strings"),
        ({"positions": [0, 1]}, "values have shape \\(1, 3\\), but the labels name 1 layers, "),
        ({"positions": [0, 1, 7]}, "positions \\[7\\] lie outside the 3 tokens"),
    ]
    for change, match in cases:
        _rewrite(path, labels=json.dumps({**good, **change}))
        with pytest.raises(kl.ResultError, match=match):
            kl.load_result(path)
    _rewrite(path, labels=json.dumps({k: v for k, v in good.items() if k != "site"}))
    with pytest.raises(kl.ResultError, match="labels lack field 'site'"):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps([good]))
    with pytest.raises(kl.ResultError, match="labels are a list, expected an object"):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps(good), tensors={"other": torch.zeros(1, 3)})
    with pytest.raises(kl.ResultError, match="lacks the tensor 'values'"):
        kl.load_result(path)


def test_trace_and_aggregate_sets_check_their_labels(tmp_path):
    import json

    trace = kl.TraceResult(
        **{f.name: getattr(_layer_pos(), f.name) for f in dataclasses.fields(_layer_pos())},
        kind=kl.TraceKind.MLP,
        window=3,
        severed=None,
        target="Paris",
    )
    path = kl.TraceSet((trace, trace)).save(tmp_path / "t.safetensors")
    assert len(kl.TraceSet.load(path)) == 2
    good = _labels(path)
    _rewrite(path, labels=json.dumps([good[0], {**good[1], "window": 2.5}]))
    with pytest.raises(kl.ResultError, match="trace 1: label 'window' is 2.5, expected an integer"):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps([good[0], {**good[1], "kind": "neuron"}]))
    with pytest.raises(kl.ResultError, match="label 'kind' is 'neuron', expected one of 'resid'"):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps(good[0]))
    with pytest.raises(kl.ResultError, match="labels are a dict, expected a list"):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps([*good, good[0]]))
    with pytest.raises(kl.ResultError, match="lacks the tensor 'trace2'"):
        kl.load_result(path)

    aggregate = kl.results.AggregateTrace(
        mean=torch.zeros(2, 3),
        stderr=torch.zeros(2, 3),
        counts=(4, 4),
        bins=("subject", "last"),
        layers=(0, 1, 2),
        kind=kl.TraceKind.RESID,
        severed=None,
        window=1,
        span="subject",
        n_facts=4,
        clean_score=0.9,
        corrupted_score=0.1,
    )
    path = kl.results.AggregateSet((aggregate,)).save(tmp_path / "a.safetensors")
    assert kl.results.AggregateSet.load(path).traces[0].counts == (4, 4)
    good = _labels(path)
    _rewrite(path, labels=json.dumps([{**good[0], "layers": [0, 1]}]))
    with pytest.raises(kl.ResultError, match="mean has shape \\(2, 3\\), but the labels name 2 "):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps([{**good[0], "counts": [4]}]))
    with pytest.raises(kl.ResultError, match="1 counts for 2 bins"):
        kl.load_result(path)
    _rewrite(path, labels=json.dumps([{**good[0], "n_facts": "4"}]))
    with pytest.raises(kl.ResultError, match="label 'n_facts' is '4', expected an integer"):
        kl.load_result(path)
