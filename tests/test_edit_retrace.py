"""Tracing a fact again after its edit (issue 14, item 7)."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.corrupt import GaussianNoise
from kloc_lens.edit import EditError, EditRequest, RomeEditor, planted_corpus, second_moment
from kloc_lens.edit.retrace import retrace_edit
from kloc_lens.facts import Fact
from kloc_lens.trace import causal_trace

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

NOISE = GaussianNoise(scale=1.0, samples=3, seed=0)


@pytest.fixture(scope="module")
def edited(planted):
    model, facts = planted
    fact = Fact(facts.subjects[0], "home", facts.objects[0], entity_template=facts.template)
    stats = second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)
    editor = RomeEditor(layer=facts.mlp_layer, stats=stats)
    request = EditRequest(fact, facts.spare_objects[0], none_target="a")
    return model, facts, request, editor.compute(model, request), editor


def test_the_planted_site_stays_where_the_edit_wrote(edited):
    """The planted fact lives in the MLP of one layer at the subject's last token; ROME writes
    the new object there, so the edited model's new answer is carried at the same site."""
    model, facts, request, edit, _ = edited
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    again = retrace_edit(model, edit, request, corruption=NOISE)
    assert again.peak_layer("before") == facts.mlp_layer
    assert again.peak_layer("after") == facts.mlp_layer and not again.moved
    assert again.after.get("mlp").target == request.target
    assert again.after.clean_score > 0.5  # the edited model answers the new object
    # unedited, the new object has no such site: its clean probability is small
    unedited = causal_trace(
        model, request.entity_prompt(), target=request.target, corruption=NOISE, progress=False
    )
    assert unedited.clean_score < 0.1 < again.after.clean_score
    # the committed edit was restored bit for bit
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
    # the after-trace equals a trace under the edit applied as hooks (a different path)
    with edit.applied(model):
        by_hooks = causal_trace(
            model, request.entity_prompt(), target=request.target, corruption=NOISE, progress=False
        )
    for kind in ("resid", "mlp", "attn"):
        torch.testing.assert_close(again.after.get(kind).values, by_hooks.get(kind).values)


def test_relation_edits_are_traced_on_the_relation_prompts(edited):
    model, _, request, _, editor = edited
    relation = EditRequest(request.fact, request.target, perspective="relation", none_target="a")
    edit = editor.compute(model, relation)
    again = retrace_edit(model, edit, relation, corruption=NOISE, kinds=("mlp",))
    before, after = again.before.get("mlp"), again.after.get("mlp")
    assert before.target == after.target == "home"
    assert request.fact.object in "".join(before.str_tokens)
    assert request.target in "".join(after.str_tokens)
    assert len(again.subject_last_effects("after")) == len(after.layers)


def test_bad_arguments_are_named(edited):
    model, _, request, edit, _ = edited
    again = retrace_edit(model, edit, request, corruption=NOISE, kinds=("mlp",))
    with pytest.raises(EditError, match="'before' or 'after'"):
        again.peak_layer("during")
