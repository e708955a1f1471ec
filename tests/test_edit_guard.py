"""The collapse guard: its signs against direct computations, working edits pass, a
deliberately huge update is flagged disabling, batched checks equal one at a time."""

from __future__ import annotations

import math

import pytest
import torch

from kloc_lens.edit import (
    EditError,
    EditRequest,
    LowRankEdit,
    LowRankUpdate,
)
from kloc_lens.edit.guard import (
    CollapseCheck,
    CollapseThresholds,
    check_collapse,
    check_collapse_each,
    generate_greedy,
    ngram_entropy,
    text_loss,
    update_ratio,
)

TEXTS = ["The mother tongue of Danielle Darrieux is", "Edwin Hubble works in the field of", "a"]


def test_ngram_entropy_identities():
    assert ngram_entropy([7] * 12) == 0.0  # one token repeated: every n-gram the same
    distinct = list(range(10))  # 9 distinct bigrams, 8 distinct trigrams
    expected = (2 / 3 * math.log2(9) + 4 / 3 * math.log2(8)) / 2
    assert ngram_entropy(distinct) == pytest.approx(expected, rel=1e-12)
    assert ngram_entropy([1, 2, 1, 2], ns=(2,), weights=(1.0,)) == pytest.approx(
        -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    )  # bigrams 12, 21, 12
    assert ngram_entropy([5]) == 0.0
    with pytest.raises(EditError, match="must pair up"):
        ngram_entropy([1, 2], ns=(2, 3), weights=(1.0,))


def test_text_loss_equals_each_text_alone(tiny):
    expected_total, expected_count = 0.0, 0
    for text in TEXTS:
        tokens = tiny.to_tokens(text)
        if tokens.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = tiny(tokens)[0].float()
        loss = torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:], reduction="sum")
        expected_total += float(loss)
        expected_count += tokens.shape[1] - 1
    assert text_loss(tiny, TEXTS, batch_size=2) == pytest.approx(
        expected_total / expected_count, rel=1e-5
    )
    with pytest.raises(EditError, match="texts must be a non-empty sequence of strings"):
        text_loss(tiny, "one text")
    with pytest.raises(EditError, match="texts must be a non-empty sequence"):
        text_loss(tiny, [])


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    batched = generate_greedy(tiny, TEXTS[:2], n_tokens=6)
    for text, run in zip(TEXTS[:2], batched, strict=True):
        tokens = tiny.to_tokens(text)
        alone = []
        with torch.no_grad():
            for _ in range(6):
                token = int(tiny(tokens)[0, -1].argmax())
                alone.append(token)
                tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        assert run == alone
    with pytest.raises(EditError, match="n_tokens must be an integer >= 1"):
        generate_greedy(tiny, TEXTS, n_tokens=0)


def test_update_ratio_is_the_frobenius_ratio_summed_per_weight(tiny):
    from kloc_lens.edit import Projection
    from kloc_lens.model import model_identity

    g = torch.Generator().manual_seed(0)
    d_mlp, d_model = tiny.cfg.d_mlp, tiny.cfg.d_model
    parts = [
        LowRankUpdate(
            1,
            Projection.W_OUT,
            torch.randn(d_mlp, 1, generator=g),
            torch.randn(1, d_model, generator=g),
        )
        for _ in range(2)
    ]
    other = LowRankUpdate(
        0,
        Projection.W_OUT,
        torch.randn(d_mlp, 1, generator=g) * 1e-3,
        torch.randn(1, d_model, generator=g),
    )
    edit = LowRankEdit(model_identity(tiny), (*parts, other))
    weight = tiny.blocks[1].mlp.W_out.detach()
    expected = float((parts[0].delta() + parts[1].delta()).norm() / weight.norm())
    assert update_ratio(tiny, edit) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(EditError, match="no updates"):
        update_ratio(tiny, LowRankEdit(model_identity(tiny), ()))


@pytest.fixture(scope="module")
def factworld_edits():
    """Four ROME edits of the shipped factworld model (a language model with a real loss and
    varied continuations), one of them scaled 100-fold: a deliberately huge update."""
    from kloc_lens.edit import ContextSpec
    from kloc_lens.factworld import NONE_ANSWER, load_factworld, rome_editor

    model, world = load_factworld()
    editor = rome_editor(model, world, contexts=ContextSpec(count=1))
    facts = [f for f in world.facts if f.new_object][:8:2]
    requests = [EditRequest(f, none_target=NONE_ANSWER) for f in facts]
    edits = editor.compute_each(model, requests)
    (update,) = edits[1].updates
    scaled = LowRankUpdate(update.layer, update.projection, update.left * 100, update.right)
    edits[1] = LowRankEdit(edits[1].model, (scaled,))
    corpus = list(world.corpus())[:8]
    texts = [[t for t in corpus if r.fact.subject not in t][:3] for r in requests]
    prompts = [f.entity_prompt().text for f in world.facts[-40::10]]
    return model, edits, texts, prompts, update


def test_working_edits_pass_and_a_huge_update_is_disabling(factworld_edits):
    model, edits, texts, prompts, unscaled = factworld_edits
    checks = [
        check_collapse(model, edit, texts=t, prompts=prompts, n_tokens=8)
        for edit, t in zip(edits, texts, strict=True)
    ]
    for index in (0, 2, 3):
        assert not checks[index].disabling, checks[index].reasons
        assert abs(checks[index].loss_change) < 0.05
    huge = checks[1]
    assert huge.disabling
    assert any(r.startswith("update |dW|/|W|") for r in huge.reasons)
    assert any(r.startswith("loss on unrelated texts rose") for r in huge.reasons)
    ratio = update_ratio(model, LowRankEdit(edits[1].model, (unscaled,)))
    assert huge.update_ratio == pytest.approx(100 * ratio, rel=1e-4)
    assert huge.loss_before == pytest.approx(text_loss(model, texts[1]))  # model unchanged
    data = huge.as_dict()
    assert data["disabling"] is True and data["loss_change"] == pytest.approx(huge.loss_change)
    assert CollapseCheck.from_dict(data) == huge


def test_checking_many_edits_in_one_batch_equals_one_at_a_time(factworld_edits):
    model, edits, texts, prompts, _ = factworld_edits
    alone = [
        check_collapse(model, edit, texts=t, prompts=prompts[: 2 + i % 2], n_tokens=6)
        for i, (edit, t) in enumerate(zip(edits, texts, strict=True))
    ]
    batched = check_collapse_each(
        model,
        edits,
        texts=texts,
        prompts=[prompts[: 2 + i % 2] for i in range(len(edits))],
        n_tokens=6,
        batch_size=5,  # batches that cut across edits
    )
    for a, b in zip(alone, batched, strict=True):
        assert b.reasons == a.reasons
        assert b.update_ratio == a.update_ratio
        for name in ("loss_before", "loss_after", "entropy_before", "entropy_after"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-5, abs=1e-6)
    given = check_collapse_each(
        model,
        edits,
        texts=texts,
        prompts=[prompts[:2]] * len(edits),
        n_tokens=6,
        before=[(0.0, 100.0)] * len(edits),
    )
    assert all(any("entropy fell" in r for r in c.reasons) for c in given)  # `before` is used
    with pytest.raises(EditError, match="texts must hold one entry per edit: 1 for 4"):
        check_collapse_each(model, edits, texts=texts[:1], prompts=[prompts] * 4)


def test_row_edit_hooks_equal_each_edit_applied_alone(factworld_edits):
    from kloc_lens.edit.apply import row_edit_hooks

    model, edits, _, prompts, _ = factworld_edits
    tokens = model.to_tokens(prompts[:1]).repeat(3, 1)
    owners = [2, -1, 0]
    with torch.no_grad():
        rows = model.run_with_hooks(tokens, fwd_hooks=row_edit_hooks(model, edits, owners))
        for row, owner in enumerate(owners):
            if owner < 0:
                expected = model(tokens[row : row + 1])
            else:
                with edits[owner].applied(model):
                    expected = model(tokens[row : row + 1])
            torch.testing.assert_close(rows[row : row + 1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(EditError, match="row owners must lie in -1..3"):
        row_edit_hooks(model, edits, [4])


@pytest.mark.parametrize(
    ("field", "value"),
    [("update_ratio", 0.0), ("loss_increase", float("nan")), ("entropy_share", -1.0)],
)
def test_thresholds_must_be_positive_numbers(field, value):
    with pytest.raises(EditError, match=f"CollapseThresholds.{field} must be a finite number > 0"):
        CollapseThresholds(**{field: value})
