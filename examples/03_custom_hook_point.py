# %% [markdown]
# # Sweep a hook point of your own
#
# kloc_lens sweeps any TransformerLens hook point, not only the built-in ones. Here we add a
# `HookPoint` on the output of every layer's MLP module, register it as a site, and run the same
# activation-patching sweep, result type and figure as for a built-in site.

# %%
import torch

import kloc_lens as kl
from kloc_lens import plot
from kloc_lens.planted import planted_model

model, facts = planted_model()
prompt = kl.tokenize(
    model, kl.Prompt.from_text(facts.prompt(0), facts.objects[0], subject=facts.subjects[0])
)

# %% [markdown]
# `add_hook_point` attaches a new `HookPoint` to the output of `blocks.{layer}.mlp` of every
# layer and re-indexes the model's hooks; `register_site` names it for sweeps.

# %%
hook = kl.add_hook_point(model, "blocks.{layer}.mlp", "hook_tap")
site = kl.register_site("mlp_tap", hook, description="MLP module output", overwrite=True)

noise = kl.GaussianNoise(scale=3.0, samples=10, seed=0)
metric = kl.TargetProb(kl.target_token_ids(model, prompt.prompt)[0])
result = kl.activation_patching(model, prompt, noise, metric, site="mlp_tap", progress=False)

# %% [markdown]
# The tap sees exactly what `hook_mlp_out` sees, so the two sweeps agree; the planted fact's
# MLP layer stands out at the subject's last token.

# %%
builtin = kl.activation_patching(model, prompt, noise, metric, site="mlp_out", progress=False)
assert torch.allclose(result.values, builtin.values, atol=1e-6)
layer, pos = divmod(int(result.effect.argmax()), result.values.shape[1])
print(f"peak of the custom site: layer {layer}, token {prompt.str_tokens[pos]!r}")
assert (layer, pos) == (facts.mlp_layer, prompt.span("subject").last)
figure = plot.trace_heatmap(result)
figure

# %% [markdown]
# The planted head reads the tap's output at the subject's last token:

# %%
from kloc_lens import vis

vis.attention_view(model, prompt, heads=[(facts.attn_layer, facts.head)])
