"""Corruption schemes."""

from __future__ import annotations

import pytest
import torch

import kloc_lens as kl

pytestmark = pytest.mark.substrate

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


@pytest.fixture(scope="module")
def prompt(tiny):
    return kl.tokenize(tiny, FACT.entity_prompt())


def _embeds(model, made):
    out = {}

    def grab(act, hook):
        out["e"] = made.embed_edit(act) if made.embed_edit else act
        return out["e"]

    model.run_with_hooks(made.tokens, fwd_hooks=[("hook_embed", grab)])
    return out["e"]


def test_gaussian_noise_touches_only_the_span_and_is_seeded(tiny, prompt):
    noise = kl.GaussianNoise(scale=0.2, samples=5, seed=4)
    made = noise.apply(tiny, prompt)
    assert made.tokens.shape == (5, len(prompt)) and made.positions == (5, 6)
    clean = tiny.W_E[prompt.tokens]
    noisy = _embeds(tiny, made)
    diff = noisy - clean[None]
    assert diff[:, [0, 1, 2, 3, 4, 7]].abs().max() == 0
    assert diff[:, 5:7].std().item() == pytest.approx(0.2, rel=0.15)
    again = _embeds(tiny, noise.apply(tiny, prompt))
    assert torch.equal(noisy, again)
    other = _embeds(tiny, kl.GaussianNoise(scale=0.2, samples=5, seed=5).apply(tiny, prompt))
    assert not torch.equal(noisy, other)
    assert made.description == "Gaussian noise (scale 0.2, 5 samples, seed 4) on subject"


def test_noise_rows_repeat_identically_for_packed_configs(tiny, prompt):
    made = kl.GaussianNoise(scale=0.2, samples=2).apply(tiny, prompt)
    embed = torch.zeros(6, len(prompt), tiny.cfg.d_model)
    out = made.embed_edit(embed)
    torch.testing.assert_close(out[0:2], out[2:4])
    torch.testing.assert_close(out[0:2], out[4:6])
    with pytest.raises(kl.CorruptionError, match="cannot cover 3 rows"):
        made.embed_edit(torch.zeros(3, len(prompt), tiny.cfg.d_model))


def test_rome_noise_scale_from_prompts(tiny, prompt):
    other = kl.tokenize(tiny, kl.Fact("Edwin Hubble", "field", "astronomy").entity_prompt())
    noise = kl.GaussianNoise.from_prompts(tiny, [prompt, other])
    ids = torch.cat([prompt.tokens[5:7], other.tokens[list(other.span("subject").positions)]])
    expected = 3 * tiny.W_E[ids].std().item()
    assert noise.scale == pytest.approx(expected, rel=1e-6)
    default = kl.GaussianNoise()
    assert default.resolved_scale(tiny) == pytest.approx(3 * tiny.W_E.std().item(), rel=1e-6)


def test_replace_option_and_explicit_positions(tiny, prompt):
    made = kl.GaussianNoise(scale=0.1, samples=1, span=[2, -1], replace=True).apply(tiny, prompt)
    assert made.positions == (2, 7)
    embeds = _embeds(tiny, made)
    clean = tiny.W_E[prompt.tokens]
    assert (embeds[0, 2] - clean[2]).abs().max() > 0
    assert embeds[0, 2].std().item() == pytest.approx(0.1, rel=0.5)
    torch.testing.assert_close(embeds[0, 3], clean[3])


def test_token_replacement(tiny, prompt):
    made = kl.TokenReplacement("Lyon Beirut").apply(tiny, prompt)
    assert made.tokens.shape == (1, len(prompt))
    assert tiny.to_str_tokens(made.tokens[0])[5:7] == ["Lyon", "Beirut"]
    assert made.positions == (5, 6) and made.embed_edit is None
    with pytest.raises(kl.CorruptionError, match="changes the length"):
        kl.TokenReplacement("Lyon").apply(tiny, prompt)
    with pytest.raises(kl.SpanError, match="no 'object' span"):
        kl.TokenReplacement("Paris", span="object").apply(tiny, prompt)


def test_resample(tiny, prompt):
    made = kl.Resample(("The mother tongue of Lyon Beirut is", "The city of Edwin Hubble is a"))
    out = made.apply(tiny, prompt)
    assert out.tokens.shape == (2, len(prompt))
    assert out.positions == (2, 3, 4, 5, 6, 7)
    with pytest.raises(kl.CorruptionError, match="has 6 tokens"):
        kl.Resample(("The capital of Germany is",)).apply(tiny, prompt)
    with pytest.raises(kl.CorruptionError, match="non-empty tuple"):
        kl.Resample("The capital")


def test_zero_and_mean_ablation(tiny, prompt):
    zero = _embeds(tiny, kl.ZeroAblation(span="relation").apply(tiny, prompt))
    assert zero[0, 2:4].abs().max() == 0 and zero[0, 4].abs().max() > 0
    mean = _embeds(tiny, kl.MeanAblation().apply(tiny, prompt))
    torch.testing.assert_close(mean[0, 5], tiny.W_E.mean(0))
    other = kl.tokenize(tiny, kl.Fact("Edwin Hubble", "field", "astronomy").entity_prompt())
    custom = kl.MeanAblation.from_prompts(tiny, [prompt, other])
    ids = torch.tensor([5, 6]).tolist()
    expected = tiny.W_E[
        torch.cat([prompt.tokens[ids], other.tokens[list(other.span("subject").positions)]])
    ].mean(0)
    torch.testing.assert_close(_embeds(tiny, custom.apply(tiny, prompt))[0, 6], expected)
    with pytest.raises(kl.CorruptionError, match="MeanAblation.mean has shape \\(3,\\)"):
        kl.MeanAblation(mean=torch.zeros(3)).apply(tiny, prompt)


def test_schemes_are_reusable_across_sweeps_and_describe_themselves(tiny, prompt):
    scheme = kl.GaussianNoise(scale=0.3, samples=3)
    metric = kl.TargetProb(kl.target_token_ids(tiny, prompt.prompt)[0])
    a = kl.activation_patching(tiny, prompt, scheme, metric, site="mlp_out", progress=False)
    b = kl.activation_patching(tiny, prompt, scheme, metric, site="mlp_out", progress=False)
    assert torch.equal(a.values, b.values)
    assert a.corruption == scheme.apply(tiny, prompt).description
    assert str(kl.ZeroAblation()) == "zero ablation of subject embeddings"
    assert "positions [1, 2]" in kl.MeanAblation(span=[1, 2]).describe()


def test_bad_noise_parameters():
    with pytest.raises(kl.CorruptionError, match="samples must be an integer >= 1, got 0"):
        kl.GaussianNoise(samples=0)
    with pytest.raises(kl.CorruptionError, match="scale must be a positive finite number, got -1"):
        kl.GaussianNoise(scale=-1.0)
    for scale in (float("inf"), float("nan")):
        with pytest.raises(kl.CorruptionError, match=f"positive finite number, got {scale}"):
            kl.GaussianNoise(scale=scale)


def test_noise_parameters_of_the_wrong_type_are_refused(unchecked):
    with pytest.raises(kl.CorruptionError, match="scale must be a positive finite number, got str"):
        kl.GaussianNoise(scale="0.1")  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match="scale must be a positive .*, got bool True"):
        kl.GaussianNoise(scale=True)
    with pytest.raises(kl.CorruptionError, match="samples must be an integer >= 1, got 10.0"):
        kl.GaussianNoise(samples=10.0)  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match="seed must be an integer, got '0'"):
        kl.GaussianNoise(seed="0")  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match="replace must be a bool, got 1"):
        kl.GaussianNoise(replace=1)  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match=r"GaussianNoise.span must be a span .*\[1.5\]"):
        kl.GaussianNoise(span=[1.5])  # type: ignore[list-item]
    with pytest.raises(kl.CorruptionError, match="ZeroAblation.span must be a span name"):
        kl.ZeroAblation(span=3)  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match="replacement must be a non-empty string, got 3"):
        kl.TokenReplacement(3)  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match="TokenReplacement.span must be a span name"):
        kl.TokenReplacement("Paris", span=[1])  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match=r"Resample.prompts\[1\] must be a prompt string"):
        kl.Resample(("The mother tongue", 3))  # type: ignore[arg-type]
    with pytest.raises(kl.CorruptionError, match="MeanAblation.mean must be a vector"):
        kl.MeanAblation(mean=torch.zeros(2, 3))
    assert kl.ZeroAblation(span=torch.tensor([1, 2])).span is not None


def test_non_finite_numbers_are_refused_where_they_enter(tiny, prompt):
    with pytest.raises(kl.CorruptionError, match="MeanAblation.mean holds 1 non-finite value"):
        kl.MeanAblation(mean=torch.tensor([0.0, float("nan"), 1.0]))
    inf = torch.zeros(tiny.cfg.d_model)
    inf[3] = float("inf")
    with pytest.raises(kl.CorruptionError, match=r"\(inf at index 3\); mean ablation needs a fin"):
        kl.MeanAblation(mean=inf)
    with pytest.raises(kl.CorruptionError, match="from_prompts factor must be a positive finite"):
        kl.GaussianNoise.from_prompts(tiny, [prompt], factor=float("inf"))
    with torch.no_grad():
        saved = tiny.W_E[7].clone()
        tiny.W_E[7] = float("nan")
    try:
        with pytest.raises(kl.CorruptionError, match="the mean of W_E holds 32 non-finite value"):
            kl.MeanAblation().apply(tiny, prompt)
        with pytest.raises(kl.CorruptionError, match=r"default noise scale 3 x std\(W_E\) is nan"):
            kl.GaussianNoise().apply(tiny, prompt)
    finally:
        with torch.no_grad():
            tiny.W_E[7] = saved
