"""Sweeps: activation patching and ROME-protocol causal tracing.

**Activation patching** runs two inputs, *clean* and *corrupted*, and measures a metric after
copying one activation from one run into the other, for every layer and position (or head) of a
site. In the ``restore`` direction (``transformer_lens.patching``'s convention) clean activations
go into the corrupted run and a large value marks an activation that carries what the corruption
destroyed; in the ``inject`` direction corrupted activations go into the clean run.

**Causal tracing** (Meng et al. 2022, "ROME") corrupts a span of the prompt, usually the subject,
with Gaussian noise on its token embeddings and measures the probability of the right answer after
restoring the clean state at one (layer, position): a residual-stream state, or the MLP (or
attention) outputs of a window of layers around the layer. The *indirect effect* is the restored
probability minus the corrupted one. *Severed* tracing restores a residual state while freezing
the later MLP (or attention) outputs at that token to their corrupted values, which removes the
share of the effect that flows through them.

Example (on the planted model whose fact sits in the MLP of layer 1):
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Prompt, tokenize
    >>> model, planted = planted_model()
    >>> subject = planted.subjects[0]
    >>> prompt = tokenize(model, Prompt.from_text(planted.template.format(subject=subject),
    ...     planted.objects[0], subject=subject))
    >>> traces = causal_trace(model, prompt, corruption=GaussianNoise(scale=1.0), window=1,
    ...     progress=False)
    >>> traces.get("mlp").values.shape == (model.cfg.n_layers, len(prompt))
    True

All sweeps run through one batched executor (:mod:`kloc_lens.engine`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Any

from torch import Tensor

from kloc_lens.corrupt import Corruption, GaussianNoise
from kloc_lens.engine import (
    ExecutionOptions,
    Patch,
    Precision,
    Run,
    Source,
    execute,
    resolve_options,
)
from kloc_lens.errors import KlocLensError, SiteError, SpanError, SweepError, choice
from kloc_lens.facts import Fact, Prompt, TokenizedPrompt, target_token_ids, tokenize
from kloc_lens.metrics import TargetProb, metric_name
from kloc_lens.results import (
    LayerHeadResult,
    LayerPosHeadResult,
    LayerPosResult,
    PatchResult,
    TraceResult,
    TraceSet,
)
from kloc_lens.sites import Site, get_site
from kloc_lens.types import Direction, Indices, TraceKind

__all__ = [
    "ExecutionOptions",
    "Sweep",
    "activation_patching",
    "causal_trace",
    "default_window",
    "frozen_layers",
    "window_layers",
]


class Sweep(str, Enum):
    """The axes an activation-patching sweep runs over."""

    LAYER_POS = "layer_pos"
    """Each (layer, position): the whole activation at that position (all heads)."""
    LAYER_HEAD = "layer_head"
    """Each (layer, head), patched at every position."""
    LAYER_POS_HEAD = "layer_pos_head"
    """Each (layer, position, head)."""


PromptLike = Fact | Prompt | TokenizedPrompt | str


def _as_tokenized(model: Any, prompt: PromptLike) -> TokenizedPrompt:
    if isinstance(prompt, TokenizedPrompt):
        return prompt
    if isinstance(prompt, Fact):
        return tokenize(model, prompt.entity_prompt())
    return tokenize(model, prompt)


def _labels(prompt: TokenizedPrompt | None) -> tuple[tuple[str, ...], dict[str, tuple[int, int]]]:
    if prompt is None:
        return (), {}
    return prompt.str_tokens, {k: (s.start, s.end) for k, s in prompt.spans.items()}


def _resolve_inputs(
    model: Any,
    clean: Tensor | PromptLike,
    corrupted: Tensor | PromptLike | Corruption,
) -> tuple[Run, Run, TokenizedPrompt | None, str]:
    prompt: TokenizedPrompt | None = None
    if isinstance(clean, Tensor):
        clean_tokens = clean if clean.dim() == 2 else clean[None]
        if clean_tokens.dim() != 2:
            raise SweepError(f"clean tokens must be [batch, pos], got shape {tuple(clean.shape)}")
    else:
        prompt = _as_tokenized(model, clean)
        clean_tokens = prompt.tokens[None]
    if isinstance(corrupted, Corruption):
        if prompt is None:
            if clean_tokens.shape[0] != 1:
                raise SweepError("a Corruption applies to one prompt; pass a prompt, not a batch")
            raise SweepError(
                "a Corruption needs the clean prompt with its spans: pass a Prompt or "
                "TokenizedPrompt as clean, or corrupted tokens instead of a Corruption"
            )
        made = corrupted.apply(model, prompt)
        return Run(clean_tokens), Run(made.tokens, made.embed_edit), prompt, made.description
    if isinstance(corrupted, Tensor):
        corrupted_tokens = corrupted if corrupted.dim() == 2 else corrupted[None]
        description = "corrupted tokens"
    else:
        other = _as_tokenized(model, corrupted)
        corrupted_tokens = other.tokens[None]
        description = f"corrupted prompt {other.text!r}"
    if corrupted_tokens.shape[1] != clean_tokens.shape[1]:
        raise SweepError(
            f"clean and corrupted inputs differ in length: {clean_tokens.shape[1]} vs "
            f"{corrupted_tokens.shape[1]} tokens"
        )
    return Run(clean_tokens), Run(corrupted_tokens), prompt, description


def _check_indices(values: Indices | None, size: int, what: str) -> tuple[int, ...]:
    """Resolve layer/position/head indices (negative ones count from the end).

    Raises:
        SweepError: Not a sequence of integers, empty, or an index outside ``0..size-1``.
    """
    if values is None:
        return tuple(range(size))
    if isinstance(values, Tensor):
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SweepError(f"{what} must be a sequence of integers in 0..{size - 1}, got {values!r}")
    values = list(values)
    resolved = []
    for value in values:
        index = None if isinstance(value, bool) else _as_int(value)
        if index is None:
            raise SweepError(
                f"{what} must be integers in 0..{size - 1}, got {value!r} in {list(values)!r}"
            )
        resolved.append(index + size if index < 0 else index)
    bad = [v for v, r in zip(values, resolved, strict=True) if not 0 <= r < size]
    if bad or not resolved:
        raise SweepError(f"{what} {list(values)} outside 0..{size - 1}")
    return tuple(resolved)


def _n_heads(model: Any, site: Site) -> int:
    cfg = model.cfg
    if site.name in ("k", "v"):
        return int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(cfg.n_heads)


def activation_patching(
    model: Any,
    clean: Tensor | PromptLike,
    corrupted: Tensor | PromptLike | Corruption,
    metric: Callable[[Tensor], Any],
    *,
    site: str | Site = "resid_pre",
    sweep: Sweep | str = Sweep.LAYER_POS,
    direction: Direction | str = Direction.RESTORE,
    layers: Indices | None = None,
    positions: Indices | None = None,
    heads: Indices | None = None,
    options: ExecutionOptions | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    precision: Precision | str | None = None,
    progress: bool | None = None,
) -> PatchResult:
    """Patch one site at every layer and position (or head) and measure ``metric``.

    Args:
        model: A hooked model in eval mode.
        clean: Clean token ids ``[batch, pos]``, or a prompt (string, :class:`Prompt`,
            :class:`TokenizedPrompt`, :class:`Fact` for its entity prompt).
        corrupted: Corrupted token ids of the same shape, another prompt of the same token
            length, or a :class:`Corruption` applied to the clean prompt.
        metric: ``logits[batch, pos, vocab] -> 0-d tensor`` (as in ``transformer_lens.patching``).
        site: Site name or object (see :mod:`kloc_lens.sites`), custom sites included.
        sweep: ``layer_pos``, ``layer_head`` or ``layer_pos_head``.
        direction: ``restore`` (clean into corrupted) or ``inject`` (corrupted into clean).
        layers: Layers to sweep (default all).
        positions: Positions to sweep (default all).
        heads: Heads to sweep (default all).
        options: How the sweep executes (:class:`~kloc_lens.engine.ExecutionOptions`: batch
            size, memory budget, precision, progress bar); default ``ExecutionOptions()``.
        batch_size: Shorthand: overrides ``options.batch_size`` (configurations per forward
            pass; default: from the memory budget).
        memory_budget: Shorthand: overrides ``options.memory_budget`` (bytes of activations a
            forward pass may use).
        precision: Shorthand: overrides ``options.precision`` (``fp32``, the default and the
            reference; ``tf32``, ``bf16``, ``fp16`` on request).
        progress: Shorthand: overrides ``options.progress`` (show a progress bar).

    Returns:
        :class:`LayerPosResult`, :class:`LayerHeadResult` or :class:`LayerPosHeadResult` (the
        sweep decides which); ``values`` equal ``transformer_lens.patching``'s for the same
        inputs in the restore direction.

    Raises:
        SiteError: Unknown site, or a head sweep on a site without heads.
        SweepError: An unknown sweep or direction (the message lists the valid values), inputs
            of different lengths, layers/positions/heads that are not integers in range, heads
            on a layer_pos sweep or positions on a layer_head sweep, or bad execution options.
        MetricError: The metric does not return one finite number.
        ModelError: The model is in train mode or lacks the site's hook points.
        HookNotFiredError: A patched hook point never ran during a forward pass.
    """
    opts = resolve_options(
        options,
        batch_size=batch_size,
        memory_budget=memory_budget,
        precision=precision,
        progress=progress,
    )
    site = get_site(site)
    sweep = choice(Sweep, sweep, "sweep", SweepError)
    direction = choice(Direction, direction, "direction", SweepError)
    if sweep is not Sweep.LAYER_POS and not site.has_heads:
        raise SiteError(f"site {site.name!r} has no head axis; a {sweep.value} sweep needs one")
    if heads is not None and sweep is Sweep.LAYER_POS:
        raise SweepError(
            f"heads={list(heads)!r} is given, but a layer_pos sweep patches every head at once; "
            "use sweep='layer_head' or 'layer_pos_head' to sweep heads"
        )
    if positions is not None and sweep is Sweep.LAYER_HEAD:
        raise SweepError(
            f"positions={list(positions)!r} is given, but a layer_head sweep patches every "
            "position at once; use sweep='layer_pos' or 'layer_pos_head' to sweep positions"
        )
    clean_run, corrupted_run, prompt, description = _resolve_inputs(model, clean, corrupted)
    n_pos = int(clean_run.tokens.shape[1])
    layer_ids = _check_indices(layers, site.n_layers(model), "layers")
    pos_ids = _check_indices(positions, n_pos, "positions")
    head_ids = _check_indices(heads, _n_heads(model, site), "heads") if site.has_heads else ()
    source = Source.CLEAN if direction is Direction.RESTORE else Source.CORRUPTED
    base = Source.CORRUPTED if direction is Direction.RESTORE else Source.CLEAN

    if sweep is Sweep.LAYER_POS:
        grid = [(layer, pos, None) for layer in layer_ids for pos in pos_ids]
        shape: tuple[int, ...] = (len(layer_ids), len(pos_ids))
    elif sweep is Sweep.LAYER_HEAD:
        grid = [(layer, None, head) for layer in layer_ids for head in head_ids]
        shape = (len(layer_ids), len(head_ids))
    else:
        grid = [(layer, pos, head) for layer in layer_ids for pos in pos_ids for head in head_ids]
        shape = (len(layer_ids), len(pos_ids), len(head_ids))
    configs = [(Patch(site, layer, pos, head, source),) for layer, pos, head in grid]
    outcome = execute(
        model,
        clean_run,
        corrupted_run,
        configs,
        metric,
        base=base,
        options=opts,
        desc=f"patching {site.name}",
    )
    str_tokens, spans = _labels(prompt)
    common: dict[str, Any] = {
        "values": outcome.values.reshape(shape),
        "layers": layer_ids,
        "positions": pos_ids if sweep is not Sweep.LAYER_HEAD else (),
        "heads": head_ids if sweep is not Sweep.LAYER_POS else (),
        "str_tokens": str_tokens,
        "spans": spans,
        "site": site.name,
        "direction": direction,
        "metric": metric_name(metric),
        "corruption": description,
        "clean_score": outcome.clean_score,
        "corrupted_score": outcome.corrupted_score,
    }
    if sweep is Sweep.LAYER_POS:
        return LayerPosResult(**common)
    if sweep is Sweep.LAYER_HEAD:
        return LayerHeadResult(**common)
    return LayerPosHeadResult(**common)


def default_window(n_layers: int) -> int:
    """The MLP/attention window of a causal trace on a model of ``n_layers`` layers.

    ROME restores windows of 10 of GPT-2 XL's 48 layers; scaled to the model, at least 2 (a
    window of 1 would be a single layer, not a window). The one place that computes it:
    :func:`causal_trace` and :func:`~kloc_lens.aggregate.trace_dataset` use it when no window
    is given.

    >>> default_window(48), default_window(28), default_window(12), default_window(6)
    (10, 6, 2, 2)

    Raises:
        SweepError: ``n_layers`` is not a positive integer.
    """
    layers = _positive(n_layers, "n_layers")
    return max(2, round(10 * layers / 48))


def _positive(value: object, what: str) -> int:
    """``value`` as an integer >= 1, or a :class:`SweepError` naming ``what``."""
    number = None if isinstance(value, bool) else _as_int(value)
    if number is None or number < 1:
        raise SweepError(f"{what} must be an integer >= 1, got {value!r}")
    return number


def _as_int(value: object) -> int | None:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The layers of a window of size ``window`` around ``layer``, clipped at the ends.

    ROME's convention: ``layer - window // 2`` up to ``layer + ceil(window / 2) - 1``.

    >>> window_layers(10, 10, 48)
    (5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
    >>> window_layers(1, 10, 12)
    (0, 1, 2, 3, 4, 5)
    """
    if window < 1:
        raise SweepError(f"window must be >= 1, got {window}")
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def frozen_layers(
    resid_site: str, layer: int, component: TraceKind, n_layers: int
) -> tuple[int, ...]:
    """Layers whose ``component`` outputs a severed trace freezes, after restoring
    ``resid_site`` at ``layer``: every layer whose output is not part of the restored state.

    >>> frozen_layers("resid_post", 2, TraceKind.MLP, 5)
    (3, 4)
    >>> frozen_layers("resid_pre", 2, TraceKind.MLP, 5)
    (2, 3, 4)
    """
    included_through = {
        ("resid_pre", TraceKind.MLP): layer - 1,
        ("resid_pre", TraceKind.ATTN): layer - 1,
        ("resid_mid", TraceKind.MLP): layer - 1,
        ("resid_mid", TraceKind.ATTN): layer,
        ("resid_post", TraceKind.MLP): layer,
        ("resid_post", TraceKind.ATTN): layer,
    }
    key = (resid_site, component)
    if key not in included_through:
        raise SweepError(
            f"severed tracing restores resid_pre, resid_mid or resid_post and freezes mlp or "
            f"attn; got {resid_site!r} and {component.value!r}"
        )
    return tuple(range(included_through[key] + 1, n_layers))


_COMPONENT_SITE = {TraceKind.MLP: "mlp_out", TraceKind.ATTN: "attn_out"}


def parse_kinds(
    values: Sequence[TraceKind | str],
    what: str,
    *,
    allowed: Sequence[TraceKind] = tuple(TraceKind),
    error: type[KlocLensError] = SweepError,
) -> list[TraceKind]:
    """Parse trace kinds (``kinds=``, ``sever=``), refusing unknown ones.

    >>> parse_kinds(["resid", TraceKind.MLP], "kinds")
    [<TraceKind.RESID: 'resid'>, <TraceKind.MLP: 'mlp'>]
    >>> parse_kinds(["resid"], "sever", allowed=(TraceKind.MLP, TraceKind.ATTN))
    Traceback (most recent call last):
    ...
    kloc_lens.errors.SweepError: sever must be one of 'mlp', 'attn', got 'resid'

    Raises:
        SweepError: (or ``error``) A value that is not one of ``allowed``; the message lists
            them.
    """
    if isinstance(values, (str, TraceKind)):
        values = [values]  # one kind given bare
    valid = ", ".join(repr(kind.value) for kind in allowed)
    out = []
    for value in values:
        try:
            kind = TraceKind(value)
        except ValueError:
            kind = None
        if kind is None or kind not in allowed:
            shown = value.value if isinstance(value, TraceKind) else value
            raise error(f"{what} must be one of {valid}, got {shown!r}")
        out.append(kind)
    return out


def _resolve_target(
    model: Any, prompt: TokenizedPrompt, target: str | int | None
) -> tuple[int, str]:
    if isinstance(target, int):
        return target, model.tokenizer.decode([target])
    text = prompt.prompt.target if target is None else target
    if not text:
        raise SpanError(f"no target for prompt {prompt.text!r}: pass target=")
    return target_token_ids(model, prompt.prompt, text)[0], text


def causal_trace(
    model: Any,
    prompt: PromptLike,
    *,
    target: str | int | None = None,
    corruption: Corruption | None = None,
    kinds: Sequence[TraceKind | str] = (TraceKind.RESID, TraceKind.MLP, TraceKind.ATTN),
    sever: Sequence[TraceKind | str] = (),
    window: int | None = None,
    resid_site: str = "resid_post",
    layers: Indices | None = None,
    positions: Indices | None = None,
    metric: Callable[[Tensor], Any] | None = None,
    options: ExecutionOptions | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    precision: Precision | str | None = None,
    progress: bool | None = None,
) -> TraceSet:
    """ROME-protocol causal tracing of one prompt.

    Args:
        model: A hooked model in eval mode.
        prompt: The prompt (a :class:`Fact` uses its entity prompt).
        target: The answer whose probability is traced (string or token id); defaults to the
            prompt's target. A multi-token string is scored by its first token, as in ROME.
        corruption: Default: :class:`GaussianNoise` on the subject, 10 samples, seed 0.
        kinds: Which traces to compute: ``resid``, ``mlp``, ``attn``.
        sever: Components (``mlp``, ``attn``) for which a severed residual trace is added.
        window: Window size of MLP and attention restores; default :func:`default_window` of
            the model's layers (ROME: 10 of GPT-2 XL's 48).
        resid_site: The residual state restored by ``resid`` traces (ROME: the block output).
        layers: Layers to trace (default all).
        positions: Positions to trace (default all).
        metric: Overrides the score (default: mean p(target) at the last position).
        options: How the sweep executes (:class:`~kloc_lens.engine.ExecutionOptions`: batch
            size, memory budget, precision, progress bar); default ``ExecutionOptions()``.
        batch_size: Shorthand: overrides ``options.batch_size`` (configurations per forward
            pass; default: from the memory budget).
        memory_budget: Shorthand: overrides ``options.memory_budget`` (bytes of activations a
            forward pass may use).
        precision: Shorthand: overrides ``options.precision`` (``fp32``, the default and the
            reference; ``tf32``, ``bf16``, ``fp16`` on request).
        progress: Shorthand: overrides ``options.progress`` (show a progress bar).

    Returns:
        A :class:`TraceSet` with one :class:`TraceResult` per kind and severed component.

    Raises:
        SweepError: An unknown kind or severed component (the message lists the valid values),
            a window below 1, layers/positions that are not integers in range, or bad execution
            options.
        SiteError: An unknown ``resid_site``.
        MetricError: The metric does not return one finite number.
        HookNotFiredError: A restored or frozen hook point never ran during a forward pass.
    """
    opts = resolve_options(
        options,
        batch_size=batch_size,
        memory_budget=memory_budget,
        precision=precision,
        progress=progress,
    )
    kind_list = parse_kinds(kinds, "kinds")
    sever_list = parse_kinds(sever, "sever", allowed=tuple(_COMPONENT_SITE))
    n_layers = int(model.cfg.n_layers)
    window = default_window(n_layers) if window is None else _positive(window, "window")
    resid = get_site(resid_site)
    tokenized = _as_tokenized(model, prompt)
    corruption = corruption if corruption is not None else GaussianNoise()
    made = corruption.apply(model, tokenized)
    target_id, target_text = _resolve_target(model, tokenized, target)
    if metric is None:
        metric = TargetProb(target=target_id, positions=len(tokenized) - 1)
    layer_ids = _check_indices(layers, n_layers, "layers")
    pos_ids = _check_indices(positions, len(tokenized), "positions")

    plans: list[tuple[TraceKind, TraceKind | None, int]] = []
    plans += [(kind, None, window if kind is not TraceKind.RESID else 1) for kind in kind_list]
    plans += [(TraceKind.RESID, component, 1) for component in sever_list]
    configs: list[tuple[Patch, ...]] = []
    for kind, severed, size in plans:
        for layer in layer_ids:
            for pos in pos_ids:
                if kind is TraceKind.RESID:
                    patches = [Patch(resid, layer, pos, None, Source.CLEAN)]
                    if severed is not None:
                        frozen = get_site(_COMPONENT_SITE[severed])
                        patches += [
                            Patch(frozen, other, pos, None, Source.CORRUPTED)
                            for other in frozen_layers(resid.name, layer, severed, n_layers)
                        ]
                else:
                    component = get_site(_COMPONENT_SITE[kind])
                    patches = [
                        Patch(component, other, pos, None, Source.CLEAN)
                        for other in window_layers(layer, size, n_layers)
                    ]
                configs.append(tuple(patches))
    outcome = execute(
        model,
        Run(tokenized.tokens[None]),
        Run(made.tokens, made.embed_edit),
        configs,
        metric,
        base=Source.CORRUPTED,
        options=opts,
        desc="causal trace",
    )
    str_tokens, spans = _labels(tokenized)
    per_plan = len(layer_ids) * len(pos_ids)
    traces = []
    for index, (kind, severed, size) in enumerate(plans):
        values = outcome.values[index * per_plan : (index + 1) * per_plan]
        traces.append(
            TraceResult(
                values=values.reshape(len(layer_ids), len(pos_ids)),
                layers=layer_ids,
                positions=pos_ids,
                heads=(),
                str_tokens=str_tokens,
                spans=spans,
                site=resid.name if kind is TraceKind.RESID else _COMPONENT_SITE[kind],
                direction=Direction.RESTORE,
                metric=metric_name(metric),
                corruption=made.description,
                clean_score=outcome.clean_score,
                corrupted_score=outcome.corrupted_score,
                kind=kind,
                window=size,
                severed=severed,
                target=target_text,
            )
        )
    return TraceSet(tuple(traces))
