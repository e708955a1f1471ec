"""The block-level runner: configurations run from their first changed block and position.

A configuration that first changes the base run at block ``s`` and position ``t`` starts at
block ``s`` from the base run's cached residual stream, runs positions ``t..T-1`` only, and lets
them attend to the base run's keys and values of the positions before ``t``
(:class:`~kloc_lens.engine.cache.PrefixCache`). Logits are computed at the positions the metric
reads. Before trusting any of this, :meth:`BlockRunner.check` verifies that a block-by-block pass
reproduces the base run's logits, and :meth:`BlockRunner.run` that starting mid-stack at a later
position does too; the caller falls back to the plain path where the first check fails.

The runner reads the sweep's cached runs and returns its results (:class:`RunOutcome`); it
changes nothing outside itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kloc_lens._hooks import Fired, HookFn
from kloc_lens.engine.adapter import BlockDriver
from kloc_lens.engine.budget import PassLimits
from kloc_lens.engine.cache import Cached, PrefixCache
from kloc_lens.engine.passes import arithmetic, patch_hook
from kloc_lens.engine.plan import Layout, Planned, layer_groups, plan_passes
from kloc_lens.engine.skip import axis_sizes
from kloc_lens.engine.types import Precision, Source
from kloc_lens.metrics import check_metric_value
from kloc_lens.sites import Site

__all__ = ["CHECK_ATOL", "BlockRunner", "RunOutcome"]

CHECK_ATOL = 1e-4
"""The block-by-block pass must reproduce the base run's logits to this (times 1 + max |logit|)."""

_PASS_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError)


@dataclass(frozen=True)
class RunOutcome:
    """What the block-by-block passes of one sweep produced.

    Attributes:
        values: The metric value of every configuration run, by its index in the sweep.
        passes: Block-by-block passes run.
        work: Token-layers computed.
        fallback: Why positions were recomputed from the first one, or ``None``.
    """

    values: dict[int, Tensor]
    passes: int
    work: float
    fallback: str | None


class BlockRunner:
    """The block-by-block passes of one sweep.

    Args:
        driver: Drives the model's blocks (prepared with the base run's block arguments).
        base: The base run's cache (its logits are kept at the read positions).
        caches: Cached activations of both runs, by source.
        sites: The site of every patched hook name.
        metric: Applied to each configuration's rows.
        rows: Rows of one configuration.
        n_pos: Positions of the runs.
        reads: Positions the metric reads per row, or ``None`` for every position.
        precision: Arithmetic of the passes.
        device: The model's device.
    """

    def __init__(
        self,
        driver: BlockDriver,
        base: Cached,
        caches: dict[Source, dict[str, Tensor]],
        sites: dict[str, Site],
        metric: Callable[[Tensor], Any],
        *,
        rows: int,
        n_pos: int,
        reads: Tensor | None,
        precision: Precision,
        device: torch.device,
    ) -> None:
        if base.logits is None:
            raise ValueError("the base run must keep its logits for the block-by-block path")
        self.driver = driver
        self.model = driver.model
        self.caches = caches
        self.sites = sites
        self.metric = metric
        self.precision = precision
        self.device = device
        self.rows = rows
        self.n_layers = driver.n_layers
        self.reads = reads.to(device) if reads is not None else None
        # [rows, 1, vocab] at the read positions, or [rows, pos, vocab] for other metrics
        self.base_logits = base.logits
        self.n_pos = n_pos
        self.prefix = PrefixCache(base.store, self.n_layers, driver.kv_pos_dim)
        self.positions_ok = True

    # -- checks --

    def _record(self, first_layer: int) -> Tensor:
        """Run the base rows block by block from ``first_layer``, keeping keys/values."""
        hidden = self.prefix.resid[first_layer]
        for layer in range(first_layer, self.n_layers):
            kv = self.driver.new_kv(None, hidden)
            hidden = self.driver.block(layer, hidden, 0, kv)
            if kv.calls != 1 or kv.recorded is None:
                self.positions_ok = False
            else:
                self.prefix.kv[layer] = (kv.recorded[0].detach(), kv.recorded[1].detach())
        return hidden

    def _logits_at_reads(self, hidden: Tensor, t0: int) -> Tensor:
        """Logits of the read positions (or of positions t0..) of ``hidden``'s rows, which are
        whole copies of the base rows."""
        if self.reads is None:
            return self.driver.final(hidden)
        rows = hidden.shape[0]
        reads = self.reads.repeat(rows // self.rows) - t0
        picked = hidden[torch.arange(rows, device=hidden.device), reads]
        return self.driver.final(picked[:, None])

    def _expected(self, t0: int) -> Tensor:
        return self.base_logits[:, t0:] if self.reads is None else self.base_logits

    @staticmethod
    def _agree(got: Tensor, expected: Tensor) -> bool:
        if got.shape != expected.shape:
            return False
        tol = CHECK_ATOL * (1.0 + float(expected.abs().max()))
        return bool(((got.float() - expected.float()).abs() <= tol).all())

    def _base_rows(self, hidden: Tensor) -> Tensor:
        return hidden.expand(self.rows, *hidden.shape[1:]) if hidden.shape[0] == 1 else hidden

    def check(self, first_layer: int) -> str | None:
        """Record keys/values and check that block-by-block passes reproduce the base logits;
        say why not where they do not."""
        try:
            hidden = self._record(first_layer)
            got = self._logits_at_reads(self._base_rows(hidden), 0)
        except _PASS_ERRORS as err:
            return f"the block-by-block pass failed ({type(err).__name__}: {err})"
        if not self._agree(got, self._expected(0)):
            return "the block-by-block pass does not reproduce the model's logits"
        return None

    def _check_positions(self, layer: int, t0: int) -> bool:
        """Whether starting at ``layer`` with positions ``t0..`` reproduces the base logits."""
        if not self.positions_ok:
            return False
        try:
            hidden = self.prefix.resid[layer][:, t0:]
            for block in range(layer, self.n_layers):
                past = self.prefix.past(block, t0)
                hidden = self.driver.block(block, hidden, t0, self.driver.new_kv(past, hidden))
            got = self._logits_at_reads(self._base_rows(hidden), t0)
        except _PASS_ERRORS:
            return False
        return self._agree(got, self._expected(t0))

    # -- passes --

    def run(
        self, planned: list[Planned], limits: PassLimits, on_done: Callable[[int], Any]
    ) -> RunOutcome:
        """Run every planned configuration (after :meth:`check` passed).

        Args:
            planned: The configurations with their start blocks and positions.
            limits: Bounds of one pass.
            on_done: Called with the number of configurations each pass finished.

        Raises:
            HookNotFiredError: A patch hook did not run during a pass.
            MetricError: The metric did not return one number.
        """
        fallback: str | None = None
        passes = plan_passes(
            planned,
            self.rows,
            self.n_pos,
            self.n_layers,
            limits.max_tokens,
            limits.max_configs,
            limits.min_tokens,
        )
        latest = max(t0 for t0, _ in passes)
        if latest > 0:
            probe_layer = max(p.start_layer for _, members in passes for p in members)
            if not self._check_positions(probe_layer, latest):
                fallback = "keys/values of earlier positions cannot be reused here"
                for item in planned:
                    item.start_pos = 0
                passes = plan_passes(
                    planned,
                    self.rows,
                    self.n_pos,
                    self.n_layers,
                    limits.max_tokens,
                    limits.max_configs,
                    0,
                )
                latest = 0
        # keep only the keys/values of positions some pass starts after
        self.prefix.keep_before(latest)
        values: dict[int, Tensor] = {}
        work = 0.0
        for t0, members in passes:
            outs, pass_work = self._run_pass(t0, members)
            values.update(outs)
            work += pass_work
            on_done(len(members))
        return RunOutcome(values, len(passes), work, fallback)

    def _run_pass(self, t0: int, members: list[Planned]) -> tuple[dict[int, Tensor], float]:
        """One block-by-block pass over positions ``t0..`` for ``members``: their values and
        the token-layers computed.

        Rows are grouped: configurations whose patches agree up to a block share the rows that
        compute it, and split into groups of their own at the first block where they differ; a
        configuration joins at its start block with the base run's residual stream.
        """
        rows, width = self.rows, self.n_pos - t0
        first = min(item.start_layer for item in members)
        layout = layer_groups(members, first, self.n_layers)
        fired = Fired()
        fwd = fired.track(self._pass_hooks(t0, members, layout))
        hidden: Tensor | None = None
        work = 0.0
        with self.model.hooks(fwd_hooks=fwd), arithmetic(self.precision, self.device):
            for layer in range(first, self.n_layers):
                groups, parents = layout[layer - first]
                hidden = self._gather(hidden, parents, layer, t0)
                past = self.prefix.past(layer, t0)
                hidden = self.driver.block(layer, hidden, t0, self.driver.new_kv(past, hidden))
                work += len(groups) * rows * width
            if hidden is None:
                raise ValueError("a pass without blocks")
            logits = self._logits_at_reads(hidden, t0)
        fired.check(f"a block-by-block pass of the sweep (blocks {first}.., positions {t0}..)")
        groups = layout[-1][0]
        logits = logits.float().reshape(len(groups), rows, *logits.shape[1:])
        out: dict[int, Tensor] = {}
        for g, group in enumerate(groups):
            mine = logits[g]
            if self.reads is None:
                if t0 > 0:
                    prefix = self.base_logits[:, :t0].expand(rows, -1, -1)
                    mine = torch.cat([prefix.to(mine.dtype), mine], dim=1)
            else:
                mine = mine.expand(rows, self.n_pos, mine.shape[-1])
            value = check_metric_value(self.metric(mine), self.metric)
            for member in group:
                out[members[member].index] = value
        return out, work

    def _gather(
        self, hidden: Tensor | None, parents: list[int | None], layer: int, t0: int
    ) -> Tensor:
        """The rows entering block ``layer``: continuing groups' rows, then joining groups'."""
        rows = self.rows
        parts = []
        carried = [p for p in parents if p is not None]
        if carried:
            if hidden is None:
                raise ValueError(f"groups continue into block {layer} from no rows")
            if carried != list(range(hidden.shape[0] // rows)):
                index = torch.tensor(carried, device=hidden.device)
                grouped = hidden.reshape(-1, rows, *hidden.shape[1:])
                # (advanced indexing: index_select is far slower on CPU for large rows)
                hidden = grouped[index].reshape(-1, *hidden.shape[1:])
            parts.append(hidden)
        joining = len(parents) - len(carried)
        if joining:
            entry = self.prefix.resid[layer][:, t0:]
            entry = entry.expand(rows, *entry.shape[1:]).repeat(joining, 1, 1)
            parts.append(entry if not parts else entry.to(parts[0].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pass_hooks(
        self, t0: int, members: list[Planned], layout: list[Layout]
    ) -> list[tuple[str, HookFn]]:
        """One patch hook per (hook fired, hook cached, source), masked per group of rows."""
        first = min(item.start_layer for item in members)
        masks: dict[tuple[str, str, Source], Tensor] = {}
        group_of = [{m: g for g, group in enumerate(groups) for m in group} for groups, _ in layout]
        for item_pos, item in enumerate(members):
            for fire, layer, patch in item.patches:
                groups, _ = layout[layer - first]
                g = group_of[layer - first][item_pos]
                if groups[g][0] != item_pos:
                    continue  # the group's first member sets the group's mask
                key = (fire, patch.hook, patch.source)
                if key not in masks:
                    n_p, n_h = axis_sizes(patch.site, self.caches[patch.source][patch.hook])
                    masks[key] = torch.zeros(len(groups), n_p, n_h, dtype=torch.bool)
                pos = slice(None) if patch.position is None else patch.position
                head = slice(None) if patch.head is None else patch.head
                masks[key][g, pos, head] = True
        fwd: list[tuple[str, HookFn]] = []
        # translated patches (resid_post of the block below) first, then clean before corrupted
        ordered = sorted(
            masks.items(), key=lambda kv: (kv[0][0] == kv[0][1], kv[0][2] != Source.CLEAN)
        )
        width = self.n_pos - t0
        for (fire, cached, source), mask in ordered:
            site = self.sites[cached]
            act = self.caches[source][cached]
            mask = mask.to(act.device)  # built on the CPU: one transfer, not one per entry
            if t0 > 0:  # every patch of a pass that starts after position 0 is position-safe
                act = act.narrow(1 + site.pos_dim, t0, width)
                mask = mask[:, t0:]
            fwd.append((fire, patch_hook(mask, act, site)))
        return fwd
