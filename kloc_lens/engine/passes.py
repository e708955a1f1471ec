"""Packed passes: many configurations in one forward pass, each patch one masked ``where``.

A packed pass repeats the base run's rows once per configuration (or per group of configurations
that share rows, on the block-by-block path) and gives each patched hook point one hook that
swaps the cached source activation in under a boolean mask of shape ``[group, pos, head]``
(:func:`patch_hook`). The *plain* pass (:func:`run_plain`) runs the whole model this way: it is
always correct and is the fallback of every shortcut. Reduced precision applies to the patched
passes only (:func:`arithmetic`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from kloc_lens._hooks import Fired, HookFn
from kloc_lens.engine.cache import run_hooks
from kloc_lens.engine.skip import axis_sizes
from kloc_lens.engine.types import Config, Precision, Run, Source
from kloc_lens.errors import SweepError
from kloc_lens.metrics import check_metric_value
from kloc_lens.sites import Site

__all__ = ["arithmetic", "mask_view", "patch_hook", "run_plain"]


@contextlib.contextmanager
def arithmetic(precision: Precision, device: torch.device) -> Iterator[None]:
    """Arithmetic for the patched passes; restores global switches on exit.

    Raises:
        SweepError: TF32 on a device other than CUDA.
    """
    if precision is Precision.FP32:
        yield
        return
    if precision is Precision.TF32:
        if device.type != "cuda":
            raise SweepError(f"precision 'tf32' needs a CUDA model, this one is on {device}")
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def mask_view(mask: Bool[Tensor, "group pos head"], site: Site, act_shape: torch.Size) -> Tensor:
    """Reshape a ``[group, pos, head]`` mask to broadcast against ``[group, row, *act]``."""
    groups = mask.shape[0]
    dims = len(act_shape) - 1
    shape = [1] * dims
    shape[site.pos_dim] = act_shape[1 + site.pos_dim]
    if site.head_dim is None:
        mask = mask[:, :, 0]
    else:
        shape[site.head_dim] = act_shape[1 + site.head_dim]
        if site.head_dim < site.pos_dim:
            mask = mask.transpose(1, 2)
    return mask.reshape(groups, 1, *shape)


def patch_hook(mask: Bool[Tensor, "group pos head"], source: Tensor, site: Site) -> HookFn:
    """Patch ``source`` (``[row, ...]``) into the rows of each group where its mask is set.

    The activation the hook sees holds ``group`` consecutive copies of the rows.
    """
    return partial(_patch_groups, mask_view(mask, site, source.shape), source[None])


def _patch_groups(view: Tensor, src: Tensor, act: Tensor, hook: Any) -> Tensor:
    shape = act.shape
    grouped = act.reshape(view.shape[0], shape[0] // view.shape[0], *shape[1:])
    patched = torch.where(view, src.to(act.dtype), grouped)
    return patched.reshape(shape)


def _plain_hooks(
    chunk: Sequence[Config],
    caches: dict[Source, dict[str, Tensor]],
    sites: dict[str, Site],
) -> list[tuple[str, HookFn]]:
    """One patch hook per (hook, source) for a chunk of configurations, clean sources first."""
    n_configs = len(chunk)
    masks: dict[tuple[str, Source], Tensor] = {}
    for i, config in enumerate(chunk):
        for patch in config:
            key = (patch.hook, patch.source)
            if key not in masks:
                n_pos, n_head = axis_sizes(patch.site, caches[patch.source][patch.hook])
                masks[key] = torch.zeros(n_configs, n_pos, n_head, dtype=torch.bool)
            mask = masks[key]
            pos = slice(None) if patch.position is None else patch.position
            head = slice(None) if patch.head is None else patch.head
            mask[i, pos, head] = True
    hooks: list[tuple[str, HookFn]] = []
    # Patches from the clean run first, then freezes from the corrupted run.
    for (hook, source), mask in sorted(masks.items(), key=lambda kv: kv[0][1] != Source.CLEAN):
        source_act = caches[source][hook]
        hooks.append((hook, patch_hook(mask.to(source_act.device), source_act, sites[hook])))
    return hooks


def run_plain(
    model: Any,
    base_run: Run,
    rows: int,
    configs: dict[int, Config],
    caches: dict[Source, dict[str, Tensor]],
    sites: dict[str, Site],
    metric: Callable[[Tensor], Any],
    *,
    per_pass: int,
    precision: Precision,
    device: torch.device,
    on_done: Callable[[int], Any],
) -> tuple[dict[int, Tensor], int]:
    """Run configurations as full forward passes, ``per_pass`` at a time.

    Args:
        model: The hooked model.
        base_run: The run executed (and patched into).
        rows: Rows of one configuration (the base run's rows are spread over them).
        configs: The configurations by their index in the sweep.
        caches: Cached activations of both runs.
        sites: The site of every patched hook name.
        metric: Applied to each configuration's rows.
        per_pass: Configurations per forward pass.
        precision: Arithmetic of the passes.
        device: The model's device.
        on_done: Called with the number of configurations each pass finished.

    Returns:
        The metric value of every configuration, and the number of passes.

    Raises:
        HookNotFiredError: A patch hook did not run during a pass.
    """
    base_tokens = base_run.tokens.expand(rows, -1)
    indices = list(configs)
    values: dict[int, Tensor] = {}
    passes = 0
    for start in range(0, len(indices), per_pass):
        chunk = indices[start : start + per_pass]
        with arithmetic(precision, device):
            fired = Fired()
            hooks = run_hooks(base_run) + _plain_hooks([configs[i] for i in chunk], caches, sites)
            tokens = base_tokens.repeat(len(chunk), 1)
            logits = model.run_with_hooks(tokens, fwd_hooks=fired.track(hooks))
            fired.check("a packed forward pass of the sweep")
            logits = logits.float().reshape(len(chunk), rows, *logits.shape[1:])
            outs = [check_metric_value(metric(logits[i]), metric) for i in range(len(chunk))]
        values.update(zip(chunk, outs, strict=True))
        passes += 1
        on_done(len(chunk))
    return values, passes
