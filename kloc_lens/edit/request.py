"""Edit requests: which fact to change, to what, and from which perspective.

An :class:`EditRequest` turns into *objectives*: prompts after which a target should become
likely (``increase``) or unlikely (``decrease``). The two perspectives of the study
(``notes/knowledge-localization.md``) differ only in their objectives:

=========  =================================================  =========================
edit       prompt                                             objective
=========  =================================================  =========================
entity     ``"The home of Ana Bel is"``                       raise new, lower old object
relation   ``"The relation between Ana Bel and Quito is"``    raise the relation (add)
           ``"The relation between Ana Bel and Paris is"``    raise ``"None"``, lower the
                                                              relation (remove)
=========  =================================================  =========================

Example:
    >>> from kloc_lens.facts import Fact
    >>> request = EditRequest(Fact("Ana Bel", "home", "Paris"), "Quito")
    >>> [(o.prompt.text, o.increase, o.decrease) for o in request.objectives()]
    [('The home of Ana Bel is', 'Quito', 'Paris')]
    >>> relation = EditRequest(Fact("Ana Bel", "home", "Paris"), "Quito", perspective="relation")
    >>> [(o.prompt.text, o.increase, o.decrease) for o in relation.objectives()]
    [('The relation between Ana Bel and Quito is', 'home', None),
     ('The relation between Ana Bel and Paris is', 'None', 'home')]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kloc_lens.edit._errors import EditError, choice
from kloc_lens.facts import Fact, Perspective, Prompt, find_word

__all__ = ["EditRequest", "Objective", "request_list"]


@dataclass(frozen=True)
class Objective:
    """One prompt of an edit objective.

    Attributes:
        prompt: The prompt, with its spans.
        increase: A continuation to make likely, or ``None``.
        decrease: A continuation to make unlikely, or ``None``.
    """

    prompt: Prompt
    increase: str | None = None
    decrease: str | None = None


@dataclass(frozen=True)
class EditRequest:
    """A fact to change, its new object and the perspective to edit from.

    Attributes:
        fact: The fact as the model knows it now (``fact.object`` is the old object).
        new_object: The object after the edit; defaults to ``fact.new_object``.
        perspective: ``entity`` (make the entity prompt answer the new object) or ``relation``
            (the study's add / remove objectives on relation prompts).
        prompt: The entity prompt to edit on, if not ``fact.entity_prompt()``; a plain string
            must contain the subject.
        neighbors: Facts about other subjects with the same old object (evaluation only:
            neighbourhood specificity); none given, the fact's ``neighborhood_prompts`` (as
            CounterFact ships them) are scored instead.
        related: Other facts about the same subject (evaluation only: relation specificity,
            RETS's "R-Specificity": an entity edit should not change what the model says about
            the subject's other relations).
        none_target: The relation-perspective answer meaning "no relation" (the study's
            ``"None"``).

    Raises:
        EditError: No new object, a blank one, the old object again, an unknown perspective,
            or a field of the wrong type.
    """

    fact: Fact
    new_object: str | None = None
    perspective: Perspective | str = Perspective.ENTITY
    prompt: Prompt | str | None = None
    neighbors: tuple[Fact, ...] = ()
    none_target: str = "None"
    related: tuple[Fact, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.fact, Fact):
            raise EditError(f"EditRequest.fact must be a Fact, got {type(self.fact).__name__}")
        new = self.new_object if self.new_object is not None else self.fact.new_object
        if new is not None and not isinstance(new, str):
            raise EditError(f"new object must be a string, got {type(new).__name__} {new!r}")
        if not isinstance(self.none_target, str):
            raise EditError(f"none_target must be a string, got {self.none_target!r}")
        if new is None:
            raise EditError(
                f"edit request for {self.fact.subject!r} has no new object (give new_object "
                "or Fact.new_object)"
            )
        if not new.strip():
            raise EditError(f"new object {new!r} for {self.fact.subject!r} is empty")
        if new.strip() == self.fact.object.strip():
            raise EditError(f"new object {new!r} is the old object of {self.fact.subject!r}")
        object.__setattr__(self, "new_object", new)
        object.__setattr__(
            self, "perspective", choice(Perspective, self.perspective, "perspective")
        )

    @property
    def target(self) -> str:
        """The new object."""
        return str(self.new_object)  # resolved in __post_init__

    @property
    def edited(self) -> Perspective:
        """The perspective the edit is made from."""
        return Perspective(self.perspective)

    def entity_prompt(self) -> Prompt:
        """The entity prompt edited (and evaluated for efficacy).

        Raises:
            SpanError: A plain-string ``prompt`` does not contain the subject.
        """
        if self.prompt is None:
            return self.fact.entity_prompt()
        if isinstance(self.prompt, Prompt):
            return self.prompt
        prompt = Prompt.from_text(self.prompt, self.fact.object, subject=self.fact.subject)
        spans = dict(prompt.char_spans)
        start = find_word(self.prompt, self.fact.relation)
        if start >= 0:
            spans["relation"] = (start, start + len(self.fact.relation))
        return Prompt(prompt.text, prompt.target, spans, Perspective.ENTITY)

    def add_prompt(self) -> Prompt:
        """The relation prompt with the new object (the study's add prompt)."""
        return self.fact.relation_prompt(object=self.target)

    def remove_prompt(self) -> Prompt:
        """The relation prompt with the old object (the study's remove prompt)."""
        return self.fact.relation_prompt()

    def objectives(self) -> tuple[Objective, ...]:
        """The prompts and targets the value optimisation fits."""
        if self.edited is Perspective.ENTITY:
            return (Objective(self.entity_prompt(), self.target, self.fact.object),)
        return (
            Objective(self.add_prompt(), self.fact.relation, None),
            Objective(self.remove_prompt(), self.none_target, self.fact.relation),
        )


def request_list(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """``requests`` as a list, checked: at least one, every item an :class:`EditRequest`.

    Raises:
        EditError: No requests, or an item of another type (named by its index).
    """
    items = list(requests)
    if not items:
        raise EditError("no requests to edit")
    for index, item in enumerate(items):
        if not isinstance(item, EditRequest):
            raise EditError(f"requests[{index}] is a {type(item).__name__}, not an EditRequest")
    return items
