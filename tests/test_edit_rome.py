"""ROME on the planted model: the edit flips the fact where it was planted, and nothing else."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import (
    ContextSpec,
    EditRequest,
    KeyToken,
    Projection,
    RankOneEdit,
    RomeEditor,
    planted_corpus,
    second_moment,
)
from kloc_lens.facts import Fact, Perspective

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

SMALL = ContextSpec(count=3, lengths=(4,))
"""Fewer contexts for the tests that do not measure generalisation."""


def _fact(planted, index: int) -> Fact:
    _, facts = planted
    return Fact(facts.subjects[index], "home", facts.objects[index])


def _p_top(model, text: str) -> tuple[str, float]:
    with torch.no_grad():
        probs = model(text)[0, -1].softmax(-1)
    top = int(probs.argmax())
    return model.to_string(top), float(probs[top])


@pytest.fixture(scope="module")
def stats(planted):
    model, facts = planted
    return second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)


@pytest.fixture(scope="module")
def edited(planted, stats) -> RankOneEdit:
    """Ana Bel: Paris -> Quito (a spare object), with the default contexts and ROME's values."""
    model, facts = planted
    editor = RomeEditor(layer=facts.mlp_layer, stats=stats)
    return editor.compute(model, EditRequest(_fact(planted, 0), facts.spare_objects[0]))


def test_the_edit_flips_the_fact_and_nothing_else(planted, edited):
    model, facts = planted
    before = [_p_top(model, facts.prompt(i)) for i in range(len(facts.subjects))]
    assert [word for word, _ in before] == list(facts.objects)
    with edited.applied(model):
        after = [_p_top(model, facts.prompt(i)) for i in range(len(facts.subjects))]
    assert after[0][0] == facts.spare_objects[0]
    assert after[0][1] > 0.9
    for index in range(1, len(facts.subjects)):
        assert after[index][0] == facts.objects[index]
        assert after[index][1] == pytest.approx(before[index][1], abs=1e-3)
    assert [_p_top(model, facts.prompt(i)) for i in range(len(facts.subjects))] == before


def test_the_edit_records_how_it_was_obtained(planted, edited, stats):
    model, facts = planted
    assert edited.layer == facts.mlp_layer
    assert edited.projection is Projection.W_OUT
    assert edited.key_token is KeyToken.SUBJECT_LAST
    assert edited.perspective is Perspective.ENTITY
    assert edited.stats_used == stats.describe()
    assert not edited.used_identity
    assert edited.contexts[0] == ""
    assert len(edited.contexts) == 21
    assert edited.fit.hook == f"blocks.{facts.mlp_layer}.hook_mlp_out"
    assert len(edited.fit.losses) == edited.fit.updates + 1
    assert edited.fit.losses[-1] < 0.2 * edited.fit.losses[0]
    assert edited.key.shape == (model.cfg.d_mlp,)
    assert edited.value.shape == (model.cfg.d_model,)


def test_hook_form_equals_weight_form(planted, edited):
    model, facts = planted
    texts = [facts.prompt(i) for i in range(3)] + [f"{facts.subjects[0]} lives in"]
    tokens = [model.to_tokens(text) for text in texts]
    with torch.no_grad(), edited.applied(model):
        hooked = [model(t) for t in tokens]
    with torch.no_grad(), edited.commit(model):
        committed = [model(t) for t in tokens]
    for a, b in zip(hooked, committed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_committed_update_is_rank_one_and_maps_the_key_to_the_value(planted, edited):
    model, facts = planted
    weight = model.blocks[facts.mlp_layer].mlp.W_out
    before = weight.detach().clone()
    handle = edited.commit(model)
    try:
        after = model.blocks[facts.mlp_layer].mlp.W_out.detach().clone()
    finally:
        handle.restore()
    change = (after - before).double()
    singular = torch.linalg.svdvals(change)
    assert singular[0] > 1.0
    assert singular[1] < 1e-6 * singular[0]
    mapped = edited.key.double() @ after.double()
    torch.testing.assert_close(mapped, edited.value.double(), atol=1e-4, rtol=0)
    assert torch.equal(model.blocks[facts.mlp_layer].mlp.W_out, before)
    assert handle.restored


def test_restore_is_bit_identical_also_after_an_exception(planted, edited):
    model, _ = planted
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside the edit"), edited.commit(model):
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])]
        assert len(changed) == 1
        raise RuntimeError("inside the edit")
    for name, param in model.named_parameters():
        assert torch.equal(param, snapshot[name]), name
    hook_names = [edited.projection.key_hook(1), edited.projection.output_hook(1)]
    with pytest.raises(RuntimeError, match="inside the hooks"), edited.applied(model):
        assert all(model.hook_dict[name].fwd_hooks for name in hook_names)
        raise RuntimeError("inside the hooks")
    assert not any(model.hook_dict[name].fwd_hooks for name in hook_names)


def test_computing_an_edit_leaves_the_model_untouched(planted):
    model, facts = planted
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = None
    editor = RomeEditor(layer=facts.mlp_layer, contexts=SMALL)
    edit = editor.compute(model, EditRequest(_fact(planted, 1), facts.spare_objects[1]))
    assert edit.fit.updates > 0
    for name, param in model.named_parameters():
        assert param.grad is None, name
        assert param.requires_grad == flags[name], name
        assert torch.equal(param, snapshot[name]), name
    assert not any(point.fwd_hooks for point in model.hook_dict.values())


def test_the_key_is_the_mean_hidden_activation_over_the_contexts(planted, edited):
    model, facts = planted
    subject_last = facts.subjects[0].split()[-1]
    activations = []
    for prefix in edited.contexts:
        text = prefix + facts.prompt(0)
        _, cache = model.run_with_cache(text)
        str_tokens = model.to_str_tokens(text)
        position = len(str_tokens) - 1 - str_tokens[::-1].index(subject_last)
        activations.append(cache[f"blocks.{facts.mlp_layer}.mlp.hook_post"][0, position])
    torch.testing.assert_close(edited.key, torch.stack(activations).mean(0), atol=1e-5, rtol=0)


def test_statistics_make_the_edit_specific(planted, stats):
    """Without statistics (u = k*) the update leaks into the other subjects' facts, whose keys
    overlap the edited one; with C^-1 it does not."""
    model, facts = planted
    request = EditRequest(_fact(planted, 0), facts.spare_objects[0])
    leaks = {}
    for label, source in (("stats", stats), ("identity", None)):
        edit = RomeEditor(layer=facts.mlp_layer, stats=source, contexts=SMALL).compute(
            model, request
        )
        assert edit.used_identity == (source is None)
        with edit.applied(model):
            after = [_p_top(model, facts.prompt(i)) for i in range(len(facts.subjects))]
        assert after[0][0] == facts.spare_objects[0]
        leaks[label] = max(1.0 - p for _, p in after[1:])
    assert leaks["stats"] < 1e-3
    assert leaks["identity"] > 10 * leaks["stats"]


def test_attention_output_edit_at_the_mover_head(planted):
    """The planted head copies the object at the last token: editing W_O there with the key at
    the last token rewrites the fact too (and keys of other subjects differ in the object)."""
    model, facts = planted
    attn_stats = second_moment(
        model, facts.attn_layer, planted_corpus(facts), projection="W_O", progress=False
    )
    editor = RomeEditor(
        layer=facts.attn_layer, projection="W_O", key_token="last", stats=attn_stats, contexts=SMALL
    )
    edit = editor.compute(model, EditRequest(_fact(planted, 0), facts.spare_objects[0]))
    assert edit.key.shape == (model.cfg.n_heads * model.cfg.d_head,)
    texts = [facts.prompt(i) for i in range(len(facts.subjects))]
    with torch.no_grad(), edit.applied(model):
        hooked = [model(text) for text in texts]
    with torch.no_grad(), edit.commit(model):
        committed = [model(text) for text in texts]
        weight = model.blocks[facts.attn_layer].attn.W_O.detach().clone()
    for a, b in zip(hooked, committed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert model.to_string(hooked[0][0, -1].argmax()) == facts.spare_objects[0]
    for index in range(1, len(facts.subjects)):
        assert model.to_string(hooked[index][0, -1].argmax()) == facts.objects[index]
    flat = weight.reshape(-1, model.cfg.d_model).double()
    torch.testing.assert_close(edit.key.double() @ flat, edit.value.double(), atol=1e-4, rtol=0)


def test_relation_perspective_edit_uses_the_add_and_remove_prompts(planted):
    model, facts = planted
    request = EditRequest(
        _fact(planted, 0), facts.spare_objects[0], perspective="relation", none_target="a"
    )
    objectives = request.objectives()
    assert [o.prompt.text for o in objectives] == [
        f"The relation between {facts.subjects[0]} and {facts.spare_objects[0]} is",
        f"The relation between {facts.subjects[0]} and {facts.objects[0]} is",
    ]
    assert [(o.increase, o.decrease) for o in objectives] == [("home", None), ("a", "home")]
    edit = RomeEditor(layer=facts.mlp_layer, contexts=SMALL).compute(model, request)
    assert edit.perspective is Perspective.RELATION
    assert edit.fit.losses[-1] < edit.fit.losses[0]
    # both relation prompts share the prefix up to the subject: one key for add and remove
    assert edit.key.shape == (model.cfg.d_mlp,)
