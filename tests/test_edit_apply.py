"""Edits as hooks and as committed weights: the same numbers, and an exact undo."""

from __future__ import annotations

import pytest
import torch

from kloc_lens.edit import (
    EditError,
    LowRankEdit,
    LowRankUpdate,
    Projection,
    applied,
    commit,
    edit_hooks,
)
from kloc_lens.model import model_identity

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]


TEXTS = ["The mother tongue of Danielle Darrieux is", "Edwin Hubble works in the field of"]


def _random_edit(model, seed: int = 0, scale: float = 0.5) -> LowRankEdit:
    """Updates of rank 1-2 at several layers and both projections."""
    generator = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    d_z = cfg.n_heads * cfg.d_head

    def update(layer: int, projection: Projection, d_in: int, rank: int) -> LowRankUpdate:
        left = torch.randn(d_in, rank, generator=generator) * scale
        right = torch.randn(rank, cfg.d_model, generator=generator) * scale
        return LowRankUpdate(layer, projection, left, right)

    updates = (
        update(0, Projection.W_OUT, cfg.d_mlp, 1),
        update(2, Projection.W_OUT, cfg.d_mlp, 2),
        update(1, Projection.W_O, d_z, 1),
    )
    return LowRankEdit(model_identity(model), updates)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(text) for text in TEXTS]


def test_hooks_equal_committed_weights_at_several_layers_and_sites(tiny):
    edit = _random_edit(tiny)
    clean = _logits(tiny)
    with edit.applied(tiny):
        hooked = _logits(tiny)
    with edit.commit(tiny):
        committed = _logits(tiny)
    for a, b, c in zip(hooked, committed, clean, strict=True):
        assert (a - c).abs().max() > 1e-2  # the edit does something
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_committed_weights_are_the_originals_plus_the_updates(tiny):
    edit = _random_edit(tiny)
    before = {
        (u.layer, u.projection): u.projection.matrix(tiny, u.layer).clone() for u in edit.updates
    }
    with edit.commit(tiny) as handle:
        assert set(handle.weights) == set(before)
        for update in edit.updates:
            now = update.projection.matrix(tiny, update.layer)
            expected = before[(update.layer, update.projection)] + update.left @ update.right
            torch.testing.assert_close(now, expected, atol=1e-6, rtol=0)
    for (layer, projection), matrix in before.items():
        assert torch.equal(projection.matrix(tiny, layer), matrix)


def test_restore_is_bit_identical_and_idempotent(tiny):
    snapshot = _snapshot(tiny)
    handle = commit(tiny, _random_edit(tiny, seed=1), _random_edit(tiny, seed=2))
    assert not handle.restored
    assert any(not torch.equal(p, snapshot[n]) for n, p in tiny.named_parameters())
    handle.restore()
    handle.restore()
    assert handle.restored
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name


def test_restore_after_an_exception_inside_with(tiny):
    snapshot = _snapshot(tiny)
    with pytest.raises(ValueError, match="boom"), commit(tiny, _random_edit(tiny)):
        raise ValueError("boom")
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name


def test_stacked_commits_restore_in_reverse_order(tiny):
    snapshot = _snapshot(tiny)
    first = commit(tiny, _random_edit(tiny, seed=3))
    second = commit(tiny, _random_edit(tiny, seed=4))
    second.restore()
    first.restore()
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name


def test_restoring_out_of_order_is_refused_and_changes_nothing(tiny):
    snapshot = _snapshot(tiny)
    first = commit(tiny, _random_edit(tiny, seed=3))
    second = commit(tiny, _random_edit(tiny, seed=4))
    both = _snapshot(tiny)
    with pytest.raises(EditError, match="also changed W_out of layer 0, W_O of layer 1"):
        first.restore()
    assert not first.restored
    for name, param in tiny.named_parameters():
        assert torch.equal(param, both[name]), name
    second.restore()
    first.restore()
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name


def test_commits_of_disjoint_weights_restore_in_any_order(tiny):
    snapshot = _snapshot(tiny)
    edit = _random_edit(tiny, seed=5)
    w_out_0 = Projection.W_OUT.weight(tiny, 0)
    before = w_out_0.detach().clone()
    first = commit(tiny, LowRankEdit(edit.model, edit.updates[:1]))  # W_out of layer 0
    second = commit(tiny, LowRankEdit(edit.model, edit.updates[1:]))  # layer 2, W_O of layer 1
    others = [(2, Projection.W_OUT), (1, Projection.W_O)]
    edited = [p.weight(tiny, layer).detach().clone() for layer, p in others]
    first.restore()
    assert torch.equal(Projection.W_OUT.weight(tiny, 0), before)
    for (layer, p), weight in zip(others, edited, strict=True):
        assert torch.equal(p.weight(tiny, layer), weight), (layer, p)
    second.restore()
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name


def test_several_edits_add_up(tiny):
    a, b = _random_edit(tiny, seed=5), _random_edit(tiny, seed=6)
    merged = LowRankEdit(a.model, a.updates + b.updates)
    with applied(tiny, a, b):
        together = _logits(tiny)
    with merged.applied(tiny):
        single = _logits(tiny)
    with commit(tiny, a, b):
        committed = _logits(tiny)
    for x, y, z in zip(together, single, committed, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        torch.testing.assert_close(x, z, atol=1e-5, rtol=0)


def test_hooks_are_removed_also_after_an_exception(tiny):
    edit = _random_edit(tiny)
    names = {name for name, _ in edit_hooks(tiny, edit)}
    assert names == {
        "hook_embed",  # with ln_final.hook_normalized: checks that the edit's hooks ran
        "ln_final.hook_normalized",
        "blocks.0.mlp.hook_post",
        "blocks.0.hook_mlp_out",
        "blocks.2.mlp.hook_post",
        "blocks.2.hook_mlp_out",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_attn_out",
    }
    clean = _logits(tiny)
    with pytest.raises(KeyError), edit.applied(tiny):
        assert all(tiny.hook_dict[name].fwd_hooks for name in names)
        raise KeyError("inside")
    assert not any(tiny.hook_dict[name].fwd_hooks for name in names)
    for a, b in zip(_logits(tiny), clean, strict=True):
        assert torch.equal(a, b)


def test_run_with_hooks_takes_the_edit_hooks(tiny):
    edit = _random_edit(tiny)
    tokens = tiny.to_tokens(TEXTS[0])
    with torch.no_grad():
        direct = tiny.run_with_hooks(tokens, fwd_hooks=edit_hooks(tiny, edit))
        with edit.applied(tiny):
            hooked = tiny(tokens)
    assert torch.equal(direct, hooked)


def test_edits_for_another_model_or_shape_are_refused(tiny, planted):
    model, _ = planted
    snapshot = _snapshot(tiny)
    foreign = _random_edit(model)
    with pytest.raises(EditError, match="computed on model 'kloc-planted"):
        commit(tiny, foreign)
    with pytest.raises(EditError, match="computed on model"), applied(tiny, foreign):
        pass
    wrong = LowRankEdit(
        model_identity(tiny),
        (LowRankUpdate(0, Projection.W_OUT, torch.zeros(7, 1), torch.zeros(1, tiny.cfg.d_model)),),
    )
    with pytest.raises(EditError, match=r"is \[7, 32\]; the model's is \[128, 32\]"):
        commit(tiny, wrong)
    far = LowRankEdit(
        model_identity(tiny),
        (LowRankUpdate(9, Projection.W_OUT, torch.zeros(128, 1), torch.zeros(1, 32)),),
    )
    with pytest.raises(EditError, match="layer 9; the model has 0..2"):
        commit(tiny, far)
    with pytest.raises(EditError, match="no edits given"):
        commit(tiny)
    for name, param in tiny.named_parameters():
        assert torch.equal(param, snapshot[name]), name
