"""Bad input to the editors: a clear error that names the input, and an untouched model."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import (
    ContextSpec,
    EditError,
    EditRequest,
    LowRankUpdate,
    MemitEditor,
    Projection,
    RomeEditor,
    ValueSpec,
    evaluate_edit,
    second_moment,
)
from kloc_lens.edit.stats import weights_fingerprint
from kloc_lens.edit.value import kl_prompts
from kloc_lens.errors import KlocLensError, ModelError, SpanError
from kloc_lens.facts import Fact

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

SMALL = ContextSpec(count=2, lengths=(3,))


@pytest.fixture(scope="module")
def fact(planted) -> Fact:
    _, facts = planted
    return Fact(facts.subjects[0], "home", facts.objects[0])


def test_errors_belong_to_the_family():
    assert issubclass(EditError, KlocLensError)


def test_a_target_that_tokenizes_to_nothing(planted, fact):
    model, facts = planted
    with pytest.raises(EditError, match="new object ' ' for 'Ana Bel' is empty"):
        EditRequest(fact, " ")
    with pytest.raises(EditError, match="has no new object"):
        EditRequest(fact)
    with pytest.raises(EditError, match="is the old object"):
        EditRequest(fact, "Paris")
    relation = EditRequest(fact, "Quito", perspective="relation", none_target="")
    with pytest.raises(EditError, match="increase target '' is empty"):
        RomeEditor(layer=facts.mlp_layer, contexts=SMALL).compute(model, relation)
    unknown = EditRequest(fact, "Atlantis")
    with pytest.raises(EditError, match="'Atlantis' is not in the vocabulary"):
        RomeEditor(layer=facts.mlp_layer, contexts=SMALL).compute(model, unknown)


def test_a_subject_absent_from_the_prompt(planted, fact):
    model, facts = planted
    request = EditRequest(fact, "Quito", prompt=facts.prompt(3))
    with pytest.raises(SpanError, match="subject 'Ana Bel' does not occur in prompt"):
        RomeEditor(layer=facts.mlp_layer, contexts=SMALL).compute(model, request)
    relation = EditRequest(fact, "Quito", perspective="relation")
    editor = RomeEditor(layer=facts.mlp_layer, key_token="relation_last", contexts=SMALL)
    with pytest.raises(SpanError, match="has no 'relation' span"):
        editor.compute(model, relation)


def test_editor_settings_that_cannot_work(planted, fact):
    model, _ = planted
    request = EditRequest(fact, "Quito")
    with pytest.raises(EditError, match="layer 6 is outside 0..5"):
        RomeEditor(layer=6).compute(model, request)
    with pytest.raises(EditError, match="ROME edits one fact at a time, got 2"):
        RomeEditor(layer=1).compute(model, [request, request])
    with pytest.raises(EditError, match="key of 'Ana Bel' is zero at layer 0"):
        RomeEditor(layer=0, contexts=SMALL).compute(model, request)
    with pytest.raises(EditError, match="ValueSpec.lr must be a finite number > 0, got 0.0"):
        ValueSpec(lr=0.0)
    with pytest.raises(EditError, match="count must be >= 0 and lengths >= 1"):
        ContextSpec(lengths=(0,))
    with pytest.raises(EditError, match="covariance_weight must be >= 0"):
        MemitEditor(layers=(1,), covariance_weight=-1.0).compute(model, request)
    model.train()
    try:
        with pytest.raises(ModelError, match="train mode"):
            RomeEditor(layer=1, contexts=SMALL).compute(model, request)
    finally:
        model.eval()


def test_an_edit_for_another_model(planted, fact, tiny):
    model, facts = planted
    edit = RomeEditor(layer=facts.mlp_layer, contexts=SMALL).compute(
        model, EditRequest(fact, "Quito")
    )
    with pytest.raises(EditError, match="computed on model 'kloc-planted"):
        evaluate_edit(tiny, edit)
    with pytest.raises(EditError, match="computed on model 'kloc-planted"), edit.applied(tiny):
        pass
    with pytest.raises(EditError, match="'None' is not in the vocabulary"):
        evaluate_edit(model, edit)


def test_unknown_choices_name_the_options(planted, fact):
    with pytest.raises(EditError, match="perspective must be one of 'entity', 'relation'"):
        EditRequest(fact, "Quito", perspective="object")
    with pytest.raises(EditError, match="projection must be one of 'W_out', 'W_O', got 'W_in'"):
        RomeEditor(layer=1, projection="W_in")
    with pytest.raises(EditError, match="key_token must be one of 'subject_last'"):
        MemitEditor(layers=(1,), key_token="first")
    with pytest.raises(EditError, match="key_token must be one of 'subject_last'.*got 'subject'"):
        kl_prompts(EditRequest(fact, "Quito"), "subject")
    model, _ = planted
    with pytest.raises(EditError, match="projection must be one of 'W_out', 'W_O', got 'mlp'"):
        weights_fingerprint(model, 1, "mlp")
    with pytest.raises(EditError, match="projection must be one of 'W_out', 'W_O', got 'W_I'"):
        second_moment(model, 1, ["Ana Bel lives in Paris"], projection="W_I", progress=False)


def test_updates_are_checked_where_they_are_made():
    with pytest.raises(EditError, match="update of W_out at layer 1: left holds non-finite values"):
        LowRankUpdate(1, Projection.W_OUT, torch.full((4, 1), float("nan")), torch.zeros(1, 4))
    with pytest.raises(EditError, match="right holds non-finite values; the edit would turn"):
        LowRankUpdate(1, Projection.W_OUT, torch.zeros(4, 1), torch.full((1, 4), float("inf")))


def test_update_fields_of_the_wrong_type(unchecked):
    with pytest.raises(EditError, match="LowRankUpdate.projection must be one of 'W_out', 'W_O'"):
        LowRankUpdate(1, "W_in", torch.zeros(4, 1), torch.zeros(1, 4))  # type: ignore[arg-type]
    update = LowRankUpdate(1, "W_out", torch.zeros(4, 1), torch.zeros(1, 4))  # type: ignore[arg-type]
    assert update.projection is Projection.W_OUT
    with pytest.raises(EditError, match="LowRankUpdate.layer must be an integer, got 1.0"):
        LowRankUpdate(1.0, Projection.W_OUT, torch.zeros(4, 1), torch.zeros(1, 4))  # type: ignore[arg-type]
    with pytest.raises(EditError, match="update of W_out at layer 1: left must be a matrix, got"):
        LowRankUpdate(1, Projection.W_OUT, torch.zeros(4), torch.zeros(1, 4))
    with pytest.raises(EditError, match="left is \\(4, 2\\) and right \\(1, 4\\); their ranks"):
        LowRankUpdate(1, Projection.W_OUT, torch.zeros(4, 2), torch.zeros(1, 4))


def test_request_fields_of_the_wrong_type(fact, unchecked):
    with pytest.raises(EditError, match="EditRequest.fact must be a Fact, got str"):
        EditRequest("Ana Bel", "Quito")  # type: ignore[arg-type]
    with pytest.raises(EditError, match="new object must be a string, got int 3"):
        EditRequest(fact, 3)  # type: ignore[arg-type]
    with pytest.raises(EditError, match="none_target must be a string, got None"):
        EditRequest(fact, "Quito", none_target=None)  # type: ignore[arg-type]


def test_a_plain_prompt_finds_the_relation_as_a_whole_word():
    fact = Fact("Ana", "age", "12")
    request = EditRequest(fact, "13", prompt="The language of Ana is")
    assert "relation" not in request.entity_prompt().char_spans
    request = EditRequest(fact, "13", prompt="The age of Ana is")
    assert request.entity_prompt().char_spans["relation"] == (4, 7)
