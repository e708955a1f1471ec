"""The error of the editing subpackage (a :class:`~kloc_lens.errors.KlocLensError`)."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from kloc_lens import errors
from kloc_lens.errors import EditError

__all__ = ["EditError", "choice"]

E = TypeVar("E", bound=Enum)


def choice(kind: type[E], value: object, what: str) -> E:
    """``kind(value)`` for an enum, or an :class:`EditError` that lists the choices
    (:func:`kloc_lens.errors.choice` with the editing subpackage's error)."""
    return errors.choice(kind, value, what, EditError)
