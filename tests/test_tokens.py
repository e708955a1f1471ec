"""One BOS and padding rule (kloc_lens._tokens), used alike by prompts (facts) and edits."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from models import word_tokenizer

import kloc_lens as kl
from kloc_lens import _tokens
from kloc_lens.edit import _tokens as edit_tokens

pytestmark = pytest.mark.substrate

TEXTS = ["The mother tongue of Danielle Darrieux is", "The capital of"]


def _fake(prepend: bool, pad: bool):
    tokenizer = copy.deepcopy(word_tokenizer())
    if not pad:
        tokenizer.pad_token = None
    return SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(default_prepend_bos=prepend))


@pytest.mark.parametrize("prepend", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("pad", [True, False], ids=["pad-token", "eos-as-pad"])
def test_prompts_and_edits_share_one_bos_and_padding_rule(prepend, pad):
    model = _fake(prepend, pad)
    bos = model.tokenizer.bos_token_id
    assert _tokens.bos_id(model) == (bos if prepend else None)
    for text in TEXTS:
        prompt = kl.tokenize(model, text)
        assert prompt.tokens.tolist() == edit_tokens.encode(model, text)
        assert (int(prompt.tokens[0]) == bos) is prepend
        assert prompt.offsets[0] == ((0, 0) if prepend else (0, 3))
    expected_pad = model.tokenizer.pad_token_id if pad else model.tokenizer.eos_token_id
    assert _tokens.pad_id(model) == expected_pad
    batch = kl.tokenize_batch(model, TEXTS)
    model.parameters = lambda: iter([torch.zeros(1)])  # edit rows go to the model's device
    rows = edit_tokens.pad_rows(model, [edit_tokens.encode(model, t) for t in TEXTS])
    assert torch.equal(batch.tokens, rows.tokens)
    short = len(edit_tokens.encode(model, TEXTS[1]))
    assert rows.lengths[1] == short and int(batch.last[1]) == short - 1
    assert set(batch.tokens[1, short:].tolist()) == {expected_pad}


def test_the_subject_span_never_covers_bos(tiny):
    prompt = kl.tokenize(tiny, "Danielle Darrieux is", subject="Danielle Darrieux")
    assert prompt.tokens[0] == tiny.tokenizer.bos_token_id
    assert prompt.span("subject").positions == (1, 2)
