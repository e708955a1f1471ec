"""What a configuration may skip: the layers and positions its patches cannot change.

While the base run executes, each patched hook point's cached source activation is compared with
the base run's own (:func:`differences`). A configuration then changes nothing before the first
layer and the first position at which one of its patches writes a different value
(:func:`start_of`); with causal attention nothing at earlier positions changes in any layer.
A configuration that changes nothing at all scores the base run's score.

>>> from kloc_lens.engine.types import Patch, Source
>>> from kloc_lens.sites import get_site
>>> fire_point(Patch(get_site("resid_post"), 1, 3, None, Source.CLEAN), n_layers=4)
('blocks.2.hook_resid_pre', 2)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from kloc_lens.engine.types import Config, Patch, Source
from kloc_lens.sites import Site

__all__ = [
    "SAME_RTOL",
    "axis_sizes",
    "block_of",
    "differences",
    "fire_point",
    "first_change",
    "position_safe",
    "start_of",
]

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Hook points (after ``blocks.{l}.``) whose activation has the query position on the given axis
# (after the batch axis) and holds positions t..T-1 only when a block runs on those positions.
_POSITION_AXIS = {
    "hook_resid_pre": 0,
    "hook_resid_mid": 0,
    "hook_resid_post": 0,
    "hook_attn_out": 0,
    "hook_mlp_out": 0,
    "attn.hook_q": 0,
    "attn.hook_k": 0,
    "attn.hook_v": 0,
    "attn.hook_z": 0,
    "attn.hook_result": 0,
    "attn.hook_attn_scores": 1,
    "attn.hook_pattern": 1,
    "mlp.hook_pre": 0,
    "mlp.hook_post": 0,
}

SAME_RTOL = 1e-6
"""Entries whose source and base activations differ by less than this (relative to the entry and
to the activation's RMS) count as unchanged: float rounding of batches of other sizes."""


def axis_sizes(site: Site, act: Tensor) -> tuple[int, int]:
    """(positions, heads) of a ``[row, ...]`` activation of ``site`` (0 positions for an
    activation without a position axis, 1 head for a site without heads)."""
    n_pos = act.shape[1 + site.pos_dim] if act.dim() > 1 + site.pos_dim else 0
    n_head = act.shape[1 + site.head_dim] if site.head_dim is not None else 1
    return n_pos, n_head


def fire_point(patch: Patch, n_layers: int) -> tuple[str, int] | None:
    """Where a block-by-block pass applies ``patch``: (hook name, block index), or ``None`` for a
    hook point outside the blocks.

    ``blocks.{l}.hook_resid_post`` is the input of block ``l + 1``, so it is applied there (and
    the pass may start at block ``l + 1``).
    """
    match = _BLOCK_HOOK.match(patch.hook)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if rest == "hook_resid_post" and layer + 1 < n_layers:
        return f"blocks.{layer + 1}.hook_resid_pre", layer + 1
    return patch.hook, layer


def block_of(hook_name: str) -> int | None:
    """The block a hook point lies in (``blocks.{l}.…``), or ``None`` outside the blocks."""
    match = _BLOCK_HOOK.match(hook_name)
    return int(match.group(1)) if match is not None else None


def position_safe(patch: Patch) -> bool:
    """Whether the hook point holds only the positions a block is run on."""
    match = _BLOCK_HOOK.match(patch.hook)
    return match is not None and _POSITION_AXIS.get(match.group(2)) == patch.site.pos_dim


def differences(site: Site, act: Tensor, source: Tensor) -> Bool[Tensor, "pos head"]:
    """Where ``source`` differs from ``act`` beyond float rounding.

    Finite entries may differ by :data:`SAME_RTOL` of their size (plus of the activation's RMS);
    infinite or NaN entries (masked attention scores) must match exactly.
    """
    finite = torch.isfinite(act) & torch.isfinite(source)
    plain = torch.where(finite, act, torch.zeros((), dtype=act.dtype, device=act.device))
    scale = plain.abs() + plain.float().pow(2).mean().sqrt().to(act.dtype)
    close = (act - source).abs() <= SAME_RTOL * scale
    changed = torch.where(finite, ~close, act != source).any(dim=0)  # over rows
    n_pos, n_head = axis_sizes(site, act)
    if n_pos == 0:
        return changed.any().reshape(1, 1).expand(1, n_head)
    keep = [site.pos_dim] + ([site.head_dim] if site.head_dim is not None else [])
    for dim in sorted(set(range(changed.dim())) - set(keep), reverse=True):
        changed = changed.any(dim=dim)
    if site.head_dim is None:
        return changed.reshape(n_pos, 1)
    return changed if site.pos_dim < site.head_dim else changed.transpose(0, 1)


def first_change(patch: Patch, changed: Bool[Tensor, "pos head"]) -> int | None:
    """First position at which ``patch`` writes a value that differs from the base run's."""
    heads = changed if patch.head is None else changed[:, patch.head : patch.head + 1]
    per_pos = heads.any(dim=1)
    if per_pos.shape[0] == 1:  # one position, or an activation without a position axis
        return 0 if bool(per_pos[0]) else None
    if patch.position is not None:
        return patch.position if bool(per_pos[patch.position]) else None
    hits = per_pos.nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def start_of(
    config: Config,
    base: Source,
    changed: dict[str, Tensor],
    reads: Tensor | None,
    n_layers: int,
    fires: Sequence[tuple[str, int] | None] | None = None,
) -> tuple[int, int] | None:
    """First (layer, position) at which ``config`` changes the ``base`` run; ``None`` if never.

    Args:
        config: The configuration.
        base: The run it is executed on.
        changed: Per hook name read from the other run, :func:`differences` of the two runs.
        reads: The positions the metric reads (the logits there are always recomputed), or
            ``None`` when it reads every position.
        n_layers: The model's layers.
        fires: :func:`fire_point` of each patch of ``config``, if the caller has them already.
    """
    if fires is None:
        fires = [fire_point(p, n_layers) for p in config]
    layer, pos = None, None
    for patch, fire in zip(config, fires, strict=True):
        if patch.source is base:
            continue  # the base run's own activation: a change only after an earlier one
        first = first_change(patch, changed[patch.hook])
        if first is None:
            continue
        fire_layer = fire[1] if fire is not None else 0
        layer = fire_layer if layer is None else min(layer, fire_layer)
        pos = first if pos is None else min(pos, first)
    if layer is None or pos is None:
        return None
    if any(not position_safe(p) for p in config):
        pos = 0
    if reads is not None:
        pos = min(pos, int(reads.min()))
    return layer, pos
