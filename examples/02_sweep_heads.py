# %% [markdown]
# # Sweep attention heads
#
# Which heads carry the answer to the last token? Restore each head's output (`z`, all
# positions) from the clean run into the noisy run, then look at the top heads' patterns.

# %%
import kloc_lens as kl
from kloc_lens import plot, vis
from kloc_lens.planted import planted_model

model, planted = planted_model()
fact = kl.Fact(planted.subjects[2], "home", planted.objects[2], entity_template=planted.template)
prompt = kl.tokenize(model, fact.entity_prompt())
metric = kl.TargetProb(kl.target_token_ids(model, prompt.prompt)[0])
noise = kl.GaussianNoise(scale=3.0, samples=10, seed=0)

heads = kl.activation_patching(
    model, prompt, noise, metric, site="z", sweep="layer_head", progress=False
)
layer, head = divmod(int(heads.effect.argmax()), model.cfg.n_heads)
print(f"top head: L{layer}H{head} (effect {float(heads.effect.max()):.3f})")
plot.head_heatmap(heads)

# %%
vis.top_heads_view(model, prompt, heads, k=3)

# %%
by_position = kl.activation_patching(
    model,
    prompt,
    noise,
    metric,
    site="z",
    sweep="layer_pos_head",
    layers=[layer],
    progress=False,
)
plot.pos_head_heatmap(by_position, layer=layer)
