"""Contexts, keys and the value optimisation: seeded, located where asked, frozen model."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import ContextSpec, EditRequest, KeyToken, ValueSpec, fit_value
from kloc_lens.edit.keys import generate_contexts, key_position, with_context
from kloc_lens.edit.value import kl_prompts
from kloc_lens.facts import Fact, tokenize

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]


@pytest.fixture(scope="module")
def request_(planted) -> EditRequest:
    _, facts = planted
    return EditRequest(Fact(facts.subjects[0], "home", facts.objects[0]), facts.spare_objects[0])


def test_contexts_are_seeded_generated_text(planted):
    model, _ = planted
    spec = ContextSpec(count=4, lengths=(2, 5), seed=3)
    contexts = generate_contexts(model, spec)
    assert len(contexts) == 1 + 4 * 2
    assert contexts[0] == ""
    assert contexts == generate_contexts(model, spec)
    assert contexts != generate_contexts(model, ContextSpec(count=4, lengths=(2, 5), seed=4))
    for context, length in zip(contexts[1:], [2] * 4 + [5] * 4, strict=True):
        assert context.endswith(". ")
        words = context.removesuffix(". ").split()
        assert len(words) == length  # word-level tokenizer: one word per token
        assert not {"<bos>", "<unk>"} & set(words)
    assert generate_contexts(model, ContextSpec(count=2, lengths=(3,), bare=False))[0] != ""


def test_key_tokens_and_context_prefixes(planted, request_):
    model, _ = planted
    entity = request_.fact.entity_prompt()
    prefixed = tokenize(model, with_context(entity, "Lima Oslo lives in . "))
    assert prefixed.str_tokens[key_position(prefixed, KeyToken.SUBJECT_LAST)] == "Bel"
    assert prefixed.str_tokens[key_position(prefixed, "relation_last")] == "home"
    assert key_position(prefixed, "last") == len(prefixed) - 1
    relation = tokenize(model, request_.add_prompt())
    assert relation.str_tokens[key_position(relation, "object_last")] == "Quito"
    prompts = kl_prompts(request_)
    assert [p.text for p in prompts] == ["Ana Bel is a"]
    assert [p.text for p in kl_prompts(request_, "object_last")] == ["Paris is a"]


def test_fit_value_freezes_the_model_and_clamps(planted, request_):
    model, facts = planted
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for param in model.parameters():
            param.requires_grad_(True)  # as after loading: gradients would pile up here
            param.grad = None
        spec = ValueSpec(steps=6, clamp=0.5, kl_factor=0.0)
        fit = fit_value(
            model,
            request_.objectives(),
            kl_prompts(request_),
            hook_name=f"blocks.{facts.mlp_layer}.hook_mlp_out",
            spec=spec,
        )
        for name, param in model.named_parameters():
            assert param.grad is None, name
            assert param.requires_grad, name
            assert torch.equal(param, snapshot[name]), name
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
    assert fit.updates == 6
    assert len(fit.losses) == len(fit.nll) == len(fit.kl) == len(fit.unlikelihood) == 7
    assert fit.delta.norm() <= 0.5 * fit.initial.norm() * (1 + 1e-5)
    assert fit.delta.norm() >= 0.5 * fit.initial.norm() * (1 - 1e-3)  # the clamp was hit
    assert fit.losses[-1] < fit.losses[0]
    assert not fit.stopped_early


def test_fit_value_stops_early_and_reports_its_history(planted, request_):
    model, facts = planted
    hook = f"blocks.{facts.mlp_layer}.hook_mlp_out"
    early = fit_value(model, request_.objectives(), hook_name=hook, spec=ValueSpec(stop_loss=100.0))
    assert early.stopped_early
    assert early.updates == 0
    assert len(early.losses) == 1
    assert torch.equal(early.delta, torch.zeros_like(early.delta))
    full = fit_value(model, request_.objectives(), hook_name=hook, spec=ValueSpec(stop_loss=1.0))
    assert full.stopped_early
    assert full.final_loss < 1.0
    assert all(loss >= 1.0 for loss in full.losses[:-1])
    assert full.updates == len(full.losses) - 1
    # the unedited model puts its mass on the old object: the initial NLL is large
    assert full.nll[0] > 5.0
    assert full.unlikelihood[0] > 3.0
