"""What the executor keeps from the unpatched runs: activations, scores, keys and values.

The clean and the corrupted input each run once (:func:`cache_run`), caching only the hook
points the configurations read from that run, plus the residual stream entering each block a
configuration may start at. The block-by-block passes then reuse the base run's keys and values
of the positions before their start (:class:`PrefixCache`): with causal attention those
positions are the same in every configuration that starts later.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kloc_lens._hooks import Fired, HookFn
from kloc_lens.engine.adapter import BlockInputs, capture_block_inputs
from kloc_lens.engine.skip import differences
from kloc_lens.engine.types import Run
from kloc_lens.errors import MetricError, SweepError
from kloc_lens.metrics import check_metric_value, metric_name
from kloc_lens.sites import Site

__all__ = [
    "EMBED_HOOK",
    "Cached",
    "PrefixCache",
    "at_reads",
    "cache_run",
    "run_hooks",
    "whole",
]

EMBED_HOOK = "hook_embed"


@dataclass
class Cached:
    """What one unpatched run leaves behind.

    Attributes:
        store: Cached activations by hook name (``[rows, ...]``).
        score: The metric on the run.
        logits: Kept logits (for the block-by-block checks), or ``None``.
        changed: Per compared hook name, where this run's activation differs from the other run's
            (``[pos, head]``).
        block_inputs: The arguments each block was called with, when captured.
    """

    store: dict[str, Tensor]
    score: float
    logits: Tensor | None = None
    changed: dict[str, Tensor] = field(default_factory=dict)
    block_inputs: BlockInputs = field(default_factory=dict)


def run_hooks(run: Run) -> list[tuple[str, HookFn]]:
    """The hook that applies ``run``'s embedding edit (none without one)."""
    if run.embed_edit is None:
        return []
    edit = run.embed_edit

    def embed_hook(act: Tensor, hook: Any) -> Tensor:
        return edit(act)

    return [(EMBED_HOOK, embed_hook)]


def score_of(value: Any, metric: Any, during: str) -> float:
    """A metric's value as a finite float.

    Raises:
        MetricError: The metric did not return one number, or returned NaN or an infinity.
    """
    score = float(check_metric_value(value, metric))
    if not math.isfinite(score):
        raise MetricError(
            f"metric {metric_name(metric)!r} returned {score} on {during}; a sweep needs finite "
            "scores (check the metric for log(0) or a division by zero)"
        )
    return score


def cache_run(
    model: Any,
    run: Run,
    hooks: set[str],
    metric: Callable[[Tensor], Any],
    rows: int,
    *,
    compare: dict[str, tuple[Site, Tensor]] | None = None,
    keep_logits: Callable[[Tensor], Tensor] | None = None,
    capture_blocks: bool = False,
    label: str = "a cached run",
) -> Cached:
    """Run ``run`` once, keeping the activations of ``hooks`` and the metric's score.

    ``compare`` maps hook names to (site, activation of the other run): the run records where its
    own activation differs. ``keep_logits`` picks the logits to keep. ``capture_blocks`` records
    the arguments each block is called with.

    Raises:
        HookNotFiredError: A hook to cache, compare or edit did not run.
        MetricError: The metric did not return one finite number.
    """
    result = Cached({}, 0.0)

    def saver(name: str) -> HookFn:
        # Keyed by the requested name: on a bridge, hook.name may be the aliased module's name.
        def save(act: Tensor, hook: Any) -> None:
            result.store[name] = act.detach().clone()

        return save

    def comparer(name: str, site: Site, other: Tensor) -> HookFn:
        def compare_fn(act: Tensor, hook: Any) -> None:
            result.changed[name] = differences(site, act.detach(), other).cpu()

        return compare_fn

    fwd = run_hooks(run) + [(name, saver(name)) for name in sorted(hooks)]
    fwd += [(name, comparer(name, *pair)) for name, pair in sorted((compare or {}).items())]
    fired = Fired()
    capture = (
        capture_block_inputs(model)
        if capture_blocks
        else contextlib.nullcontext(result.block_inputs)
    )
    with capture as block_inputs:
        logits = model.run_with_hooks(run.tokens, fwd_hooks=fired.track(fwd))
    result.block_inputs = block_inputs
    fired.check(label)
    logits = logits.expand(rows, *logits.shape[1:]) if logits.shape[0] == 1 else logits
    result.score = score_of(metric(logits), metric, label)
    if keep_logits is not None:
        result.logits = keep_logits(logits.detach())
    return result


def whole(logits: Tensor) -> Tensor:
    """Keep every position's logits."""
    return logits


def at_reads(reads: Tensor) -> Callable[[Tensor], Tensor]:
    """Keep each row's logits at its read position: ``[rows, 1, vocab]``."""

    def pick(logits: Tensor) -> Tensor:
        index = torch.arange(logits.shape[0], device=logits.device)
        return logits[index, reads.to(logits.device)][:, None].clone()

    return pick


class PrefixCache:
    """The base run's state that block-by-block passes start from.

    Attributes:
        resid: Per block index, the residual stream entering it (``[rows, pos, d_model]``,
            shared with the base run's cache: no copy).
        kv: Per block index, the keys/values its attention computed on the base rows (recorded
            by a block-by-block pass from position 0), or ``None`` where that was not recorded.
        pos_dim: The position axis of the keys/values.
    """

    def __init__(self, store: dict[str, Tensor], n_layers: int, pos_dim: int) -> None:
        self.resid = {
            layer: store[name]
            for layer in range(n_layers)
            if (name := f"blocks.{layer}.hook_resid_pre") in store
        }
        self.kv: dict[int, tuple[Tensor, Tensor] | None] = {}
        self.pos_dim = pos_dim

    def past(self, layer: int, t0: int) -> tuple[Tensor, Tensor] | None:
        """Keys/values of positions ``0..t0-1`` at block ``layer`` (``None`` for ``t0 == 0``).

        Raises:
            SweepError: None were recorded for the block.
        """
        if t0 == 0:
            return None
        past = self.kv[layer]
        if past is None:
            raise SweepError(f"no keys/values recorded for block {layer}")
        key, value = past
        return key.narrow(self.pos_dim, 0, t0), value.narrow(self.pos_dim, 0, t0)

    def keep_before(self, latest: int) -> None:
        """Keep only the keys/values of positions before ``latest`` (the latest start of a
        pass); drop all of them for ``latest == 0``."""
        self.kv = {layer: self.past(layer, latest) for layer in self.kv} if latest else {}
