"""The one executor behind every sweep.

A sweep is a list of *patch configurations*; each configuration is a tuple of :class:`Patch`
operations (copy the activation of a hook point at some position/head from the clean or the
corrupted run into the run being executed). The executor

1. runs the clean and the corrupted input once each, caching only the hook points the
   configurations read from that run (and the unpatched scores);
2. packs many configurations into one forward pass: the base run's rows are repeated once per
   configuration and each hook point gets one vectorised ``torch.where`` that swaps in the
   cached source activation under a boolean mask of shape ``[config, pos, head]``;
3. applies the metric to each configuration's rows.

Everything that makes sweeps fast belongs here, so every sweep kind benefits at once. The slow
reference loop in ``tests/reference.py`` runs one forward per configuration and is the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens.errors import SweepError
from kloc_lens.metrics import check_metric_value
from kloc_lens.model import check_model
from kloc_lens.sites import Site

__all__ = ["DEFAULT_MEMORY_BUDGET", "ExecutionResult", "Patch", "Run", "Source", "execute"]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
"""Bytes of activations one packed forward pass may use, by default."""

EMBED_HOOK = "hook_embed"


class Source(str, Enum):
    """Which cached run a patch copies from."""

    CLEAN = "clean"
    """The clean run."""
    CORRUPTED = "corrupted"
    """The corrupted run."""


@dataclass(frozen=True)
class Patch:
    """Copy ``site``'s activation at ``layer`` from ``source`` into the executed run.

    ``position``/``head`` of ``None`` mean every position / every head.
    """

    site: Site
    layer: int
    position: int | None
    head: int | None
    source: Source

    @property
    def hook(self) -> str:
        """The hook name."""
        return self.site.hook_name(self.layer)


@dataclass(frozen=True)
class Run:
    """An input: token rows plus an optional edit of their token embeddings."""

    tokens: Int[Tensor, "row pos"]
    embed_edit: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class ExecutionResult:
    """Metric values of every configuration plus the two unpatched scores."""

    values: Float[Tensor, " config"]
    clean_score: float
    corrupted_score: float


Config = Sequence[Patch]


def _run_hooks(run: Run) -> list[tuple[str, Callable[..., Any]]]:
    if run.embed_edit is None:
        return []
    edit = run.embed_edit

    def embed_hook(act: Tensor, hook: Any) -> Tensor:
        return edit(act)

    return [(EMBED_HOOK, embed_hook)]


def _cache_run(
    model: Any, run: Run, hooks: set[str], metric: Callable[[Tensor], Any], rows: int
) -> tuple[dict[str, Tensor], float]:
    """Run ``run`` once, keeping the activations of ``hooks`` and the metric's score."""
    store: dict[str, Tensor] = {}

    def saver(name: str) -> Callable[[Tensor, Any], None]:
        # Keyed by the requested name: on a bridge, hook.name may be the aliased module's name.
        def save(act: Tensor, hook: Any) -> None:
            store[name] = act.detach().clone()

        return save

    fwd = _run_hooks(run) + [(name, saver(name)) for name in sorted(hooks)]
    logits = model.run_with_hooks(run.tokens, fwd_hooks=fwd)
    logits = logits.expand(rows, *logits.shape[1:]) if logits.shape[0] == 1 else logits
    score = float(check_metric_value(metric(logits), metric))
    return store, score


def _mask_view(mask: torch.Tensor, site: Site, act_shape: torch.Size) -> torch.Tensor:
    """Reshape a ``[config, pos, head]`` mask to broadcast against ``[config, row, *act]``."""
    configs = mask.shape[0]
    dims = len(act_shape) - 1
    shape = [1] * dims
    shape[site.pos_dim] = act_shape[1 + site.pos_dim]
    if site.head_dim is None:
        mask = mask[:, :, 0]
    else:
        shape[site.head_dim] = act_shape[1 + site.head_dim]
        if site.head_dim < site.pos_dim:
            mask = mask.transpose(1, 2)
    return mask.reshape(configs, 1, *shape)


def _axis_sizes(site: Site, act: Tensor) -> tuple[int, int]:
    n_pos = act.shape[1 + site.pos_dim] if act.dim() > 1 + site.pos_dim else 0
    n_head = act.shape[1 + site.head_dim] if site.head_dim is not None else 1
    return n_pos, n_head


def _row_bytes(model: Any, n_pos: int) -> int:
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    per_pos = cfg.d_vocab + 10 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos
    return 4 * n_pos * per_pos


def configs_per_pass(
    model: Any, rows: int, n_pos: int, batch_size: int | None, memory_budget: int
) -> int:
    """How many configurations to pack into one forward pass."""
    if batch_size is not None:
        if batch_size < 1:
            raise SweepError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size
    return max(1, memory_budget // max(1, _row_bytes(model, n_pos) * rows))


def execute(
    model: Any,
    clean: Run,
    corrupted: Run,
    configs: Sequence[Config],
    metric: Callable[[Tensor], Any],
    *,
    base: Source,
    batch_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    desc: str = "sweep",
) -> ExecutionResult:
    """Run every configuration on the ``base`` run and measure it.

    Args:
        model: The hooked model.
        clean: The clean run (rows: 1 or as many as the corrupted run).
        corrupted: The corrupted run.
        configs: Patch configurations.
        metric: ``logits[rows, pos, vocab] -> number``, applied to each configuration's rows.
        base: Which run is executed (and patched into).
        batch_size: Configurations per forward pass; ``None`` chooses from ``memory_budget``.
        memory_budget: Activation bytes one forward pass may use.
        progress: Show a progress bar.
        desc: Progress-bar label.

    Returns:
        One metric value per configuration, and the unpatched clean and corrupted scores.

    Raises:
        SweepError: Clean and corrupted runs do not fit together.
        ModelError: The model is in train mode or lacks a hook point.
    """
    n_clean, n_corr = clean.tokens.shape[0], corrupted.tokens.shape[0]
    if clean.tokens.shape[1] != corrupted.tokens.shape[1]:
        raise SweepError(
            f"clean and corrupted inputs differ in length: {clean.tokens.shape[1]} vs "
            f"{corrupted.tokens.shape[1]} tokens"
        )
    rows = max(n_clean, n_corr)
    if n_clean not in (1, rows) or n_corr not in (1, rows):
        raise SweepError(
            f"clean input has {n_clean} rows and corrupted {n_corr}; each must be 1 or the other"
        )
    needed: dict[Source, set[str]] = {Source.CLEAN: set(), Source.CORRUPTED: set()}
    sites: dict[str, Site] = {}
    for config in configs:
        for patch in config:
            needed[patch.source].add(patch.hook)
            sites[patch.hook] = patch.site
    check_model(model, set(sites) | ({EMBED_HOOK} if corrupted.embed_edit else set()))

    device = _device_of(model)
    clean = Run(clean.tokens.to(device), clean.embed_edit)
    corrupted = Run(corrupted.tokens.to(device), corrupted.embed_edit)
    with torch.no_grad():
        caches = {}
        caches[Source.CLEAN], clean_score = _cache_run(
            model, clean, needed[Source.CLEAN], metric, rows
        )
        caches[Source.CORRUPTED], corrupted_score = _cache_run(
            model, corrupted, needed[Source.CORRUPTED], metric, rows
        )
        base_run = clean if base is Source.CLEAN else corrupted
        base_tokens = base_run.tokens.expand(rows, -1)
        n_pos = int(base_tokens.shape[1])
        per_pass = configs_per_pass(model, rows, n_pos, batch_size, memory_budget)
        values: list[Tensor] = []
        bar = tqdm(total=len(configs), desc=desc, disable=not progress, leave=False)
        try:
            for start in range(0, len(configs), per_pass):
                chunk = configs[start : start + per_pass]
                values.extend(
                    _execute_chunk(model, base_run, base_tokens, chunk, caches, sites, metric)
                )
                bar.update(len(chunk))
        finally:
            bar.close()
    result = torch.stack(values) if values else torch.zeros(0)
    return ExecutionResult(result, clean_score, corrupted_score)


def _execute_chunk(
    model: Any,
    base_run: Run,
    base_tokens: Tensor,
    chunk: Sequence[Config],
    caches: dict[Source, dict[str, Tensor]],
    sites: dict[str, Site],
    metric: Callable[[Tensor], Any],
) -> list[Tensor]:
    n_configs = len(chunk)
    rows = base_tokens.shape[0]
    masks: dict[tuple[str, Source], Tensor] = {}
    for i, config in enumerate(chunk):
        for patch in config:
            key = (patch.hook, patch.source)
            if key not in masks:
                source_act = caches[patch.source][patch.hook]
                n_pos, n_head = _axis_sizes(patch.site, source_act)
                masks[key] = torch.zeros(
                    n_configs, n_pos, n_head, dtype=torch.bool, device=source_act.device
                )
            mask = masks[key]
            if patch.position is not None and not 0 <= patch.position < mask.shape[1]:
                raise SweepError(f"position {patch.position} outside {mask.shape[1]} positions")
            if patch.head is not None and not 0 <= patch.head < mask.shape[2]:
                raise SweepError(f"head {patch.head} outside {mask.shape[2]} heads")
            pos = slice(None) if patch.position is None else patch.position
            head = slice(None) if patch.head is None else patch.head
            mask[i, pos, head] = True

    fwd = _run_hooks(base_run)
    # Patches from the clean run first, then freezes from the corrupted run.
    for (hook, source), mask in sorted(masks.items(), key=lambda kv: kv[0][1] != Source.CLEAN):
        fwd.append((hook, _patch_hook(mask, caches[source][hook], sites[hook], n_configs)))
    tokens = base_tokens.repeat(n_configs, 1)
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
    logits = logits.reshape(n_configs, rows, *logits.shape[1:])
    return [check_metric_value(metric(logits[i]), metric) for i in range(n_configs)]


def _patch_hook(
    mask: Tensor, source: Tensor, site: Site, n_configs: int
) -> Callable[[Tensor, Any], Tensor]:
    view = _mask_view(mask, site, source.shape)

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        shape = act.shape
        grouped = act.reshape(n_configs, shape[0] // n_configs, *shape[1:])
        patched = torch.where(view, source[None].to(act.dtype), grouped)
        return patched.reshape(shape)

    return hook_fn


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(model.cfg, "device", None) or "cpu")


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of ``a / b``."""
    return math.ceil(a / b)
