"""MEMIT: several facts at once, spread over layers, behind the same interface as ROME."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import (
    ContextSpec,
    EditError,
    EditRequest,
    MemitEditor,
    MultiLayerEdit,
    ValueSpec,
    planted_corpus,
    second_moment,
)
from kloc_lens.edit.keys import generate_contexts, key_rows, mean_at_keys
from kloc_lens.facts import Fact

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]


SMALL = ContextSpec(count=3, lengths=(4,))


def _top(model, text: str) -> tuple[str, float]:
    with torch.no_grad():
        probs = model(text)[0, -1].softmax(-1)
    index = int(probs.argmax())
    return model.to_string(index), float(probs[index])


@pytest.fixture(scope="module")
def two_facts(planted) -> tuple[MultiLayerEdit, list[EditRequest]]:
    model, facts = planted
    stats = second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)
    requests = [
        EditRequest(Fact(facts.subjects[0], "home", facts.objects[0]), facts.spare_objects[0]),
        EditRequest(Fact(facts.subjects[2], "home", facts.objects[2]), facts.spare_objects[1]),
    ]
    editor = MemitEditor(
        layers=(facts.mlp_layer,), stats=stats, covariance_weight=1.0, contexts=SMALL
    )
    return editor.compute(model, requests), requests


def test_two_facts_flip_at_once_and_the_others_stay(planted, two_facts):
    model, facts = planted
    edit, _ = two_facts
    before = [_top(model, facts.prompt(i)) for i in range(len(facts.subjects))]
    with edit.applied(model):
        after = [_top(model, facts.prompt(i)) for i in range(len(facts.subjects))]
    assert after[0][0] == facts.spare_objects[0]
    assert after[2][0] == facts.spare_objects[1]
    for index in (1, 3, 4, 5):
        assert after[index][0] == facts.objects[index]
        assert after[index][1] == pytest.approx(before[index][1], abs=1e-3)


def test_one_update_per_layer_of_rank_up_to_the_facts(planted, two_facts):
    model, facts = planted
    edit, requests = two_facts
    assert [u.layer for u in edit.updates] == [facts.mlp_layer]
    assert edit.updates[0].rank == len(requests)
    assert edit.keys.shape == (1, 2, model.cfg.d_mlp)
    assert edit.targets.shape == (2, model.cfg.d_model)
    assert edit.target_layer == facts.mlp_layer
    assert len(edit.fits) == 2
    assert edit.stats_used[0].startswith("E[kk^T] of W_out at layer 1")
    singular = torch.linalg.svdvals(edit.updates[0].delta().double())
    assert singular[1] > 1e-3 * singular[0]
    assert singular[2] < 1e-6 * singular[0]
    tokens = model.to_tokens(facts.prompt(0))
    with torch.no_grad(), edit.applied(model):
        hooked = model(tokens)
    with torch.no_grad(), edit.commit(model):
        committed = model(tokens)
    torch.testing.assert_close(hooked, committed, atol=1e-5, rtol=0)


def test_spread_over_layers_reaches_the_targets(tiny):
    """With λ = 0 every layer solves its share exactly, so the residual stream after the last
    edited layer, averaged over the contexts at the key token, lands on the targets."""
    fact = Fact("Danielle Darrieux", "mother tongue", "French")
    requests = [
        EditRequest(fact, "English"),
        EditRequest(Fact("Edwin Hubble", "field", "astronomy"), "piano"),
    ]
    value = ValueSpec(steps=5, weight_decay=0.0, clamp=100.0)
    editor = MemitEditor(layers=(0, 1), covariance_weight=0.0, value=value, contexts=SMALL)
    snapshot = {name: p.detach().clone() for name, p in tiny.named_parameters()}
    edit = editor.compute(tiny, requests)
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name
        assert param.grad is None
    assert [u.layer for u in edit.updates] == [0, 1]
    assert edit.target_layer == 1
    contexts = generate_contexts(tiny, SMALL)
    assert contexts == edit.contexts
    groups = [[o.prompt for o in r.objectives()] for r in requests]
    rows = key_rows(tiny, groups, contexts=contexts)
    before = mean_at_keys(tiny, rows, "blocks.1.hook_resid_post", layer=1)
    with edit.applied(tiny):
        reached = mean_at_keys(tiny, rows, "blocks.1.hook_resid_post", layer=1)
    assert (edit.targets - before).norm() > 1.0
    torch.testing.assert_close(reached, edit.targets, atol=1e-4, rtol=1e-4)
    tokens = tiny.to_tokens(fact.entity_prompt().text)
    with torch.no_grad(), edit.applied(tiny):
        hooked = tiny(tokens)
    with torch.no_grad(), edit.commit(tiny):
        committed = tiny(tokens)
    torch.testing.assert_close(hooked, committed, atol=1e-5, rtol=0)


def test_memit_refuses_what_it_cannot_do(planted, tiny):
    model, facts = planted
    request = EditRequest(Fact(facts.subjects[0], "home", facts.objects[0]), "Quito")
    stats = second_moment(model, 1, planted_corpus(facts, n_texts=16), progress=False)
    with pytest.raises(EditError, match=r"statistics given for layers \[1\] but not .* \[0\]"):
        MemitEditor(layers=(0, 1), stats=stats, contexts=SMALL).compute(model, request)
    with pytest.raises(EditError, match="keys of facts \\[0\\] are zero at layer 2"):
        MemitEditor(layers=(1, 2), contexts=SMALL, covariance_weight=1.0).compute(model, request)
    with pytest.raises(EditError, match="no edit requests"):
        MemitEditor(layers=(1,)).compute(model, [])
    with pytest.raises(EditError, match="does not reach the predictions"):
        tiny_request = EditRequest(Fact("Danielle Darrieux", "mother tongue", "French"), "English")
        MemitEditor(layers=(2,), contexts=SMALL).compute(tiny, tiny_request)
