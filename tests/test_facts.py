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
