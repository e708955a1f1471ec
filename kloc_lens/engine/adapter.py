"""The executor's one contact with TransformerLens internals: blocks, their arguments, KV caches.

Everything else in :mod:`kloc_lens.engine` uses the public hooked-model interface (hook names,
``run_with_hooks``, ``hooks()``, ``cfg``). The block-by-block shortcuts need more, and this
module holds all of it:

- which architectures and substrates the shortcuts cover (:data:`FAST_ARCHITECTURES`,
  :meth:`BlockDriver.for_model`);
- calling ``model.blocks[l]`` directly with the arguments the model's own forward pass gives
  it (attention mask, rotary embeddings, position ids: captured once by
  :func:`capture_block_inputs`, sliced to the positions run);
- handing a block the keys/values of earlier positions (:class:`PrefixKV`): a
  ``TransformerBridge`` attention takes them as a ``layer_past`` cache (``update(k, v, idx)``,
  ``[batch, kv_head, pos, d_head]`` after rotary embedding), a 3.x ``HookedTransformer`` block as
  a ``past_kv_cache_entry`` (``append(k, v)``, ``[batch, pos, kv_head, d_head]`` before rotary
  embedding); one object serves both;
- ``ln_final`` and ``unembed``;
- bridges that fire a hook after the computation and discard its edit (:func:`check_patchable`).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from kloc_lens._hooks import Fired
from kloc_lens.errors import SiteError, SweepError
from kloc_lens.model import substrate
from kloc_lens.sites import Site

__all__ = [
    "FAST_ARCHITECTURES",
    "BlockDriver",
    "BlockInputs",
    "PrefixKV",
    "capture_block_inputs",
    "check_patchable",
]

FAST_ARCHITECTURES = frozenset(
    {
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "GPTNeoXForCausalLM",
        "GPTJForCausalLM",
        "Qwen2ForCausalLM",
    }
)
"""HuggingFace architectures whose blocks the shortcuts drive (each has parity tests); any other
architecture takes the plain path."""

BlockInputs = dict[int, tuple[tuple[Any, ...], dict[str, Any]]]
"""Per block index: the positional and keyword arguments the model's forward pass called it with."""

_CACHE_NAMES = ("past_key_values", "layer_past", "cache", "past_kv_cache_entry", "past_key_value")
# Block arguments that carry positions: name -> position axis (negative: from the end).
_POSITION_ARGS = {
    "position_ids": -1,
    "cache_position": -1,
    "shortformer_pos_embed": 1,
}


# ---- hook points whose edits a bridge discards ---------------------------------------------------

_PATCHABLE: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()


def check_patchable(model: Any, sites: dict[str, Site], tokens: Tensor) -> None:
    """Refuse sites whose hook the model never calls, or fires after the fact, discarding what
    it returns.

    Some TransformerLens bridges (e.g. GPT-J's attention on TransformerLens 4.x) delegate a
    computation to the wrapped module and fire a hook such as ``hook_pattern`` on a copy
    afterwards, with a warning that the edit is discarded: a patch there changes nothing, and a
    sweep would report a flat map. For each site, the hook of its first patched layer is probed
    once per model with a perturbation on the first tokens of ``tokens``; a site is refused when
    the model says it discarded the edit and the logits indeed did not move. (Unchanged logits
    alone prove nothing: a head with zero output weights ignores its ``z`` too.)

    Raises:
        HookNotFiredError: The probed hook did not run during the probe's forward pass.
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
                fired = Fired()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = model.run_with_hooks(probe, fwd_hooks=fired.track([(hook, perturb)]))
                fired.check(f"a probe of site {sites[hook].name!r}")
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


# ---- the arguments of the blocks ----------------------------------------------------------------


@contextlib.contextmanager
def capture_block_inputs(model: Any) -> Iterator[BlockInputs]:
    """Record the arguments each of ``model.blocks`` is called with inside the ``with`` block.

    The pre-hooks are removed on leaving the block, also after an exception.
    """
    captured: BlockInputs = {}
    handles = []
    try:
        for layer, block in enumerate(model.blocks):

            def capture(module: Any, args: Any, kwargs: Any, layer: int = layer) -> None:
                captured[layer] = (tuple(args), dict(kwargs))

            handles.append(block.register_forward_pre_hook(capture, with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


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


# ---- keys and values of earlier positions --------------------------------------------------------


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


class PrefixKV:
    """Keys/values of earlier positions for one attention call, and a record of the call.

    The attention gives it this block's new keys/values and attends to what it returns: the
    recorded ``past`` (rows repeated for every configuration packed into the call) followed by
    the new ones. A ``TransformerBridge`` calls it as a ``layer_past`` cache (:meth:`update`,
    keys ``[batch, kv_head, pos, d_head]`` after rotary embedding: ``pos_dim`` 2), a
    ``HookedTransformer`` as a ``past_kv_cache_entry`` (:meth:`append` after reading
    ``past_keys`` for the position offset; ``[batch, pos, kv_head, d_head]`` before rotary
    embedding: ``pos_dim`` 1).

    Attributes:
        past: Recorded keys and values of the earlier positions, or ``None`` (positions from 0).
        pos_dim: The position axis of keys and values.
        calls: How often the attention called it.
        recorded: The last new keys and values it was given.
    """

    def __init__(
        self, past: tuple[Tensor, Tensor] | None, pos_dim: int, empty: Tensor | None = None
    ) -> None:
        self.past = past
        self.pos_dim = pos_dim
        self.calls = 0
        self.recorded: tuple[Tensor, Tensor] | None = None
        if empty is not None:
            self.past_keys = past[0] if past is not None else empty
            self.past_values = past[1] if past is not None else empty

    def extend(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Record this block's ``key``/``value``; return them after the earlier positions'."""
        self.calls += 1
        self.recorded = (key, value)
        if self.past is None:
            return key, value
        return _prepend(self.past[0], key, self.pos_dim), _prepend(
            self.past[1], value, self.pos_dim
        )

    def update(
        self, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """The bridge's cache protocol (``update(k, v, layer_idx, ...)``)."""
        return self.extend(key, value)

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """The HookedTransformer cache-entry protocol."""
        return self.extend(key, value)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        """Positions held before this call (the bridge's cache protocol)."""
        return 0 if self.past is None else int(self.past[0].shape[self.pos_dim])


# ---- driving the blocks ------------------------------------------------------------------------


class BlockDriver:
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
        self.kv_pos_dim = 2 if bridge else 1
        self.templates: dict[int, dict[str, Any]] = {}

    @staticmethod
    def for_model(model: Any) -> tuple[BlockDriver | None, str | None]:
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
        return BlockDriver(model, bridge), None

    def prepare(self, block_inputs: BlockInputs) -> str | None:
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

    def new_kv(self, past: tuple[Tensor, Tensor] | None, like: Tensor) -> PrefixKV:
        """The keys/values object for one block call on rows like ``like``."""
        if self.bridge:
            return PrefixKV(past, self.kv_pos_dim)
        return PrefixKV(past, self.kv_pos_dim, like.new_zeros(1, 0, *self.kv_shape))

    def block(self, layer: int, hidden: Tensor, t0: int, kv: PrefixKV) -> Tensor:
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

    def run_from(
        self, start: int, hidden: Tensor, joining: dict[int, Tensor] | None = None
    ) -> Tensor:
        """Logits of rows whose residual stream entering block ``start`` is ``hidden``: every
        block from ``start`` on, all positions, under whatever hooks the model holds; the rows
        of ``joining[l]`` (their stream entering block ``l > start``) are appended to the batch
        before block ``l``."""
        for layer in range(start, self.n_layers):
            if joining and layer in joining and layer != start:
                hidden = torch.cat([hidden, joining[layer]])
            hidden = self.block(layer, hidden, 0, self.new_kv(None, hidden))
        return self.final(hidden)

    def final(self, hidden: Tensor) -> Tensor:
        """``ln_final`` then ``unembed``."""
        if self.bridge or getattr(self.model.cfg, "normalization_type", None) is not None:
            hidden = self.model.ln_final(hidden)
        return self.model.unembed(hidden)
