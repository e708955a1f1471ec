"""Shape aliases and the enums shared across kloc_lens.

Axis names follow TransformerLens (``layer``, ``pos``, ``head``, ``batch``, ``d_model``), so a
signature reads as the tensor it takes::

    def restore(values: LayerPos) -> ...   # Float[Tensor, "layer pos"]
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "Direction",
    "Embeddings",
    "Indices",
    "LayerHead",
    "LayerPos",
    "LayerPosHead",
    "Logits",
    "Scalar",
    "Scores",
    "Tokens",
    "TraceKind",
]

Tokens = Int[Tensor, "batch pos"]
"""Token ids of a batch of prompts."""
Logits = Float[Tensor, "batch pos d_vocab"]
"""Logits of a batch of prompts."""
Embeddings = Float[Tensor, "batch pos d_model"]
"""Residual-stream vectors (token embeddings, residual states) of a batch of prompts."""
Scalar = Float[Tensor, ""]
"""A 0-dimensional tensor: what a metric returns for one run."""
Scores = Float[Tensor, " config"]
"""One metric value per patch configuration of a sweep."""
Indices = Iterable[Any]
"""Layer, position or head indices a sweep runs over: integers (a list, a range, a 1-d integer
tensor; negative ones count from the end). Typed loosely on purpose: a sweep checks every element
itself and raises a :class:`~kloc_lens.errors.SweepError` naming a bad one (``1.7``, ``"3"``,
``True``), where a runtime type checker would only sample one element."""
LayerPos = Float[Tensor, "layer pos"]
"""A sweep over layers and token positions."""
LayerHead = Float[Tensor, "layer head"]
"""A sweep over layers and attention heads (all positions at once)."""
LayerPosHead = Float[Tensor, "layer pos head"]
"""A sweep over layers, token positions and attention heads."""


class Direction(str, Enum):
    """Which way activations flow in a patch."""

    RESTORE = "restore"
    """Run the corrupted input and copy clean activations in (denoising; ROME's restore,
    ``transformer_lens.patching``'s convention)."""
    INJECT = "inject"
    """Run the clean input and copy corrupted activations in (noising)."""


class TraceKind(str, Enum):
    """What a causal trace restores at each (layer, position)."""

    RESID = "resid"
    """One residual-stream state (the block output, as in ROME)."""
    MLP = "mlp"
    """The MLP outputs of a window of layers around the layer."""
    ATTN = "attn"
    """The attention outputs of a window of layers around the layer."""
