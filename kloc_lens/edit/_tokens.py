"""Token-level helpers shared by keys, statistics, value optimisation and evaluation.

The BOS and padding rules themselves live in :mod:`kloc_lens._tokens` (shared with
:mod:`kloc_lens.facts`); the device comes from :func:`kloc_lens.model.device_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Int
from torch import Tensor

from kloc_lens._tokens import bos_id, encode_ids, pad_id
from kloc_lens._tokens import pad_rows as padded
from kloc_lens.edit._errors import EditError
from kloc_lens.errors import PromptError, SpanError
from kloc_lens.facts import Prompt, target_token_ids
from kloc_lens.model import device_of

__all__ = ["Rows", "bos_id", "device_of", "encode", "pad_rows", "target_ids"]


def encode(model: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it (BOS prepended where the model does)."""
    return encode_ids(model, text)


def target_ids(model: Any, prompt: Prompt, target: str, what: str) -> list[int]:
    """Token ids of ``target`` after ``prompt``, refusing empty and unknown targets.

    Raises:
        EditError: The target is blank, tokenizes to nothing, or to the unknown token anywhere
            (its first token included).
    """
    if not target.strip():
        raise EditError(f"{what} {target!r} is empty: it tokenizes to nothing")
    try:
        ids = target_token_ids(model, prompt, target)
    except PromptError as err:
        raise EditError(f"{what}: {err}") from None
    except SpanError as err:
        raise EditError(f"{what} {target!r} tokenizes to nothing after {prompt.text!r}") from err
    return ids


@dataclass(frozen=True)
class Rows:
    """Token rows padded on the right into one batch.

    Attributes:
        tokens: The padded ids.
        lengths: The real length of each row.
    """

    tokens: Int[Tensor, "batch pos"]
    lengths: tuple[int, ...]


def pad_rows(model: Any, rows: Sequence[Sequence[int]]) -> Rows:
    """Pad token rows on the right (causal attention keeps every real token's numbers)."""
    if not rows:
        raise EditError("no token rows to run")
    tokens = padded(rows, pad_id(model))
    return Rows(tokens.to(device_of(model)), tuple(len(row) for row in rows))
