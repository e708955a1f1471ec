"""Hooks that never fire are errors, and hooks never outlive a call: the engine's patch, restore
and cache hooks and the edits' hooks, on the substrate under test (a TransformerBridge, or with
KLOC_SUBSTRATE=hooked_transformer a TransformerLens 3.9 HookedTransformer)."""

from __future__ import annotations

import pytest
import torch
from models import as_substrate, tiny_hf, word_tokenizer
from transformer_lens.hook_points import HookPoint

import kloc_lens as kl
from kloc_lens.edit import LowRankEdit, LowRankUpdate, Projection, applied, edit_hooks
from kloc_lens.engine import Patch, Run, Source, execute, passes, runner
from kloc_lens.model import model_identity, substrate
from kloc_lens.sites import refresh_hook_registry

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


@pytest.fixture(scope="module")
def dead():
    """A tiny model with a hook point ``blocks.{l}.mlp.hook_dead`` that nothing calls, and
    ``blocks.{l}.mlp.hook_half``: called at layer 0 only."""
    model = as_substrate(tiny_hf(seed=11), word_tokenizer(), "kloc-dead-hooks")
    kl.add_hook_point(model, "blocks.0.mlp", "hook_half")
    for layer in range(int(model.cfg.n_layers)):
        model.blocks[layer].mlp.add_module("hook_dead", HookPoint())
        if layer > 0:
            model.blocks[layer].mlp.add_module("hook_half", HookPoint())
    refresh_hook_registry(model)
    assert "blocks.2.mlp.hook_dead" in model.hook_dict
    assert "blocks.2.mlp.hook_half" in model.hook_dict
    return model


def _inputs(model):
    prompt = kl.tokenize(model, FACT.entity_prompt())
    corrupted = kl.TokenReplacement("Lyon Beirut").apply(model, prompt).tokens
    target = kl.target_token_ids(model, prompt.prompt)[0]
    return prompt, corrupted, kl.TargetProb(target, len(prompt) - 1)


# ---- point 6: a hook that never fires is an error ----------------------------------------------


def test_a_site_whose_hook_never_runs_is_an_error(dead):
    prompt, corrupted, metric = _inputs(dead)
    site = kl.Site("dead", "blocks.{layer}.mlp.hook_dead")
    with pytest.raises(
        kl.HookNotFiredError, match="hook 'blocks.1.mlp.hook_dead' did not run during a probe"
    ):
        kl.activation_patching(dead, prompt, corrupted, metric, site=site, layers=[1, 2])


def test_a_hook_dead_at_some_layers_is_caught_by_the_cached_runs(dead):
    prompt, corrupted, metric = _inputs(dead)
    site = kl.Site("half", "blocks.{layer}.mlp.hook_half")
    with pytest.raises(
        kl.HookNotFiredError,
        match=r"hooks 'blocks.1.mlp.hook_half', 'blocks.2.mlp.hook_half' did not run during "
        "the clean run",
    ):
        kl.activation_patching(dead, prompt, corrupted, metric, site=site, progress=False)
    live = kl.activation_patching(
        dead, prompt, corrupted, metric, site=site, layers=[0], progress=False
    )
    assert live.values.shape == (1, len(prompt))


def test_the_block_by_block_pass_checks_its_hooks(tiny, monkeypatch):
    original = runner.BlockRunner._pass_hooks

    def with_an_outside_hook(self, *args):
        return [*original(self, *args), ("hook_embed", lambda act, hook: act)]

    monkeypatch.setattr(runner.BlockRunner, "_pass_hooks", with_an_outside_hook)
    prompt, corrupted, metric = _inputs(tiny)
    with pytest.raises(
        kl.HookNotFiredError, match="'hook_embed' did not run during a block-by-block pass"
    ):
        kl.activation_patching(tiny, prompt, corrupted, metric, site="mlp_out", progress=False)


def test_the_plain_pass_checks_its_hooks(dead, monkeypatch):
    original = passes._plain_hooks

    def with_a_dead_hook(*args):
        return [*original(*args), ("blocks.0.mlp.hook_dead", lambda act, hook: act)]

    monkeypatch.setattr(passes, "_plain_hooks", with_a_dead_hook)
    prompt, corrupted, metric = _inputs(dead)
    configs = [(Patch(kl.get_site("mlp_out"), 1, 6, None, Source.CLEAN),)]
    runs = (Run(prompt.tokens[None]), Run(corrupted))
    with pytest.raises(
        kl.HookNotFiredError,
        match="'blocks.0.mlp.hook_dead' did not run during a packed forward pass",
    ):
        execute(dead, *runs, configs, metric, base=Source.CORRUPTED, shortcuts=False)


def test_a_patch_outside_the_sequence_names_its_hook(tiny):
    prompt, corrupted, metric = _inputs(tiny)
    site = kl.get_site("z")
    runs = (Run(prompt.tokens[None]), Run(corrupted))
    with pytest.raises(
        kl.SweepError,
        match="position 8 of the patch at 'blocks.0.hook_resid_pre' is outside its 8 positions",
    ):
        execute(
            tiny, *runs, [(Patch(kl.get_site("resid_pre"), 0, 8, None, Source.CLEAN),)], metric,
            base=Source.CORRUPTED,
        )  # fmt: skip
    with pytest.raises(
        kl.SweepError, match="head 4 of the patch at 'blocks.1.attn.hook_z' is outside its 4 heads"
    ):
        execute(tiny, *runs, [(Patch(site, 1, 2, 4, Source.CLEAN),)], metric, base=Source.CLEAN)


def _edit(model, layer=1):
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    generator = torch.Generator().manual_seed(layer)
    left = torch.randn(d_mlp, 1, generator=generator) * 0.1
    right = torch.randn(1, d_model, generator=generator)
    update = LowRankUpdate(layer, Projection.W_OUT, left, right)
    return LowRankEdit(model_identity(model), (update,))


def test_an_edit_whose_hook_never_runs_is_an_error(dead, monkeypatch):
    edit = _edit(dead)
    tokens = kl.tokenize(dead, FACT.entity_prompt()).tokens[None]
    monkeypatch.setattr(
        Projection, "output_hook", lambda self, layer: f"blocks.{layer}.mlp.hook_dead"
    )
    with (
        pytest.raises(
            kl.HookNotFiredError,
            match="hook 'blocks.1.mlp.hook_dead' did not run during a forward pass with an edit",
        ),
        applied(dead, edit),
    ):
        dead(tokens)
    with pytest.raises(kl.HookNotFiredError, match="'blocks.1.mlp.hook_dead' did not run"):
        dead.run_with_hooks(tokens, fwd_hooks=edit_hooks(dead, edit))
    # a pass that stops before the edited layer legitimately skips it
    with applied(dead, edit):
        dead.run_with_hooks(tokens, stop_at_layer=1)


def test_a_sweep_through_an_applied_edit_equals_the_committed_edit(tiny):
    """The edit's check sees whole forward passes only: the block-by-block passes that start
    above the edited layer are not errors, and give the committed edit's numbers."""
    prompt, _, _ = _inputs(tiny)
    edit = _edit(tiny, layer=0)
    with applied(tiny, edit):
        hooked = kl.causal_trace(tiny, prompt, window=1, progress=False)
    with edit.commit(tiny):
        committed = kl.causal_trace(tiny, prompt, window=1, progress=False)
    for a, b in zip(hooked, committed, strict=True):
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    plain = kl.causal_trace(tiny, prompt, window=1, progress=False)
    assert not torch.equal(plain.get("resid").values, hooked.get("resid").values)


# ---- point 7: hooks never outlive a call, also when the metric raises ----------------------------


class Boom(Exception):
    """Raised by the failing metric."""


class _Failing:
    """``p(target)`` at the last position that raises at its ``fail_at``-th call."""

    def __init__(self, metric, fail_at, declares):
        self.metric, self.fail_at, self.calls, self.declares = metric, fail_at, 0, declares

    def __call__(self, logits):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Boom(f"call {self.calls}")
        return self.metric(logits)


class _FailingDeclared(_Failing):
    """The same, declaring the one position it reads (the engine unembeds only there)."""

    @property
    def reads_positions(self):
        return self.metric.reads_positions


def _hook_state(model):
    """Every torch module hook and TransformerLens hook-point hook attached to the model."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    modules = {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind in kinds
        for key in getattr(module, kind, {})
    }
    points = {
        (name, kind)
        for name, point in model.hook_dict.items()
        for kind in ("fwd_hooks", "bwd_hooks")
        if getattr(point, kind)
    }
    globals_ = {
        kind
        for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
        if getattr(torch.nn.modules.module, kind)
    }
    return modules, points, globals_


SWEEPS = {
    "layer_pos": dict(api="patch", site="resid_pre", sweep="layer_pos"),
    "layer_head": dict(api="patch", site="z", sweep="layer_head"),
    "layer_pos_head": dict(api="patch", site="z", sweep="layer_pos_head"),
    "layer_pos (plain path)": dict(api="patch", site="embed", sweep="layer_pos"),
    "trace resid": dict(api="trace", kinds=("resid",), sever=()),
    "trace mlp": dict(api="trace", kinds=("mlp",), sever=()),
    "trace attn": dict(api="trace", kinds=("attn",), sever=()),
    "trace resid, mlp severed": dict(api="trace", kinds=(), sever=("mlp",)),
    "trace resid, attn severed": dict(api="trace", kinds=(), sever=("attn",)),
}


def _sweep(model, spec, metric, prompt, corrupted):
    if spec["api"] == "patch":
        return kl.activation_patching(
            model, prompt, corrupted, metric, site=spec["site"], sweep=spec["sweep"],
            batch_size=2, progress=False,
        )  # fmt: skip
    return kl.causal_trace(
        model, prompt, corruption=kl.GaussianNoise(scale=0.5, samples=2), kinds=spec["kinds"],
        sever=spec["sever"], window=2, metric=metric, batch_size=2, progress=False,
    )  # fmt: skip


@pytest.mark.parametrize("declares", [False, True], ids=["full-logits", "declared-position"])
@pytest.mark.parametrize("when", ["1st", "2nd", "middle", "last"])
@pytest.mark.parametrize("kind", list(SWEEPS))
def test_no_hook_outlives_a_metric_that_raises(tiny, kind, when, declares):
    prompt, corrupted, target = _inputs(tiny)
    before = _hook_state(tiny)
    if substrate(tiny) == "hooked_transformer":
        assert before == (set(), set(), set())  # nothing of its own: 'unchanged' means empty
    else:
        assert before[1:] == (set(), set())  # the bridge keeps its own module hooks only
    cls = _FailingDeclared if declares else _Failing
    counting = cls(target, 0, declares)
    _sweep(tiny, SWEEPS[kind], counting, prompt, corrupted)
    total = counting.calls
    assert total >= 4, "calls 1 and 2 score the cached runs, the others the patched passes"
    fail_at = {"1st": 1, "2nd": 2, "middle": (total + 3) // 2, "last": total}[when]
    clean_logits = tiny(prompt.tokens[None])
    metric = cls(target, fail_at, declares)
    with pytest.raises(Boom, match=f"call {fail_at}"):
        _sweep(tiny, SWEEPS[kind], metric, prompt, corrupted)
    assert metric.calls == fail_at
    assert _hook_state(tiny) == before
    assert torch.equal(tiny(prompt.tokens[None]), clean_logits)


@pytest.mark.parametrize("kind", list(SWEEPS))
def test_no_hook_outlives_a_sweep_that_raises_inside_a_hook(tiny, kind):
    """A failure inside the model's forward pass (here: a NaN check in a user's hook) leaves
    no hook either, on every sweep kind."""
    prompt, corrupted, target = _inputs(tiny)
    before = _hook_state(tiny)

    def exploding(act, hook):
        raise Boom(hook.name)

    with pytest.raises(Boom), tiny.hooks(fwd_hooks=[("blocks.2.hook_resid_post", exploding)]):
        _sweep(tiny, SWEEPS[kind], _Failing(target, 0, False), prompt, corrupted)
    assert _hook_state(tiny) == before
