"""The factworld generator and tokenizer: determinism, names, held-out templates, facts, spans."""

from __future__ import annotations

import doctest
import importlib
import json
from collections import Counter
from types import SimpleNamespace

import pytest

from kloc_lens.errors import KlocLensError
from kloc_lens.facts import Fact, Perspective, tokenize
from kloc_lens.factworld import (
    NONE_ANSWER,
    FactWorld,
    FactworldError,
    WorldConfig,
    build_tokenizer,
    generate_world,
)
from kloc_lens.factworld.world import greedy_wordpiece, template_words


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return generate_world(seed=0)


@pytest.fixture(scope="module")
def tokenizer(world: FactWorld):
    return build_tokenizer(world)


@pytest.fixture(scope="module")
def stub_model(tokenizer):
    """What :func:`kloc_lens.tokenize` reads from a model: its tokenizer and ``cfg``."""
    return SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(default_prepend_bos=True))


def test_same_seed_same_world_other_seed_other_world(world: FactWorld) -> None:
    again = generate_world(seed=0)
    assert again.to_dict() == world.to_dict()
    other = generate_world(seed=1)
    assert other.to_dict()["subjects"] != world.to_dict()["subjects"]
    assert [f.object for f in other.facts] != [f.object for f in world.facts]


def test_tokenizer_is_deterministic(world: FactWorld, tokenizer) -> None:
    assert build_tokenizer(world).get_vocab() == tokenizer.get_vocab()


def test_size_and_shape(world: FactWorld) -> None:
    assert len(world.subjects) == 256
    assert len(world.relations) >= 8
    assert len(world.facts) == len(world.subjects) * len(world.relations)
    assert len({s.name for s in world.subjects}) == len(world.subjects)
    for relation in world.relations:
        assert len(relation.surface.split()) >= 2
        assert len(relation.train_templates) >= 4
        assert len(relation.heldout_templates) >= 4
    assert len(world.relation_train_templates) >= 4
    assert len(world.relation_heldout_templates) >= 4
    assert world.relation_train_templates[0] == "The relation between {subject} and {object} is"


def test_names_are_several_syllable_tokens(world: FactWorld, tokenizer) -> None:
    lengths = Counter()
    for subject in world.subjects:
        ids = tokenizer(subject.name, add_special_tokens=False)["input_ids"]
        tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
        assert tokens == subject.tokens
        assert tokenizer.decode(ids) == subject.name
        lengths[len(tokens)] += 1
    assert set(lengths) <= {3, 4, 5}
    assert len(lengths) >= 2


def test_words_and_answers_are_single_tokens(world: FactWorld, tokenizer) -> None:
    unk = tokenizer.unk_token_id
    for word in world.words():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(word.split()), word
        assert unk not in ids
    firsts = [
        tokenizer(answer, add_special_tokens=False)["input_ids"][0]
        for answer in (*world.objects, *(r.surface for r in world.relations), NONE_ANSWER)
    ]
    assert len(set(firsts)) == len(firsts)


def test_tokenizer_prepends_bos(tokenizer) -> None:
    ids = tokenizer("The relation between")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer("The relation between", add_special_tokens=False)["input_ids"]


def test_heldout_templates_are_new_combinations_of_seen_words(world: FactWorld) -> None:
    for relation in world.relations:
        seen = set().union(*(template_words(t) for t in relation.train_templates))
        assert not set(relation.heldout_templates) & set(relation.train_templates)
        for template in relation.heldout_templates:
            assert template_words(template) <= seen, template
    seen = set().union(*(template_words(t) for t in world.relation_train_templates))
    assert not set(world.relation_heldout_templates) & set(world.relation_train_templates)
    for template in world.relation_heldout_templates:
        assert template_words(template) <= seen, template


def test_facts_are_valid_and_spans_are_found(world: FactWorld, stub_model) -> None:
    for fact in world.facts[:: 6 * len(world.relations) + 1]:
        assert isinstance(fact, Fact)
        relation = world.relation_of(fact)
        assert fact.relation == relation.surface
        assert fact.object in relation.objects
        assert fact.new_object in relation.objects and fact.new_object != fact.object
        assert fact.entity_paraphrases == relation.heldout_templates
        entity = tokenize(stub_model, fact.entity_prompt())
        assert entity.str_tokens[0] == "<bos>"
        subject = world.subjects[[s.name for s in world.subjects].index(fact.subject)]
        assert entity.str_tokens[entity.span("subject").start : entity.span("subject").end] == (
            subject.tokens
        )
        assert len(entity.span("relation")) == len(fact.relation.split())
        related = tokenize(stub_model, fact.relation_prompt())
        assert len(related.span("subject")) == len(subject.tokens)
        assert related.str_tokens[related.span("object").start] == fact.object
        for prompt in (*fact.prompts(Perspective.ENTITY), *fact.prompts(Perspective.RELATION)):
            assert "subject" in tokenize(stub_model, prompt).spans


def test_one_answer_per_prompt(world: FactWorld) -> None:
    for subject in world.subjects:
        facts = [world.fact(subject.name, r.relation_id) for r in world.relations]
        objects = [f.object for f in facts]
        assert len(set(objects)) == len(objects)  # shared pools never give the same object
        for fact in facts:
            assert fact.new_object not in objects


def test_neighbors_exist(world: FactWorld) -> None:
    for fact in world.facts[::7]:
        neighbors = world.neighbors(fact)
        assert neighbors
        assert all(n.object == fact.object and n.relation_id == fact.relation_id for n in neighbors)
        assert all(n.subject != fact.subject for n in neighbors)
        assert len(fact.neighborhood_prompts) == min(10, len(neighbors))
        assert set(fact.neighborhood_prompts) <= {n.entity_prompt().text for n in neighbors}
    prompts = world.neighborhood_prompts(world.facts[0], 3)
    assert len(prompts) == 3
    assert all(p.target == world.facts[0].object for p in prompts)


def test_none_pairs_are_unrelated(world: FactWorld) -> None:
    for subject, obj in world.none_pairs(n=50):
        assert all(world.fact(subject, r.relation_id).object != obj for r in world.relations)
    prompt = world.none_prompt(*world.none_pairs(n=1)[0])
    assert prompt.target == NONE_ANSWER
    assert prompt.text.startswith("The relation between ")


def test_corpus(world: FactWorld) -> None:
    corpus = world.corpus()
    assert len(corpus) == len(world.subjects)  # one biography per person
    assert corpus == world.corpus()
    assert world.corpus(n=10, seed=1) != corpus[:10]
    assert len(world.corpus(n=300)) == 300  # a second round past one per person
    # every person has a biography, and every fact is told in it from one perspective
    for person in world.subjects[:20]:
        text = next(t for t in corpus if t.count(person.name) >= len(world.relations))
        for fact in (f for f in world.facts if f.subject == person.name):
            told = f"{fact.object}" in text or f" {fact.relation}." in text
            assert told, (person.name, fact.relation)


def test_json_round_trip(world: FactWorld, tmp_path) -> None:
    path = tmp_path / "world.json"
    world.save(path)
    loaded = FactWorld.load(path)
    assert loaded.facts == world.facts
    assert loaded.subjects == world.subjects
    assert loaded.relations == world.relations
    data = json.loads(path.read_text())
    del data["facts"]
    path.write_text(json.dumps(data))
    with pytest.raises(FactworldError, match="'facts'"):
        FactWorld.load(path)
    with pytest.raises(FactworldError, match="no factworld file"):
        FactWorld.load(tmp_path / "missing.json")


def test_lookups_and_errors(world: FactWorld) -> None:
    fact = world.facts[3]
    assert world.fact(fact.subject, fact.relation_id or "") == fact
    assert len(world.facts_of("P103")) == len(world.subjects)
    with pytest.raises(FactworldError, match="P999"):
        world.relation("P999")
    with pytest.raises(FactworldError, match="Nobody"):
        world.fact("Nobody", "P103")
    with pytest.raises(KlocLensError, match="n_relations"):
        WorldConfig(n_relations=99)


def test_greedy_wordpiece() -> None:
    vocab = {"Vel", "Ve", "##ka", "##lka", "##ro"}
    assert greedy_wordpiece("Velkaro", vocab) == ("Vel", "##ka", "##ro")
    assert greedy_wordpiece("Velx", vocab) is None


@pytest.mark.parametrize("name", ["world", "tokenizer"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"kloc_lens.factworld.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
