"""Dataset loaders, the shipped real-world facts, filtering to known facts."""

from __future__ import annotations

import json

import pytest

import kloc_lens as kl
from kloc_lens.datasets import (
    DatasetError,
    filter_known,
    load_counterfact,
    load_relation_counterfact,
    real_world_facts,
)

RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "relation_id": "P103",
        "target_true": {"str": " French", "id": "Q150"},
        "target_new": {"str": "English", "id": "Q1860"},
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux's mother tongue is"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
}

RELATION_RECORD = {
    **RECORD,
    "requested_rewrite": {
        **RECORD["requested_rewrite"],
        "relation": {"strs": ["mother tongue", "native language"]},
        "add_rel_prompt": "The relation between {} and English is",
        "rm_rel_prompt": "The relation between {} and French is",
        "rel_prompts": ["How are Danielle Darrieux and French related? By"],
    },
}


def _write(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_counterfact(tmp_path):
    (fact,) = load_counterfact(_write(tmp_path, [RECORD]), relations={"P103": "mother tongue"})
    assert fact.subject == "Danielle Darrieux" and fact.object == "French"
    assert fact.new_object == "English" and fact.relation == "mother tongue"
    assert fact.entity_prompt().text == "The mother tongue of Danielle Darrieux is"
    assert fact.entity_prompt().char_spans["relation"] == (4, 17)
    assert [p.text for p in fact.prompts("entity")][1] == RECORD["paraphrase_prompts"][0]
    para = fact.prompts("entity")[1]
    assert para.text[slice(*para.char_spans["subject"])] == "Danielle Darrieux"
    assert fact.neighborhood_prompts == ("The mother tongue of Léon Blum is",)
    (plain,) = load_counterfact(_write(tmp_path, [RECORD]))
    assert plain.relation == "P103"


def test_relation_counterfact(tmp_path):
    (fact,) = load_relation_counterfact(_write(tmp_path, [RELATION_RECORD]))
    assert fact.relation == "mother tongue"
    assert fact.relation_prompt().text == "The relation between Danielle Darrieux and French is"
    assert fact.relation_prompt(object="English").text == RELATION_RECORD["requested_rewrite"][
        "add_rel_prompt"
    ].format("Danielle Darrieux")
    (para,) = fact.relation_paraphrases
    assert para == "How are {subject} and {object} related? By"


def test_braces_in_text_survive(tmp_path):
    record = json.loads(json.dumps(RECORD))
    record["requested_rewrite"]["prompt"] = "In {curly} text, the mother tongue of {} is"
    (fact,) = load_counterfact(_write(tmp_path, [record]))
    assert fact.entity_prompt().text == "In {curly} text, the mother tongue of Danielle Darrieux is"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("requested_rewrite", "subject"),
            None,
            "record 0 \\(case_id 7\\): field 'requested_rewrite.subject' is missing",
        ),
        (
            ("requested_rewrite", "target_true"),
            {"id": "Q1"},
            "field 'requested_rewrite.target_true.str' is missing",
        ),
        (("requested_rewrite", "prompt"), "No slot here", "has no '\\{\\}' subject slot"),
        (
            ("requested_rewrite", "subject"),
            3,
            "field 'requested_rewrite.subject' should be str, got int",
        ),
        (
            ("paraphrase_prompts",),
            ["Someone else speaks"],
            "paraphrase_prompts\\[0\\] 'Someone else speaks' has no",
        ),
    ],
)
def test_counterfact_errors_name_record_and_field(tmp_path, path, value, message):
    record = json.loads(json.dumps(RECORD))
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(DatasetError, match=message):
        load_counterfact(_write(tmp_path, [record]))


def test_relation_counterfact_errors(tmp_path):
    record = json.loads(json.dumps(RELATION_RECORD))
    record["requested_rewrite"]["rm_rel_prompt"] = "The relation between {} and Spanish is"
    with pytest.raises(DatasetError, match="rm_rel_prompt .* does not contain the object 'French'"):
        load_relation_counterfact(_write(tmp_path, [record]))
    del record["requested_rewrite"]["relation"]
    with pytest.raises(DatasetError, match="'requested_rewrite.relation.strs' is missing"):
        load_relation_counterfact(_write(tmp_path, [record]))


def test_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="no dataset file"):
        load_counterfact(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        load_counterfact(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(DatasetError, match="must hold a JSON list"):
        load_counterfact(tmp_path / "obj.json")
    (tmp_path / "num.json").write_text("[3]")
    with pytest.raises(DatasetError, match="record 0 is a int"):
        load_counterfact(tmp_path / "num.json")


def test_real_world_facts():
    facts = real_world_facts()
    assert len(facts) >= 30
    assert len({f.relation for f in facts}) >= 8
    for fact in facts:
        assert fact.new_object and fact.new_object != fact.object
        for prompt in fact.prompts("entity") + fact.prompts("relation"):
            assert "subject" in prompt.char_spans
        for neighbor in fact.neighborhood_prompts:
            assert fact.subject not in neighbor
    assert any(f.neighborhood_prompts for f in facts)


@pytest.mark.substrate
def test_filter_known_keeps_what_the_model_answers(planted):
    model, facts = planted
    known = [kl.Fact(s, "home", o, entity_template=facts.template) for s, o in facts.pairs()]
    wrong = kl.Fact(facts.subjects[0], "home", facts.objects[1], entity_template=facts.template)
    result = filter_known(model, [*known, wrong], batch_size=4)
    assert result.facts == tuple(known)
    assert (result.total, result.kept) == (len(known) + 1, len(known))
    assert result.correct[-1] is False
    assert f"{len(known)}/{len(known) + 1} facts" in str(result)


def test_load_facts_recognises_formats(tmp_path):
    from kloc_lens.datasets import load_facts

    plain = load_facts(_write(tmp_path, [RECORD]))
    assert plain[0].relation == "P103"
    relation = load_facts(_write(tmp_path, [RELATION_RECORD]))
    assert relation[0].relation == "mother tongue"
    ours = tmp_path / "ours.json"
    ours.write_text(
        json.dumps(
            {
                "facts": [
                    {
                        "subject": "A B",
                        "relation": "home",
                        "object": "C",
                        "entity_paraphrases": ["{subject} lives in"],
                    }
                ]
            }
        )
    )
    (fact,) = load_facts(ours)
    assert fact.entity_paraphrases == ("{subject} lives in",)
    ours.write_text(json.dumps({"facts": [{"subject": "A B", "object": "C"}]}))
    with pytest.raises(DatasetError, match="record 0: field 'relation' is missing"):
        load_facts(ours)
    ours.write_text(json.dumps([1, 2]))
    with pytest.raises(DatasetError, match="neither kloc_lens facts JSON nor CounterFact"):
        load_facts(ours)


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path):
    from kloc_lens.datasets import load_facts

    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([RECORD], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DatasetError, match="latin1.json' is not UTF-8 text \\(byte \\d+: invalid"):
        load_counterfact(path)
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        load_facts(path)


def test_a_file_that_mixes_record_formats_names_the_record(tmp_path):
    from kloc_lens.datasets import load_facts

    other = {**RECORD, "case_id": 9}
    with pytest.raises(
        DatasetError,
        match="mixes record formats: record 1 \\(case_id 9\\) is plain CounterFact, but record 0 "
        "is relation-augmented CounterFact",
    ):
        load_facts(_write(tmp_path, [RELATION_RECORD, other]))
    with pytest.raises(DatasetError, match="record 1 \\(case_id 7\\) is relation-augmented"):
        load_facts(_write(tmp_path, [other, RELATION_RECORD]))


def test_a_prompt_with_two_subject_slots_names_record_and_field(tmp_path):
    record = json.loads(json.dumps(RECORD))
    record["requested_rewrite"]["prompt"] = "The mother tongue of {} and {} is"
    with pytest.raises(
        DatasetError,
        match="record 0 \\(case_id 7\\): requested_rewrite.prompt 'The mother tongue of {} and "
        "{} is' has 2 '{}' slots",
    ):
        load_counterfact(_write(tmp_path, [record]))
    record = json.loads(json.dumps(RECORD))
    record["paraphrase_prompts"] = ["{} speaks like {}"]
    with pytest.raises(DatasetError, match="paraphrase_prompts\\[0\\] '{} speaks like {}' has 2"):
        load_counterfact(_write(tmp_path, [record]))


def test_misspelt_fields_name_record_and_field(tmp_path):
    from kloc_lens.datasets import load_facts

    record = json.loads(json.dumps(RECORD))
    record["paraphrase_prompt"] = record.pop("paraphrase_prompts")
    with pytest.raises(
        DatasetError,
        match="record 0 \\(case_id 7\\): unknown field 'paraphrase_prompt'; did you mean "
        "'paraphrase_prompts'",
    ):
        load_counterfact(_write(tmp_path, [record]))
    record = json.loads(json.dumps(RELATION_RECORD))
    record["requested_rewrite"]["rm_rel_promt"] = record["requested_rewrite"].pop("rm_rel_prompt")
    with pytest.raises(DatasetError, match="'requested_rewrite.rm_rel_promt'; did you mean 'rm_"):
        load_facts(_write(tmp_path, [record]))
    extra = {**RECORD, "source": "wikidata dump"}  # a field of its own, not a misspelling
    assert load_counterfact(_write(tmp_path, [extra]))[0].subject == "Danielle Darrieux"
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"facts": [{"subject": "A", "relation": "r", "objct": "C"}]}))
    with pytest.raises(DatasetError, match="record 0: unknown field 'objct'; did you mean 'obj"):
        load_facts(ours)
    ours.write_text(
        json.dumps({"facts": [{"subject": "A", "relation": "r", "object": "C", "x": 1}]})
    )
    with pytest.raises(DatasetError, match="record 0: unknown field 'x' \\(fields: entity_para"):
        load_facts(ours)


def test_templates_and_objects_are_matched_as_whole_words(tmp_path):
    record = json.loads(json.dumps(RELATION_RECORD))
    record["requested_rewrite"]["rel_prompts"] = ["Frenchman Danielle Darrieux and French? By"]
    (fact,) = load_relation_counterfact(_write(tmp_path, [record]))
    assert fact.relation_paraphrases == ("Frenchman {subject} and {object}? By",)
    record["requested_rewrite"]["rel_prompts"] = ["Danielle Darrieux and Frenchmen? By"]
    with pytest.raises(DatasetError, match="does not contain the object 'French'"):
        load_relation_counterfact(_write(tmp_path, [record]))


def test_counts_and_choices_are_checked(tmp_path, planted):
    from kloc_lens.datasets import load_facts

    path = _write(tmp_path, [RECORD, RECORD])
    for loader in (load_counterfact, load_facts):
        with pytest.raises(
            DatasetError, match="limit must be a non-negative integer or None, got -"
        ):
            loader(path, limit=-1)
    assert len(load_counterfact(path, limit=0)) == 0
    model, facts = planted
    fact = kl.Fact(facts.subjects[0], "home", facts.objects[0], entity_template=facts.template)
    with pytest.raises(DatasetError, match="perspective must be one of 'entity', 'relation', got"):
        filter_known(model, [fact], "object")
    with pytest.raises(DatasetError, match="batch_size must be an integer >= 1, got 0"):
        filter_known(model, [fact], batch_size=0)


def test_arguments_of_the_wrong_type(tmp_path, planted, unchecked):
    model, facts = planted
    fact = kl.Fact(facts.subjects[0], "home", facts.objects[0], entity_template=facts.template)
    with pytest.raises(DatasetError, match="limit must be a non-negative integer or None, got 1.5"):
        load_counterfact(_write(tmp_path, [RECORD]), limit=1.5)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="batch_size must be an integer >= 1, got 2.0"):
        filter_known(model, [fact], batch_size=2.0)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="path must be a str or Path, got list"):
        load_counterfact([RECORD])  # type: ignore[arg-type]
