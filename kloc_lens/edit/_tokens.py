"""Token-level helpers shared by keys, statistics, value optimisation and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from kloc_lens.edit._errors import EditError
from kloc_lens.errors import PromptError, SpanError
from kloc_lens.facts import Prompt, target_token_ids

__all__ = ["Rows", "bos_id", "device_of", "encode", "pad_rows", "target_ids"]


def device_of(model: Any) -> torch.device:
    """The device of the model's parameters."""
    for param in model.parameters():
        return param.device
    return torch.device(str(getattr(model.cfg, "device", None) or "cpu"))


def bos_id(model: Any) -> int | None:
    """The BOS id the model prepends to every prompt, or ``None``."""
    bos = model.tokenizer.bos_token_id
    if bool(getattr(model.cfg, "default_prepend_bos", True)) and bos is not None:
        return int(bos)
    return None


def encode(model: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it (BOS prepended where the model does)."""
    ids = [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = bos_id(model)
    return ids if bos is None else [bos, *ids]


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
    pad = model.tokenizer.pad_token_id
    if pad is None:
        pad = model.tokenizer.eos_token_id or 0
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), int(pad), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return Rows(tokens.to(device_of(model)), tuple(len(row) for row in rows))
