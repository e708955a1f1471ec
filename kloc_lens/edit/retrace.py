"""Trace a fact again after editing it: did the causal site move?

The editor chose its layer from a trace of the unedited model. After the edit, the model
answers the new object; tracing that answer on the edited model (same prompt, same corruption)
shows where the edited model now carries the fact. ROME's account predicts the site stays put:
the new value is written at the edited layer, at the subject's last token, and read from there
as the old one was. :func:`retrace_edit` returns both traces and compares their MLP-window peaks
at the subject's last token. An edit can also leave no site there: when the new answer survives
corrupting the subject (the update fires on the corrupted keys too), restoring the subject's
states recovers nothing, and the peak is undefined rather than "moved".

Entity edits are traced on the edited entity prompt (before: the old object; after: the new).
Relation edits are traced on the relation prompt (before: the relation, with the old object;
after: the relation, with the new object).

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> from kloc_lens.edit import EditRequest, RomeEditor, planted_corpus, second_moment
    >>> from kloc_lens.corrupt import GaussianNoise
    >>> model, planted = planted_model()
    >>> fact = Fact(planted.subjects[0], "home", planted.objects[0])
    >>> stats = second_moment(model, planted.mlp_layer, planted_corpus(planted), progress=False)
    >>> request = EditRequest(fact, "Quito")
    >>> edit = RomeEditor(layer=planted.mlp_layer, stats=stats).compute(model, request)
    >>> again = retrace_edit(model, edit, request, corruption=GaussianNoise(scale=1.0, samples=3))
    >>> again.peak_layer("before"), again.peak_layer("after"), again.moved
    (1, 1, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kloc_lens.corrupt import Corruption
from kloc_lens.edit._errors import EditError
from kloc_lens.edit.apply import Edit, commit
from kloc_lens.edit.request import EditRequest
from kloc_lens.facts import Perspective, Prompt
from kloc_lens.results import TraceResult, TraceSet
from kloc_lens.trace import causal_trace

__all__ = ["SITE_SHARE", "Retrace", "retrace_edit"]

SITE_SHARE = 0.1
"""A trace has a site at the subject's last token when some layer's restore there recovers at
least this share of its total effect (our threshold, not a published one)."""

Which = str
"""``"before"`` (the unedited model) or ``"after"`` (the edited one)."""


@dataclass(frozen=True)
class Retrace:
    """A fact traced on the unedited model and again on the edited one.

    Attributes:
        request: The edit's request.
        before: Traces of the unedited model's answer (old object, or the relation with the
            old object).
        after: Traces of the edited model's new answer, same prompt shape and corruption.
    """

    request: EditRequest
    before: TraceSet
    after: TraceSet

    def _trace(self, which: Which, kind: str) -> TraceResult:
        if which not in ("before", "after"):
            raise EditError(f"which must be 'before' or 'after', got {which!r}")
        return (self.before if which == "before" else self.after).get(kind)

    def subject_last_effects(self, which: Which, kind: str = "mlp") -> list[float]:
        """The indirect effect at the subject's last token, per traced layer."""
        trace = self._trace(which, kind)
        if "subject" not in trace.spans:
            raise EditError("the traced prompt has no subject span")
        position = trace.spans["subject"][1] - 1
        if position not in trace.positions:
            raise EditError(f"the subject's last token {position} was not traced")
        column = trace.positions.index(position)
        return [float(x) for x in trace.indirect_effect[:, column]]

    def peak_layer(self, which: Which, kind: str = "mlp") -> int | None:
        """The layer whose restore (MLP window by default) at the subject's last token
        recovers the most; ``None`` when no layer there recovers :data:`SITE_SHARE` of the
        trace's total effect (the answer is not carried at the subject's last token, e.g. it
        survives the corruption)."""
        effects = self.subject_last_effects(which, kind)
        trace = self._trace(which, kind)
        best = max(range(len(effects)), key=effects.__getitem__)
        total = trace.total_effect
        if not total > 0 or not effects[best] >= SITE_SHARE * total:
            return None
        return trace.layers[best]

    @property
    def moved(self) -> bool | None:
        """Whether the MLP-window peak at the subject's last token changed layer; ``None``
        when either trace has no such site (:meth:`peak_layer`)."""
        before, after = self.peak_layer("before"), self.peak_layer("after")
        if before is None or after is None:
            return None
        return before != after


def _prompts(request: EditRequest) -> tuple[tuple[Prompt, str], tuple[Prompt, str]]:
    fact = request.fact
    if request.edited is Perspective.ENTITY:
        prompt = request.entity_prompt()
        return (prompt, fact.object), (prompt, request.target)
    return (request.remove_prompt(), fact.relation), (request.add_prompt(), fact.relation)


def retrace_edit(
    model: Any,
    edit: Edit,
    request: EditRequest,
    *,
    corruption: Corruption | None = None,
    **trace_options: Any,
) -> Retrace:
    """Trace ``request``'s fact on the model, then again with ``edit`` committed (restored
    bit for bit afterwards, also after an error).

    Args:
        model: The hooked model the edit was computed on.
        edit: The edit.
        request: What it edited (its perspective picks the prompts).
        corruption: As :func:`~kloc_lens.trace.causal_trace` (default: noise on the subject).
        **trace_options: More :func:`~kloc_lens.trace.causal_trace` arguments (``kinds``,
            ``window``, ``sever``, ``progress``...), the same for both traces.

    Returns:
        Both traces.

    Raises:
        EditError: The edit belongs to another model; or as :func:`causal_trace`.
    """
    if not isinstance(request, EditRequest):
        raise EditError(f"request must be an EditRequest, got {type(request).__name__}")
    (first, old), (second, new) = _prompts(request)
    trace_options.setdefault("progress", False)
    before = causal_trace(model, first, target=old, corruption=corruption, **trace_options)
    with commit(model, edit):
        after = causal_trace(model, second, target=new, corruption=corruption, **trace_options)
    return Retrace(request, before, after)
