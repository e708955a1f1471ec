"""The one exception family of kloc_lens.

Every error a user can trigger with bad input is a :class:`KlocLensError`; the subclass says which
kind of input was wrong and the message names the offending value, so that

>>> try:
...     raise SpanError("'Paris' does not occur in prompt 'The capital of France is'")
... except KlocLensError as err:
...     print(type(err).__name__)
SpanError
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "CorruptionError",
    "EditError",
    "HookNotFiredError",
    "KlocLensError",
    "MetricError",
    "ModelError",
    "PromptError",
    "ResultError",
    "SiteError",
    "SpanError",
    "SweepError",
    "choice",
]


class KlocLensError(Exception):
    """Base class of every error kloc_lens raises for bad input."""


class ModelError(KlocLensError):
    """The model cannot be used: missing tokenizer, train mode, missing hook names, ..."""


class SiteError(KlocLensError):
    """An unknown site, or a site that does not exist on this model or layer."""


class SpanError(KlocLensError):
    """A span (subject, relation, object, positions) that cannot be found in a prompt."""


class PromptError(KlocLensError):
    """A prompt the model cannot take: not a prompt at all (a list, a batch, a number), longer
    than the model's context, or holding text the tokenizer can only write as its unknown token."""


class CorruptionError(KlocLensError):
    """A corruption scheme that cannot be applied to the given prompt."""


class EditError(KlocLensError):
    """An edit that cannot be computed or applied: a target that tokenizes to nothing,
    statistics of the wrong shape or from another model, an edit for another model, ..."""


class MetricError(KlocLensError):
    """A metric that returns something other than one number per run."""


class SweepError(KlocLensError):
    """An inconsistent sweep request (shapes, layers, positions, heads, window)."""


class ResultError(KlocLensError):
    """A result file that cannot be read back."""


class HookNotFiredError(KlocLensError):
    """A hook that was attached for a forward pass but never ran during it: a patch, restore,
    edit or custom site that would otherwise silently do nothing (a hook name this architecture
    never calls, a hook point that needs a switch such as ``set_use_attn_result``)."""


E = TypeVar("E", bound=Enum)


def choice(
    kind: type[E], value: object, what: str, error: type[KlocLensError] = KlocLensError
) -> E:
    """``kind(value)`` for an enum, or ``error`` with a message that lists the valid values.

    >>> from kloc_lens.types import Direction
    >>> choice(Direction, "inject", "direction")
    <Direction.INJECT: 'inject'>
    >>> choice(Direction, "forward", "direction", SweepError)
    Traceback (most recent call last):
    ...
    kloc_lens.errors.SweepError: direction must be one of 'restore', 'inject', got 'forward'
    """
    try:
        return kind(value)  # type: ignore[call-arg]
    except ValueError:
        options = ", ".join(repr(member.value) for member in kind)
        raise error(f"{what} must be one of {options}, got {value!r}") from None
