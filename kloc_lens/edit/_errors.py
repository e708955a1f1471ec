"""The error of the editing subpackage (a :class:`~kloc_lens.errors.KlocLensError`)."""

from __future__ import annotations

import operator
from enum import Enum
from typing import TypeVar

from kloc_lens import errors
from kloc_lens.errors import EditError

__all__ = ["EditError", "choice", "integer"]

E = TypeVar("E", bound=Enum)


def choice(kind: type[E], value: object, what: str) -> E:
    """``kind(value)`` for an enum, or an :class:`EditError` that lists the choices
    (:func:`kloc_lens.errors.choice` with the editing subpackage's error)."""
    return errors.choice(kind, value, what, EditError)


def integer(
    value: object, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int within ``minimum..maximum``, or an :class:`EditError` naming it.

    >>> integer(3, "layer", minimum=0, maximum=5)
    3
    >>> integer(1.7, "layer", minimum=0, maximum=5)
    Traceback (most recent call last):
    ...
    kloc_lens.errors.EditError: layer must be an integer in 0..5, got 1.7
    """
    low = "" if minimum is None else str(minimum)
    high = "" if maximum is None else str(maximum)
    expected = f"an integer in {low}..{high}" if maximum is not None else "an integer"
    if maximum is None and minimum is not None:
        expected = f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise EditError(f"{what} must be {expected}, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise EditError(f"{what} must be {expected}, got {value!r}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise EditError(f"{what} must be {expected}, got {value!r}")
    return number
