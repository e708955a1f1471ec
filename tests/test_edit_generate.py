"""Evaluation without teacher forcing: greedy continuations and the generated scores."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import (
    ContextSpec,
    EditError,
    EditMetric,
    EditRequest,
    RomeEditor,
    evaluate_edit,
    planted_corpus,
    second_moment,
)
from kloc_lens.edit.generate import generate_greedy, generates
from kloc_lens.facts import Fact

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]


def _slow_continuation(model, text: str, n_tokens: int) -> list[int]:
    """One prompt, one token at a time, no padding: the reference for the batched loop."""
    tokens = model.to_tokens(text)
    out = []
    with torch.no_grad():
        for _ in range(n_tokens):
            token = int(model(tokens)[0, -1].argmax())
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]], device=tokens.device)], 1)
    return out


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    prompts = ["the cat sat on", "a dog", "the mat is red and the cat"]
    batched = generate_greedy(tiny, prompts, n_tokens=4)
    assert batched == [_slow_continuation(tiny, p, 4) for p in prompts]


def test_an_answer_is_generated_only_as_whole_words(planted):
    model, facts = planted
    prompt = f"{facts.subjects[0]} lives in"
    continuation = generate_greedy(model, [prompt], n_tokens=2)[0]
    text = model.to_string(continuation)
    assert text.lstrip().startswith(facts.objects[0])
    assert generates(model, continuation, facts.objects[0])
    assert not generates(model, continuation, facts.objects[0][:-1])  # a word's prefix
    assert not generates(model, continuation, facts.spare_objects[0])
    with pytest.raises(EditError, match="empty"):
        generates(model, continuation, "  ")
    with pytest.raises(EditError, match="n_tokens"):
        generate_greedy(model, [prompt], n_tokens=0)


def test_an_edited_model_generates_its_new_object(planted):
    """The planted model answers each subject's home; edited to a spare object, it must say the
    new object after the edited prompt and its paraphrase, and keep saying the neighbour's own,
    and each generated score equals a slow, unbatched generation under the committed edit."""
    model, facts = planted
    pairs = list(facts.pairs())
    items = [Fact(s, "home", o, entity_paraphrases=("{subject} lives in",)) for s, o in pairs]
    request = EditRequest(
        items[0], facts.spare_objects[0], neighbors=(items[1],), related=(), none_target="a"
    )
    stats = second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)
    editor = RomeEditor(
        layer=facts.mlp_layer, stats=stats, contexts=ContextSpec(count=3, lengths=(4,))
    )
    edit = editor.compute(model, request)
    (fact,) = evaluate_edit(model, edit, request).facts
    efficacy, paraphrase = fact.score("efficacy"), fact.score("paraphrase")
    assert (efficacy.pre_generated, efficacy.post_generated) == (0.0, 1.0)
    assert (paraphrase.pre_generated, paraphrase.post_generated) == (0.0, 1.0)
    assert fact.score("neighborhood").post_generated == 1.0

    def said(prompt: str, answer: str) -> float:
        n = 1 + len(model.to_tokens(" " + answer, prepend_bos=False)[0])
        return float(generates(model, _slow_continuation(model, prompt, n), answer))

    checks = {
        EditMetric.EFFICACY: (items[0].entity_prompt().text, request.target),
        EditMetric.NEIGHBORHOOD: (items[1].entity_prompt().text, items[1].object),
        EditMetric.RELATION_ADD: (request.add_prompt().text, "home"),
    }
    before = {metric: said(*args) for metric, args in checks.items()}
    with edit.commit(model):
        after = {metric: said(*args) for metric, args in checks.items()}
    for metric in checks:
        score = fact.score(metric)
        assert (score.pre_generated, score.post_generated) == (before[metric], after[metric])
