"""The BOS and padding rules: the one module that knows how a text becomes the model's token row
and how rows of different lengths share a batch.

- **BOS**: the model prepends its tokenizer's BOS token to every prompt when
  ``cfg.default_prepend_bos`` is true (TransformerLens's default) and the tokenizer has one; the
  text itself is encoded without special tokens. :func:`bos_id` says which id (or none),
  :func:`encode` gives the row (with character offsets of each token, ``(0, 0)`` for BOS).
- **Padding**: rows are padded on the *right* with the tokenizer's pad token (else its EOS
  token, else 0): with causal attention every real token keeps the numbers it has alone, and a
  row's logits are read at its own last position. :func:`pad_id` and :func:`pad_rows`.

:mod:`kloc_lens.facts` (prompts and spans) and :mod:`kloc_lens.edit` (keys, statistics, value
fits, evaluation) both use these functions.

>>> from types import SimpleNamespace
>>> from kloc_lens.planted import planted_model
>>> model, _ = planted_model()
>>> ids, offsets = encode(model, "Toko")
>>> ids[0] == bos_id(model), offsets[0]
(True, (0, 0))
>>> pad_rows([[5, 6, 7], [5]], pad=0).tolist()
[[5, 6, 7], [5, 0, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["bos_id", "encode", "encode_ids", "pad_id", "pad_rows"]


def bos_id(model: Any) -> int | None:
    """The BOS id the model prepends to every prompt, or ``None``."""
    bos = model.tokenizer.bos_token_id
    if bool(getattr(model.cfg, "default_prepend_bos", True)) and bos is not None:
        return int(bos)
    return None


def encode(model: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` as the model sees it, and each token's character range in ``text``
    (BOS prepended where the model does, with the range ``(0, 0)``)."""
    encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    bos = bos_id(model)
    if bos is not None:
        ids = [bos, *ids]
        offsets = [(0, 0), *offsets]
    return ids, offsets


def encode_ids(model: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the model sees it (BOS prepended where the model does)."""
    ids = [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = bos_id(model)
    return ids if bos is None else [bos, *ids]


def pad_id(model: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS token, else 0."""
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id or 0
    return int(pad)


def pad_rows(rows: Sequence[Sequence[int] | Tensor], pad: int) -> Int[Tensor, "batch pos"]:
    """Pad token rows on the right with ``pad`` into one ``[batch, pos]`` tensor (on the CPU)."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), int(pad), dtype=torch.long)
    for index, row in enumerate(rows):
        if len(row):
            tokens[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return tokens
