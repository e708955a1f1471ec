"""Contexts, keys and the value optimisation: seeded, located where asked, frozen model."""

from __future__ import annotations

import logging

import pytest
import torch

from kloc_lens.edit import ContextSpec, EditError, EditRequest, KeyToken, ValueSpec, fit_value
from kloc_lens.edit.keys import generate_contexts, key_position, with_context
from kloc_lens.edit.request import Objective
from kloc_lens.edit.value import kl_prompts
from kloc_lens.errors import SpanError
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


def test_value_spec_refuses_non_finite_and_out_of_range_numbers():
    for field, value in [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("weight_decay", float("nan")),
        ("kl_factor", float("inf")),
        ("clamp", float("-inf")),
        ("stop_loss", float("nan")),
    ]:
        with pytest.raises(EditError, match=f"ValueSpec.{field} must be a finite number"):
            ValueSpec(**{field: value})
    with pytest.raises(EditError, match="ValueSpec.decrease_weight must be a finite number >= 0"):
        ValueSpec(decrease_weight=-1.0)
    with pytest.raises(EditError, match="ValueSpec.converge_factor must be a finite number > 0"):
        ValueSpec(converge_factor=0.0)
    with pytest.raises(EditError, match="ValueSpec.steps must be an integer >= 0, got -1"):
        ValueSpec(steps=-1)
    with pytest.raises(SpanError, match="ValueSpec.kl_templates\\[0\\] '{subject is a' is not a"):
        ValueSpec(kl_templates=("{subject is a",))


def test_value_spec_refuses_numbers_of_the_wrong_type(unchecked):
    with pytest.raises(EditError, match="ValueSpec.steps must be an integer >= 0, got 2.5"):
        ValueSpec(steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(EditError, match="ValueSpec.steps must be an integer >= 0, got True"):
        ValueSpec(steps=True)
    with pytest.raises(EditError, match="ValueSpec.lr must be a finite number > 0, got str '0.5'"):
        ValueSpec(lr="0.5")  # type: ignore[arg-type]
    with pytest.raises(EditError, match="kl_templates must be a tuple of templates or None"):
        ValueSpec(kl_templates="{subject} is a")  # type: ignore[arg-type]


def test_a_fit_far_above_its_stop_loss_warns_and_is_marked(planted, request_, caplog):
    model, facts = planted
    hook = f"blocks.{facts.mlp_layer}.hook_mlp_out"
    with caplog.at_level(logging.WARNING, logger="kloc_lens.edit.value"):
        short = fit_value(model, request_.objectives(), hook_name=hook, spec=ValueSpec(steps=1))
    assert not short.converged
    assert "did not converge: its rewrite loss (NLL + unlikelihood) is" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kloc_lens.edit.value"):
        done = fit_value(model, request_.objectives(), hook_name=hook, spec=ValueSpec(steps=40))
    assert done.converged and done.nll[-1] + done.unlikelihood[-1] <= 0.5
    assert "did not converge" not in caplog.text


def test_a_loss_that_turns_non_finite_stops_the_fit(planted, request_):
    model, facts = planted
    with pytest.raises(EditError, match="reached a nan loss at step 0 .* not finite"):
        fit_value(
            model,
            request_.objectives(),
            hook_name=f"blocks.{facts.mlp_layer}.hook_mlp_out",
            spread=lambda tokens: torch.full(tokens.shape, float("nan")),
        )


def test_a_rewrite_row_longer_than_the_context_is_refused(planted, request_):
    model, facts = planted
    prompt = request_.entity_prompt()
    # the prompt fits the context, the prompt with its (multi-token) target does not
    room = model.cfg.n_ctx - len(tokenize(model, prompt))
    target = " ".join([facts.spare_objects[0]] * (room + 2))
    objective = Objective(prompt, target, None)
    with pytest.raises(EditError, match="more than the model's context of n_ctx="):
        fit_value(model, [objective], hook_name=f"blocks.{facts.mlp_layer}.hook_mlp_out")


def test_fit_values_equals_fitting_each_problem_alone(planted, unchecked):
    """One batch, per-problem stops and clamps: the same fits as one call per problem."""
    from kloc_lens.edit import RomeEditor, planted_corpus, second_moment
    from kloc_lens.edit.keys import compute_key
    from kloc_lens.edit.projection import Projection
    from kloc_lens.edit.rome import rank_one_spread, solve_direction
    from kloc_lens.edit.value import FitProblem, fit_values

    model, facts = planted
    layer = facts.mlp_layer
    stats = second_moment(model, layer, planted_corpus(facts), progress=False)
    requests = [
        EditRequest(Fact(subject, "home", obj), target, perspective=perspective, none_target="a")
        for (subject, obj), target in zip(facts.pairs(), facts.spare_objects, strict=False)
        for perspective in ("entity", "relation")
    ]
    contexts = ("", "Lima Oslo lives in . ")
    problems = []
    for index, request in enumerate(requests):
        key = compute_key(
            model,
            [o.prompt for o in request.objectives()],
            layer=layer,
            contexts=contexts,
        )
        spread = rank_one_spread(model, layer, Projection.W_OUT, key, solve_direction(key, stats))
        # every other problem without a spread: both kinds share one batch
        problems.append(
            FitProblem(
                tuple(request.objectives()), kl_prompts(request), spread if index % 2 else None
            )
        )
    spec = ValueSpec(stop_loss=1.0, steps=14)
    hook = f"blocks.{layer}.hook_mlp_out"
    together = fit_values(model, problems, hook_name=hook, contexts=contexts, spec=spec)
    alone = [
        fit_value(
            model,
            p.objectives,
            p.kl,
            hook_name=hook,
            contexts=contexts,
            spec=spec,
            spread=p.spread,
        )
        for p in problems
    ]
    assert len({fit.updates for fit in alone}) > 1  # some stop early, others go on
    for mine, reference in zip(together, alone, strict=True):
        assert mine.updates == reference.updates
        assert mine.stopped_early == reference.stopped_early
        assert mine.spread == reference.spread
        torch.testing.assert_close(mine.delta, reference.delta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.initial, reference.initial, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.tensor(mine.losses), torch.tensor(reference.losses), atol=1e-5, rtol=1e-5
        )
    with pytest.raises(EditError, match="no value fits"):
        fit_values(model, [], hook_name=hook)
    editor = RomeEditor(layer=layer, stats=stats, contexts=ContextSpec(count=1, lengths=(2,)))
    each = editor.compute_each(model, requests)
    for request, edit in zip(requests, each, strict=True):
        single = editor.compute(model, request)
        assert edit.request is request
        torch.testing.assert_close(edit.value, single.value, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(edit.direction, single.direction, atol=1e-6, rtol=1e-6)
    with pytest.raises(EditError, match="not an EditRequest"):
        editor.compute_each(model, [requests[0], "Ana Bel"])  # type: ignore[list-item]


def test_steps_run_from_the_edited_block_and_equal_the_whole_forward(planted, monkeypatch):
    """After the first pass the fit runs only the blocks from the edited one (the residual
    stream entering it never changes); the fits equal those of whole forward passes."""
    import kloc_lens.edit.value as value
    from kloc_lens.edit.value import FitProblem, fit_values

    model, facts = planted
    requests = [
        EditRequest(Fact(subject, "home", obj), target, perspective=perspective, none_target="a")
        for (subject, obj), target in zip(facts.pairs(), facts.spare_objects, strict=False)
        for perspective in ("entity", "relation")
    ]
    problems = [FitProblem(tuple(r.objectives()), kl_prompts(r)) for r in requests]
    hook = f"blocks.{facts.mlp_layer}.hook_mlp_out"
    assert facts.mlp_layer > 0  # blocks below it to skip
    spec = ValueSpec(stop_loss=1.0, steps=8)
    calls = []
    real = value.BlockDriver.run_from

    def spy(self, start, hidden, joining=None):
        calls.append(start)
        return real(self, start, hidden, joining)

    monkeypatch.setattr(value.BlockDriver, "run_from", spy)
    from_block = fit_values(model, problems, hook_name=hook, spec=spec)
    assert calls and set(calls) == {facts.mlp_layer}
    n_calls = len(calls)
    monkeypatch.setattr(value.BlockDriver, "for_model", lambda model: (None, "off"))
    whole = fit_values(model, problems, hook_name=hook, spec=spec)
    assert len(calls) == n_calls  # the reference ran whole forward passes
    for mine, reference in zip(from_block, whole, strict=True):
        assert mine.updates == reference.updates
        torch.testing.assert_close(mine.delta, reference.delta, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            torch.tensor(mine.losses), torch.tensor(reference.losses), atol=1e-6, rtol=1e-6
        )
