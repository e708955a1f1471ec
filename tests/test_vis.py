"""circuitsvis views: the data they carry, offline rendering."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_study import _render

import kloc_lens as kl
from kloc_lens import vis


def _props(view):
    match = re.search(
        r"CircuitsVis\.render\(\s*\"[^\"]+\",\s*CircuitsVis\.(\w+),\s*(\{.*\})\s*\)",
        view.local_src,
        re.S,
    )
    assert match, "no CircuitsVis.render call"
    return match.group(1), json.loads(match.group(2))


@pytest.fixture(scope="module")
def prompt(planted):
    model, facts = planted
    return kl.tokenize(
        model, kl.Prompt.from_text(facts.prompt(0), facts.objects[0], subject=facts.subjects[0])
    )


def test_attention_view_carries_the_patterns(planted, prompt):
    model, facts = planted
    view = vis.attention_view(model, prompt, heads=[(facts.attn_layer, facts.head), (0, 0)])
    element, props = _props(view)
    assert element == "AttentionHeads"
    assert props["attentionHeadNames"] == [f"L{facts.attn_layer}H{facts.head}", "L0H0"]
    assert props["tokens"] == ["<bos>", "The", "home", "of", "«Ana»", "«Bel»", "is"]
    _, cache = model.run_with_cache(prompt.tokens[None])
    expected = cache[f"blocks.{facts.attn_layer}.attn.hook_pattern"][0, facts.head]
    torch.testing.assert_close(torch.tensor(props["attention"][0]), expected, atol=1e-6, rtol=0)
    # the planted head looks from the last token at the subject's last token
    assert int(expected[-1].argmax()) == prompt.span("subject").last
    assert len(_props(vis.attention_view(model, prompt, heads=1))[1]["attention"]) == 4
    with pytest.raises(kl.SweepError, match="head L9H0 outside"):
        vis.attention_view(model, prompt, heads=[(9, 0)])


def test_effect_tokens_and_top_heads(planted, prompt):
    model, facts = planted
    noise = kl.GaussianNoise(scale=3.0, samples=4)
    traces = kl.causal_trace(
        model, prompt, corruption=noise, kinds=("mlp",), window=1, progress=False
    )
    mlp = traces.get("mlp")
    element, props = _props(vis.effect_tokens(mlp, facts.mlp_layer))
    assert element == "ColoredTokens"
    torch.testing.assert_close(torch.tensor(props["values"]), mlp.effect[facts.mlp_layer])
    assert props["tokens"][prompt.span("subject").last] == "«Bel»"
    with pytest.raises(kl.ResultError, match="layer 17 is not in the result"):
        vis.effect_tokens(mlp, 17)
    target = kl.target_token_ids(model, prompt.prompt)[0]
    heads = kl.activation_patching(
        model, prompt, noise, kl.TargetProb(target), site="z", sweep="layer_head", progress=False
    )
    _, props = _props(vis.top_heads_view(model, prompt, heads, k=2))
    assert props["attentionHeadNames"][0] == f"L{facts.attn_layer}H{facts.head}"


def test_views_render_offline_in_a_browser(planted, prompt, tmp_path):
    model, facts = planted
    view = vis.attention_view(model, prompt, heads=facts.attn_layer)
    assert view._repr_html_() == view.local_src and "unpkg" not in view._repr_html_()
    path = view.save(tmp_path / "view.html")
    page = path.read_text()
    assert "unpkg.com" not in page and "http://" not in page.split("<script")[0]
    dom, console = _render(path, tmp_path)
    assert [line for line in console if "rror" in line] == []
    # React rendered the head selector and the pattern canvases
    assert all(f"L{facts.attn_layer}H{h}" in dom for h in range(model.cfg.n_heads))
    assert dom.count("<canvas") >= 1
