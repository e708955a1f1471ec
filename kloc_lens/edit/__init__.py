"""Rank-one model editing (ROME, MEMIT) from the entity and the relation perspective.

A fact ``(subject, relation, object)`` that a model recalls is, by ROME's account (Meng et al.
2022), written by an MLP output projection ``W`` at the subject's last token: the hidden
activation there (the *key* ``k*``) is mapped to an output (the *value* ``k* W``) that carries the
object. Editing the fact means changing ``W`` so that ``k*`` maps to a new value ``v*`` while
other keys keep their outputs:

1. **Key** (:mod:`~kloc_lens.edit.keys`): ``k*`` is the projection's input at the key token,
   averaged over the prompt prefixed by short texts the model generates itself.
2. **Statistics** (:mod:`~kloc_lens.edit.stats`): ``C = E[k k^T]`` over a corpus says which
   directions ordinary keys use; cached on disk per model, layer and corpus. Without it the
   editors fall back to ``C = I`` and record that they did.
3. **Value** (:mod:`~kloc_lens.edit.value`): gradient descent on a change ``delta`` of the
   output at the key token finds ``v* = k* W + delta`` that makes the new object likely (with a
   KL term on ``"{subject} is a"``, a norm penalty and a clamp); the model stays frozen.
4. **Update** (:mod:`~kloc_lens.edit.rome`): ``W' = W + u (v* - k* W)^T / (u . k*)`` with
   ``u = C^-1 k*``, a rank-one change with ``k* W' = v*``. MEMIT (:mod:`~kloc_lens.edit.memit`)
   spreads the change of many facts over several layers.
5. **Apply** (:mod:`~kloc_lens.edit.apply`): an edit is data. ``with edit.applied(model):``
   adds it through hooks and removes them afterwards; ``edit.commit(model)`` writes it into the
   weights and returns a handle whose ``restore()`` puts the exact original weights back.
6. **Evaluate** (:mod:`~kloc_lens.edit.evaluate`): efficacy, paraphrase and neighbourhood scores
   on the entity side, relation-vs-"None" scores on the relation side, and the 2 x 2
   cross-perspective transfer matrix of the study (``notes/knowledge-localization.md``);
   figures in :mod:`kloc_lens.edit.plot`.
7. **Layers and traces** (:mod:`~kloc_lens.edit.sweep`, :mod:`~kloc_lens.edit.informs`): every
   fact edited at every layer (:func:`edit_layer_sweep`), and Hase et al.'s question, whether
   the trace effect at a layer predicts edit success there (:func:`trace_edit_regression`);
   the collapse guard (:mod:`~kloc_lens.edit.guard`) flags edits that break the model.

The *perspective* of an :class:`EditRequest` chooses the objective: an entity edit raises the new
object (and lowers the old one) on the entity prompt; a relation edit follows the study's add /
remove objectives on relation prompts. The edited *site* is ``W_out`` (the MLP, default) or
``W_O`` (attention, where the study finds relational knowledge too).

Example (the planted model's facts live in the MLP of layer 1, at the subject's last token):
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> model, planted = planted_model()
    >>> fact = Fact(planted.subjects[0], "home", planted.objects[0])   # Ana Bel -> Paris
    >>> stats = second_moment(model, planted.mlp_layer, planted_corpus(planted), progress=False)
    >>> edit = RomeEditor(layer=planted.mlp_layer, stats=stats).compute(
    ...     model, EditRequest(fact, "Quito"))
    >>> prompt = fact.entity_prompt().text
    >>> with edit.applied(model):
    ...     model.to_string(model(prompt)[0, -1].argmax())
    'Quito'
    >>> handle = edit.commit(model)
    >>> model.to_string(model(prompt)[0, -1].argmax())
    'Quito'
    >>> handle.restore()
    >>> model.to_string(model(prompt)[0, -1].argmax())
    'Paris'
"""

from kloc_lens.edit._errors import EditError
from kloc_lens.edit.apply import (
    CommittedEdit,
    Edit,
    LowRankEdit,
    LowRankUpdate,
    WeightEdit,
    applied,
    commit,
    edit_hooks,
)
from kloc_lens.edit.corpus import planted_corpus
from kloc_lens.edit.evaluate import (
    EditEvaluation,
    EditMetric,
    Editor,
    FactEvaluation,
    MetricScore,
    TransferMatrix,
    evaluate_edit,
    evaluate_editor,
    evaluate_edits,
)
from kloc_lens.edit.informs import TraceEditRegression, trace_edit_regression
from kloc_lens.edit.keys import ContextSpec, KeyToken, compute_key, generate_contexts
from kloc_lens.edit.memit import MemitEditor, MultiLayerEdit
from kloc_lens.edit.projection import Projection
from kloc_lens.edit.request import EditRequest, Objective
from kloc_lens.edit.retrace import Retrace, retrace_edit
from kloc_lens.edit.rome import KeyForm, RankOneEdit, RomeEditor
from kloc_lens.edit.stats import SecondMoment, load_second_moment, second_moment
from kloc_lens.edit.sweep import EditLayerSweep, edit_layer_sweep
from kloc_lens.edit.value import FitProblem, KeySpread, ValueFit, ValueSpec, fit_value, fit_values

__all__ = [
    "CommittedEdit",
    "ContextSpec",
    "Edit",
    "EditError",
    "EditEvaluation",
    "EditLayerSweep",
    "EditMetric",
    "EditRequest",
    "Editor",
    "FactEvaluation",
    "FitProblem",
    "KeyForm",
    "KeySpread",
    "KeyToken",
    "LowRankEdit",
    "LowRankUpdate",
    "MemitEditor",
    "MetricScore",
    "MultiLayerEdit",
    "Objective",
    "Projection",
    "RankOneEdit",
    "Retrace",
    "RomeEditor",
    "SecondMoment",
    "TraceEditRegression",
    "TransferMatrix",
    "ValueFit",
    "ValueSpec",
    "WeightEdit",
    "applied",
    "commit",
    "compute_key",
    "edit_hooks",
    "edit_layer_sweep",
    "evaluate_edit",
    "evaluate_editor",
    "evaluate_edits",
    "fit_value",
    "fit_values",
    "generate_contexts",
    "load_second_moment",
    "planted_corpus",
    "retrace_edit",
    "second_moment",
    "trace_edit_regression",
]
