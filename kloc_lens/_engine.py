"""The one executor behind every sweep.

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
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens.errors import SiteError, SweepError
from kloc_lens.metrics import check_metric_value, read_positions
from kloc_lens.model import check_model, substrate
from kloc_lens.sites import Site

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "FAST_ARCHITECTURES",
    "ExecutionResult",
    "ExecutionStats",
    "Patch",
    "Precision",
    "Run",
    "Source",
    "execute",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
"""Bytes of activations one packed forward pass may use, by default (never more than half the
memory free on the model's device)."""

EMBED_HOOK = "hook_embed"

FAST_ARCHITECTURES = frozenset(
    {"GPT2LMHeadModel", "LlamaForCausalLM", "GPTNeoXForCausalLM", "GPTJForCausalLM"}
)
"""HuggingFace architectures whose blocks the shortcuts drive (each has parity tests); any other
architecture takes the plain path."""

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

# Entries whose source and base activations differ by less than this (relative to the entry
# and to the activation's RMS) count as unchanged: float rounding of batches of other sizes.
_SAME_RTOL = 1e-6

# Pack positions of different start positions together while the padding costs at most this
# share of extra work, or while a pass is smaller than the per-device token minimum.
_PACK_SLACK = 0.1
_MIN_PASS_TOKENS = {"cpu": 256, "cuda": 4096}

# The block-by-block pass must reproduce the base run's logits to this (times 1 + max |logit|).
_CHECK_ATOL = 1e-4


class Source(str, Enum):
    """Which cached run a patch copies from."""

    CLEAN = "clean"
    """The clean run."""
    CORRUPTED = "corrupted"
    """The corrupted run."""


class Precision(str, Enum):
    """Arithmetic of the patched passes (the clean and corrupted runs stay float32)."""

    FP32 = "fp32"
    """float32 throughout: the default and the reference."""
    TF32 = "tf32"
    """float32 tensors with TF32 matmuls (CUDA only; about 1e-3 relative error)."""
    BF16 = "bf16"
    """bfloat16 autocast (meant for GPUs; about 1e-2 relative error)."""
    FP16 = "fp16"
    """float16 autocast (meant for GPUs; about 1e-3 relative error, may overflow)."""


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


_PATCHABLE: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()


def check_patchable(model: Any, sites: dict[str, Site], tokens: Tensor) -> None:
    """Refuse sites whose hook the model fires after the fact, discarding what it returns.

    Some TransformerLens bridges (e.g. GPT-J's attention on TransformerLens 4.x) delegate a
    computation to the wrapped module and fire a hook such as ``hook_pattern`` on a copy
    afterwards, with a warning that the edit is discarded: a patch there changes nothing, and a
    sweep would report a flat map. For each site, the hook of its first patched layer is probed
    once per model with a perturbation on the first tokens of ``tokens``; a site is refused when
    the model says it discarded the edit and the logits indeed did not move. (Unchanged logits
    alone prove nothing: a head with zero output weights ignores its ``z`` too.)

    Raises:
        SiteError: A site whose edits the model discards.
    """
    known = _PATCHABLE.setdefault(model, {})
    first: dict[str, str] = {}
    for hook, site in sites.items():
        first.setdefault(site.name, hook)
    todo = [hook for hook in first.values() if hook not in known]
    if todo:
        probe = tokens[:1, : min(int(tokens.shape[1]), 4)]

        def perturb(activation: Tensor, hook: Any) -> Tensor:
            generator = torch.Generator().manual_seed(0)
            noise = torch.randn(activation.shape, generator=generator).to(activation)
            return activation + noise * (activation.abs().mean() + 1.0)

        with torch.no_grad():
            base: Tensor | None = None
            for hook in todo:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = model.run_with_hooks(probe, fwd_hooks=[(hook, perturb)])
                live = True
                if any("discarded" in str(item.message) for item in caught):
                    reference: Tensor = model(probe) if base is None else base
                    base = reference
                    live = not torch.equal(out, reference)
                known[hook] = live
    dead = [name for name, hook in first.items() if not known[hook]]
    if dead:
        raise SiteError(
            f"site {dead[0]!r} cannot be patched on this model: its hook fires after the "
            "computation and the model discards what the hook returns (a TransformerLens "
            "bridge delegating to the wrapped module); use a HookedTransformer or another site"
        )


@dataclass(frozen=True)
class Run:
    """An input: token rows plus an optional edit of their token embeddings."""

    tokens: Int[Tensor, "row pos"]
    embed_edit: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class ExecutionStats:
    """How the configurations of one sweep were executed.

    Attributes:
        unchanged: Configurations whose patches change nothing (they score the base score).
        fast: Configurations run block by block from their first changed layer and position.
        plain: Configurations run as full forward passes.
        passes: Packed forward passes (block-by-block and full) after the two cached runs.
        work: Token-layers computed by the patched passes, as a share of a full forward pass of
            every configuration's rows.
        fallback: Why a shortcut was not taken (configurations on the plain path, or positions
            recomputed from the first one), or ``None``.
    """

    unchanged: int = 0
    fast: int = 0
    plain: int = 0
    passes: int = 0
    work: float = 1.0
    fallback: str | None = None


@dataclass(frozen=True)
class ExecutionResult:
    """Metric values of every configuration plus the two unpatched scores."""

    values: Float[Tensor, " config"]
    clean_score: float
    corrupted_score: float
    stats: ExecutionStats = field(default_factory=ExecutionStats)


Config = Sequence[Patch]


# ---- small helpers ------------------------------------------------------------------------------


def _run_hooks(run: Run) -> list[tuple[str, Callable[..., Any]]]:
    if run.embed_edit is None:
        return []
    edit = run.embed_edit

    def embed_hook(act: Tensor, hook: Any) -> Tensor:
        return edit(act)

    return [(EMBED_HOOK, embed_hook)]


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
    """Peak bytes of one row of a full forward pass (activations, logits and their softmax)."""
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    per_pos = 2 * cfg.d_vocab + 10 * cfg.d_model + 3 * d_mlp + 4 * cfg.n_heads * n_pos
    return 4 * n_pos * per_pos


def _token_bytes(model: Any, n_pos: int) -> int:
    """Peak bytes per token row of a block-by-block pass (logits not included)."""
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    return 4 * (12 * cfg.d_model + 3 * d_mlp + 4 * cfg.n_heads * n_pos)


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), if known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _budget(memory_budget: int, device: torch.device) -> int:
    """The bytes a pass may use: ``memory_budget``, but at most half the free memory."""
    if memory_budget < 1:
        raise SweepError(f"memory_budget must be >= 1 byte, got {memory_budget}")
    free = _available_bytes(device)
    return memory_budget if free is None else max(1, min(memory_budget, free // 2))


def configs_per_pass(
    model: Any, rows: int, n_pos: int, batch_size: int | None, memory_budget: int
) -> int:
    """How many configurations to pack into one full forward pass."""
    if batch_size is not None:
        if batch_size < 1:
            raise SweepError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size
    return max(1, memory_budget // max(1, _row_bytes(model, n_pos) * rows))


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(model.cfg, "device", None) or "cpu")


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of ``a / b``."""
    return math.ceil(a / b)


@contextlib.contextmanager
def _precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """Arithmetic for the patched passes; restores global switches on exit."""
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


# ---- which hook points may be skipped ---------------------------------------------------------


def _fire_point(patch: Patch, n_layers: int) -> tuple[str, int] | None:
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


def _position_safe(patch: Patch) -> bool:
    """Whether the hook point holds only the positions a block is run on."""
    match = _BLOCK_HOOK.match(patch.hook)
    return match is not None and _POSITION_AXIS.get(match.group(2)) == patch.site.pos_dim


def _differences(site: Site, act: Tensor, source: Tensor) -> Tensor:
    """``[pos, head]``: where ``source`` differs from ``act`` beyond float rounding.

    Finite entries may differ by ``_SAME_RTOL`` of their size (plus of the activation's RMS);
    infinite or NaN entries (masked attention scores) must match exactly.
    """
    finite = torch.isfinite(act) & torch.isfinite(source)
    plain = torch.where(finite, act, torch.zeros((), dtype=act.dtype, device=act.device))
    scale = plain.abs() + plain.float().pow(2).mean().sqrt().to(act.dtype)
    close = (act - source).abs() <= _SAME_RTOL * scale
    changed = torch.where(finite, ~close, act != source).any(dim=0)  # over rows
    n_pos, n_head = _axis_sizes(site, act)
    if n_pos == 0:
        return changed.any().reshape(1, 1).expand(1, n_head)
    keep = [site.pos_dim] + ([site.head_dim] if site.head_dim is not None else [])
    for dim in sorted(set(range(changed.dim())) - set(keep), reverse=True):
        changed = changed.any(dim=dim)
    if site.head_dim is None:
        return changed.reshape(n_pos, 1)
    return changed if site.pos_dim < site.head_dim else changed.transpose(0, 1)


# ---- the cached runs ---------------------------------------------------------------------------


@dataclass
class _Cached:
    """What one unpatched run leaves behind."""

    store: dict[str, Tensor]
    score: float
    logits: Tensor | None = None
    changed: dict[str, Tensor] = field(default_factory=dict)
    block_inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)


def _cache_run(
    model: Any,
    run: Run,
    hooks: set[str],
    metric: Callable[[Tensor], Any],
    rows: int,
    *,
    compare: dict[str, tuple[Site, Tensor]] | None = None,
    keep_logits: Callable[[Tensor], Tensor] | None = None,
    capture_blocks: bool = False,
) -> _Cached:
    """Run ``run`` once, keeping the activations of ``hooks`` and the metric's score.

    ``compare`` maps hook names to (site, activation of the other run): the run records where its
    own activation differs. ``keep_logits`` picks the logits to keep. ``capture_blocks`` records
    the arguments each block is called with.
    """
    result = _Cached({}, 0.0)

    def saver(name: str) -> Callable[[Tensor, Any], None]:
        # Keyed by the requested name: on a bridge, hook.name may be the aliased module's name.
        def save(act: Tensor, hook: Any) -> None:
            result.store[name] = act.detach().clone()

        return save

    def comparer(name: str, site: Site, other: Tensor) -> Callable[[Tensor, Any], None]:
        def compare_fn(act: Tensor, hook: Any) -> None:
            result.changed[name] = _differences(site, act.detach(), other).cpu()

        return compare_fn

    fwd = _run_hooks(run) + [(name, saver(name)) for name in sorted(hooks)]
    fwd += [(name, comparer(name, *pair)) for name, pair in sorted((compare or {}).items())]
    handles = []
    if capture_blocks:
        for layer, block in enumerate(model.blocks):

            def capture(module: Any, args: Any, kwargs: Any, layer: int = layer) -> None:
                result.block_inputs[layer] = (tuple(args), dict(kwargs))

            handles.append(block.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        logits = model.run_with_hooks(run.tokens, fwd_hooks=fwd)
    finally:
        for handle in handles:
            handle.remove()
    logits = logits.expand(rows, *logits.shape[1:]) if logits.shape[0] == 1 else logits
    result.score = float(check_metric_value(metric(logits), metric))
    if keep_logits is not None:
        result.logits = keep_logits(logits.detach())
    return result


def _whole(logits: Tensor) -> Tensor:
    return logits


def _at_reads(reads: Tensor) -> Callable[[Tensor], Tensor]:
    """Keep each row's logits at its read position: ``[rows, 1, vocab]``."""

    def pick(logits: Tensor) -> Tensor:
        index = torch.arange(logits.shape[0], device=logits.device)
        return logits[index, reads.to(logits.device)][:, None].clone()

    return pick


# ---- driving the blocks ------------------------------------------------------------------------


class _BridgeKV:
    """Keys/values of earlier positions for a TransformerBridge attention (``layer_past``).

    The attention bridge calls ``update(k, v, layer_idx)`` with this block's new keys/values
    (``[batch, kv_head, pos, d_head]``, after rotary embedding) and attends to what it returns.
    """

    pos_dim = 2

    def __init__(self, past: tuple[Tensor, Tensor] | None) -> None:
        self.past = past
        self.calls = 0
        self.recorded: tuple[Tensor, Tensor] | None = None

    def update(
        self, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        self.calls += 1
        self.recorded = (key, value)
        if self.past is None:
            return key, value
        return _prepend(self.past[0], key, self.pos_dim), _prepend(
            self.past[1], value, self.pos_dim
        )

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0 if self.past is None else int(self.past[0].shape[self.pos_dim])


class _HookedKV:
    """Keys/values of earlier positions for a HookedTransformer block (``past_kv_cache_entry``:
    ``[batch, pos, kv_head, d_head]``, before rotary embedding)."""

    pos_dim = 1

    def __init__(self, past: tuple[Tensor, Tensor] | None, like: Tensor, kv_shape: tuple[int, int]):
        self.past = past
        self.calls = 0
        self.recorded: tuple[Tensor, Tensor] | None = None
        empty = like.new_zeros(1, 0, *kv_shape)
        self.past_keys = past[0] if past is not None else empty
        self.past_values = past[1] if past is not None else empty

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        self.recorded = (key, value)
        if self.past is None:
            return key, value
        return _prepend(self.past[0], key, self.pos_dim), _prepend(
            self.past[1], value, self.pos_dim
        )


def _prepend(past: Tensor, new: Tensor, pos_dim: int) -> Tensor:
    """``cat([past, new])`` along positions, the past's rows repeated for every configuration."""
    copies = new.shape[0] // past.shape[0]
    if copies * past.shape[0] != new.shape[0]:
        raise SweepError(f"cannot spread {past.shape[0]} cached rows over {new.shape[0]} rows")
    if past.dtype != new.dtype:
        past = past.to(new.dtype)
    grouped = new.reshape(copies, past.shape[0], *new.shape[1:])
    out = torch.cat([past[None].expand(copies, *past.shape), grouped], dim=pos_dim + 1)
    return out.reshape(new.shape[0], *out.shape[2:])


_CACHE_NAMES = ("past_key_values", "layer_past", "cache", "past_kv_cache_entry", "past_key_value")
# Block arguments that carry positions: name -> position axis (negative: from the end).
_POSITION_ARGS = {
    "position_ids": -1,
    "cache_position": -1,
    "shortformer_pos_embed": 1,
}


class _BlockDriver:
    """Runs ``model.blocks[l:]`` on a residual stream, positions ``t0..T-1`` only, with the
    keys/values of earlier positions taken from a recorded pass; then ``ln_final``/``unembed``.

    The arguments each block gets from the model's own forward pass are captured once (they carry
    the attention mask and rotary embeddings) and sliced to the positions that are run.
    """

    def __init__(self, model: Any, bridge: bool) -> None:
        self.model = model
        self.bridge = bridge
        self.n_layers = int(model.cfg.n_layers)
        cfg = model.cfg
        self.kv_shape = (
            int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
            int(cfg.d_head),
        )
        self.templates: dict[int, dict[str, Any]] = {}

    @staticmethod
    def for_model(model: Any) -> tuple[_BlockDriver | None, str | None]:
        """A driver for ``model``, or ``None`` and why not."""
        cfg = model.cfg
        architecture = getattr(cfg, "architecture", None) or getattr(
            cfg, "original_architecture", None
        )
        if architecture not in FAST_ARCHITECTURES:
            return None, f"architecture {architecture!r} is not one the shortcuts cover"
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) != int(cfg.n_layers):
            return None, "the model has no 'blocks' stack"
        for name in ("ln_final", "unembed"):
            if not isinstance(getattr(model, name, None), torch.nn.Module):
                return None, f"the model has no {name!r} module"
        bridge = substrate(model) == "bridge"
        if not bridge:
            if (getattr(cfg, "output_logits_soft_cap", 0.0) or 0.0) > 0:
                return None, "logit soft-capping is not covered"
            if getattr(cfg, "positional_embedding_type", "standard") == "shortformer":
                return None, "shortformer position embeddings are not covered"
        return _BlockDriver(model, bridge), None

    def prepare(
        self, block_inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]
    ) -> str | None:
        """Turn the captured block arguments into templates; say why not where they are unusable."""
        for layer in range(self.n_layers):
            if layer not in block_inputs:
                return f"block {layer} was not called by the forward pass"
            args, kwargs = block_inputs[layer]
            block = self.model.blocks[layer]
            target = block.original_component if self.bridge else block
            try:
                bound = inspect.signature(target.forward).bind_partial(*args, **kwargs)
            except TypeError as err:
                return f"cannot read the arguments of block {layer}: {err}"
            named = dict(bound.arguments)
            named.pop(next(iter(named)), None)  # the residual stream
            for key, value in list(named.items()):
                param = inspect.signature(target.forward).parameters.get(key)
                if param is not None and param.kind is inspect.Parameter.VAR_KEYWORD:
                    named.pop(key)
                    named.update(value)
            template: dict[str, Any] = {}
            for key, value in named.items():
                if key in _CACHE_NAMES or _is_cache(value):
                    template[key] = None
                    continue
                reduced = _one_row(value)
                if reduced is _ROWS_DIFFER:
                    return f"block {layer} argument {key!r} differs between rows"
                if not _known_argument(key, reduced):
                    return f"block {layer} argument {key!r} is not one the shortcuts understand"
                template[key] = reduced
            self.templates[layer] = template
        return None

    def block(self, layer: int, hidden: Tensor, t0: int, kv: _BridgeKV | _HookedKV) -> Tensor:
        """Run block ``layer`` on ``hidden`` (positions ``t0..``), attending to ``kv``'s past."""
        kwargs: dict[str, Any] = {}
        for key, value in self.templates[layer].items():
            kwargs[key] = _slice_argument(key, value, t0)
        if self.bridge:
            for key in list(kwargs):
                if key in _CACHE_NAMES:
                    kwargs[key] = kv
            kwargs["layer_past"] = kv
        else:
            kwargs["past_kv_cache_entry"] = kv
        out = self.model.blocks[layer](hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def new_kv(self, past: tuple[Tensor, Tensor] | None, like: Tensor) -> _BridgeKV | _HookedKV:
        if self.bridge:
            return _BridgeKV(past)
        return _HookedKV(past, like, self.kv_shape)

    def final(self, hidden: Tensor) -> Tensor:
        """``ln_final`` then ``unembed``."""
        if self.bridge or getattr(self.model.cfg, "normalization_type", None) is not None:
            hidden = self.model.ln_final(hidden)
        return self.model.unembed(hidden)


def _is_cache(value: Any) -> bool:
    return any(
        base.__name__ in ("Cache", "TransformerLensKeyValueCacheEntry")
        for base in type(value).__mro__
    )


_ROWS_DIFFER = object()


def _one_row(value: Any) -> Any:
    """A captured block argument reduced to one row (``_ROWS_DIFFER`` if its rows differ)."""
    if isinstance(value, tuple):
        parts = tuple(_one_row(part) for part in value)
        return _ROWS_DIFFER if any(p is _ROWS_DIFFER for p in parts) else parts
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] > 1:
        first = value[:1]
        return first if torch.equal(value, first.expand_as(value)) else _ROWS_DIFFER
    return value


def _known_argument(key: str, value: Any) -> bool:
    if not isinstance(value, (Tensor, tuple)):
        return True  # flags such as use_cache
    return key in ("attention_mask", "position_embeddings") or key in _POSITION_ARGS


def _slice_argument(key: str, value: Any, t0: int) -> Any:
    """Keep positions ``t0..`` of a block argument that carries positions."""
    if t0 == 0 or value is None:
        return value
    if key == "attention_mask" and isinstance(value, Tensor):
        # 4-D masks [batch, head, query, key]: keep the queries run, every key.
        return value[..., t0:, :] if value.dim() == 4 else value
    if key == "position_embeddings" and isinstance(value, tuple):
        return tuple(part[:, t0:] for part in value)
    if key in _POSITION_ARGS and isinstance(value, Tensor):
        return value.narrow(_POSITION_ARGS[key] % value.dim(), t0, value.shape[-1] - t0)
    return value


# ---- planning -----------------------------------------------------------------------------------


@dataclass
class _Planned:
    """A configuration on the block-by-block path."""

    index: int
    start_layer: int
    start_pos: int
    patches: list[tuple[str, int, Patch]]  # (hook fired, its block, patch), from start_layer on


def _plan_passes(
    items: list[_Planned],
    rows: int,
    n_pos: int,
    n_layers: int,
    max_tokens: int,
    max_configs: int | None,
    min_tokens: int,
) -> list[tuple[int, list[_Planned]]]:
    """Group configurations into passes ``(t0, members)``, latest start positions first."""
    order = sorted(items, key=lambda p: (-p.start_pos, p.start_layer))
    passes: list[tuple[int, list[_Planned]]] = []
    members: list[_Planned] = []
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
            if fits and (small or padded <= (1 + _PACK_SLACK) * needed):
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


# ---- execution ----------------------------------------------------------------------------------


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
    precision: Precision | str = Precision.FP32,
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
        batch_size: Configurations per forward pass; ``None`` chooses from ``memory_budget``.
        memory_budget: Activation bytes one forward pass may use (at most half the memory free
            on the model's device when the sweep starts is used).
        progress: Show a progress bar.
        desc: Progress-bar label.
        precision: Arithmetic of the patched passes; float32 unless asked otherwise.
        shortcuts: Skip unchanged layers, positions and logits (see the module docstring);
            ``False`` runs every configuration as a full forward pass.

    Returns:
        One metric value per configuration, the unpatched clean and corrupted scores, and how the
        configurations were executed.

    Raises:
        SweepError: Clean and corrupted runs do not fit together, or a bad batch size.
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
    if batch_size is not None and batch_size < 1:
        raise SweepError(f"batch_size must be >= 1, got {batch_size}")
    try:
        precision = Precision(precision)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in Precision)
        raise SweepError(f"precision must be one of {choices}, got {precision!r}") from None
    device = _device_of(model)
    memory_budget = _budget(memory_budget, device)
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
        return sweep.run(
            shortcuts=shortcuts,
            batch_size=batch_size,
            memory_budget=memory_budget,
            precision=precision,
            progress=progress,
            desc=desc,
        )


class _Sweep:
    """State of one :func:`execute` call."""

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
        self.caches: dict[Source, dict[str, Tensor]] = {}
        self.work = 0.0

    # -- the two unpatched runs --

    def _cached_runs(
        self, driver: _BlockDriver | None, compare: bool, reads: Tensor | None
    ) -> tuple[_Cached, _Cached]:
        other = _cache_run(
            self.model, self.runs[self.other], self.needed[self.other], self.metric, self.rows
        )
        base_hooks = set(self.needed[self.base])
        if driver is not None:
            # the residual stream entering each block a configuration may start at
            starts = {
                point[1]
                for config in self.configs
                for patch in config
                if patch.source is not self.base
                and (point := _fire_point(patch, self.n_layers)) is not None
            }
            base_hooks |= {f"blocks.{layer}.hook_resid_pre" for layer in starts}
        comparisons = {}
        if compare:
            comparisons = {
                hook: (self.sites[hook], other.store[hook]) for hook in self.needed[self.other]
            }
        keep = None
        if driver is not None:
            keep = _at_reads(reads) if reads is not None else _whole
        base = _cache_run(
            self.model,
            self.runs[self.base],
            base_hooks,
            self.metric,
            self.rows,
            compare=comparisons,
            keep_logits=keep,
            capture_blocks=driver is not None,
        )
        return other, base

    # -- the whole sweep --

    def run(
        self,
        *,
        shortcuts: bool,
        batch_size: int | None,
        memory_budget: int,
        precision: Precision,
        progress: bool,
        desc: str,
    ) -> ExecutionResult:
        driver, fallback = (None, "shortcuts=False")
        if shortcuts:
            driver, fallback = _BlockDriver.for_model(self.model)
            fast_hooks = [
                all(_fire_point(p, self.n_layers) is not None for p in c) for c in self.configs
            ]
            if driver is not None and not any(fast_hooks):
                driver, fallback = (
                    None,
                    "every configuration patches hook points outside the blocks",
                )
        reads = read_positions(self.metric, self.rows, self.n_pos)
        other, base = self._cached_runs(driver, compare=shortcuts, reads=reads)
        self.caches = {self.other: other.store, self.base: base.store}
        scores = {self.other: other.score, self.base: base.score}
        if driver is not None:
            reason = driver.prepare(base.block_inputs)
            if reason is not None:
                driver, fallback = None, reason
        base.block_inputs.clear()

        values: dict[int, Tensor] = {}
        unchanged = 0
        plain: list[int] = []
        planned: list[_Planned] = []
        for index, config in enumerate(self.configs):
            self._check_ranges(config)
            if not shortcuts:
                plain.append(index)
                continue
            start = self._start(config, base.changed, reads)
            fire = _fire_point_all(config, self.n_layers)
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
                planned.append(_Planned(index, layer, pos, patches))

        total = len(self.configs)
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        bar.update(unchanged)
        passes = 0
        try:
            if planned and driver is not None:
                fast = _FastRunner(self, driver, base, reads, precision)
                reason = fast.check(min(p.start_layer for p in planned))
                if reason is not None:
                    fallback = reason
                    plain.extend(p.index for p in planned)
                    planned = []
                else:
                    passes += fast.run_all(planned, batch_size, memory_budget, values, bar)
                    fallback = fast.fallback if not plain else fallback
            if plain:
                passes += self._run_plain(plain, batch_size, memory_budget, precision, values, bar)
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
            work=(self.work + len(plain) * full_pass) / max(1, total * full_pass),
            fallback=fallback if plain or planned else None,
        )
        result = torch.stack([values[i] for i in range(total)]) if total else torch.zeros(0)
        return ExecutionResult(result, scores[Source.CLEAN], scores[Source.CORRUPTED], stats)

    def _check_ranges(self, config: Config) -> None:
        for patch in config:
            n_pos, n_head = _axis_sizes(patch.site, self.caches[patch.source][patch.hook])
            if patch.position is not None and not 0 <= patch.position < n_pos:
                raise SweepError(f"position {patch.position} outside {n_pos} positions")
            if patch.head is not None and not 0 <= patch.head < n_head:
                raise SweepError(f"head {patch.head} outside {n_head} heads")

    def _start(
        self, config: Config, changed: dict[str, Tensor], reads: Tensor | None
    ) -> tuple[int, int] | None:
        """First (layer, position) at which ``config`` changes the base run; ``None`` if never."""
        layer, pos = None, None
        for patch in config:
            if patch.source is self.base:
                continue  # the base run's own activation: a change only after an earlier one
            first = _first_change(patch, changed[patch.hook])
            if first is None:
                continue
            fire = _fire_point(patch, self.n_layers)
            fire_layer = fire[1] if fire is not None else 0
            layer = fire_layer if layer is None else min(layer, fire_layer)
            pos = first if pos is None else min(pos, first)
        if layer is None or pos is None:
            return None
        if any(not _position_safe(p) for p in config):
            pos = 0
        if reads is not None:
            pos = min(pos, int(reads.min()))
        return layer, pos

    # -- the plain path --

    def _run_plain(
        self,
        indices: list[int],
        batch_size: int | None,
        memory_budget: int,
        precision: Precision,
        values: dict[int, Tensor],
        bar: Any,
    ) -> int:
        base_run = self.runs[self.base]
        base_tokens = base_run.tokens.expand(self.rows, -1)
        per_pass = configs_per_pass(self.model, self.rows, self.n_pos, batch_size, memory_budget)
        passes = 0
        for start in range(0, len(indices), per_pass):
            chunk = indices[start : start + per_pass]
            with _precision(precision, self.device):
                outs = _execute_chunk(
                    self.model,
                    base_run,
                    base_tokens,
                    [self.configs[i] for i in chunk],
                    self.caches,
                    self.sites,
                    self.metric,
                )
            values.update(zip(chunk, outs, strict=True))
            passes += 1
            bar.update(len(chunk))
        return passes


def _fire_point_all(config: Config, n_layers: int) -> list[tuple[str, int]] | None:
    points = [_fire_point(p, n_layers) for p in config]
    if any(p is None for p in points):
        return None
    return [p for p in points if p is not None]


def _first_change(patch: Patch, changed: Tensor) -> int | None:
    """First position at which ``patch`` writes a value that differs from the base run's."""
    heads = changed if patch.head is None else changed[:, patch.head : patch.head + 1]
    per_pos = heads.any(dim=1)
    if per_pos.shape[0] == 1:  # one position, or an activation without a position axis
        return 0 if bool(per_pos[0]) else None
    if patch.position is not None:
        return patch.position if bool(per_pos[patch.position]) else None
    hits = per_pos.nonzero()
    return int(hits[0, 0]) if hits.numel() else None


class _FastRunner:
    """The block-by-block passes of one sweep."""

    def __init__(
        self,
        sweep: _Sweep,
        driver: _BlockDriver,
        base: _Cached,
        reads: Tensor | None,
        precision: Precision,
    ) -> None:
        self.sweep = sweep
        self.driver = driver
        self.precision = precision
        self.rows = sweep.rows
        self.n_pos = sweep.n_pos
        self.n_layers = sweep.n_layers
        self.reads = reads.to(sweep.device) if reads is not None else None
        assert base.logits is not None
        # [rows, 1, vocab] at the read positions, or [rows, pos, vocab] for other metrics
        self.base_logits = base.logits
        # The residual stream entering each block a configuration may start at, per row of the
        # base run (shared with the base run's cache: no copy).
        self.resid = {
            layer: base.store[name]
            for layer in range(self.n_layers)
            if (name := f"blocks.{layer}.hook_resid_pre") in base.store
        }
        self.kv: dict[int, tuple[Tensor, Tensor] | None] = {}
        self.fallback: str | None = None
        self.positions_ok = True

    # -- checks --

    def _record(self, first_layer: int) -> Tensor:
        """Run the base rows block by block from ``first_layer``, keeping keys/values."""
        hidden = self.resid[first_layer]
        for layer in range(first_layer, self.n_layers):
            kv = self.driver.new_kv(None, hidden)
            hidden = self.driver.block(layer, hidden, 0, kv)
            if kv.calls != 1 or kv.recorded is None:
                self.positions_ok = False
            else:
                self.kv[layer] = (kv.recorded[0].detach(), kv.recorded[1].detach())
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
        tol = _CHECK_ATOL * (1.0 + float(expected.abs().max()))
        return bool(((got.float() - expected.float()).abs() <= tol).all())

    def check(self, first_layer: int) -> str | None:
        """Record keys/values and check that block-by-block passes reproduce the base logits."""
        try:
            hidden = self._record(first_layer)
            got = self._logits_at_reads(self._base_rows(hidden), 0)
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError) as err:
            return f"the block-by-block pass failed ({type(err).__name__}: {err})"
        if not self._agree(got, self._expected(0)):
            return "the block-by-block pass does not reproduce the model's logits"
        return None

    def _base_rows(self, hidden: Tensor) -> Tensor:
        return hidden.expand(self.rows, *hidden.shape[1:]) if hidden.shape[0] == 1 else hidden

    def check_positions(self, layer: int, t0: int) -> bool:
        """Whether starting at ``layer`` with positions ``t0..`` reproduces the base logits."""
        if not self.positions_ok:
            return False
        try:
            hidden = self.resid[layer][:, t0:]
            for block in range(layer, self.n_layers):
                past = self._past(block, t0)
                hidden = self.driver.block(block, hidden, t0, self.driver.new_kv(past, hidden))
            got = self._logits_at_reads(self._base_rows(hidden), t0)
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError):
            return False
        return self._agree(got, self._expected(t0))

    def _past(self, layer: int, t0: int) -> tuple[Tensor, Tensor] | None:
        if t0 == 0:
            return None
        past = self.kv[layer]
        if past is None:
            raise SweepError(f"no keys/values recorded for block {layer}")
        key, value = past
        dim = _BridgeKV.pos_dim if self.driver.bridge else _HookedKV.pos_dim
        return key.narrow(dim, 0, t0), value.narrow(dim, 0, t0)

    # -- passes --

    def run_all(
        self,
        planned: list[_Planned],
        batch_size: int | None,
        memory_budget: int,
        values: dict[int, Tensor],
        bar: Any,
    ) -> int:
        model = self.sweep.model
        vocab_bytes = 4 * int(model.cfg.d_vocab) * (2 if self.reads is not None else self.n_pos)
        per_token = _token_bytes(model, self.n_pos)
        max_tokens = max(1, memory_budget // per_token)
        # logits of every configuration's rows share the budget
        max_configs = max(1, memory_budget // max(1, 2 * vocab_bytes * self.rows))
        if batch_size is not None:
            max_configs = min(max_configs, batch_size)
        min_tokens = _MIN_PASS_TOKENS.get(self.sweep.device.type, 256)
        passes = _plan_passes(
            planned, self.rows, self.n_pos, self.n_layers, max_tokens, max_configs, min_tokens
        )
        latest = max(t0 for t0, _ in passes)
        if latest > 0:
            probe_layer = max(p.start_layer for _, members in passes for p in members)
            if not self.check_positions(probe_layer, latest):
                self.fallback = "keys/values of earlier positions cannot be reused here"
                for item in planned:
                    item.start_pos = 0
                passes = _plan_passes(
                    planned, self.rows, self.n_pos, self.n_layers, max_tokens, max_configs, 0
                )
                latest = 0
        # keep only the keys/values of positions some pass starts after
        self.kv = {layer: self._past(layer, latest) for layer in self.kv} if latest else {}
        for t0, members in passes:
            outs = self._run_pass(t0, members)
            values.update(outs)
            bar.update(len(members))
        return len(passes)

    def _run_pass(self, t0: int, members: list[_Planned]) -> dict[int, Tensor]:
        """One block-by-block pass over positions ``t0..`` for ``members``.

        Rows are grouped: configurations whose patches agree up to a block share the rows that
        compute it, and split into groups of their own at the first block where they differ; a
        configuration joins at its start block with the base run's residual stream.
        """
        sweep = self.sweep
        rows, width = self.rows, self.n_pos - t0
        first = min(item.start_layer for item in members)
        layout = _layer_groups(members, first, self.n_layers)
        fwd = self._pass_hooks(t0, members, layout)
        hidden: Tensor | None = None
        with sweep.model.hooks(fwd_hooks=fwd), _precision(self.precision, sweep.device):
            for layer in range(first, self.n_layers):
                groups, parents = layout[layer - first]
                hidden = self._gather(hidden, parents, layer, t0)
                past = self._past(layer, t0)
                hidden = self.driver.block(layer, hidden, t0, self.driver.new_kv(past, hidden))
                sweep.work += len(groups) * rows * width
            assert hidden is not None
            logits = self._logits_at_reads(hidden, t0)
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
            value = check_metric_value(sweep.metric(mine), sweep.metric)
            for member in group:
                out[members[member].index] = value
        return out

    def _gather(
        self, hidden: Tensor | None, parents: list[int | None], layer: int, t0: int
    ) -> Tensor:
        """The rows entering block ``layer``: continuing groups' rows, then joining groups'."""
        rows = self.rows
        parts = []
        carried = [p for p in parents if p is not None]
        if carried:
            assert hidden is not None
            if carried != list(range(hidden.shape[0] // rows)):
                index = torch.tensor(carried, device=hidden.device)
                grouped = hidden.reshape(-1, rows, *hidden.shape[1:])
                # (advanced indexing: index_select is far slower on CPU for large rows)
                hidden = grouped[index].reshape(-1, *hidden.shape[1:])
            parts.append(hidden)
        joining = len(parents) - len(carried)
        if joining:
            entry = self.resid[layer][:, t0:]
            entry = entry.expand(rows, *entry.shape[1:]).repeat(joining, 1, 1)
            parts.append(entry if not parts else entry.to(parts[0].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pass_hooks(
        self, t0: int, members: list[_Planned], layout: list[_Layout]
    ) -> list[tuple[str, Callable[..., Any]]]:
        """One patch hook per (hook fired, hook cached, source), masked per group of rows."""
        sweep = self.sweep
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
                    n_p, n_h = _axis_sizes(patch.site, sweep.caches[patch.source][patch.hook])
                    masks[key] = torch.zeros(len(groups), n_p, n_h, dtype=torch.bool)
                pos = slice(None) if patch.position is None else patch.position
                head = slice(None) if patch.head is None else patch.head
                masks[key][g, pos, head] = True
        fwd: list[tuple[str, Callable[..., Any]]] = []
        # translated patches (resid_post of the block below) first, then clean before corrupted
        ordered = sorted(
            masks.items(), key=lambda kv: (kv[0][0] == kv[0][1], kv[0][2] != Source.CLEAN)
        )
        width = self.n_pos - t0
        for (fire, cached, source), mask in ordered:
            site = sweep.sites[cached]
            act = sweep.caches[source][cached]
            mask = mask.to(act.device)  # built on the CPU: one transfer, not one per entry
            if t0 > 0:  # every patch of a pass that starts after position 0 is position-safe
                act = act.narrow(1 + site.pos_dim, t0, width)
                mask = mask[:, t0:]
            fwd.append((fire, _group_patch_hook(mask, act, site)))
        return fwd


_Layout = tuple[list[list[int]], list[int | None]]


def _layer_groups(members: list[_Planned], first: int, n_layers: int) -> list[_Layout]:
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
    layout: list[_Layout] = []
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


def _group_patch_hook(mask: Tensor, source: Tensor, site: Site) -> Callable[[Tensor, Any], Tensor]:
    """Patch ``source`` into the rows of each group where its ``[group, pos, head]`` mask is set."""
    view = _mask_view(mask, site, source.shape)
    src = source[None]
    groups = mask.shape[0]

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        shape = act.shape
        grouped = act.reshape(groups, shape[0] // groups, *shape[1:])
        patched = torch.where(view, src.to(act.dtype), grouped)
        return patched.reshape(shape)

    return hook_fn


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
                masks[key] = torch.zeros(n_configs, n_pos, n_head, dtype=torch.bool)
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
        source_act = caches[source][hook]
        fwd.append(
            (hook, _patch_hook(mask.to(source_act.device), source_act, sites[hook], n_configs))
        )
    tokens = base_tokens.repeat(n_configs, 1)
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
    logits = logits.float().reshape(n_configs, rows, *logits.shape[1:])
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
