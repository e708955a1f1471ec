"""Screen, then patch: gradient estimates of a whole sweep, exact patching of its top-k.

Kramar et al. (2024) recommend screening every component of a sweep with AtP*
(:func:`~kloc_lens.attribution_patching`, one forward and ``n_layers`` backward passes) and then
confirming the components it ranks highest with exact activation patching
(:func:`~kloc_lens.activation_patching`), which costs one patched run per component.
:func:`screen_then_patch` is that workflow; :class:`ScreenedPatching` holds the screen, the
chosen components and both their estimated and their exact effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.attribution import AttributionMethod, attribution_patching
from kloc_lens.corrupt import Corruption
from kloc_lens.errors import SweepError
from kloc_lens.results import LayerHeadResult, LayerPosHeadResult, PatchResult
from kloc_lens.sites import Site
from kloc_lens.trace import PromptLike, Sweep, activation_patching
from kloc_lens.types import Direction, Indices

__all__ = ["Component", "ScreenedPatching", "screen_then_patch"]


@dataclass(frozen=True)
class Component:
    """One component of a sweep: a layer and, as the sweep has them, a position and a head.

    Attributes:
        layer: The layer.
        position: The token position (``None`` for ``layer_head`` sweeps: every position).
        head: The head (``None`` for ``layer_pos`` sweeps: every head).
    """

    layer: int
    position: int | None
    head: int | None


@dataclass(frozen=True)
class ScreenedPatching:
    """A gradient screen of every component, and exact patching of the top-k.

    Attributes:
        screen: The attribution-patching estimate of the whole sweep.
        components: The ``top_k`` components with the largest estimated ``|effect|``, largest
            first.
        exact: The exact metric after patching each of ``components`` (activation patching).
        method: The screening method.
    """

    screen: PatchResult
    components: tuple[Component, ...]
    exact: Float[Tensor, " k"]
    method: AttributionMethod

    def _index(self, component: Component) -> tuple[int, ...]:
        index = [self.screen.layers.index(component.layer)]
        if component.position is not None:
            index.append(self.screen.positions.index(component.position))
        if component.head is not None:
            index.append(self.screen.heads.index(component.head))
        return tuple(index)

    @property
    def estimated(self) -> Float[Tensor, " k"]:
        """The screen's estimated metric after patching each of ``components``."""
        return torch.stack([self.screen.values[self._index(c)] for c in self.components])

    @property
    def estimated_effect(self) -> Float[Tensor, " k"]:
        """The screen's estimated effect of each component (``atp*``: its estimated size)."""
        return torch.stack([self.screen.effect[self._index(c)] for c in self.components])

    @property
    def exact_effect(self) -> Float[Tensor, " k"]:
        """The exact effect of each component, in the screen's direction convention."""
        if self.screen.direction is Direction.RESTORE:
            return self.exact - self.screen.corrupted_score
        return self.screen.clean_score - self.exact

    def to_dataframe(self) -> pd.DataFrame:
        """One row per confirmed component: rank, layer, pos, token, head, the estimated and the
        exact value and effect."""
        tokens = self.screen.str_tokens
        rows = []
        for rank, (component, estimated, estimated_effect, exact, exact_effect) in enumerate(
            zip(
                self.components,
                self.estimated.tolist(),
                self.estimated_effect.tolist(),
                self.exact.tolist(),
                self.exact_effect.tolist(),
                strict=True,
            )
        ):
            pos = component.position
            rows.append(
                {
                    "rank": rank,
                    "layer": component.layer,
                    "pos": pos,
                    "token": tokens[pos] if tokens and pos is not None else "",
                    "head": component.head,
                    "estimated": estimated,
                    "estimated_effect": estimated_effect,
                    "exact": exact,
                    "exact_effect": exact_effect,
                }
            )
        return pd.DataFrame(rows)


def screen_then_patch(
    model: Any,
    clean: Tensor | PromptLike,
    corrupted: Tensor | PromptLike | Corruption,
    metric: Callable[[Tensor], Any],
    *,
    top_k: int = 10,
    site: str | Site = "resid_pre",
    sweep: Sweep | str = Sweep.LAYER_POS,
    direction: Direction | str = Direction.RESTORE,
    layers: Indices | None = None,
    positions: Indices | None = None,
    heads: Indices | None = None,
    method: AttributionMethod | str = AttributionMethod.ATP_STAR,
    batch_size: int | None = None,
    progress: bool = False,
) -> ScreenedPatching:
    """Screen every component with gradients, then confirm the top-k with exact patching.

    :func:`attribution_patching` (AtP* by default) estimates the whole sweep; the ``top_k``
    components of largest estimated ``|effect|`` are then patched exactly with
    :func:`~kloc_lens.activation_patching` (one call per layer among them, with only their
    positions and heads).

    Args:
        model: A hooked model in eval mode.
        clean: As for :func:`attribution_patching`.
        corrupted: As for :func:`attribution_patching`.
        metric: As for :func:`attribution_patching`.
        top_k: How many components to patch exactly.
        site: Site name or object.
        sweep: ``layer_pos``, ``layer_head`` or ``layer_pos_head``.
        direction: ``restore`` or ``inject``.
        layers: Layers to screen (default all).
        positions: Positions to screen (default all).
        heads: Heads to screen (default all).
        method: The screening method (default ``atp*``).
        batch_size: Configurations per forward pass of the exact patching.
        progress: Show the exact patching's progress bars.

    Returns:
        The screen, the top-k components and their exact values.

    Raises:
        SweepError: ``top_k`` is not between 1 and the number of components; and everything
            :func:`attribution_patching` raises.

    Example:
        >>> import kloc_lens as kl
        >>> from kloc_lens.planted import planted_model
        >>> model, planted = planted_model()
        >>> prompt = kl.tokenize(model, kl.Prompt.from_text(planted.prompt(0), planted.objects[0],
        ...     subject=planted.subjects[0]))
        >>> metric = kl.TargetProb(kl.target_token_ids(model, prompt.prompt)[0])
        >>> found = screen_then_patch(model, prompt, kl.TokenReplacement(planted.subjects[2]),
        ...     metric, site="mlp_out", top_k=3)
        >>> found.components[0] == Component(planted.mlp_layer, prompt.span("subject").last, None)
        True
        >>> bool(found.exact_effect[0] > 0.9)
        True
    """
    screen = attribution_patching(
        model,
        clean,
        corrupted,
        metric,
        site=site,
        sweep=sweep,
        direction=direction,
        layers=layers,
        positions=positions,
        heads=heads,
        method=method,
    )
    method = AttributionMethod(method)
    size = screen.values.numel()
    if not 1 <= top_k <= size:
        raise SweepError(f"top_k must be between 1 and the {size} components screened; got {top_k}")
    order = torch.sort(screen.effect.abs().flatten().cpu(), descending=True, stable=True).indices
    components = []
    for flat in order[:top_k].tolist():
        index = list(torch.unravel_index(torch.tensor(flat), screen.values.shape))
        layer = screen.layers[int(index.pop(0))]
        pos = screen.positions[int(index.pop(0))] if screen.positions else None
        head = screen.heads[int(index.pop(0))] if screen.heads else None
        components.append(Component(layer, pos, head))

    exact: dict[Component, float] = {}
    for layer in sorted({c.layer for c in components}):
        chosen = [c for c in components if c.layer == layer]
        pos_set = sorted({c.position for c in chosen if c.position is not None})
        head_set = sorted({c.head for c in chosen if c.head is not None})
        patched = activation_patching(
            model,
            clean,
            corrupted,
            metric,
            site=site,
            sweep=_sweep_of(screen),
            direction=direction,
            layers=[layer],
            positions=pos_set or None,
            heads=head_set or None,
            batch_size=batch_size,
            progress=progress,
        )
        for component in chosen:
            index = [0]
            if component.position is not None:
                index.append(patched.positions.index(component.position))
            if component.head is not None:
                index.append(patched.heads.index(component.head))
            exact[component] = float(patched.values[tuple(index)])
    values = torch.tensor([exact[c] for c in components], dtype=screen.values.dtype)
    return ScreenedPatching(screen, tuple(components), values, method)


def _sweep_of(result: PatchResult) -> Sweep:
    """The sweep a result's class stands for."""
    if isinstance(result, LayerPosHeadResult):
        return Sweep.LAYER_POS_HEAD
    if isinstance(result, LayerHeadResult):
        return Sweep.LAYER_HEAD
    return Sweep.LAYER_POS
