"""Sweeps: parity with transformer_lens.patching and the slow reference loops, and invariants."""

from __future__ import annotations

import pytest
import torch
from reference import reference_sweep, rome_trace_loop
from transformer_lens import patching

import kloc_lens as kl
from kloc_lens.trace import frozen_layers, window_layers

pytestmark = pytest.mark.substrate

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    corrupted = kl.TokenReplacement("Lyon Beirut").apply(tiny, prompt).tokens
    target = kl.target_token_ids(tiny, prompt.prompt)[0]
    wrong = kl.target_token_ids(tiny, prompt.prompt, "English")[0]
    metric = kl.LogitDiff(target, wrong)
    _, cache = tiny.run_with_cache(prompt.tokens[None])
    return prompt, corrupted, metric, cache


TL_CASES = [
    ("resid_pre", "layer_pos", "get_act_patch_resid_pre"),
    ("attn_out", "layer_pos", "get_act_patch_attn_out"),
    ("mlp_out", "layer_pos", "get_act_patch_mlp_out"),
    ("z", "layer_head", "get_act_patch_attn_head_out_all_pos"),
    ("z", "layer_pos_head", "get_act_patch_attn_head_out_by_pos"),
]


@pytest.mark.parametrize(("site", "sweep", "tl_name"), TL_CASES, ids=[c[2] for c in TL_CASES])
def test_matches_transformer_lens_patching(tiny, setup, site, sweep, tl_name):
    prompt, corrupted, metric, cache = setup
    tl_fn = getattr(patching, tl_name)
    expected = tl_fn(tiny, corrupted, cache, metric)
    result = kl.activation_patching(
        tiny, prompt.tokens[None], corrupted, metric, site=site, sweep=sweep, progress=False
    )
    assert result.values.shape == expected.shape
    torch.testing.assert_close(result.values, expected.float(), atol=TOL, rtol=0)
    assert result.values.std() > 0  # the comparison is not between constants


def test_matches_transformer_lens_on_a_batch(tiny):
    texts = ["The mother tongue of Danielle Darrieux is", "The capital of Germany is a city"]
    corrupt = ["The mother tongue of Lyon Beirut is", "The capital of Paris is a city"]
    clean = torch.cat([tiny.to_tokens(t) for t in texts])
    bad = torch.cat([tiny.to_tokens(t) for t in corrupt])
    metric = kl.LogitDiff([9, 12], [10, 9])
    _, cache = tiny.run_with_cache(clean)
    expected = patching.get_act_patch_resid_pre(tiny, bad, cache, metric)
    result = kl.activation_patching(tiny, clean, bad, metric, progress=False)
    torch.testing.assert_close(result.values, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("direction", ["restore", "inject"])
@pytest.mark.parametrize(
    ("site", "sweep"),
    [
        ("resid_mid", "layer_pos"),
        ("v", "layer_pos_head"),
        ("pattern", "layer_head"),
        ("mlp_post", "layer_pos"),
        ("q", "layer_head"),
        ("embed", "layer_pos"),
    ],
)
def test_matches_reference_loop(tiny, setup, site, sweep, direction):
    prompt, corrupted, metric, _ = setup
    result = kl.activation_patching(
        tiny,
        prompt,
        corrupted,
        metric,
        site=site,
        sweep=sweep,
        direction=direction,
        batch_size=7,
        progress=False,
    )
    s = kl.get_site(site)
    source = "clean" if direction == "restore" else "corrupted"
    base = "corrupted" if direction == "restore" else "clean"
    configs = []
    layers = result.layers
    for layer in layers:
        if sweep == "layer_pos":
            configs += [
                [(s.hook_name(layer), p, None, source, s.pos_dim, s.head_dim)]
                for p in result.positions
            ]
        elif sweep == "layer_head":
            configs += [
                [(s.hook_name(layer), None, h, source, s.pos_dim, s.head_dim)] for h in result.heads
            ]
        else:
            configs += [
                [(s.hook_name(layer), p, h, source, s.pos_dim, s.head_dim)]
                for p in result.positions
                for h in result.heads
            ]
    expected = reference_sweep(tiny, prompt.tokens[None], corrupted, configs, metric, base=base)
    torch.testing.assert_close(result.values.flatten(), expected, atol=TOL, rtol=0)
    assert (result.values - result.values.flatten()[0]).abs().max() > 0


@pytest.mark.parametrize(
    ("kind", "window", "sever"),
    [
        ("resid", 1, None),
        ("mlp", 10, None),
        ("attn", 2, None),
        ("mlp", 1, None),
        ("resid", 1, "mlp"),
        ("resid", 1, "attn"),
    ],
)
def test_causal_trace_matches_rome_loop(tiny, kind, window, sever):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    noise = kl.GaussianNoise(scale=0.5, samples=4, seed=3)
    traces = kl.causal_trace(
        tiny,
        prompt,
        corruption=noise,
        kinds=() if sever else (kind,),
        sever=(sever,) if sever else (),
        window=window,
        batch_size=5,
        progress=False,
    )
    made = noise.apply(tiny, prompt)
    target = kl.target_token_ids(tiny, prompt.prompt)[0]
    expected = rome_trace_loop(
        tiny, prompt.tokens[None], made.tokens, made.embed_edit, target, kind, window, sever=sever
    )
    got = traces.get(kind, sever)
    torch.testing.assert_close(got.values, expected, atol=TOL, rtol=0)
    assert got.values.std() > 0


def test_trace_labels_and_scores(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    traces = kl.causal_trace(
        tiny, prompt, corruption=kl.GaussianNoise(scale=0.5), sever=("mlp", "attn"), progress=False
    )
    assert [t.label for t in traces] == [
        "resid",
        "mlp",
        "attn",
        "resid (mlp severed)",
        "resid (attn severed)",
    ]
    resid = traces.get("resid")
    assert resid.str_tokens == prompt.str_tokens
    assert resid.spans["subject"] == (5, 7)
    assert resid.target == "French"
    assert "Gaussian noise" in resid.corruption
    torch.testing.assert_close(resid.indirect_effect, resid.values - resid.corrupted_score)
    target = kl.target_token_ids(tiny, prompt.prompt)[0]
    clean_p = torch.softmax(tiny(prompt.tokens[None])[0, -1], -1)[target]
    assert resid.clean_score == pytest.approx(float(clean_p), abs=1e-6)


def test_window_and_frozen_layers():
    assert window_layers(0, 10, 48) == (0, 1, 2, 3, 4)
    assert window_layers(47, 10, 48) == (42, 43, 44, 45, 46, 47)
    assert window_layers(5, 3, 12) == (4, 5, 6)
    assert window_layers(5, 1, 12) == (5,)
    assert frozen_layers("resid_mid", 1, kl.TraceKind.ATTN, 4) == (2, 3)
    assert frozen_layers("resid_mid", 1, kl.TraceKind.MLP, 4) == (1, 2, 3)
    with pytest.raises(kl.SweepError, match="window"):
        window_layers(3, 0, 12)


# ---- invariants -------------------------------------------------------------------------------


def test_restoring_every_position_at_layer_zero_recovers_clean(tiny, setup):
    prompt, corrupted, metric, _ = setup
    from kloc_lens.engine import Patch, Run, Source, execute

    site = kl.get_site("resid_pre")
    out = execute(
        tiny,
        Run(prompt.tokens[None]),
        Run(corrupted),
        [(Patch(site, 0, None, None, Source.CLEAN),), ()],
        metric,
        base=Source.CORRUPTED,
    )
    assert float(out.values[0]) == pytest.approx(out.clean_score, abs=1e-5)
    assert float(out.values[1]) == pytest.approx(out.corrupted_score, abs=1e-5)
    assert abs(out.clean_score - out.corrupted_score) > 1e-3


def test_restore_at_first_layer_all_tokens_via_trace(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    # Restoring the residual state at a corrupted position before any layer mixes positions:
    # with only the subject corrupted, restoring each subject position at layer 0 of resid_pre
    # and the untouched rest is the clean run.
    noise = kl.GaussianNoise(scale=1.0, span=prompt.positions("subject"))
    traces = kl.causal_trace(
        tiny, prompt, corruption=noise, kinds=("resid",), resid_site="resid_pre", progress=False
    )
    resid = traces.get("resid")
    # restoring a position outside the corrupted span changes nothing
    outside = [p for p in resid.positions if p not in prompt.positions("subject")]
    torch.testing.assert_close(
        resid.values[0, outside],
        torch.full((len(outside),), resid.corrupted_score),
        atol=1e-6,
        rtol=0,
    )


def test_patching_clean_into_clean_changes_nothing(tiny, setup):
    prompt, _, metric, _ = setup
    result = kl.activation_patching(
        tiny, prompt, prompt.tokens[None], metric, site="mlp_out", progress=False
    )
    torch.testing.assert_close(
        result.values, torch.full_like(result.values, result.clean_score), atol=1e-5, rtol=0
    )
    assert result.clean_score == result.corrupted_score


def test_same_seed_same_numbers_other_seed_other_numbers(tiny):
    prompt = kl.tokenize(tiny, FACT.entity_prompt())

    def run(seed):
        noise = kl.GaussianNoise(scale=0.5, seed=seed)
        traces = kl.causal_trace(tiny, prompt, corruption=noise, kinds=("resid",), progress=False)
        return traces.get("resid").values

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_inject_direction_and_effect_sign(tiny, setup):
    prompt, corrupted, metric, _ = setup
    result = kl.activation_patching(
        tiny, prompt, corrupted, metric, direction="inject", progress=False
    )
    # injecting the corrupted residual at every position of layer 0 gives the corrupted run
    assert result.direction is kl.Direction.INJECT
    torch.testing.assert_close(result.effect, result.clean_score - result.values)


def test_progress_bar_can_be_turned_off(tiny, setup, capsys):
    prompt, corrupted, metric, _ = setup
    kl.activation_patching(tiny, prompt, corrupted, metric, progress=False)
    assert "it/s" not in capsys.readouterr().err
    kl.activation_patching(tiny, prompt, corrupted, metric, progress=True)
    assert "patching resid_pre" in capsys.readouterr().err


def test_batch_size_does_not_change_numbers(tiny, setup):
    prompt, corrupted, metric, _ = setup
    one = kl.activation_patching(tiny, prompt, corrupted, metric, batch_size=1, progress=False)
    many = kl.activation_patching(tiny, prompt, corrupted, metric, batch_size=64, progress=False)
    budget = kl.activation_patching(
        tiny, prompt, corrupted, metric, memory_budget=1, progress=False
    )
    torch.testing.assert_close(one.values, many.values, atol=TOL, rtol=0)
    torch.testing.assert_close(one.values, budget.values, atol=TOL, rtol=0)


def test_padded_batch_equals_single_prompts(tiny):
    texts = [
        "The mother tongue of Danielle Darrieux is",
        "The capital of Germany is",
        "Edwin Hubble works in the field of",
    ]
    batch = kl.tokenize_batch(tiny, texts)
    assert batch.tokens.shape == (3, 8)
    logits = tiny(batch.tokens)
    for row, text in enumerate(texts):
        alone = tiny(tiny.to_tokens(text))[0]
        n = alone.shape[0]
        torch.testing.assert_close(logits[row, :n], alone, atol=1e-5, rtol=0)
        assert int(batch.last[row]) == n - 1

    # a sweep over the padded batch equals the mean of the single-prompt sweeps
    corrupt = [
        "The mother tongue of Lyon Beirut is",
        "The capital of Paris is",
        "Edwin Hubble works in the city of",
    ]
    bad = kl.tokenize_batch(tiny, corrupt)
    targets = [9, 10, 33]
    metric = kl.TargetProb(targets, batch.last)
    swept = kl.activation_patching(tiny, batch.tokens, bad.tokens, metric, progress=False)
    singles = []
    for row in range(3):
        n = int(batch.last[row]) + 1
        single = kl.activation_patching(
            tiny,
            batch.tokens[row : row + 1, :n],
            bad.tokens[row : row + 1, :n],
            kl.TargetProb(targets[row]),
            progress=False,
        )
        singles.append(single.values[:, :6])
    torch.testing.assert_close(swept.values[:, :6], torch.stack(singles).mean(0), atol=TOL, rtol=0)
