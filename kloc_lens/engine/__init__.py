"""The one executor behind every sweep (:func:`execute`).

A sweep is a list of *patch configurations*; each configuration is a tuple of :class:`Patch`
operations (copy the activation of a hook point at some position/head from the clean or the
corrupted run into the run being executed). Every sweep kind (activation patching over any site,
head sweeps, causal traces with windows and severing, custom sites) is such a list, so everything
that makes sweeps fast lives here and every sweep kind benefits at once.

**The plain path** (always correct, the fallback):

1. run the clean and the corrupted input once each, caching only the hook points the
   configurations read from that run (and the unpatched scores);
2. pack many configurations into one forward pass: the base run's rows are repeated once per
   configuration and each hook point gets one vectorised ``torch.where`` that swaps in the cached
   source activation under a boolean mask of shape ``[config, pos, head]``;
3. apply the metric to each configuration's rows.

**The shortcuts** (on by default; each one exact up to float rounding):

- *Unchanged work is not redone.* While the base run executes, each cached source activation is
  compared with the base run's own: a patch entry whose source equals the base (a position before
  the corrupted span, say) changes nothing. A configuration changes nothing before the first layer
  ``s`` and the first position ``t`` at which one of its patches differs from the base run, and
  with causal attention nothing at positions before ``t`` in any layer. So the executor starts at
  block ``s`` from the base run's cached residual stream (``blocks.{s}.hook_resid_pre``), feeds
  only positions ``t..T-1``, and lets them attend to the base run's cached keys and values of the
  positions before ``t``. A configuration that changes nothing at all scores the base score.
- *Logits only where the metric reads.* A metric that declares its positions
  (:class:`~kloc_lens.metrics.ReadsPositions`: the built-in ones do) gets logits computed at those
  positions only; the full-vocabulary unembedding of every position is skipped.
- *Packing and sharing.* Configurations are grouped by start position and packed into passes
  whose size comes from ``memory_budget``. Inside a pass, a configuration joins the batch at its
  own start block, and configurations whose patches agree up to a block share the rows that
  compute it (ROME's windows around neighbouring layers share their first layers), splitting at
  the first block where they differ.
- *Reduced precision*, on explicit request only (:class:`Precision`): bfloat16 / float16
  autocast or TF32 matmuls for the patched passes. float32 is the default and the reference.

Every hook the executor attaches must run: a patch whose hook point the model never calls raises
:class:`~kloc_lens.errors.HookNotFiredError` naming it, instead of a flat map.

The shortcuts drive the model block by block (``model.blocks[l]``, then ``ln_final`` and
``unembed``); every hook point inside a block still fires, so patches, custom hook points and the
user's hooks behave as in a full forward pass. This works on a TransformerLens 3.x
``HookedTransformer`` (keys/values go in through ``past_kv_cache_entry``) and on a
``TransformerBridge`` in compatibility mode (through the attention bridge's ``layer_past``
cache), for the architectures in :data:`FAST_ARCHITECTURES`. Before trusting it, each sweep checks
that the block-by-block pass reproduces the base run's logits, and that starting mid-stack at a
later position does too; where a check fails, or the architecture, substrate or a patched hook
point is not covered (``hook_embed``, hook points outside the blocks), those configurations take
the plain path. The slow reference loop in ``tests/reference.py`` runs one forward per
configuration and is the oracle for both paths.

The parts, one module each:

==================  ==========================================================================
``types``           patches, runs, :class:`ExecutionOptions`, results
``budget``          the memory budget: configurations and tokens per pass
``skip``            what a configuration may skip (unchanged layers and positions)
``plan``            which configurations share a block-by-block pass, and which rows
``cache``           the cached unpatched runs and the base run's prefix keys/values
``passes``          packed passes: the one patch hook, the plain path, reduced precision
``runner``          the block-level runner of the shortcuts
``sweep``           the driver: :func:`execute`
``adapter``         the only module touching TransformerLens internals (blocks, KV caches)
==================  ==========================================================================
"""

from __future__ import annotations

from kloc_lens.engine.adapter import FAST_ARCHITECTURES
from kloc_lens.engine.budget import DEFAULT_MEMORY_BUDGET
from kloc_lens.engine.sweep import execute
from kloc_lens.engine.types import (
    ExecutionOptions,
    ExecutionResult,
    ExecutionStats,
    Patch,
    Precision,
    Run,
    Source,
    resolve_options,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "FAST_ARCHITECTURES",
    "ExecutionOptions",
    "ExecutionResult",
    "ExecutionStats",
    "Patch",
    "Precision",
    "Run",
    "Source",
    "execute",
    "resolve_options",
]
