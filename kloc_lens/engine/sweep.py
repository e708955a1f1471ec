"""The sweep driver: :func:`execute` runs a list of configurations and measures each.

It caches the two unpatched runs, sorts the configurations into those that change nothing
(they score the base score), those the block-level runner takes and those that take the plain
path, runs both paths, and assembles one value per configuration with statistics of how they
ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens.engine import cache
from kloc_lens.engine.adapter import BlockDriver, check_patchable
from kloc_lens.engine.budget import configs_per_pass, pass_limits, usable_budget
from kloc_lens.engine.cache import EMBED_HOOK, Cached, at_reads, whole
from kloc_lens.engine.passes import run_plain
from kloc_lens.engine.plan import Planned
from kloc_lens.engine.runner import BlockRunner
from kloc_lens.engine.skip import axis_sizes, fire_point, start_of
from kloc_lens.engine.types import (
    Config,
    ExecutionOptions,
    ExecutionResult,
    ExecutionStats,
    Precision,
    Run,
    Source,
    resolve_options,
)
from kloc_lens.errors import MetricError, SweepError
from kloc_lens.metrics import metric_name, read_positions
from kloc_lens.model import check_model, device_of
from kloc_lens.sites import Site

__all__ = ["execute"]

logger = logging.getLogger("kloc_lens.engine")


def execute(
    model: Any,
    clean: Run,
    corrupted: Run,
    configs: Sequence[Config],
    metric: Callable[[Tensor], Any],
    *,
    base: Source,
    options: ExecutionOptions | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    precision: Precision | str | None = None,
    progress: bool | None = None,
    desc: str = "sweep",
    shortcuts: bool = True,
) -> ExecutionResult:
    """Run every configuration on the ``base`` run and measure it.

    Args:
        model: The hooked model.
        clean: The clean run (rows: 1 or as many as the corrupted run).
        corrupted: The corrupted run.
        configs: Patch configurations.
        metric: ``logits[rows, pos, vocab] -> number``, applied to each configuration's rows.
        base: Which run is executed (and patched into).
        options: Batch size, memory budget, precision and progress bar.
        batch_size: Overrides ``options.batch_size``.
        memory_budget: Overrides ``options.memory_budget``.
        precision: Overrides ``options.precision``.
        progress: Overrides ``options.progress``.
        desc: Progress-bar label.
        shortcuts: Skip unchanged layers, positions and logits (see :mod:`kloc_lens.engine`);
            ``False`` runs every configuration as a full forward pass.

    Returns:
        One metric value per configuration, the unpatched clean and corrupted scores, and how the
        configurations were executed.

    Raises:
        SweepError: Clean and corrupted runs do not fit together, a patch outside its hook
            point's positions or heads, or bad options.
        ModelError: The model is in train mode or lacks a hook point.
        HookNotFiredError: A patched, cached or edited hook point never ran during a forward.
        MetricError: The metric does not return one finite number.
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
    opts = resolve_options(
        options,
        batch_size=batch_size,
        memory_budget=memory_budget,
        precision=precision,
        progress=progress,
    )
    device = device_of(model)
    budget = usable_budget(opts.memory_budget, device)
    needed: dict[Source, set[str]] = {Source.CLEAN: set(), Source.CORRUPTED: set()}
    sites: dict[str, Site] = {}
    for config in configs:
        for patch in config:
            needed[patch.source].add(patch.hook)
            sites[patch.hook] = patch.site
    check_model(model, set(sites) | ({EMBED_HOOK} if corrupted.embed_edit else set()))
    check_patchable(model, sites, clean.tokens.to(device))

    runs = {
        Source.CLEAN: Run(clean.tokens.to(device), clean.embed_edit),
        Source.CORRUPTED: Run(corrupted.tokens.to(device), corrupted.embed_edit),
    }
    with torch.no_grad():
        sweep = _Sweep(model, runs, configs, metric, base, rows, sites, needed, device)
        return sweep.run(shortcuts=shortcuts, options=opts, memory_budget=budget, desc=desc)


class _Sweep:
    """One :func:`execute` call."""

    def __init__(
        self,
        model: Any,
        runs: dict[Source, Run],
        configs: Sequence[Config],
        metric: Callable[[Tensor], Any],
        base: Source,
        rows: int,
        sites: dict[str, Site],
        needed: dict[Source, set[str]],
        device: torch.device,
    ) -> None:
        self.model = model
        self.runs = runs
        self.configs = configs
        self.metric = metric
        self.base = base
        self.other = Source.CORRUPTED if base is Source.CLEAN else Source.CLEAN
        self.rows = rows
        self.sites = sites
        self.needed = needed
        self.device = device
        self.n_layers = int(model.cfg.n_layers)
        self.n_pos = int(runs[base].tokens.shape[1])
        # each patch's fire point, once (read by the cache runs, the plan and the skip rules)
        self.fires = [[fire_point(p, self.n_layers) for p in c] for c in configs]

    def _cached_runs(
        self, driver: BlockDriver | None, compare: bool, reads: Tensor | None
    ) -> tuple[Cached, Cached]:
        """The other run, then the base run (comparing the patched hook points with it)."""
        other = cache.cache_run(
            self.model,
            self.runs[self.other],
            self.needed[self.other],
            self.metric,
            self.rows,
            label=f"the {self.other.value} run",
        )
        base_hooks = set(self.needed[self.base])
        if driver is not None:
            # the residual stream entering each block a configuration may start at
            starts = {
                point[1]
                for config, fires in zip(self.configs, self.fires, strict=True)
                for patch, point in zip(config, fires, strict=True)
                if patch.source is not self.base and point is not None
            }
            base_hooks |= {f"blocks.{layer}.hook_resid_pre" for layer in starts}
        comparisons = {}
        if compare:
            comparisons = {
                hook: (self.sites[hook], other.store[hook]) for hook in self.needed[self.other]
            }
        keep = None
        if driver is not None:
            keep = at_reads(reads) if reads is not None else whole
        base = cache.cache_run(
            self.model,
            self.runs[self.base],
            base_hooks,
            self.metric,
            self.rows,
            compare=comparisons,
            keep_logits=keep,
            capture_blocks=driver is not None,
            label=f"the {self.base.value} run",
        )
        return other, base

    def run(
        self, *, shortcuts: bool, options: ExecutionOptions, memory_budget: int, desc: str
    ) -> ExecutionResult:
        driver, fallback = (None, "shortcuts=False")
        if shortcuts:
            driver, fallback = BlockDriver.for_model(self.model)
            fast_hooks = [all(point is not None for point in fires) for fires in self.fires]
            if driver is not None and not any(fast_hooks):
                driver, fallback = (
                    None,
                    "every configuration patches hook points outside the blocks",
                )
        reads = read_positions(self.metric, self.rows, self.n_pos)
        other, base = self._cached_runs(driver, compare=shortcuts, reads=reads)
        caches = {self.other: other.store, self.base: base.store}
        scores = {self.other: other.score, self.base: base.score}
        if driver is not None:
            reason = driver.prepare(base.block_inputs)
            if reason is not None:
                driver, fallback = None, reason
        base.block_inputs.clear()

        values: dict[int, Tensor] = {}
        unchanged = 0
        plain: list[int] = []
        planned: list[Planned] = []
        sizes: dict[tuple[Source, str], tuple[int, int]] = {}
        for index, config in enumerate(self.configs):
            self._check_ranges(config, caches, sizes)
            if not shortcuts:
                plain.append(index)
                continue
            fires = self.fires[index]
            start = start_of(config, self.base, base.changed, reads, self.n_layers, fires)
            fire = None if any(f is None for f in fires) else [f for f in fires if f is not None]
            if start is None:
                values[index] = torch.tensor(
                    scores[self.base], dtype=torch.float32, device=self.device
                )
                unchanged += 1
            elif driver is None or fire is None:
                if driver is not None:
                    fallback = "some patched hook points lie outside the blocks"
                plain.append(index)
            else:
                layer, pos = start
                patches = [
                    (hook, at, patch)
                    for (hook, at), patch in zip(fire, config, strict=True)
                    if at >= layer
                ]
                planned.append(Planned(index, layer, pos, patches))

        total = len(self.configs)
        bar = tqdm(total=total, desc=desc, disable=not options.progress, leave=False)
        bar.update(unchanged)
        passes = 0
        work = 0.0
        try:
            if planned and driver is not None:
                runner = BlockRunner(
                    driver,
                    base,
                    caches,
                    self.sites,
                    self.metric,
                    rows=self.rows,
                    n_pos=self.n_pos,
                    reads=reads,
                    precision=options.precision,
                    device=self.device,
                )
                reason = runner.check(min(p.start_layer for p in planned))
                if reason is not None:
                    fallback = reason
                    plain.extend(p.index for p in planned)
                    planned = []
                else:
                    limits = pass_limits(
                        self.model,
                        self.rows,
                        self.n_pos,
                        reads_one_position=reads is not None,
                        batch_size=options.batch_size,
                        memory_budget=memory_budget,
                        device=self.device,
                    )
                    outcome = runner.run(planned, limits, bar.update)
                    values.update(outcome.values)
                    passes += outcome.passes
                    work += outcome.work
                    fallback = outcome.fallback if not plain else fallback
            if plain:
                per_pass = configs_per_pass(
                    self.model, self.rows, self.n_pos, options.batch_size, memory_budget
                )
                plain_values, plain_passes = run_plain(
                    self.model,
                    self.runs[self.base],
                    self.rows,
                    {i: self.configs[i] for i in plain},
                    caches,
                    self.sites,
                    self.metric,
                    per_pass=per_pass,
                    precision=options.precision,
                    device=self.device,
                    on_done=bar.update,
                )
                values.update(plain_values)
                passes += plain_passes
        finally:
            bar.close()
        if plain:
            logger.info("%s: %d configurations take the plain path: %s", desc, len(plain), fallback)
        elif planned and fallback is not None:
            logger.info("%s: %s", desc, fallback)
        full_pass = self.rows * self.n_pos * self.n_layers
        stats = ExecutionStats(
            unchanged=unchanged,
            fast=len(planned),
            plain=len(plain),
            passes=passes,
            work=(work + len(plain) * full_pass) / max(1, total * full_pass),
            fallback=fallback if plain or planned else None,
        )
        result = torch.stack([values[i] for i in range(total)]) if total else torch.zeros(0)
        self._check_finite(result)
        return ExecutionResult(result, scores[Source.CLEAN], scores[Source.CORRUPTED], stats)

    def _check_ranges(
        self,
        config: Config,
        caches: dict[Source, dict[str, Tensor]],
        sizes: dict[tuple[Source, str], tuple[int, int]],
    ) -> None:
        """Refuse a patch position or head outside its activation (``sizes`` memoises the
        activations' (positions, heads) over the configurations)."""
        for patch in config:
            key = (patch.source, patch.hook)
            if key not in sizes:
                sizes[key] = axis_sizes(patch.site, caches[patch.source][patch.hook])
            n_pos, n_head = sizes[key]
            if patch.position is not None and not 0 <= patch.position < n_pos:
                raise SweepError(
                    f"position {patch.position} of the patch at {patch.hook!r} is outside its "
                    f"{n_pos} positions"
                )
            if patch.head is not None and not 0 <= patch.head < n_head:
                raise SweepError(
                    f"head {patch.head} of the patch at {patch.hook!r} is outside its "
                    f"{n_head} heads"
                )

    def _check_finite(self, values: Tensor) -> None:
        """Refuse NaN or infinite metric values (one check for the whole sweep)."""
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        index = int((~finite).nonzero()[0, 0])
        patches = ", ".join(
            f"{p.hook} at position {p.position}, head {p.head}" for p in self.configs[index]
        )
        raise MetricError(
            f"metric {metric_name(self.metric)!r} returned {float(values[index])} for "
            f"configuration {index} ({patches or 'no patches'}) and "
            f"{int((~finite).sum()) - 1} more; a sweep needs finite scores (check the metric "
            "for log(0) or a division by zero)"
        )
