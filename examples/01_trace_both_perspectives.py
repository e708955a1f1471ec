# %% [markdown]
# # Trace one fact from both sides
#
# ROME causal tracing of one fact twice: with the **subject** corrupted (the entity side) and
# with the **relation words** corrupted (the relation side). Noise is 3 x the standard deviation
# of the span's token embeddings over the fact set, 10 samples; each (layer, token) restores a
# clean residual state, MLP window or attention window, plain and severed.

# %%
import kloc_lens as kl
from kloc_lens import plot, vis
from kloc_lens.planted import planted_model

model, planted = planted_model()
facts = [kl.Fact(s, "home", o, entity_template=planted.template) for s, o in planted.pairs()]
prompts = [kl.tokenize(model, f.entity_prompt()) for f in facts]
prompt = prompts[1]

# %% [markdown]
# ## Entity side: the subject corrupted

# %%
subject_noise = kl.GaussianNoise.from_prompts(model, prompts, span="subject", samples=10)
entity = kl.causal_trace(
    model, prompt, corruption=subject_noise, window=1, sever=("mlp", "attn"), progress=False
)
print(f"clean p = {entity.clean_score:.3f}, corrupted p = {entity.corrupted_score:.3f}")
plot.trace_grid(entity)

# %%
plot.effect_curves(entity, position="subject_last")

# %% [markdown]
# ## Relation side: the relation words corrupted

# %%
relation_noise = kl.GaussianNoise.from_prompts(model, prompts, span="relation", samples=10)
relation = kl.causal_trace(model, prompt, corruption=relation_noise, window=1, progress=False)
print(f"clean p = {relation.clean_score:.3f}, corrupted p = {relation.corrupted_score:.3f}")
plot.trace_grid(relation, spans=("relation",))

# %% [markdown]
# The tokens coloured by the MLP-window effect at the layer where it peaks:

# %%
layer = int(entity.get("mlp").indirect_effect.max(1).values.argmax())
print(f"MLP effect peaks at layer {layer}")
vis.effect_tokens(entity.get("mlp"), layer)
