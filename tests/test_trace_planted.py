"""Causal tracing finds the planted fact exactly where it was planted."""

from __future__ import annotations

import pytest
import torch

import kloc_lens as kl

pytestmark = pytest.mark.substrate


@pytest.fixture(scope="module")
def traced(planted):
    model, facts = planted
    subject = facts.subjects[2]
    prompt = kl.tokenize(
        model, kl.Prompt.from_text(facts.prompt(2), facts.objects[2], subject=subject)
    )
    assert torch.equal(prompt.tokens, model.to_tokens(prompt.text)[0])
    noise = kl.GaussianNoise(scale=3.0, samples=10, seed=0)
    traces = kl.causal_trace(
        model, prompt, corruption=noise, window=1, sever=("mlp", "attn"), progress=False
    )
    return model, facts, prompt, traces


def _argmax(values):
    flat = int(values.argmax())
    return divmod(flat, values.shape[1])


def test_clean_and_corrupted_scores(traced):
    _, _, _, traces = traced
    assert traces.clean_score > 0.9
    assert traces.corrupted_score < 0.1


def test_mlp_trace_peaks_at_the_planted_layer_and_subject_last_token(traced):
    _, facts, prompt, traces = traced
    mlp = traces.get("mlp")
    assert _argmax(mlp.indirect_effect) == (facts.mlp_layer, prompt.span("subject").last)
    peak = mlp.indirect_effect.max()
    others = mlp.indirect_effect.clone()
    others[facts.mlp_layer, prompt.span("subject").last] = 0
    assert others.abs().max() < 0.1 * peak


def test_attention_trace_peaks_at_the_planted_layer_and_last_token(traced):
    _, facts, prompt, traces = traced
    attn = traces.get("attn")
    assert _argmax(attn.indirect_effect) == (facts.attn_layer, len(prompt) - 1)
    others = attn.indirect_effect.clone()
    others[facts.attn_layer, -1] = 0
    assert others.abs().max() < 0.1 * attn.indirect_effect.max()


def test_severing_mlp_removes_the_mlp_mediated_effect(traced):
    _, facts, prompt, traces = traced
    last_subject = prompt.span("subject").last
    plain = traces.get("resid").indirect_effect[:, last_subject]
    no_mlp = traces.get("resid", "mlp").indirect_effect[:, last_subject]
    no_attn = traces.get("resid", "attn").indirect_effect[:, last_subject]
    before = slice(0, facts.mlp_layer)  # restored states that do not yet contain the MLP output
    assert plain[before].min() > 0.8 * traces.get("resid").total_effect
    assert no_mlp[before].abs().max() < 0.05 * plain[before].min()
    # states after the MLP already hold its output: severing later MLPs changes nothing there
    torch.testing.assert_close(
        no_mlp[facts.mlp_layer :], plain[facts.mlp_layer :], atol=1e-5, rtol=0
    )
    # the fact does not flow through attention at the subject token
    torch.testing.assert_close(no_attn, plain, atol=1e-3, rtol=0)


def test_windowed_mlp_trace_covers_the_planted_layer(planted):
    model, facts = planted
    prompt = kl.tokenize(
        model, kl.Prompt.from_text(facts.prompt(0), facts.objects[0], subject=facts.subjects[0])
    )
    traces = kl.causal_trace(
        model,
        prompt,
        corruption=kl.GaussianNoise(scale=3.0),
        kinds=("mlp",),
        window=3,
        progress=False,
    )
    effect = traces.get("mlp").indirect_effect[:, prompt.span("subject").last]
    from kloc_lens.trace import window_layers

    for layer in range(facts.n_layers):
        covers = facts.mlp_layer in window_layers(layer, 3, facts.n_layers)
        assert (effect[layer] > 0.5 * traces.get("mlp").total_effect) == covers
