"""The shipped factworld stores facts the way the study assumes: issue 11's trace thresholds on a
fixed sample of facts, through the study itself (ROME's noise on the subject, 10 samples,
window max(2, L/4)), and ROME's edits at the layer the study chooses."""

from __future__ import annotations

import random

import pytest

from kloc_lens.factworld import EDIT_LAYER, NONE_ANSWER, load_factworld
from kloc_lens.study import StudyConfig, run_study

pytestmark = pytest.mark.one_thread

N_FACTS = 48


@pytest.fixture(scope="module")
def study():
    model, world = load_factworld()
    facts = random.Random(11).sample(list(world.facts), N_FACTS)
    config = StudyConfig(
        n_trace=N_FACTS, n_edit=0, samples=10, none_target=NONE_ANSWER, n_bootstrap=200
    )
    return model, run_study(model, facts, config, progress=False, edit=False)


def test_the_subject_is_composed_at_its_last_token(study):
    _, result = study
    entity = result.entity
    assert entity.window == 2 and entity.n_facts >= 0.9 * N_FACTS
    numbers = {name: estimate.value for name, estimate in entity.numbers.items()}
    print({name: round(value, 3) for name, value in numbers.items()})
    # residual restore at the last subject token: early peak, most facts, over the first token
    assert numbers["resid_last_span"] >= 0.6
    assert numbers["facts_half_te"] >= 0.9
    assert numbers["last_to_first"] >= 1.5


def test_mlps_carry_it_early_and_attention_moves_it_late(study):
    model, result = study
    entity = result.entity
    numbers = {name: estimate.value for name, estimate in entity.numbers.items()}
    n_layers = int(model.cfg.n_layers)
    assert entity.layers["mlp_last_span"] <= n_layers // 2  # first half, +1 layer
    assert entity.layers["mlp_last_span"] == EDIT_LAYER  # what the study edits on the shipped model
    assert numbers["mlp_last_span"] >= 0.4
    assert numbers["mlp_to_attn"] >= 1.5
    assert numbers["attn_last_token_early"] <= 0.15
    assert numbers["attn_last_token_late"] >= 0.5
    assert numbers["severed_mlp_drop"] >= 0.3
