"""The edit layer sweep against editing at each layer alone (evaluate_editor, one request at a
time), its guard against check_collapse, its best layers on a constructed table, its errors."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import (
    ContextSpec,
    EditError,
    EditLayerSweep,
    EditMetric,
    EditRequest,
    FactEvaluation,
    MetricScore,
    RomeEditor,
    edit_layer_sweep,
    evaluate_editor,
)
from kloc_lens.edit.guard import CollapseCheck, check_collapse
from kloc_lens.facts import Perspective


@pytest.fixture(scope="module")
def factworld():
    from kloc_lens.factworld import NONE_ANSWER, load_factworld

    model, world = load_factworld()
    facts = [f for f in world.facts if f.new_object][:3]
    requests = [
        EditRequest(facts[0], none_target=NONE_ANSWER),
        EditRequest(facts[1], none_target=NONE_ANSWER),
        EditRequest(facts[2], perspective="relation", none_target=NONE_ANSWER),
    ]
    return model, world, requests


def _editor(layer: int) -> RomeEditor:
    return RomeEditor(layer=layer, contexts=ContextSpec(count=1))


def test_sweep_equals_editing_at_each_layer_alone(factworld):
    model, world, requests = factworld
    texts = [t for t in list(world.corpus())[:12] if all(r.fact.subject not in t for r in requests)]
    prompts = [f.entity_prompt().text for f in world.facts[-30::10]]
    sweep = edit_layer_sweep(
        model, requests, _editor, layers=[1, 3], texts=texts[:3], prompts=prompts, progress=False
    )
    assert sweep.shape == (3, 2) and sweep.layers == (1, 3)
    for j, layer in enumerate(sweep.layers):
        alone = evaluate_editor(model, requests, _editor(layer), progress=False)
        for i, expected in enumerate(alone.facts):
            got = sweep.evaluations[i][j]
            assert (got.subject, got.edited) == (expected.subject, expected.edited)
            for g, e in zip(got.scores, expected.scores, strict=True):
                assert g.metric is e.metric and g.n_prompts == e.n_prompts
                assert g.pre == pytest.approx(e.pre, abs=1e-6, nan_ok=True)
                assert g.post_margin == pytest.approx(e.post_margin, abs=2e-3, nan_ok=True)
    assert sweep.collapse is not None
    edit = _editor(3).compute(model, requests[2])
    alone_check = check_collapse(model, edit, texts=texts[:3], prompts=prompts, n_tokens=8)
    got_check = sweep.collapse[2][1]
    assert got_check.update_ratio == pytest.approx(alone_check.update_ratio, rel=1e-3)
    assert got_check.loss_after == pytest.approx(alone_check.loss_after, abs=1e-3)
    frame = sweep.to_dataframe()
    assert len(frame) == 3 * 2 * len(EditMetric)
    assert set(frame["layer"]) == {1, 3} and not frame["disabling"].any()
    # every edit is scored on both perspectives (the relation edit's efficacy is a transfer)
    assert not sweep.post("efficacy").isnan().any()
    assert not sweep.margin("relation_add").isnan().any()


def _evaluation(margin: float) -> FactEvaluation:
    score = MetricScore(EditMetric.EFFICACY, 1, 0.0, float(margin > 0), -0.5, margin)
    return FactEvaluation("s", "r", "o", "n", Perspective.ENTITY, (score,))


def _check(disabling: bool) -> CollapseCheck:
    ratio = 100.0 if disabling else 0.5
    return CollapseCheck(ratio, 2.0, 2.0, 3.0, 3.0, ("update",) if disabling else ())


def test_best_layers_skip_disabling_edits_and_take_the_first_of_ties(factworld):
    _, _, requests = factworld
    margins = [[0.1, 0.6, 0.9], [0.2, 0.2, -0.1]]
    flags = [[False, False, True], [False, False, False]]
    sweep = EditLayerSweep(
        requests=tuple(requests[:2]),
        layers=(2, 3, 4),
        evaluations=tuple(tuple(_evaluation(m) for m in row) for row in margins),
        collapse=tuple(tuple(_check(f) for f in row) for row in flags),
        editors=("a", "b", "c"),
        model="m",
    )
    assert sweep.best_layers("efficacy") == [3, 2]
    assert torch.equal(sweep.disabling(), torch.tensor(flags))
    assert torch.equal(sweep.margin("efficacy"), torch.tensor(margins, dtype=torch.float64))
    with pytest.raises(EditError, match="metric='eficacy' is not a metric; use one of: efficacy"):
        sweep.post("eficacy")
    with pytest.raises(EditError, match="must be 2 rows of 3 layers"):
        EditLayerSweep(tuple(requests[:2]), (2, 3, 4), (), None, ("a", "b", "c"), "m")


def test_bad_sweeps_are_named_errors(factworld, unchecked):
    model, world, requests = factworld
    with pytest.raises(EditError, match="no requests"):
        edit_layer_sweep(model, [], _editor)
    with pytest.raises(EditError, match=r"requests\[0\] is a Fact"):
        edit_layer_sweep(model, [world.facts[0]], _editor)
    with pytest.raises(EditError, match=r"layers holds 6: use integers in \[0, 6\)"):
        edit_layer_sweep(model, requests, _editor, layers=[1, 6])
    with pytest.raises(EditError, match="layers holds 1.5"):
        edit_layer_sweep(model, requests, _editor, layers=[1.5])  # type: ignore[list-item]
    with pytest.raises(EditError, match="repeats a layer"):
        edit_layer_sweep(model, requests, _editor, layers=[1, 1])
    with pytest.raises(EditError, match="layers='early': use 'all'"):
        edit_layer_sweep(model, requests, _editor, layers="early")
    with pytest.raises(EditError, match="needs both texts and prompts"):
        edit_layer_sweep(model, requests, _editor, texts=["a b"])
