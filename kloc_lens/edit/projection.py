"""The weight matrices a rank-one edit can change, and where their inputs and outputs are hooked.

An edited projection is a linear map ``out = k @ W + b`` inside one block: ``k`` (the *key*) is the
activation the matrix reads, ``out`` is what the block adds to the residual stream. Both ends
have TransformerLens hook points, so an edit ``W + ΔW`` can equally be applied as a hook that adds
``k @ ΔW`` to the output (see :mod:`kloc_lens.edit.apply`).

- ``W_out``: the MLP output projection ``blocks[l].mlp.W_out`` ``[d_mlp, d_model]``; key hook
  ``blocks.{l}.mlp.hook_post`` (the MLP neurons), output hook ``blocks.{l}.hook_mlp_out``.
- ``W_O``: the attention output projection ``blocks[l].attn.W_O``, edited as one
  ``[n_heads * d_head, d_model]`` matrix; key hook ``blocks.{l}.attn.hook_z`` with the heads
  flattened, output hook ``blocks.{l}.hook_attn_out``.

Example:
    >>> Projection.W_OUT.key_hook(3), Projection.W_OUT.output_hook(3)
    ('blocks.3.mlp.hook_post', 'blocks.3.hook_mlp_out')
    >>> Projection("W_O").key_hook(0)
    'blocks.0.attn.hook_z'
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from jaxtyping import Float
from torch import Tensor

from kloc_lens.edit._errors import EditError

__all__ = ["Projection"]


class Projection(str, Enum):
    """The output projection an edit changes (the edit's *site*)."""

    W_OUT = "W_out"
    """The MLP output projection ``blocks[l].mlp.W_out`` ``[d_mlp, d_model]``; its key is the
    MLP's hidden activation ``blocks.{l}.mlp.hook_post``. ROME's and MEMIT's site."""
    W_O = "W_O"
    """The attention output projection ``blocks[l].attn.W_O`` ``[n_heads, d_head, d_model]``,
    edited as one ``[n_heads * d_head, d_model]`` matrix; its key is ``blocks.{l}.attn.hook_z``
    with the head axis flattened (every head's output before ``W_O``, concatenated)."""

    def key_hook(self, layer: int) -> str:
        """The hook name of the projection's input at ``layer``."""
        if self is Projection.W_OUT:
            return f"blocks.{layer}.mlp.hook_post"
        return f"blocks.{layer}.attn.hook_z"

    def output_hook(self, layer: int) -> str:
        """The hook name of the projection's output (bias included) at ``layer``."""
        if self is Projection.W_OUT:
            return f"blocks.{layer}.hook_mlp_out"
        return f"blocks.{layer}.hook_attn_out"

    def key_size(self, model: Any) -> int:
        """Length of a key on ``model``: ``d_mlp`` or ``n_heads * d_head``."""
        cfg = model.cfg
        if self is Projection.W_OUT:
            return int(cfg.d_mlp)
        return int(cfg.n_heads) * int(cfg.d_head)

    def keys(self, activation: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """An activation of :meth:`key_hook` as keys: ``hook_z``'s head axis is flattened."""
        if self is Projection.W_O:
            return activation.flatten(-2)
        return activation

    def weight(self, model: Any, layer: int) -> Tensor:
        """The live weight tensor of ``layer`` (a parameter, or a view of one on a bridge).

        Writing into it in place (``add_``, ``copy_``) changes the model.

        Raises:
            EditError: ``layer`` is out of range, or the block has no such weight.
        """
        n_layers = int(model.cfg.n_layers)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise EditError(f"layer must be an integer in 0..{n_layers - 1}, got {layer!r}")
        if not 0 <= layer < n_layers:
            raise EditError(f"layer {layer} is outside 0..{n_layers - 1}")
        block = model.blocks[layer]
        owner = block.mlp if self is Projection.W_OUT else block.attn
        name = "W_out" if self is Projection.W_OUT else "W_O"
        weight = getattr(owner, name, None)
        if not isinstance(weight, Tensor):
            raise EditError(f"block {layer} of {type(model).__name__} has no {name} weight")
        return weight

    def matrix(self, model: Any, layer: int) -> Float[Tensor, "d_in d_model"]:
        """:meth:`weight` as a ``[key_size, d_model]`` matrix (a view, detached)."""
        weight = self.weight(model, layer).detach()
        return weight.reshape(self.key_size(model), int(model.cfg.d_model))
