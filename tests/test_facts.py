"""Facts, prompts and spans from tokenizer offsets."""

from __future__ import annotations

import pytest
import torch
from models import SUBSTRATE, save_tiny_checkpoint

import kloc_lens as kl
from kloc_lens.facts import format_template
from kloc_lens.model import load_hooked_transformer

pytestmark = pytest.mark.substrate


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    save_tiny_checkpoint(directory)
    if SUBSTRATE == "hooked_transformer":
        return load_hooked_transformer(directory)
    return kl.load_model(directory)


def test_fact_prompts_record_where_fields_landed():
    fact = kl.Fact(
        "Lyon",
        "twin city",
        "Beirut",
        entity_template="In {subject}, the {relation} of {subject} is",
    )
    prompt = fact.entity_prompt()
    assert prompt.text == "In Lyon, the twin city of Lyon is"
    assert prompt.char_spans["subject"] == (3, 7)  # first use of the field
    assert prompt.text[slice(*prompt.char_spans["relation"])] == "twin city"
    relation = fact.relation_prompt()
    assert relation.text == "The relation between Lyon and Beirut is"
    assert relation.target == "twin city"
    assert relation.text[slice(*relation.char_spans["object"])] == "Beirut"
    add = fact.relation_prompt(object="Manila")
    assert add.text == "The relation between Lyon and Manila is"
    assert add.perspective is kl.Perspective.RELATION


def test_literal_relation_in_template_is_found():
    fact = kl.Fact(
        "Danielle Darrieux",
        "mother tongue",
        "French",
        entity_template="The mother tongue of {subject} is",
    )
    prompt = fact.entity_prompt()
    assert prompt.text[slice(*prompt.char_spans["relation"])] == "mother tongue"


def test_paraphrases_and_perspectives():
    fact = kl.Fact(
        "Danielle Darrieux",
        "mother tongue",
        "French",
        entity_paraphrases=("{subject} grew up speaking",),
        relation_paraphrases=("{subject} and {object} are linked by",),
    )
    assert [p.text for p in fact.prompts("entity")] == [
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux grew up speaking",
    ]
    assert len(fact.prompts(kl.Perspective.RELATION)) == 2


def test_bad_templates_raise():
    with pytest.raises(kl.SpanError, match="no \\{subject\\} field"):
        kl.Fact("A", "r", "B", entity_template="The r of X is")
    with pytest.raises(kl.SpanError, match="needs both"):
        kl.Fact("A", "r", "B", relation_template="{subject} relates to")
    with pytest.raises(kl.SpanError, match="has field \\{country\\}"):
        format_template("{country} is", {"subject": "x"})
    with pytest.raises(kl.SpanError, match="subject is empty"):
        kl.Fact(" ", "r", "B")


def test_word_level_spans_with_bos(tiny):
    prompt = kl.tokenize(
        tiny, kl.Fact("Danielle Darrieux", "mother tongue", "French").entity_prompt()
    )
    assert prompt.str_tokens[0] == "<bos>"
    assert prompt.span("subject") == kl.TokenSpan(5, 7)
    assert prompt.span("relation").positions == (2, 3)
    assert prompt.span("last").positions == (7,)
    assert torch.equal(prompt.tokens, tiny.to_tokens(prompt.text)[0])


def test_bpe_spans_with_leading_spaces_and_multi_token_names(bpe):
    fact = kl.Fact("Danielle Darrieux", "mother tongue", "French")
    prompt = kl.tokenize(bpe, fact.entity_prompt())
    assert torch.equal(prompt.tokens, bpe.to_tokens(prompt.text)[0].cpu())
    subject = prompt.span("subject")
    decoded = "".join(prompt.str_tokens[subject.start : subject.end])
    assert decoded.strip() == "Danielle Darrieux"
    # the token before the subject does not belong to it, the one after neither
    assert "Danielle" not in prompt.str_tokens[subject.start - 1]
    assert prompt.str_tokens[subject.end].strip() == "is"
    assert len(subject) >= 2


def test_repeated_string_is_found_where_the_template_put_it(bpe):
    fact = kl.Fact(
        "Lyon",
        "twin city",
        "Beirut",
        entity_template="Lyon is a city. The twin city of {subject} is",
    )
    prompt = kl.tokenize(bpe, fact.entity_prompt())
    subject = prompt.span("subject")
    second = prompt.text.index("Lyon", 1)
    assert prompt.offsets[subject.start][0] >= second - 1
    assert prompt.offsets[subject.last][1] == second + len("Lyon")
    assert "".join(prompt.str_tokens[subject.start : subject.end]).strip() == "Lyon"


def test_plain_string_prompts_and_missing_spans(bpe):
    prompt = kl.tokenize(bpe, "Edwin Hubble works in the field of", subject="Edwin Hubble")
    assert "".join(prompt.str_tokens[slice(*_bounds(prompt.span("subject")))]).strip() == (
        "Edwin Hubble"
    )
    with pytest.raises(kl.SpanError, match="'Einstein' does not occur in prompt 'Edwin"):
        kl.tokenize(bpe, "Edwin Hubble works in the field of", subject="Einstein")
    with pytest.raises(kl.SpanError, match="has no 'object' span"):
        prompt.span("object")
    with pytest.raises(kl.SpanError, match="position 40 is outside"):
        prompt.positions([40])
    assert prompt.positions([-1]) == (len(prompt) - 1,)


def _bounds(span):
    return span.start, span.end


def test_target_tokens_in_context(bpe):
    prompt = kl.Fact("Danielle Darrieux", "mother tongue", "French").entity_prompt()
    ids = kl.target_token_ids(bpe, prompt)
    full = bpe.tokenizer(prompt.text + " French", add_special_tokens=False)["input_ids"]
    alone = bpe.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert ids == full[len(alone) :]
    assert bpe.tokenizer.decode(ids).strip() == "French"
    with pytest.raises(kl.SpanError, match="target '  ' for prompt"):
        kl.target_token_ids(bpe, prompt, "  ")


def test_target_that_tokenizes_to_nothing(tiny):
    prompt = kl.Fact("Danielle Darrieux", "mother tongue", "French").entity_prompt()
    assert kl.target_token_ids(tiny, prompt) == [tiny.tokenizer.convert_tokens_to_ids("French")]


def test_tokenize_batch_pads_right(tiny):
    batch = kl.tokenize_batch(
        tiny, ["The capital of Germany is", "Edwin Hubble works in the field of"]
    )
    assert batch.tokens.shape == (2, 8)
    assert batch.last.tolist() == [5, 7]
    assert batch.tokens[0, 6:].tolist() == [tiny.tokenizer.pad_token_id] * 2
    with pytest.raises(kl.SpanError, match="no prompts"):
        kl.tokenize_batch(tiny, [])


FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


def test_a_prompt_longer_than_the_context_is_refused_before_any_forward(tiny):
    long = "The " * 70
    with pytest.raises(kl.PromptError, match="is 71 tokens long, more than the model's context"):
        kl.tokenize(tiny, long)
    calls = []
    with tiny.hooks(fwd_hooks=[("hook_embed", lambda act, hook: calls.append(1))]):
        with pytest.raises(kl.PromptError, match="context of n_ctx=64 tokens"):
            kl.causal_trace(tiny, kl.Prompt.from_text(long.strip(), "French"), progress=False)
        with pytest.raises(kl.PromptError, match="context of n_ctx=64 tokens"):
            kl.activation_patching(
                tiny, long, kl.ZeroAblation(span=[1]), kl.TargetProb(3), progress=False
            )
    assert calls == []


def test_what_is_not_one_prompt_is_refused(tiny, unchecked):
    batch = kl.tokenize_batch(tiny, [FACT.entity_prompt(), FACT.relation_prompt()])
    with pytest.raises(kl.PromptError, match="got list \\(several prompts: tokenize_batch"):
        kl.tokenize(tiny, ["The mother tongue", "of"])
    with pytest.raises(
        kl.PromptError, match="prompt must be a Prompt or a string, got PromptBatch"
    ):
        kl.tokenize(tiny, batch)
    with pytest.raises(kl.PromptError, match="got Fact \\(a Fact: pass fact.entity_prompt"):
        kl.tokenize(tiny, FACT)
    with pytest.raises(kl.PromptError, match="got int"):
        kl.tokenize(tiny, 3)
    with pytest.raises(kl.PromptError, match="got PromptBatch"):
        kl.activation_patching(tiny, batch, kl.ZeroAblation(), kl.TargetProb(3), progress=False)
    with pytest.raises(kl.PromptError, match="subject must be a string, got int"):
        kl.tokenize(tiny, "The mother tongue of Danielle Darrieux is", subject=3)
    with pytest.raises(kl.PromptError, match="tokenize_batch takes a sequence of prompts, got one"):
        kl.tokenize_batch(tiny, "The mother tongue of Danielle Darrieux is")
    with pytest.raises(kl.PromptError, match="target must be a string, got int"):
        kl.target_token_ids(tiny, FACT.entity_prompt(), 7)  # type: ignore[arg-type]
    # a tokenized prompt is taken as its prompt
    assert kl.tokenize(tiny, kl.tokenize(tiny, FACT.entity_prompt())).str_tokens[-1] == "is"


def test_text_the_tokenizer_cannot_write_is_refused(tiny):
    unknown = kl.Fact("Zorblax Darrieux", "mother tongue", "French")
    with pytest.raises(kl.PromptError, match="subject 'Zorblax Darrieux' .* unknown token '<unk>'"):
        kl.tokenize(tiny, unknown.entity_prompt())
    with pytest.raises(kl.PromptError, match="subject 'Zorblax Darrieux' .* not in the vocab"):
        kl.causal_trace(tiny, unknown, progress=False)
    with pytest.raises(kl.PromptError, match="subject 'Zorblax Darrieux'"):
        kl.activation_patching(
            tiny, unknown.entity_prompt(), kl.ZeroAblation(), kl.TargetProb(3), progress=False
        )
    odd_relation = kl.Fact("Danielle Darrieux", "mother glossa", "French")
    with pytest.raises(kl.PromptError, match="relation 'mother glossa'"):
        kl.tokenize(tiny, odd_relation.entity_prompt())
    prompt = FACT.entity_prompt()
    with pytest.raises(kl.PromptError, match="'Klingon' is not in the vocabulary: its first token"):
        kl.causal_trace(tiny, prompt, target="Klingon", progress=False)
    with pytest.raises(kl.PromptError, match="'French Klingon' .* token 1 of it is the unknown"):
        kl.target_token_ids(tiny, prompt, "French Klingon")
    with pytest.raises(kl.PromptError, match="'Klingon French' .* its first token is the unknown"):
        kl.target_token_ids(tiny, prompt, "Klingon French")


def test_ids_outside_the_models_vocabulary_are_refused(tiny, monkeypatch):
    monkeypatch.setattr(tiny.cfg, "d_vocab", 5)
    with pytest.raises(kl.PromptError, match="outside the model's vocabulary 0..4"):
        kl.tokenize(tiny, FACT.entity_prompt())


def test_templates_with_stray_braces_or_unknown_fields_are_refused():
    with pytest.raises(
        kl.SpanError, match="Fact.entity_template 'The {relation} of {subject} is }"
    ):
        kl.Fact("Ana", "home", "Rome", entity_template="The {relation} of {subject} is }")
    with pytest.raises(kl.SpanError, match="is not a valid template .*write a literal brace"):
        kl.Fact("Ana", "home", "Rome", entity_paraphrases=("{subject} lives in {",))
    with pytest.raises(kl.SpanError, match="Fact.relation_paraphrases\\[0\\] '{subject} {object"):
        kl.Fact("Ana", "home", "Rome", relation_paraphrases=("{subject} {object",))
    with pytest.raises(kl.SpanError, match="has field {subjct}, expected only {subject}"):
        kl.Fact("Ana", "home", "Rome", entity_template="The {relation} of {subjct} is {subject}")
    with pytest.raises(kl.SpanError, match="template 'x {a' is not a valid template"):
        format_template("x {a", {"a": "b"})
    literal = kl.Fact("Ana", "home", "Rome", entity_template="The {{home}} of {subject} is")
    assert literal.entity_prompt().text == "The {home} of Ana is"


def test_fact_fields_have_their_types(unchecked):
    with pytest.raises(kl.SpanError, match="Fact.subject must be a string, got int"):
        kl.Fact(3, "home", "Rome")  # type: ignore[arg-type]
    with pytest.raises(
        kl.SpanError, match="Fact.entity_paraphrases must be a tuple of strings, got"
    ):
        kl.Fact("Ana", "home", "Rome", entity_paraphrases="{subject} lives in")  # type: ignore[arg-type]
    with pytest.raises(kl.SpanError, match="Fact.neighborhood_prompts holds 3, not a string"):
        kl.Fact("Ana", "home", "Rome", neighborhood_prompts=("a", 3))  # type: ignore[arg-type]
    with pytest.raises(kl.SpanError, match="Fact.new_object must be a string, got float"):
        kl.Fact("Ana", "home", "Rome", new_object=1.5)  # type: ignore[arg-type]
    listed = kl.Fact("Ana", "home", "Rome", entity_paraphrases=["{subject} lives in"])  # type: ignore[arg-type]
    assert listed.entity_paraphrases == ("{subject} lives in",)


def test_an_unknown_perspective_names_the_choices():
    with pytest.raises(
        kl.PromptError, match="perspective must be one of 'entity', 'relation', got"
    ):
        FACT.prompts("object")
    assert [p.perspective for p in FACT.prompts("relation")] == [kl.Perspective.RELATION]


def test_spans_match_whole_words():
    fact = kl.Fact("Ana", "age", "12", entity_template="The language of {subject} is")
    assert "relation" not in fact.entity_prompt().char_spans
    worded = kl.Fact("Ana", "age", "12", entity_template="The language and age of {subject} is")
    prompt = worded.entity_prompt()
    assert prompt.text[slice(*prompt.char_spans["relation"])] == "age"
    assert prompt.char_spans["relation"] == (17, 20)
    with pytest.raises(kl.SpanError, match="relation 'age' does not occur in prompt"):
        kl.Prompt.from_text("The language of Ana is", relation="age")
    assert kl.Prompt.from_text("Her age is", relation="age").char_spans["relation"] == (4, 7)
    assert kl.Prompt.from_text("In Lyon, Lyo is", subject="Lyo").char_spans["subject"] == (9, 12)


def test_positions_must_be_integers(tiny, unchecked):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    with pytest.raises(kl.SpanError, match="position 1.7 of prompt .* is not an integer"):
        prompt.positions([1.7])
    with pytest.raises(kl.SpanError, match="positions must be a span name or a sequence"):
        prompt.positions(3)  # type: ignore[arg-type]
    assert prompt.positions(torch.tensor([1, -1])) == (1, len(prompt) - 1)


def test_token_tensors_are_checked_against_vocabulary_and_context(tiny):
    from kloc_lens.facts import check_tokens

    d_vocab = tiny.cfg.d_vocab
    check_tokens(tiny, torch.tensor([[0, d_vocab - 1]]), "corrupted tokens")
    with pytest.raises(kl.PromptError, match=f"corrupted tokens hold ids \\[-1, {d_vocab}\\], out"):
        check_tokens(tiny, torch.tensor([[-1, 3, d_vocab]]), "corrupted tokens")
    with pytest.raises(kl.PromptError, match="clean tokens are 65 tokens long, more than the mod"):
        check_tokens(tiny, torch.zeros(1, 65, dtype=torch.long), "clean tokens")
    with pytest.raises(kl.PromptError, match="must be an integer tensor of token ids, got torch.f"):
        check_tokens(tiny, torch.zeros(1, 3), "corrupted tokens")
