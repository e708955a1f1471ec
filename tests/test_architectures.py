"""Editing, its evaluation and the study on every supported architecture.

Each architecture of :data:`models.ARCHITECTURES` (GPT-2, GPT-J, GPT-NeoX, Llama, Qwen2) is a
tiny random model built from its transformers config, wrapped as this run's substrate
(TransformerBridge, or TransformerLens 3.9's HookedTransformer with ``--substrate``). A random
model knows no fact, so each test first asks the model what it says ("The mother tongue of
Danielle Darrieux is" -> its greedy word) and takes that as the fact it knows. The sweeps and
traces are checked against the slow reference loops on the same models in ``test_engine.py``;
``scripts/support_table.py`` runs both files on both substrates and writes docs/support.md.
"""

from __future__ import annotations

import math

import pytest
import torch
from models import TESTED, WORDS, arch_substrate

import kloc_lens as kl
from kloc_lens.edit import (
    ContextSpec,
    EditRequest,
    MemitEditor,
    Projection,
    RomeEditor,
    evaluate_edit,
    second_moment,
)
from kloc_lens.study import StudyConfig, run_study

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

CONTEXTS = ContextSpec(count=2, lengths=(3,))
LAYER = 1  # the middle of three layers


def _words(model) -> list[str]:
    """The single-token words of the test vocabulary (objects and relations must be one)."""
    words = [w for w in dict.fromkeys(WORDS) if w.isalpha()]
    return [w for w in words if len(model.to_tokens(w, prepend_bos=False)[0]) == 1]


def _says(model, text: str, choices: list[str]) -> str:
    """The word among ``choices`` the model finds most likely after ``text``."""
    with torch.no_grad():
        logits = model(text)[0, -1]
    ids = [int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in choices]
    return choices[int(torch.stack([logits[i] for i in ids]).argmax())]


def _known_fact(model, subject: str, relation: str) -> kl.Fact:
    """A fact the random model knows: the object is what it says; the new object another word."""
    words = _words(model)
    probe = kl.Fact(subject, relation, "French")
    said = _says(model, probe.entity_prompt().text, words)
    new = next(w for w in ("English", "Paris", "Rome", "piano") if w != said)
    return kl.Fact(subject, relation, said, new_object=new)


def _corpus() -> list[str]:
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(words[i : i + 6]) for i in range(0, len(words) - 6, 2)]


@pytest.fixture(scope="module", params=TESTED)
def arch(request):
    model = arch_substrate(request.param)
    stats = second_moment(model, LAYER, _corpus(), progress=False)
    return request.param, model, stats


def _logits(model, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(text)[0, -1].float()


def test_rome_edit_writes_its_closed_form_and_restores_the_weights(arch):
    """A random model cannot be steered reliably by a value fit, but the closed form holds on
    any: the committed update maps the key to the fitted value (``k* W' = v*``), changes one
    matrix by rank one, equals the hooked edit, and restores bit for bit."""
    name, model, stats = arch
    fact = _known_fact(model, "Danielle Darrieux", "mother tongue")
    prompt = fact.entity_prompt().text
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = RomeEditor(layer=LAYER, stats=stats, contexts=CONTEXTS)
    edit = editor.compute(model, EditRequest(fact))
    with edit.applied(model):
        hooked = _logits(model, prompt)
    handle = edit.commit(model)
    committed = _logits(model, prompt)
    weight = Projection.W_OUT.weight(model, LAYER).detach().float()
    mapped = edit.key.float() @ weight
    changed = {
        n: p.detach() - before[n]
        for n, p in model.named_parameters()
        if not torch.equal(p, before[n])
    }
    handle.restore()
    torch.testing.assert_close(mapped, edit.value.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edit.value, edit.old_value), name
    torch.testing.assert_close(hooked, committed, rtol=1e-4, atol=1e-4)
    # one matrix, the MLP's output projection (the down projection of a gated MLP: its key is
    # the gated activation, mlp.hook_post), changed by rank one (float32 rounding aside)
    assert len(changed) == 1, f"{name}: {sorted(changed)}"
    ((matrix, delta),) = changed.items()
    assert "mlp" in matrix and int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4)) == 1, matrix
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{name}: {n} not restored"


def test_memit_edits_two_facts_as_hooks_and_as_weights(arch):
    name, model, stats = arch
    facts = [
        _known_fact(model, "Danielle Darrieux", "mother tongue"),
        _known_fact(model, "Edwin Hubble", "native language"),
    ]
    editor = MemitEditor(layers=(LAYER,), stats=stats, covariance_weight=1.0, contexts=CONTEXTS)
    edit = editor.compute(model, [EditRequest(f) for f in facts])
    prompts = [f.entity_prompt().text for f in facts]
    plain = [_logits(model, p) for p in prompts]
    with edit.applied(model):
        hooked = [_logits(model, p) for p in prompts]
    handle = edit.commit(model)
    committed = [_logits(model, p) for p in prompts]
    handle.restore()
    for p, h, c in zip(plain, hooked, committed, strict=True):
        torch.testing.assert_close(h, c, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(h, p), name  # the edit changes what the model says
    torch.testing.assert_close(_logits(model, prompts[0]), plain[0], rtol=0, atol=0)


def test_edits_are_scored_from_both_perspectives(arch):
    """The evaluation's efficacy margin is the new object's probability minus the old's after
    the edit, as the committed model gives them."""
    name, model, stats = arch
    fact = _known_fact(model, "Danielle Darrieux", "mother tongue")
    request = EditRequest(fact, none_target="a")  # "a" is one token here
    edit = RomeEditor(layer=LAYER, stats=stats, contexts=CONTEXTS).compute(model, request)
    scores = evaluate_edit(model, edit, request).facts[0]
    efficacy = scores.score("efficacy")
    assert efficacy.n_prompts == 1 and efficacy.pre == 0.0, name  # the old object is said
    words = (fact.new_object, fact.object)
    ids = [int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in words]
    handle = edit.commit(model)
    probs = _logits(model, fact.entity_prompt().text).softmax(-1)
    handle.restore()
    assert efficacy.post_margin == pytest.approx(float(probs[ids[0]] - probs[ids[1]]), abs=1e-5)
    assert efficacy.post == float(probs[ids[0]] > probs[ids[1]])
    assert efficacy.pre_generated == 0.0  # the unedited model generates the old object
    relation = [s for s in scores.scores if s.metric.value.startswith("relation") and s.n_prompts]
    assert relation and all(math.isfinite(s.pre) and math.isfinite(s.post) for s in relation)


SUBJECTS = ("Danielle Darrieux", "Edwin Hubble", "Toko Rama", "Vela Suri", "Nox Pell", "Kato Lind")


def _known_facts(model) -> list[kl.Fact]:
    """Facts the random model knows as the study checks it (its top-1 token over the whole
    vocabulary is the object's): of subjects x relations, those whose top-1 is a word."""
    words = set(_words(model))
    out = []
    for subject in SUBJECTS:
        for relation in ("mother tongue", "native language"):
            prompt = kl.Fact(subject, relation, "French").entity_prompt().text
            said = model.to_string(_logits(model, prompt).argmax()).strip()
            if said in words:
                new = next(w for w in ("English", "Paris", "Rome", "piano") if w != said)
                out.append(kl.Fact(subject, relation, said, new_object=new))
    return out


def test_the_study_runs_end_to_end(arch, tmp_path):
    name, model, _ = arch
    facts = _known_facts(model)
    assert len({f.subject for f in facts}) >= 2, name  # the guard needs another subject
    config = StudyConfig(
        n_trace=2,
        n_trace_relation_prompts=0,
        n_edit=1,
        n_layer_sweep=0,
        n_retrace=0,
        n_queries=0,
        samples=2,
        window=1,
        edit_layer=LAYER,
        edit_contexts=2,
        none_target="a",
        n_bootstrap=50,
    )
    result = run_study(model, facts, config, out=tmp_path, progress=False, corpus=_corpus())
    assert result.entity.n_facts == 2 and math.isfinite(result.entity.numbers["total_effect"].value)
    assert result.editing is not None and result.editing.layer == LAYER
    efficacy = result.editing.metrics["entity"]["efficacy"]["post"]
    assert efficacy.n == 1 and efficacy.value in (0.0, 1.0), name
    assert (tmp_path / "report.html").is_file() and (tmp_path / "results.json").is_file()
