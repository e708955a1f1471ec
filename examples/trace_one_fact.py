# %% [markdown]
# # Trace one fact (ROME causal tracing, plain and severed)
#
# Corrupt the subject with Gaussian noise (3 x the std of subject-token embeddings over the fact
# set, 10 samples), then restore clean states one (layer, token) at a time: residual states,
# MLP outputs and attention outputs (windows of layers), and residual states with later MLP or
# attention outputs frozen ("severed").

# %%
import kloc_lens as kl
from kloc_lens import plot
from kloc_lens.planted import planted_model

model, facts = planted_model()
prompts = [
    kl.tokenize(model, kl.Prompt.from_text(facts.prompt(i), obj, subject=subject))
    for i, (subject, obj) in enumerate(facts.pairs())
]
noise = kl.GaussianNoise.from_prompts(model, prompts, samples=10, seed=0)
traces = kl.causal_trace(
    model, prompts[1], corruption=noise, window=1, sever=("mlp", "attn"), progress=False
)
print(f"clean p = {traces.clean_score:.3f}, corrupted p = {traces.corrupted_score:.3f}")

# %%
grid = plot.trace_grid(traces)
curves = plot.effect_curves(traces, position="subject_last")
frame = traces.to_dataframe()
print(frame.sort_values("effect", ascending=False).head())
