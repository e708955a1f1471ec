# %% [markdown]
# # The study in a few lines
#
# Both halves of the study (localization from both perspectives, query localization with
# knowledge neurons, editing with the transfer matrix) on the shipped factworld model,
# offline. The settings are small so this runs in about a minute; the command line runs the
# full study on any model by name, resumably:
# `kloc-lens study --model gpt2-xl --out out/gpt2-xl` (or `kloc-lens study` on factworld).

# %%
import tempfile
from pathlib import Path

from kloc_lens import plot, vis
from kloc_lens.factworld import NONE_ANSWER, load_factworld
from kloc_lens.study import StudyConfig, run_study

model, world = load_factworld()
out = Path(tempfile.mkdtemp(prefix="kloc-study-"))
# on factworld the "no relation" answer is the world's own; the key statistics of edits are
# read over the world's biographies (its training text)
config = StudyConfig(
    n_trace=4,
    n_trace_relation_prompts=4,
    n_edit=1,
    n_layer_sweep=0,
    samples=5,
    n_queries=4,
    neuron_steps=10,
    none_target=NONE_ANSWER,
)
# the study first checks which facts the model knows, from both perspectives; 200 of the
# world's 2048 facts are plenty for these settings
result = run_study(
    model, world.facts[:200], config, out=out, corpus=list(world.corpus()), progress=False
)
print(result.summary()["localization"]["entity"])
print(result.queries.numbers["within_minus_across"] if result.queries else "no query localization")
print(f"report: {out / 'report.html'}")
plot.aggregate_grid(result.entity.aggregate)

# %%
example = result.entity.example  # the first traced fact's traces
vis.effect_tokens(example.get("attn"), layer=example.get("attn").layers[0])
