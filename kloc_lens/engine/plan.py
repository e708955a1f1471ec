"""The plan of the block-by-block passes: which configurations share a pass, and which rows.

Configurations are grouped by start position into passes (:func:`plan_passes`) whose size the
memory budget bounds: a pass runs positions ``t0..T-1`` for all its members, so members with a
later start position pay padding, which is accepted up to :data:`PACK_SLACK` of extra work (or
while a pass is too small to use the device well). Inside a pass, members whose patches agree
up to a block share the rows that compute it and split at the first block where they differ
(:func:`layer_groups`): ROME's windows around neighbouring layers share their first layers.

>>> items = [Planned(i, layer, pos, []) for i, (layer, pos) in enumerate([(0, 3), (1, 3), (0, 0)])]
>>> [(t0, [m.index for m in members]) for t0, members in plan_passes(
...     items, rows=1, n_pos=4, n_layers=2, max_tokens=100, max_configs=None, min_tokens=0)]
[(3, [0, 1]), (0, [2])]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kloc_lens.engine.types import Patch

__all__ = ["PACK_SLACK", "Layout", "Planned", "layer_groups", "plan_passes"]

PACK_SLACK = 0.1
"""Pack configurations of different start positions together while the padding costs at most
this share of extra work (or while a pass is smaller than the per-device token minimum)."""


@dataclass
class Planned:
    """A configuration on the block-by-block path.

    Attributes:
        index: Its position in the sweep's list of configurations.
        start_layer: The first block it changes.
        start_pos: The first position it changes.
        patches: ``(hook fired, its block, patch)`` for every patch from ``start_layer`` on.
    """

    index: int
    start_layer: int
    start_pos: int
    patches: list[tuple[str, int, Patch]]


def plan_passes(
    items: list[Planned],
    rows: int,
    n_pos: int,
    n_layers: int,
    max_tokens: int,
    max_configs: int | None,
    min_tokens: int,
) -> list[tuple[int, list[Planned]]]:
    """Group configurations into passes ``(t0, members)``, latest start positions first."""
    order = sorted(items, key=lambda p: (-p.start_pos, p.start_layer))
    passes: list[tuple[int, list[Planned]]] = []
    members: list[Planned] = []
    t0 = n_pos
    depth = 0  # sum of layers run over members
    minimal = 0  # token-layers the members need on their own
    for item in order:
        layers = n_layers - item.start_layer
        if members:
            new_t0 = min(t0, item.start_pos)
            count = len(members) + 1
            tokens = count * rows * (n_pos - new_t0)
            padded = rows * (n_pos - new_t0) * (depth + layers)
            needed = minimal + rows * (n_pos - item.start_pos) * layers
            small = len(members) * rows * (n_pos - t0) < min_tokens
            fits = tokens <= max_tokens and (max_configs is None or count <= max_configs)
            if fits and (small or padded <= (1 + PACK_SLACK) * needed):
                members.append(item)
                t0, depth, minimal = new_t0, depth + layers, needed
                continue
            passes.append((t0, members))
        members = [item]
        t0, depth = item.start_pos, layers
        minimal = rows * (n_pos - item.start_pos) * layers
    if members:
        passes.append((t0, members))
    return passes


Layout = tuple[list[list[int]], list[int | None]]
"""One block of a pass: the groups of members that share rows there, and each group's parent
group at the block below (``None``: it joins from the base run)."""


def layer_groups(members: list[Planned], first: int, n_layers: int) -> list[Layout]:
    """For each block from ``first``: the groups of members (positions in ``members``) that share
    rows there, and each group's parent group at the block below (``None``: joins from the base
    run). Members share rows while their patches up to that block are the same."""
    by_layer: list[dict[int, frozenset[tuple[Any, ...]]]] = []
    for item in members:
        keys: dict[int, set[tuple[Any, ...]]] = {}
        for fire, layer, patch in item.patches:
            keys.setdefault(layer, set()).add(
                (fire, patch.hook, patch.source, patch.position, patch.head)
            )
        by_layer.append({layer: frozenset(k) for layer, k in keys.items()})
    layout: list[Layout] = []
    previous: list[list[int]] = []
    empty: frozenset[tuple[Any, ...]] = frozenset()
    for layer in range(first, n_layers):
        groups: list[list[int]] = []
        parents: list[int | None] = []
        for parent, group in enumerate(previous):
            split: dict[frozenset[tuple[Any, ...]], list[int]] = {}
            for member in group:
                split.setdefault(by_layer[member].get(layer, empty), []).append(member)
            groups += split.values()
            parents += [parent] * len(split)
        joining: dict[frozenset[tuple[Any, ...]], list[int]] = {}
        for member, item in enumerate(members):
            if item.start_layer == layer:
                joining.setdefault(by_layer[member].get(layer, empty), []).append(member)
        groups += joining.values()
        parents += [None] * len(joining)
        layout.append((groups, parents))
        previous = groups
    return layout
