# %% [markdown]
# # Does localization inform editing?
#
# Hase et al. (2023) edited every fact at every layer and asked whether the causal trace says
# where an edit works. Here, on the shipped factworld model: four facts edited with ROME at
# the first three layers, each fact traced with its subject corrupted, edit success regressed
# on the layer alone and then on the layer and the trace effect; beside it the controls (a
# random layer, each fact's best layer), and every score twice: generated (what the edited
# model says) and teacher-forced. `kloc-lens study` runs the same on 30 facts x every layer.
# For speed this sketch edits with one generated context and no key statistics (C = I).

# %%
import plotly.express as px

import kloc_lens as kl
from kloc_lens import vis
from kloc_lens.edit import ContextSpec, EditRequest, RomeEditor
from kloc_lens.factworld import NONE_ANSWER, load_factworld
from kloc_lens.study.informs import edited_site_effects

model, world = load_factworld()
facts = [f for f in world.facts if f.new_object][:4]
requests = [EditRequest(f, none_target=NONE_ANSWER) for f in facts]
layers = [0, 1, 2]
sweep = kl.edit_layer_sweep(
    model,
    requests,
    lambda layer: RomeEditor(layer=layer, contexts=ContextSpec(count=1)),
    layers=layers,
    progress=False,
)
print("generated efficacy [fact, layer]:\n", sweep.generated("efficacy"))
print("teacher-forced efficacy [fact, layer]:\n", sweep.post("efficacy"))
print("best layer per fact:", sweep.best_layers("efficacy"))

# %%
noise = kl.GaussianNoise(scale=0.5, samples=4, seed=0)
traces = [
    kl.causal_trace(model, f, corruption=noise, sever=("mlp", "attn"), progress=False)
    for f in facts
]
effect = edited_site_effects(traces, layers)["mlp"]  # [fact, layer], last subject token
fit = kl.trace_edit_regression(sweep.margin("efficacy"), effect, layers=layers, n_resamples=200)
print(fit.sentence("efficacy margin"))
traced = effect.argmax(1)  # each fact's traced peak among the edited layers
at_peak = sweep.generated("efficacy").gather(1, traced[:, None]).mean()
print(
    f"generated efficacy: {float(at_peak):.2f} at the traced peak, "
    f"{float(sweep.generated('efficacy').mean()):.2f} at a random layer (expected), "
    f"{float(sweep.generated('efficacy').amax(1).mean()):.2f} at the best layer"
)

# %%
frame = sweep.to_dataframe().query("metric == 'efficacy'").copy()
frame["mlp_effect"] = [
    float(effect[row.fact, layers.index(row.layer)]) for row in frame.itertuples()
]
px.scatter(
    frame,
    x="mlp_effect",
    y="post_margin",
    color=frame["layer"].astype(str),
    hover_data=["subject", "relation", "post_generated"],
    labels={"mlp_effect": "MLP-window effect at the last subject token", "color": "layer"},
    title="Edit success against the trace effect, per layer",
)

# %%
example = traces[0].get("mlp")  # where the first fact's MLPs matter, token by token
vis.effect_tokens(example, layer=example.layers[1])
