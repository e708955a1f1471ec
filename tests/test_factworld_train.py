"""The factworld training code on a miniature world: the loss drops, facts are learned, and the
same seed gives bit-identical weights."""

from __future__ import annotations

import doctest
import importlib
import json

import pytest
import torch

from kloc_lens.factworld import (
    FactworldError,
    ModelConfig,
    TrainConfig,
    TrainResult,
    WorldConfig,
    build_tokenizer,
    evaluate,
    generate_world,
    train,
)

MINI_WORLD = WorldConfig(n_subjects=8, n_relations=2, objects_per_pool=4, n_first_names=4)
MINI_MODEL = ModelConfig(n_layer=2, d_model=64, n_head=2, d_mlp=128, n_ctx=96)
MINI_TRAIN = TrainConfig(
    steps=250, batch_size=32, lr=5e-3, warmup_steps=20, eval_every=125, eval_size=16, threads=1
)

pytestmark = pytest.mark.one_thread


@pytest.fixture(scope="module")
def mini():
    world = generate_world(MINI_WORLD, seed=3)
    tokenizer = build_tokenizer(world, n_ctx=MINI_MODEL.n_ctx)
    return world, tokenizer


@pytest.fixture(scope="module")
def trained(mini) -> TrainResult:
    world, tokenizer = mini
    return train(world, tokenizer, MINI_MODEL, MINI_TRAIN, seed=1, progress=False)


def test_loss_drops_and_facts_are_learned(trained: TrainResult) -> None:
    losses = [entry["loss"] for entry in trained.log]
    assert losses[-1] < 0.5 * losses[0]
    assert trained.log[-1]["step"] == MINI_TRAIN.steps
    assert "accuracy" in trained.log[0] or "accuracy" in trained.log[1]
    accuracy = trained.accuracy
    # chance is 1/4 for objects and 1/3 for relations (two relations or None)
    assert accuracy.entity >= 0.6
    assert accuracy.entity_train >= 0.6
    assert accuracy.relation >= 0.6
    assert accuracy.counts["entity"] == 16
    assert not trained.model.training
    assert trained.model.config._attn_implementation == "eager"


def test_same_seed_same_weights(mini, trained: TrainResult) -> None:
    world, tokenizer = mini
    config = TrainConfig(**{**MINI_TRAIN.__dict__, "steps": 40, "eval_every": 0})
    first = train(world, tokenizer, MINI_MODEL, config, seed=1, progress=False)
    again = train(world, tokenizer, MINI_MODEL, config, seed=1, progress=False)
    other = train(world, tokenizer, MINI_MODEL, config, seed=2, progress=False)
    state, state_again = first.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(state[name], state_again[name]) for name in state)
    assert not torch.equal(
        state["transformer.wte.weight"], other.model.state_dict()["transformer.wte.weight"]
    )
    assert [e["loss"] for e in first.log] == [e["loss"] for e in again.log]


def test_evaluate_takes_any_logits_function(mini, trained: TrainResult) -> None:
    world, tokenizer = mini
    model = trained.model

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens).logits

    again = evaluate(logits, tokenizer, world, seed=1)
    assert again == trained.accuracy


def test_bad_configs_name_the_field() -> None:
    with pytest.raises(FactworldError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(FactworldError, match="n_head"):
        ModelConfig(d_model=30, n_head=4)


def test_build_saves_a_directory_that_load_model_loads(tmp_path) -> None:
    from kloc_lens.factworld import build, load_factworld

    out = tmp_path / "factworld"
    config = TrainConfig(**{**MINI_TRAIN.__dict__, "steps": 60, "eval_every": 30})
    result = build(
        out,
        seed=0,
        world_config=MINI_WORLD,
        model_config=MINI_MODEL,
        train_config=config,
        progress=False,
    )
    record = json.loads((out / "training_log.json").read_text())
    assert record["train_config"]["steps"] == 60
    assert record["accuracy"] == result.accuracy.as_dict()
    assert "bridge_accuracy" in record
    assert "entity_heldout" in (out / "accuracy.txt").read_text()
    model, world = load_factworld(out)
    assert world.facts == generate_world(MINI_WORLD, seed=0).facts
    prompt = world.facts[0].entity_prompt().text
    with torch.no_grad():
        hf_logits = result.model(input_ids=model.to_tokens(prompt).cpu()).logits
        bridge_logits = model(prompt)
    # compatibility mode centres the unembedding: logits agree up to a constant per position
    torch.testing.assert_close(
        bridge_logits.cpu().log_softmax(-1), hf_logits.log_softmax(-1), atol=1e-4, rtol=1e-4
    )


def test_build_main_rejects_bad_arguments(tmp_path) -> None:
    from kloc_lens.factworld import build_main

    with pytest.raises(SystemExit):
        build_main(["--steps", "many"])
    assert build_main(["--out", str(tmp_path), "--subjects", "1", "--quiet"]) == 1


def test_docstring_examples() -> None:
    module = importlib.import_module("kloc_lens.factworld.train")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
