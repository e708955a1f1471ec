"""The executor's shortcuts against the slow reference loops, on four architectures, and every
fallback to the plain path."""

from __future__ import annotations

import pytest
import torch
from models import TESTED, arch_substrate, as_substrate, tiny_hf, word_tokenizer
from reference import reference_sweep, rome_trace_loop

import kloc_lens as kl
from kloc_lens import engine
from kloc_lens.engine import Patch, Precision, Run, Source, adapter, cache, execute, plan
from kloc_lens.model import substrate

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]


FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")
TOL = 1e-5


@pytest.fixture(scope="module", params=TESTED)
def arch_model(request):
    return request.param, arch_substrate(request.param)


def _setup(model):
    prompt = kl.tokenize(model, FACT.entity_prompt())
    corrupted = kl.TokenReplacement("Lyon Beirut").apply(model, prompt).tokens
    target = kl.target_token_ids(model, prompt.prompt)[0]
    wrong = kl.target_token_ids(model, prompt.prompt, "English")[0]
    return prompt, corrupted, kl.LogitDiff(target, wrong)


def _reference(model, prompt, corrupted, metric, result, site, direction="restore"):
    s = kl.get_site(site)
    source = "clean" if direction == "restore" else "corrupted"
    base = "corrupted" if direction == "restore" else "clean"
    configs = []
    for layer in result.layers:
        if result.heads and result.positions:
            configs += [
                [(s.hook_name(layer), p, h, source, s.pos_dim, s.head_dim)]
                for p in result.positions
                for h in result.heads
            ]
        elif result.heads:
            configs += [
                [(s.hook_name(layer), None, h, source, s.pos_dim, s.head_dim)] for h in result.heads
            ]
        else:
            configs += [
                [(s.hook_name(layer), p, None, source, s.pos_dim, s.head_dim)]
                for p in result.positions
            ]
    return reference_sweep(model, prompt.tokens[None], corrupted, configs, metric, base=base)


def _stats_of(monkeypatch):
    """Record the ExecutionStats of every sweep run through kloc_lens.trace."""
    seen = []
    original = engine.execute

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.stats)
        return out

    monkeypatch.setattr(kl.trace, "execute", spy)
    return seen


# ---- the shortcuts equal the reference loop on every architecture ------------------------------


PATCH_CASES = [
    ("resid_pre", "layer_pos", "restore"),
    ("resid_post", "layer_pos", "inject"),
    ("attn_out", "layer_pos", "restore"),
    ("mlp_out", "layer_pos", "restore"),
    ("z", "layer_head", "restore"),
    ("k", "layer_pos_head", "restore"),
    ("v", "layer_head", "inject"),
    ("pattern", "layer_pos_head", "restore"),
    ("mlp_post", "layer_pos", "restore"),
]


@pytest.mark.parametrize(("site", "sweep", "direction"), PATCH_CASES)
def test_patching_matches_reference(arch_model, monkeypatch, site, sweep, direction):
    arch, model = arch_model
    prompt, corrupted, metric = _setup(model)
    if arch == "gptj" and site == "pattern" and substrate(model) == "bridge":
        # The bridge fires hook_pattern after HF's attention has used the pattern: refused,
        # rather than a flat map of the corrupted score.
        with pytest.raises(kl.SiteError, match="'pattern' cannot be patched on this model"):
            kl.activation_patching(
                model, prompt, corrupted, metric, site=site, sweep=sweep, progress=False
            )
        return
    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(
        model, prompt, corrupted, metric, site=site, sweep=sweep, direction=direction,
        progress=False,
    )  # fmt: skip
    expected = _reference(model, prompt, corrupted, metric, result, site, direction)
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    # Patches matter: the map is not flat (a discarded patch leaves float noise of ~1e-7).
    total = abs(result.clean_score - result.corrupted_score)
    assert (result.values - result.values.flatten()[0]).abs().max() > 1e-3 * total
    stats = seen[-1]
    assert stats.plain == 0, stats.fallback
    assert stats.fast > 0
    assert stats.work < 1


@pytest.mark.parametrize(
    ("kind", "window", "sever"),
    [("resid", 1, None), ("mlp", 3, None), ("attn", 2, None), ("resid", 1, "mlp")],
)
def test_causal_trace_matches_rome_loop(arch_model, monkeypatch, kind, window, sever):
    _, model = arch_model
    prompt = kl.tokenize(model, FACT.entity_prompt())
    noise = kl.GaussianNoise(scale=0.5, samples=4, seed=3)
    seen = _stats_of(monkeypatch)
    traces = kl.causal_trace(
        model,
        prompt,
        corruption=noise,
        kinds=() if sever else (kind,),
        sever=(sever,) if sever else (),
        window=window,
        progress=False,
    )
    made = noise.apply(model, prompt)
    target = kl.target_token_ids(model, prompt.prompt)[0]
    expected = rome_trace_loop(
        model, prompt.tokens[None], made.tokens, made.embed_edit, target, kind, window, sever=sever
    )
    got = traces.get(kind, sever)
    torch.testing.assert_close(got.values, expected, atol=TOL, rtol=0)
    assert got.values.std() > 0
    stats = seen[-1]
    assert stats.plain == 0 and stats.fast > 0 and stats.unchanged > 0
    assert stats.work < 0.5


def test_shortcuts_equal_plain_path_on_all_kinds(arch_model):
    _, model = arch_model
    prompt = kl.tokenize(model, FACT.entity_prompt())
    made = kl.GaussianNoise(scale=0.5, samples=3, seed=0).apply(model, prompt)
    target = kl.target_token_ids(model, prompt.prompt)[0]
    metric = kl.TargetProb(target, len(prompt) - 1)
    mlp = kl.get_site("mlp_out")
    resid = kl.get_site(
        "resid_mid" if "blocks.0.hook_resid_mid" in model.hook_dict else "resid_pre"
    )
    configs = [
        (
            Patch(resid, layer, pos, None, Source.CLEAN),
            *(Patch(mlp, other, pos, None, Source.CORRUPTED) for other in range(layer, 3)),
        )
        for layer in range(3)
        for pos in range(len(prompt))
    ]
    runs = (Run(prompt.tokens[None]), Run(made.tokens, made.embed_edit))
    fast = execute(model, *runs, configs, metric, base=Source.CORRUPTED)
    slow = execute(model, *runs, configs, metric, base=Source.CORRUPTED, shortcuts=False)
    torch.testing.assert_close(fast.values, slow.values, atol=TOL, rtol=0)
    assert fast.stats.fast > 0 and slow.stats.plain == len(configs)


# ---- the parts of the shortcuts --------------------------------------------------------------


def test_undeclared_metric_gets_full_logits(tiny, monkeypatch):
    prompt, corrupted, _ = _setup(tiny)

    def spread(logits):  # reads every position: no declaration
        return logits[:, :, 9].mean() - logits[:, 2:, 10].mean()

    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(tiny, prompt, corrupted, spread, progress=False)
    expected = _reference(tiny, prompt, corrupted, spread, result, "resid_pre")
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    assert seen[-1].fast > 0


def test_custom_site_in_a_block_takes_the_shortcut(monkeypatch):
    model = as_substrate(tiny_hf(seed=5), word_tokenizer(), "kloc-engine-custom")
    template = kl.add_hook_point(model, "blocks.{layer}.mlp", "hook_tap")
    site = kl.register_site("engine_tap", template, overwrite=True)
    try:
        prompt, corrupted, metric = _setup(model)
        seen = _stats_of(monkeypatch)
        result = kl.activation_patching(model, prompt, corrupted, metric, site=site, progress=False)
        expected = _reference(model, prompt, corrupted, metric, result, "engine_tap")
        torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
        assert seen[-1].fast > 0 and seen[-1].plain == 0
    finally:
        kl.unregister_site("engine_tap")


def test_masked_attention_scores_site(tiny, monkeypatch):
    """Scores hold -inf above the diagonal: equal infinities are unchanged, the rest compared."""
    site = kl.register_site(
        "engine_scores", "blocks.{layer}.attn.hook_attn_scores", pos_dim=1, head_dim=0,
        overwrite=True,
    )  # fmt: skip
    try:
        prompt, corrupted, metric = _setup(tiny)
        seen = _stats_of(monkeypatch)
        result = kl.activation_patching(
            tiny, prompt, corrupted, metric, site=site, sweep="layer_pos_head", progress=False
        )
        expected = _reference(tiny, prompt, corrupted, metric, result, "engine_scores")
        torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
        assert (result.values - result.values.flatten()[0]).abs().max() > 0
        assert seen[-1].fast > 0 and seen[-1].unchanged > 0
    finally:
        kl.unregister_site("engine_scores")


def test_inject_noisy_states_into_the_single_clean_row(tiny, monkeypatch):
    """Base run of one row, source run of several: the base's rows are spread over the source's."""
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    noise = kl.GaussianNoise(scale=0.5, samples=3, seed=2)
    metric = kl.TargetProb(kl.target_token_ids(tiny, prompt.prompt)[0], len(prompt) - 1)
    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(
        tiny, prompt, noise, metric, site="mlp_out", direction="inject", progress=False
    )
    made = noise.apply(tiny, prompt)
    configs = [
        [(f"blocks.{layer}.hook_mlp_out", pos, None, "corrupted", 0, None)]
        for layer in result.layers
        for pos in result.positions
    ]
    expected = reference_sweep(
        tiny,
        prompt.tokens[None],
        made.tokens,
        configs,
        metric,
        base="clean",
        corrupted_embed_edit=made.embed_edit,
    )
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    assert seen[-1].fast > 0 and seen[-1].unchanged > 0


def test_padded_rows_read_their_own_positions(tiny, monkeypatch):
    batch = kl.tokenize_batch(tiny, ["The mother tongue of Danielle Darrieux is", "The capital of"])
    bad = kl.tokenize_batch(tiny, ["The mother tongue of Lyon Beirut is", "The city of"])
    metric = kl.TargetProb([9, 10], batch.last)
    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(tiny, batch.tokens, bad.tokens, metric, progress=False)
    configs = [
        [(f"blocks.{layer}.hook_resid_pre", pos, None, "clean", 0, None)]
        for layer in result.layers
        for pos in result.positions
    ]
    expected = reference_sweep(tiny, batch.tokens, bad.tokens, configs, metric, base="corrupted")
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    assert seen[-1].fast > 0


def test_unchanged_configurations_score_the_base(tiny):
    prompt, corrupted, metric = _setup(tiny)
    resid = kl.get_site("resid_pre")
    configs = [
        (Patch(resid, 1, 0, None, Source.CLEAN),),
        (),
        (Patch(resid, 0, 7, None, Source.CLEAN),),
    ]
    out = execute(
        tiny, Run(prompt.tokens[None]), Run(corrupted), configs, metric, base=Source.CORRUPTED
    )
    # position 0 (BOS) and, at layer 0, a position after the replaced tokens are unchanged
    assert out.stats.unchanged == 3
    torch.testing.assert_close(out.values, torch.full((3,), out.corrupted_score), atol=0, rtol=0)


def test_memory_budget_splits_passes_without_changing_numbers(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    noise = kl.GaussianNoise(scale=0.5, samples=4, seed=1)
    big = kl.causal_trace(tiny, prompt, corruption=noise, progress=False)
    small = kl.causal_trace(tiny, prompt, corruption=noise, memory_budget=20_000, progress=False)
    one = kl.causal_trace(tiny, prompt, corruption=noise, batch_size=1, progress=False)
    for kind in ("resid", "mlp", "attn"):
        torch.testing.assert_close(big.get(kind).values, small.get(kind).values, atol=TOL, rtol=0)
        torch.testing.assert_close(big.get(kind).values, one.get(kind).values, atol=TOL, rtol=0)


def test_caches_hold_only_what_the_sweep_reads(tiny, monkeypatch):
    """One copy of each patched clean activation; from the base run only the residual stream
    where configurations may start (and what base-source patches read)."""
    stores = []
    original = cache.cache_run

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        stores.append(out.store)
        return out

    monkeypatch.setattr(cache, "cache_run", spy)
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    kl.causal_trace(
        tiny, prompt, kinds=("mlp",), window=1, sever=(), layers=[1], progress=False
    )  # fmt: skip
    clean, base = stores
    assert set(clean) == {"blocks.1.hook_mlp_out"}
    assert set(base) == {"blocks.1.hook_resid_pre"}
    assert clean["blocks.1.hook_mlp_out"].shape[0] == 1


def test_plan_passes_groups_by_start_position():
    items = [
        plan.Planned(i, layer, pos, [])
        for i, (layer, pos) in enumerate((layer, pos) for layer in range(4) for pos in range(8))
    ]
    passes = plan.plan_passes(
        items, rows=1, n_pos=8, n_layers=4, max_tokens=10**6, max_configs=None, min_tokens=0
    )
    assert sorted(i.index for _, members in passes for i in members) == list(range(32))
    for t0, members in passes:
        assert t0 == min(m.start_pos for m in members)
        padded = sum((8 - t0) * (4 - m.start_layer) for m in members)
        needed = sum((8 - m.start_pos) * (4 - m.start_layer) for m in members)
        assert padded <= (1 + plan.PACK_SLACK) * needed
    capped = plan.plan_passes(
        items, rows=1, n_pos=8, n_layers=4, max_tokens=10**6, max_configs=3, min_tokens=10**6
    )
    assert max(len(members) for _, members in capped) == 3


def test_reduced_precision_is_close_to_float32(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    made = kl.GaussianNoise(scale=0.5, samples=3, seed=0).apply(tiny, prompt)
    metric = kl.TargetProb(kl.target_token_ids(tiny, prompt.prompt)[0], len(prompt) - 1)
    site = kl.get_site("mlp_out")
    configs = [
        (Patch(site, layer, pos, None, Source.CLEAN),) for layer in range(3) for pos in range(8)
    ]
    runs = (Run(prompt.tokens[None]), Run(made.tokens, made.embed_edit))
    full = execute(tiny, *runs, configs, metric, base=Source.CORRUPTED)
    half = execute(tiny, *runs, configs, metric, base=Source.CORRUPTED, precision="bf16")
    assert not torch.equal(full.values, half.values)
    torch.testing.assert_close(half.values, full.values, atol=2e-2, rtol=0)
    with pytest.raises(kl.SweepError, match="tf32"):
        execute(tiny, *runs, configs, metric, base=Source.CORRUPTED, precision=Precision.TF32)


# ---- fallbacks: where a shortcut would be wrong, the plain path runs ---------------------------


def _fallback_case(model, monkeypatch, match):
    prompt, corrupted, metric = _setup(model)
    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(
        model, prompt, corrupted, metric, site="mlp_out", progress=False
    )
    expected = _reference(model, prompt, corrupted, metric, result, "mlp_out")
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    stats = seen[-1]
    assert stats.fast == 0 and stats.plain > 0
    assert stats.fallback is not None and match in stats.fallback
    return stats


def test_unknown_architecture_falls_back(tiny, monkeypatch):
    monkeypatch.setattr(adapter, "FAST_ARCHITECTURES", frozenset())
    _fallback_case(tiny, monkeypatch, "architecture")


class _NoBlocks:
    """A hooked model that hides its blocks (a substrate without the API the shortcuts need)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        if name == "blocks":
            raise AttributeError(name)
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)


def test_model_without_blocks_falls_back(tiny, monkeypatch):
    _fallback_case(_NoBlocks(tiny), monkeypatch, "blocks")


def test_failed_self_check_falls_back(tiny, monkeypatch):
    original = adapter.BlockDriver.final

    def off_by_a_bit(self, hidden):
        return original(self, hidden) + 1e-2

    monkeypatch.setattr(adapter.BlockDriver, "final", off_by_a_bit)
    _fallback_case(tiny, monkeypatch, "does not reproduce")


def test_ignored_keys_values_disable_position_skipping(tiny, monkeypatch):
    """An attention that drops the cached keys/values of earlier positions is caught by the
    position check; the sweep then recomputes every position, still from the first layer."""
    for cls, method in ((adapter.PrefixKV, "update"), (adapter.PrefixKV, "append")):
        original = getattr(cls, method)

        def forgetful(self, key, value, *args, _original=original, **kwargs):
            _original(self, key, value, *args, **kwargs)
            return key, value

        monkeypatch.setattr(cls, method, forgetful)
    prompt, corrupted, metric = _setup(tiny)
    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(tiny, prompt, corrupted, metric, progress=False)
    expected = _reference(tiny, prompt, corrupted, metric, result, "resid_pre")
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    stats = seen[-1]
    assert stats.fast > 0 and stats.fallback is not None and "earlier positions" in stats.fallback


def test_embed_patches_take_the_plain_path(tiny, monkeypatch):
    prompt, corrupted, metric = _setup(tiny)
    seen = _stats_of(monkeypatch)
    result = kl.activation_patching(tiny, prompt, corrupted, metric, site="embed", progress=False)
    expected = _reference(tiny, prompt, corrupted, metric, result, "embed")
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    stats = seen[-1]
    assert stats.plain > 0 and stats.fast == 0 and "outside the blocks" in (stats.fallback or "")


def test_shortcuts_off_runs_everything_plain(tiny):
    prompt, corrupted, metric = _setup(tiny)
    site = kl.get_site("z")
    configs = [
        (Patch(site, layer, None, head, Source.CLEAN),) for layer in range(3) for head in range(4)
    ]
    runs = (Run(prompt.tokens[None]), Run(corrupted))
    off = execute(tiny, *runs, configs, metric, base=Source.CORRUPTED, shortcuts=False)
    on = execute(tiny, *runs, configs, metric, base=Source.CORRUPTED)
    assert off.stats.plain == len(configs) and off.stats.fallback == "shortcuts=False"
    assert on.stats.plain == 0
    torch.testing.assert_close(on.values, off.values, atol=TOL, rtol=0)


def test_public_sweeps_pass_precision_through(tiny):
    """``precision`` reaches the engine from activation_patching and causal_trace."""
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    noise = kl.GaussianNoise(scale=0.5, samples=3, seed=0)
    metric = kl.TargetProb(kl.target_token_ids(tiny, prompt.prompt)[0], len(prompt) - 1)
    full = kl.activation_patching(tiny, prompt, noise, metric, site="mlp_out", progress=False)
    half = kl.activation_patching(
        tiny, prompt, noise, metric, site="mlp_out", precision="bf16", progress=False
    )
    assert not torch.equal(full.values, half.values)
    torch.testing.assert_close(half.values, full.values, atol=2e-2, rtol=0)
    traced = kl.causal_trace(tiny, prompt, corruption=noise, window=1, progress=False)
    traced_half = kl.causal_trace(
        tiny, prompt, corruption=noise, window=1, precision=kl.Precision.BF16, progress=False
    )
    for kind in ("resid", "mlp", "attn"):
        a, b = traced.get(kind).values, traced_half.get(kind).values
        assert not torch.equal(a, b)
        torch.testing.assert_close(b, a, atol=2e-2, rtol=0)
    with pytest.raises(kl.SweepError, match="precision must be one of .*'fp32'.*got 'fp64'"):
        kl.activation_patching(tiny, prompt, noise, metric, precision="fp64", progress=False)
