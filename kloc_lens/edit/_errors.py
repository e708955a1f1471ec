"""The error of the editing subpackage (a :class:`~kloc_lens.errors.KlocLensError`)."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from kloc_lens.errors import EditError

__all__ = ["EditError", "choice"]

E = TypeVar("E", bound=Enum)


def choice(kind: type[E], value: object, what: str) -> E:
    """``kind(value)`` for an enum, or an :class:`EditError` that lists the choices."""
    try:
        return kind(value)  # type: ignore[call-arg]
    except ValueError:
        options = ", ".join(repr(member.value) for member in kind)
        raise EditError(f"{what} must be one of {options}, got {value!r}") from None
