"""Sites: built-in, registered and custom hook points."""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

import kloc_lens as kl
from kloc_lens.plot import trace_heatmap

pytestmark = pytest.mark.substrate

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")


def test_builtin_sites():
    assert kl.get_site("mlp_out").hook_name(3) == "blocks.3.hook_mlp_out"
    assert kl.get_site("embed").hook_name(7) == "hook_embed"
    assert kl.get_site("z").has_heads and not kl.get_site("resid_pre").has_heads
    assert {
        "resid_pre",
        "resid_mid",
        "resid_post",
        "attn_out",
        "mlp_out",
        "z",
        "q",
        "k",
        "v",
        "pattern",
        "mlp_post",
    } <= set(kl.list_sites())


def test_unknown_site_names_the_input_and_lists_known_ones():
    with pytest.raises(kl.SiteError, match="unknown site 'mlp_outt'; known sites: .*mlp_out"):
        kl.get_site("mlp_outt")


def test_register_and_unregister():
    site = kl.register_site("my_resid", "blocks.{layer}.hook_resid_pre", description="mine")
    try:
        assert kl.get_site("my_resid") is site and site.per_layer
        with pytest.raises(kl.SiteError, match="already registered"):
            kl.register_site("my_resid", "blocks.{layer}.hook_resid_pre")
        assert kl.register_site("my_resid", "hook_embed", overwrite=True).per_layer is False
    finally:
        kl.unregister_site("my_resid")
    with pytest.raises(kl.SiteError, match="built in"):
        kl.register_site("mlp_out", "blocks.{layer}.hook_mlp_out")
    with pytest.raises(kl.SiteError, match="needs a '\\{layer\\}' field"):
        kl.Site("bad", "hook_embed", per_layer=True)
    with pytest.raises(kl.SiteError, match="no custom site"):
        kl.unregister_site("never_registered")


def test_custom_hook_point_is_a_first_class_site():
    model = tiny_model(seed=1)
    template = kl.add_hook_point(model, "blocks.{layer}.mlp", "hook_tap")
    assert template == "blocks.{layer}.mlp.hook_tap"
    assert all(f"blocks.{layer}.mlp.hook_tap" in model.hook_dict for layer in range(3))
    site = kl.register_site("mlp_tap", template, overwrite=True)
    try:
        prompt = kl.tokenize(model, FACT.entity_prompt())
        noise = kl.GaussianNoise(scale=0.5, samples=3)
        metric = kl.TargetProb(kl.target_token_ids(model, prompt.prompt)[0])
        custom = kl.activation_patching(
            model, prompt, noise, metric, site="mlp_tap", progress=False
        )
        builtin = kl.activation_patching(
            model, prompt, noise, metric, site="mlp_out", progress=False
        )
        # the tap sees the MLP output, so restoring it equals restoring hook_mlp_out
        torch.testing.assert_close(custom.values, builtin.values, atol=1e-6, rtol=0)
        assert custom.values.std() > 0 and custom.site == "mlp_tap"
        figure = trace_heatmap(custom)
        assert figure.data[0].z.shape == (len(prompt), 3)
        # the hook point can change the output: zeroing it equals zeroing hook_mlp_out
        zero = [(site.hook_name(1), lambda act, hook: act * 0)]
        zero_builtin = [("blocks.1.hook_mlp_out", lambda act, hook: act * 0)]
        torch.testing.assert_close(
            model.run_with_hooks(prompt.tokens[None], fwd_hooks=zero),
            model.run_with_hooks(prompt.tokens[None], fwd_hooks=zero_builtin),
        )
    finally:
        kl.unregister_site("mlp_tap")


def test_add_hook_point_errors(tiny):
    with pytest.raises(kl.SiteError, match="no submodule 'blocks.0.nothing'"):
        kl.add_hook_point(tiny, "blocks.{layer}.nothing")
    with pytest.raises(kl.SiteError, match="must start with 'hook_'"):
        kl.add_hook_point(tiny, "blocks.{layer}.mlp", "tap")


def test_site_missing_on_the_model_is_a_model_error(tiny):
    ghost = kl.Site("ghost", "blocks.{layer}.hook_ghost")
    prompt = kl.tokenize(tiny, FACT.entity_prompt())
    with pytest.raises(kl.ModelError, match="no hook point\\(s\\) \\['blocks.0.hook_ghost'"):
        kl.activation_patching(
            tiny, prompt, kl.ZeroAblation(), kl.TargetProb(1), site=ghost, progress=False
        )
