# %% [markdown]
# # Edit a fact and check transfer
#
# A ROME edit of one fact from the entity perspective and one from the relation perspective,
# each scored on *both* perspectives: does an entity edit change the relation-side answer?

# %%
import kloc_lens as kl
from kloc_lens import vis
from kloc_lens.edit import EditRequest, RomeEditor, evaluate_editor, planted_corpus, second_moment
from kloc_lens.edit.plot import metric_bars, transfer_heatmap
from kloc_lens.planted import planted_model

model, planted = planted_model()
facts = [
    kl.Fact(
        s, "home", o, entity_template=planted.template, entity_paraphrases=("{subject} lives in",)
    )
    for s, o in planted.pairs()
]
stats = second_moment(model, planted.mlp_layer, planted_corpus(planted), progress=False)
editor = RomeEditor(layer=planted.mlp_layer, stats=stats)
requests = [
    EditRequest(facts[0], "Quito", perspective=p, neighbors=(facts[1],), none_target="a")
    for p in ("entity", "relation")
]
evaluation = evaluate_editor(model, requests, editor, progress=False)
print(evaluation.summary()[["edited", "metric", "pre", "post"]])
transfer_heatmap(evaluation.transfer())

# %%
metric_bars(evaluation)

# %% [markdown]
# With the entity edit applied as a hook, the planted head still moves the (new) answer:

# %%
edit = editor.compute(model, requests[0])
prompt = kl.tokenize(model, facts[0].entity_prompt())
with edit.applied(model):
    answer = model.to_string(model(prompt.tokens[None])[0, -1].argmax())
    view = vis.attention_view(model, prompt, heads=[(planted.attn_layer, planted.head)])
print(f"after the edit: {prompt.text} -> {answer}")
view
