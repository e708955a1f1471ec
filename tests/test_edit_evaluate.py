"""Evaluation from both perspectives, the transfer matrix, and their figures."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from kloc_lens.edit import (
    ContextSpec,
    EditError,
    EditMetric,
    EditRequest,
    MemitEditor,
    RomeEditor,
    evaluate_edit,
    evaluate_editor,
    planted_corpus,
    second_moment,
)
from kloc_lens.edit.plot import loss_curves, metric_bars, transfer_heatmap
from kloc_lens.facts import Fact, Perspective

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

SMALL = ContextSpec(count=3, lengths=(4,))


def _facts(planted) -> list[Fact]:
    _, facts = planted
    return [
        Fact(
            subject,
            "home",
            obj,
            entity_paraphrases=("{subject} lives in", "{subject} was born in"),
            relation_paraphrases=("The relation between {object} and {subject} is",),
        )
        for subject, obj in facts.pairs()
    ]


@pytest.fixture(scope="module")
def setup(planted):
    model, facts = planted
    items = _facts(planted)
    spare = facts.spare_objects
    requests = [
        EditRequest(items[0], spare[0], neighbors=(items[1], items[3]), none_target="a"),
        EditRequest(items[2], spare[1], neighbors=(items[4],), none_target="a"),
        EditRequest(items[1], spare[0], perspective="relation", none_target="a"),
    ]
    stats = second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)
    editor = RomeEditor(layer=facts.mlp_layer, stats=stats, contexts=SMALL)
    return model, requests, editor, evaluate_editor(model, requests, editor, progress=False)


def test_entity_edits_score_on_the_entity_side(setup):
    _, _, _, result = setup
    assert len(result) == 3
    for fact in result.facts[:2]:
        assert fact.edited is Perspective.ENTITY
        efficacy = fact.score(EditMetric.EFFICACY)
        assert (efficacy.n_prompts, efficacy.pre, efficacy.post) == (1, 0.0, 1.0)
        assert efficacy.pre_margin < -0.9
        assert efficacy.post_margin > 0.9
        paraphrase = fact.score("paraphrase")
        assert (paraphrase.n_prompts, paraphrase.pre, paraphrase.post) == (2, 0.0, 1.0)
        neighborhood = fact.score("neighborhood")
        assert neighborhood.pre == neighborhood.post == 1.0
        assert neighborhood.post_margin == pytest.approx(neighborhood.pre_margin, abs=1e-3)
    assert result.facts[0].score("neighborhood").n_prompts == 2
    assert result.facts[2].score("neighborhood").n_prompts == 0
    assert math.isnan(result.facts[2].score("neighborhood").post)


def test_margins_are_probability_differences(setup, planted):
    model, requests, editor, result = setup
    _, facts = planted
    edit = editor.compute(model, requests[0])
    new, old = (
        model.to_single_token(facts.spare_objects[0]),
        model.to_single_token(facts.objects[0]),
    )
    with torch.no_grad():
        before = model(facts.prompt(0))[0, -1].softmax(-1)
        with edit.applied(model):
            after = model(facts.prompt(0))[0, -1].softmax(-1)
    score = result.facts[0].score("efficacy")
    assert score.pre_margin == pytest.approx(float(before[new] - before[old]), abs=1e-5)
    assert score.post_margin == pytest.approx(float(after[new] - after[old]), abs=1e-5)


def test_relation_side_of_the_planted_model_is_a_tie(setup):
    """The planted unembedding gives every non-object word the same logit, so the relation word
    never beats the "None" stand-in, before or after any edit."""
    _, _, _, result = setup
    for fact in result.facts:
        for metric in ("relation_add", "relation_paraphrase", "relation_remove"):
            score = fact.score(metric)
            assert score.n_prompts == 1
            assert score.pre == score.post == 0.0
            assert score.pre_margin == pytest.approx(0.0, abs=1e-6)
            assert score.post_margin == pytest.approx(0.0, abs=1e-6)


def test_dataframe_summary_and_transfer_matrix(setup):
    _, _, _, result = setup
    frame = result.to_dataframe()
    assert len(frame) == 3 * len(EditMetric)
    assert list(frame.columns) == [
        "fact",
        "subject",
        "relation",
        "old_object",
        "new_object",
        "edited",
        "metric",
        "evaluated",
        "n_prompts",
        "pre_generated",
        "post_generated",
        "pre",
        "post",
        "pre_margin",
        "post_margin",
    ]
    summary = result.summary()
    row = summary[(summary["edited"] == "entity") & (summary["metric"] == "efficacy")].iloc[0]
    assert (row["n_facts"], row["pre"], row["post"], row["change"]) == (2, 0.0, 1.0, 1.0)
    neighborhood = summary[summary["metric"] == "neighborhood"]
    assert list(neighborhood["n_facts"]) == [2]
    assert list(neighborhood["n_prompts"]) == [3]

    matrix = result.transfer()
    assert matrix.perspectives == (Perspective.ENTITY, Perspective.RELATION)
    assert matrix.metrics == (EditMetric.EFFICACY, EditMetric.RELATION_ADD)
    assert matrix.counts.tolist() == [2, 1]
    assert matrix.pre[0].tolist() == [0.0, 0.0]
    assert matrix.post[0].tolist() == [1.0, 0.0]
    relation_efficacy = result.facts[2].score("efficacy")
    assert float(matrix.post[1, 0]) == relation_efficacy.post
    cells = matrix.to_dataframe()
    assert len(cells) == 4
    assert list(cells["n_facts"]) == [2, 2, 1, 1]


def test_figures(setup):
    _, _, _, result = setup
    matrix = result.transfer()
    fig = transfer_heatmap(matrix)
    assert isinstance(fig, go.Figure)
    assert [list(row) for row in fig.data[0].z] == matrix.post.tolist()
    assert list(fig.data[0].y) == ["entity edit", "relation edit"]
    assert "n=2" in fig.data[0].text[0][0]
    change = transfer_heatmap(matrix, value="change")
    assert [list(row) for row in change.data[0].z] == matrix.change.tolist()
    bars = metric_bars(result)
    assert len(bars.data) == 4
    assert {trace.name for trace in bars.data} == {"before", "after"}
    entity_after = next(t for t in bars.data if t.name == "after" and t.xaxis == "x")
    assert dict(zip(entity_after.x, entity_after.y, strict=True))["efficacy"] == 1.0


def test_evaluate_a_multi_fact_edit(setup, planted):
    model, requests, _, _ = setup
    _, facts = planted
    stats = second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)
    editor = MemitEditor(
        layers=(facts.mlp_layer,), stats=stats, covariance_weight=1.0, contexts=SMALL
    )
    edit = editor.compute(model, requests[:2])
    result = evaluate_edit(model, edit, editor=editor.name)
    assert result.editor == "MEMIT W_out L1"
    assert [f.score("efficacy").post for f in result.facts] == [1.0, 1.0]
    assert [f.score("neighborhood").post for f in result.facts] == [1.0, 1.0]
    curves = loss_curves(edit.fits, labels=["Ana Bel", "Dax Eli"])
    assert [trace.name for trace in curves.data] == ["Ana Bel", "Dax Eli"]
    assert list(curves.data[0].y) == list(edit.fits[0].losses)


def _same_scores(batched, alone, what):
    assert (batched.subject, batched.edited) == (alone.subject, alone.edited), what
    for b, a in zip(batched.scores, alone.scores, strict=True):
        assert (b.metric, b.n_prompts) == (a.metric, a.n_prompts), what
        for field in ("pre", "post", "pre_generated", "post_generated"):
            x, y = getattr(b, field), getattr(a, field)
            assert (math.isnan(x) and math.isnan(y)) or x == y, (what, b.metric, field)
        for field in ("pre_margin", "post_margin"):
            x, y = getattr(b, field), getattr(a, field)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-5)


def test_edits_scored_together_equal_each_scored_alone(setup):
    from kloc_lens.edit import evaluate_edits

    model, requests, editor, _ = setup
    edits = [editor.compute(model, r) for r in requests]
    together = evaluate_edits(model, edits, requests)
    for request, edit, batched in zip(requests, edits, together.facts, strict=True):
        _same_scores(batched, evaluate_edit(model, edit, request).facts[0], request.fact.subject)
    with pytest.raises(EditError, match="one request per edit"):
        evaluate_edits(model, edits, requests[:2])


def test_edits_scored_together_on_factworld_equal_each_alone():
    """On factworld: both perspectives, neighbours and the subject's other facts (relation
    specificity), eight edits in shared batches."""
    from kloc_lens.edit import evaluate_edits
    from kloc_lens.factworld import NONE_ANSWER, load_factworld, rome_editor

    model, world = load_factworld()
    editor = rome_editor(model, world, contexts=ContextSpec(count=1))
    facts = [f for f in world.facts if f.new_object][:8:2]
    requests = [
        EditRequest(
            f,
            perspective=p,
            none_target=NONE_ANSWER,
            related=tuple(g for g in world.facts if g.subject == f.subject and g is not f),
            neighbors=tuple(
                g for g in world.facts if g.object == f.object and g.subject != f.subject
            )[:3],
        )
        for f in facts
        for p in ("entity", "relation")
    ]
    edits = editor.compute_each(model, requests)
    together = evaluate_edits(model, edits, requests)
    for request, edit, batched in zip(requests, edits, together.facts, strict=True):
        alone = evaluate_edit(model, edit, request).facts[0]
        _same_scores(batched, alone, (request.fact.subject, request.edited))
        assert batched.score("same_subject").n_prompts > 0
