# %% [markdown]
# # The study on a model by name
#
# Both halves of the study (localization from both sides, editing with the transfer matrix) on a
# model and its facts. Set `KLOC_MODEL` to a hub name (`gpt2-xl`) or a local directory where the
# hub is reachable; without it this runs on the shipped factworld model, offline. The settings
# below are small so the notebook runs in a minute or two; the command line default is larger:
# `kloc-lens study --model gpt2-xl --out out/gpt2-xl`.

# %%
import os
import tempfile
from pathlib import Path

from kloc_lens import plot, vis
from kloc_lens.cli import study

MODEL = os.environ.get("KLOC_MODEL")  # None: the shipped factworld
out = Path(tempfile.mkdtemp(prefix="kloc-study-"))
# StudyConfig fields; those not given take the defaults (on factworld, its own editing settings)
result = study(MODEL, None, out, {"n_trace": 4, "n_edit": 1, "samples": 5}, progress=False)
model = result.model  # the model's identity
print(result.summary()["localization"]["entity"])
print(f"report: {out / 'report.html'}")
plot.aggregate_grid(result.entity.aggregate)

# %%
example = result.entity.trace.traces[0]
vis.effect_tokens(example.get("attn"), layer=example.get("attn").layers[0])
