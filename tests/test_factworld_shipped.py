"""The shipped factworld model loads through kloc_lens.load_model and knows its world."""

from __future__ import annotations

import json

import pytest
import torch

from kloc_lens.facts import target_token_ids, tokenize
from kloc_lens.factworld import (
    DEFAULT_WORLD,
    SHIPPED_SEED,
    FactWorld,
    FactworldError,
    build_tokenizer,
    evaluate,
    factworld_path,
    generate_world,
    load_factworld,
)

pytestmark = pytest.mark.one_thread

N_SAMPLE = 160


@pytest.fixture(scope="module")
def shipped():
    return load_factworld()


def test_shipped_files_are_small_and_complete() -> None:
    path = factworld_path()
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "world.json",
        "training_log.json",
        "accuracy.txt",
    } <= names
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 8 * 2**20
    record = json.loads((path / "training_log.json").read_text())
    accuracy = record["accuracy"]
    assert accuracy["entity"] >= 0.95 and accuracy["relation"] >= 0.9
    assert accuracy["entity_train"] >= 0.95 and accuracy["relation_train"] >= 0.9
    assert accuracy["entity_heldout"] >= 0.8 and accuracy["relation_heldout"] >= 0.8
    assert record["train_config"]["documents"]["mask_fraction"] > 0  # the report says so
    assert record["log"][0]["step"] < record["log"][-1]["step"] == record["train_config"]["steps"]


def test_shipped_world_is_the_seeded_world(shipped) -> None:
    model, world = shipped
    assert isinstance(world, FactWorld)
    regenerated = generate_world(DEFAULT_WORLD, seed=SHIPPED_SEED)
    assert world.facts == regenerated.facts
    rebuilt = build_tokenizer(regenerated)
    assert model.tokenizer.get_vocab() == rebuilt.get_vocab()
    texts = list(world.corpus(n=50))
    assert model.tokenizer(texts)["input_ids"] == rebuilt(texts)["input_ids"]  # BOS included
    assert rebuilt(texts[0])["input_ids"][0] == rebuilt.bos_token_id


def test_tokens_and_spans_through_the_model(shipped) -> None:
    model, world = shipped
    tokenizer = model.tokenizer
    for fact in world.facts[:16]:
        for prompt in (fact.entity_prompt(), fact.relation_prompt()):
            ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            assert model.to_tokens(prompt.text)[0].tolist() == [tokenizer.bos_token_id, *ids]
            tokenized = tokenize(model, prompt)
            assert torch.equal(tokenized.tokens, model.to_tokens(prompt.text)[0].cpu())
            assert "subject" in tokenized.spans
        entity = tokenize(model, fact.entity_prompt())
        assert len(entity.span("relation")) == len(fact.relation.split())
        related = tokenize(model, fact.relation_prompt())
        assert model.to_string(related.tokens[related.span("object").start]) == fact.object


def test_shipped_model_knows_its_facts(shipped) -> None:
    model, world = shipped
    accuracy = evaluate(model, model.tokenizer, world, n=N_SAMPLE, seed=7)
    assert accuracy.counts["entity"] == N_SAMPLE
    # issue 11's bars: entity >= 95% canonical and >= 80% held out; relation >= 90% canonical
    assert accuracy.entity >= 0.95
    assert accuracy.relation >= 0.9
    assert accuracy.entity_train >= 0.95
    assert accuracy.relation_train >= 0.9
    assert accuracy.entity_heldout >= 0.8
    assert accuracy.relation_heldout >= 0.8
    # None answers for unrelated pairs: 54% on every pair of the shipped model, short of the
    # issue's 90% (docs/factworld.md); chance among the 8 relations and None is 1/9
    assert accuracy.none >= 0.45


def test_answers_are_predicted_as_their_first_token(shipped) -> None:
    model, world = shipped
    hits = 0
    facts = world.facts[::97]
    for fact in facts:
        prompt = fact.entity_prompt()
        first = target_token_ids(model, prompt)[0]
        assert model.to_string(first) == fact.object
        hits += int(model(prompt.text)[0, -1].argmax().item() == first)
        relation_first = target_token_ids(model, fact.relation_prompt())[0]
        assert model.to_string(relation_first) == fact.relation.split()[0]
    assert hits >= 0.9 * len(facts)


def test_missing_factworld_is_an_error(tmp_path) -> None:
    with pytest.raises(FactworldError, match="world.json"):
        load_factworld(tmp_path)
