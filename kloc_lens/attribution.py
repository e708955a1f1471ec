"""Attribution patching: gradient estimates of activation-patching sweeps (AtP and AtP*).

Exact activation patching (:func:`kloc_lens.activation_patching`) runs one patched forward pass per
component: a layer x position x head sweep of a 7B model is out of reach. **Attribution patching**
(AtP; Nanda 2022) replaces each patched run by the first-order Taylor expansion of the metric
around the run being patched into::

    M(base | do(a <- a_source))  ~  M(base) + (a_source - a_base) . dM/da |base

The ``restore`` direction patches clean activations into the corrupted run (base = corrupted,
source = clean); ``inject`` patches corrupted activations into the clean run (base = clean,
source = corrupted; Kramar et al.'s convention, "noising"). One forward pass of each run and one
backward pass of the base run give the gradient at every hook point at once, so every component
of a sweep costs the same as one: the products are summed over the entries each component covers
(the ``d_model`` vector at one position, a head's ``d_head`` vector at every position, a row of
an attention pattern, ...) and over the rows of the batch, exactly the entries
:func:`~kloc_lens.activation_patching` would overwrite. :func:`attribution_patching` takes the same
inputs, sites (custom ones included), sweeps and directions, and returns the same result classes
with the same labels, ``values`` holding the *estimated* metric after each patch; plots,
DataFrames and ``save`` work unchanged. Where the metric is an affine function of the patched
activation, the estimate is exact.

**AtP*** (Kramar, Lieberum, Shah, Nanda 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components") fixes the two ways AtP produces false negatives:

1. *Attention saturation* (queries and keys). A query or key acts only through the softmax of the
   attention scores; where the softmax is saturated its gradient is nearly zero, so AtP misses a
   patch that moves the attention elsewhere entirely. The **QK fix** computes the patched
   attention pattern exactly (the patched query against the base run's keys, or the base run's
   queries against the patched key: one softmax per head and position) and linearises only after
   the softmax: ``(A_patched - A_base) . dM/dA``. Sites ``q`` and ``k`` get it; ``pattern`` needs
   no fix (AtP is already linear in the pattern, downstream of the softmax), and every other site
   is unchanged.
2. *Cancellation* between a component's direct and indirect effects (its output read directly by
   the unembedding, and read again by a later layer that writes the opposite): the two first-order
   terms can sum to about zero although each path alone matters. **GradDrop** repeats the backward
   pass once per layer ``l`` with the gradient through layer ``l``'s output (its attention and MLP
   outputs, where they join the residual stream) set to zero, giving ``L`` estimates
   ``AtP_l(n)``, and combines their absolute values::

       AtP*_GD(n) = 1 / (L - 1) * sum_{l = 0}^{L - 1} |AtP_l(n)|

   (the paper's definition; the term of a component's own layer is zero for attention and MLP
   components, hence ``L - 1``). A path whose gradient is dropped no longer cancels the others.

AtP* is both fixes together. GradDrop's estimate is a size, not a signed effect: with
``method="atp*"`` the results' ``effect`` is that non-negative size (``values`` are the base score
moved by it, ``corrupted_score + size`` when restoring and ``clean_score - size`` when
injecting), meant for ranking components. The absolute values are taken per call, on the metric of
the whole batch (the paper averages them over prompt pairs: call once per pair for that).

===============  ================================================  ===========================
method           estimate                                          backward passes
===============  ================================================  ===========================
``atp``          AtP, signed                                       1
``atp_qk``       AtP with the QK fix, signed                       1
``atp*``         AtP with the QK fix and GradDrop, unsigned size   ``n_layers``
===============  ================================================  ===========================

:func:`kloc_lens.screen.screen_then_patch` is the workflow the paper recommends: screen every
component with AtP*, then confirm the top-k with exact patching.

Example (the planted model, whose fact lives in the MLP of layer 1 at the subject's last token):
    >>> import kloc_lens as kl
    >>> from kloc_lens.planted import planted_model
    >>> model, planted = planted_model()
    >>> fact = kl.Fact(planted.subjects[0], "home", planted.objects[0],
    ...     entity_template=planted.template)
    >>> prompt = kl.tokenize(model, fact.entity_prompt())
    >>> answer = kl.target_token_ids(model, prompt.prompt)[0]
    >>> other = kl.target_token_ids(model, prompt.prompt, planted.objects[2])[0]
    >>> swap = kl.TokenReplacement(planted.subjects[2])
    >>> estimate = attribution_patching(model, prompt, swap, kl.LogitDiff(answer, other),
    ...     site="mlp_out")
    >>> estimate.values.shape == (model.cfg.n_layers, len(prompt))
    True
    >>> layer, pos = divmod(int(estimate.effect.abs().argmax()), len(prompt))
    >>> layer == planted.mlp_layer, pos == prompt.span("subject").last
    (True, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.corrupt import Corruption
from kloc_lens.errors import HookNotFiredError, KlocLensError, SiteError, SweepError, choice
from kloc_lens.metrics import check_metric_value, metric_name
from kloc_lens.model import check_model, device_of
from kloc_lens.results import LayerHeadResult, LayerPosHeadResult, LayerPosResult, PatchResult
from kloc_lens.sites import Site, get_site
from kloc_lens.trace import (
    PromptLike,
    Sweep,
    _check_indices,
    _labels,
    _n_heads,
    _resolve_inputs,
)
from kloc_lens.types import Direction, Indices

__all__ = [
    "AttributionError",
    "AttributionMethod",
    "attribution_patching",
]


class AttributionError(KlocLensError):
    """An attribution request that cannot be computed: an unknown method, a metric without a
    gradient, a model whose attention the QK fix cannot reproduce, ..."""


class AttributionMethod(str, Enum):
    """How :func:`attribution_patching` estimates each patch."""

    ATP = "atp"
    """Attribution patching: ``(a_source - a_base) . dM/da`` from one backward pass (signed)."""
    ATP_QK = "atp_qk"
    """AtP with the QK fix: for ``q`` and ``k`` sites the attention pattern is recomputed exactly
    with the patched query or key and only the pattern is linearised (signed)."""
    ATP_STAR = "atp*"
    """AtP*: the QK fix plus GradDrop (one backward pass per layer, each with that layer's
    gradient dropped, combined as ``sum |.| / (L - 1)``); an unsigned size for ranking."""


@dataclass(frozen=True)
class _Request:
    """A parsed attribution request (what activation_patching would sweep)."""

    site: Site
    sweep: Sweep
    direction: Direction
    method: AttributionMethod
    base_tokens: Tensor
    base_edit: Callable[[Tensor], Tensor] | None
    source_tokens: Tensor
    source_edit: Callable[[Tensor], Tensor] | None
    rows: int
    layer_ids: tuple[int, ...]
    pos_ids: tuple[int, ...]
    head_ids: tuple[int, ...]
    str_tokens: tuple[str, ...]
    spans: dict[str, tuple[int, int]]
    description: str


def _parse(
    model: Any,
    clean: Tensor | PromptLike,
    corrupted: Tensor | PromptLike | Corruption,
    site: str | Site,
    sweep: Sweep | str,
    direction: Direction | str,
    layers: Indices | None,
    positions: Indices | None,
    heads: Indices | None,
    method: AttributionMethod | str,
) -> _Request:
    site = get_site(site)
    sweep_kind = choice(Sweep, sweep, "sweep", SweepError)
    flow = choice(Direction, direction, "direction", SweepError)
    how = choice(AttributionMethod, method, "method", AttributionError)
    if sweep_kind is not Sweep.LAYER_POS and not site.has_heads:
        raise SiteError(
            f"site {site.name!r} has no head axis; a {sweep_kind.value} sweep needs one"
        )
    if heads is not None and sweep_kind is Sweep.LAYER_POS:
        raise SweepError(
            f"heads={list(heads)!r} is given, but a layer_pos sweep patches every head at once; "
            "use sweep='layer_head' or 'layer_pos_head' to sweep heads"
        )
    if positions is not None and sweep_kind is Sweep.LAYER_HEAD:
        raise SweepError(
            f"positions={list(positions)!r} is given, but a layer_head sweep patches every "
            "position at once; use sweep='layer_pos' or 'layer_pos_head' to sweep positions"
        )
    clean_run, corrupted_run, prompt, description = _resolve_inputs(model, clean, corrupted)
    n_clean, n_corrupted = int(clean_run.tokens.shape[0]), int(corrupted_run.tokens.shape[0])
    rows = max(n_clean, n_corrupted)
    if n_clean not in (1, rows) or n_corrupted not in (1, rows):
        raise SweepError(
            f"clean input has {n_clean} rows and corrupted {n_corrupted}; each must be 1 or the "
            "other"
        )
    n_pos = int(clean_run.tokens.shape[1])
    layer_ids = _check_indices(layers, site.n_layers(model), "layers")
    pos_ids = _check_indices(positions, n_pos, "positions")
    head_ids = _check_indices(heads, _n_heads(model, site), "heads") if site.has_heads else ()
    if how is AttributionMethod.ATP_STAR and int(model.cfg.n_layers) < 2:
        raise AttributionError(
            "method 'atp*' needs a model of at least 2 layers (GradDrop divides by n_layers - 1); "
            "use 'atp_qk' on a 1-layer model"
        )
    base, source = (
        (corrupted_run, clean_run) if flow is Direction.RESTORE else (clean_run, corrupted_run)
    )
    str_tokens, spans = _labels(prompt)
    return _Request(
        site=site,
        sweep=sweep_kind,
        direction=flow,
        method=how,
        base_tokens=base.tokens,
        base_edit=base.embed_edit,
        source_tokens=source.tokens,
        source_edit=source.embed_edit,
        rows=rows,
        layer_ids=layer_ids,
        pos_ids=pos_ids,
        head_ids=head_ids,
        str_tokens=str_tokens,
        spans=spans,
        description=description,
    )


# ---- the two runs ------------------------------------------------------------------------------


def _embed_hooks(edit: Callable[[Tensor], Tensor] | None) -> list[tuple[str, Any]]:
    if edit is None:
        return []

    def embed_hook(activation: Tensor, hook: Any) -> Tensor:
        return edit(activation)

    return [("hook_embed", embed_hook)]


def _score(model: Any, metric: Callable[[Tensor], Any], logits: Tensor, rows: int) -> Any:
    logits = logits.expand(rows, *logits.shape[1:]) if logits.shape[0] == 1 else logits
    return metric(logits)


def _source_run(
    model: Any, request: _Request, hooks: set[str], metric: Callable[[Tensor], Any]
) -> tuple[dict[str, Tensor], float]:
    """Run the source input once (no gradient), keeping the activations of ``hooks``."""
    store: dict[str, Tensor] = {}

    def saver(name: str) -> Callable[[Tensor, Any], None]:
        def save(activation: Tensor, hook: Any) -> None:
            store[name] = activation.detach()

        return save

    fwd = _embed_hooks(request.source_edit) + [(name, saver(name)) for name in sorted(hooks)]
    with torch.no_grad():
        logits = model.run_with_hooks(request.source_tokens.to(device_of(model)), fwd_hooks=fwd)
        score = float(check_metric_value(_score(model, metric, logits, request.rows), metric))
    missing = sorted(hooks - set(store))
    if missing:
        raise HookNotFiredError(
            f"hook point(s) {missing[:3]} never ran in the forward pass of the source input"
        )
    return store, score


class _Gates:
    """GradDrop's switch: which layer's output gradient the current backward pass drops."""

    def __init__(self) -> None:
        self.drop: int | None = None


class _GradGate(torch.autograd.Function):
    """Identity forward; zero gradient backward when ``gates.drop`` is this layer."""

    @staticmethod
    def forward(ctx: Any, activation: Tensor, gates: _Gates, layer: int) -> Tensor:
        ctx.gates = gates
        ctx.layer = layer
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        gates: _Gates = ctx.gates
        if gates.drop == ctx.layer:
            return torch.zeros_like(grad), None, None
        return grad, None, None


@dataclass
class _BaseRun:
    """The differentiable run of the base input."""

    value: Tensor
    score: float
    probes: dict[str, Tensor]
    acts: dict[str, Tensor]
    discarded: bool  # the model warned that it discarded what a hook returned


def _base_run(
    model: Any,
    request: _Request,
    metric: Callable[[Tensor], Any],
    probed: set[str],
    captured: set[str],
    gates: _Gates | None,
) -> _BaseRun:
    """Run the base input with a zero probe added at every ``probed`` hook (its gradient is the
    gradient there), keeping the activations of ``probed`` and ``captured`` hooks."""
    probes: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def probe_hook(name: str) -> Callable[[Tensor, Any], Tensor]:
        def hook_fn(activation: Tensor, hook: Any) -> Tensor:
            acts[name] = activation.detach()
            probe = torch.zeros_like(activation, requires_grad=True)
            probes[name] = probe
            return activation + probe

        return hook_fn

    def capture_hook(name: str) -> Callable[[Tensor, Any], None]:
        def hook_fn(activation: Tensor, hook: Any) -> None:
            acts[name] = activation.detach()

        return hook_fn

    def gate_hook(layer: int, gates: _Gates) -> Callable[[Tensor, Any], Tensor]:
        def hook_fn(activation: Tensor, hook: Any) -> Tensor:
            return _GradGate.apply(activation, gates, layer)  # type: ignore[no-any-return]

        return hook_fn

    fwd = _embed_hooks(request.base_edit)
    fwd += [(name, probe_hook(name)) for name in sorted(probed)]
    fwd += [(name, capture_hook(name)) for name in sorted(captured - probed)]
    if gates is not None:
        for layer in range(int(model.cfg.n_layers)):
            for name in (f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"):
                fwd.append((name, gate_hook(layer, gates)))
    tokens = request.base_tokens.to(device_of(model)).expand(request.rows, -1)
    with torch.enable_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
        value = _score(model, metric, logits, request.rows)
        score = float(check_metric_value(value, metric))
    discarded = False
    for item in caught:
        if "discarded" in str(item.message):
            discarded = True
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if not value.requires_grad:
        raise AttributionError(
            f"metric {metric_name(metric)!r} has no gradient with respect to the logits "
            "(attribution patching differentiates it); use a differentiable metric such as "
            "kl.LogitDiff or kl.TargetProb"
        )
    missing = sorted((probed | captured) - set(acts))
    if missing:
        raise HookNotFiredError(
            f"hook point(s) {missing[:3]} never ran in the forward pass of the base input"
        )
    return _BaseRun(value=value, score=score, probes=probes, acts=acts, discarded=discarded)


# ---- estimates ---------------------------------------------------------------------------------


def _reduce(
    contribution: Float[Tensor, "..."],
    pos_dim: int,
    head_dim: int | None,
    request: _Request,
) -> Float[Tensor, "..."]:
    """Sum an activation-shaped contribution (no batch axis) over everything a component of the
    sweep covers, leaving ``[pos]``, ``[head]`` or ``[pos, head]`` at the swept indices."""
    if request.sweep is Sweep.LAYER_POS:
        keep = [pos_dim]
    elif request.sweep is Sweep.LAYER_HEAD:
        keep = [head_dim]
    else:
        keep = [pos_dim, head_dim]
    dims = [d for d in keep if d is not None]
    moved = contribution.movedim(dims, list(range(len(dims))))
    reduced = moved.reshape(*moved.shape[: len(dims)], -1).sum(-1)
    if request.sweep is Sweep.LAYER_POS:
        return reduced[list(request.pos_ids)]
    if request.sweep is Sweep.LAYER_HEAD:
        return reduced[list(request.head_ids)]
    return reduced[list(request.pos_ids)][:, list(request.head_ids)]


def _attention_scale(model: Any, layer: int) -> float:
    cfg = model.cfg
    if not getattr(cfg, "use_attn_scale", True):
        scale = 1.0
    else:
        given = getattr(cfg, "attn_scale", None)
        scale = float(given) if given is not None and given > 0 else math.sqrt(int(cfg.d_head))
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale *= layer + 1
    return scale


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Causally masked attention scores ``[row, head, query, key]`` from ``q [row, pos, head,
    d_head]`` and ``k [row, pos, kv_head, d_head]`` (grouped keys are shared by their heads)."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
    scores = torch.einsum("rthd,ruhd->rhtu", q, k) / scale
    n_pos = q.shape[1]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def _check_pattern(scores: Tensor, pattern: Tensor, layer: int) -> None:
    recomputed = torch.softmax(scores, dim=-1)
    gap = float((recomputed - pattern).abs().max())
    if gap > 1e-4:
        raise AttributionError(
            f"the QK fix cannot reproduce the attention pattern of layer {layer} from hook_q and "
            f"hook_k (max difference {gap:.2g}; rotary embeddings, soft-capping or ALiBi are not "
            "covered); use method='atp' on this model"
        )


def _qk_fix(
    kind: str,
    q_base: Tensor,
    k_base: Tensor,
    source: Tensor,
    pattern: Tensor,
    grad: Tensor,
    scale: float,
    request: _Request,
) -> Tensor:
    """The QK-fixed estimates of one layer: ``(A_patched - A) . dM/dA`` for each component."""
    group = q_base.shape[2] // k_base.shape[2]
    if kind == "q":
        # Each query row of the pattern depends on its own query only: one recomputation covers
        # every (position, head) component, and sums of them are patches of several queries.
        patched = torch.softmax(_scores(source.expand_as(q_base), k_base, scale), dim=-1)
        per_query = ((patched - pattern) * grad).sum(dim=(0, 3))  # [head, pos]
        return _reduce(per_query.T[..., None], 0, 1, request)
    if request.sweep is Sweep.LAYER_HEAD:
        # every key of a head patched at once
        patched = torch.softmax(_scores(q_base, source.expand_as(k_base), scale), dim=-1)
        per_head = ((patched - pattern) * grad).sum(dim=(0, 2, 3))  # [head]
        per_kv = per_head.reshape(-1, group).sum(-1)
        return per_kv[list(request.head_ids)]
    # one key position at a time: replace column s of every query row, softmax again
    base = _scores(q_base, k_base, scale)  # [row, head, query, key]
    crossed = _scores(q_base, source.expand_as(k_base), scale)
    rows, n_heads, n_pos, _ = base.shape
    per_key = torch.zeros(n_heads, n_pos, dtype=base.dtype, device=base.device)
    chunk = max(1, (1 << 24) // max(1, rows * n_heads * n_pos * n_pos))
    for start in range(0, n_pos, chunk):
        keys = torch.arange(start, min(n_pos, start + chunk), device=base.device)
        column = torch.nn.functional.one_hot(keys, n_pos).bool()  # [s, key]
        trial = torch.where(
            column[None, None, :, None, :],
            crossed[:, :, None, :, :],
            base[:, :, None, :, :],
        )  # [row, head, s, query, key]
        patched = torch.softmax(trial, dim=-1)
        change = (patched - pattern[:, :, None]) * grad[:, :, None]
        per_key[:, keys] = change.sum(dim=(0, 3, 4))
    per_kv = per_key.reshape(-1, group, n_pos).sum(1)  # [kv_head, pos]
    return _reduce(per_kv.T[..., None], 0, 1, request)


_QK_SITES = {"blocks.{layer}.attn.hook_q": "q", "blocks.{layer}.attn.hook_k": "k"}
"""Hook templates whose patches act only through the attention softmax (the QK fix applies)."""


def _attribute(
    model: Any, request: _Request, metric: Callable[[Tensor], Any]
) -> tuple[Tensor, float, float]:
    """Estimated change of the metric for every component of the sweep (GradDrop: its size),
    and the unpatched clean and corrupted scores."""
    site = request.site
    method = request.method
    n_layers = int(model.cfg.n_layers)
    qk_kind = None
    if method is not AttributionMethod.ATP:
        qk_kind = _QK_SITES.get(site.hook)
    site_hooks = {layer: site.hook_name(layer) for layer in request.layer_ids}
    pattern_hooks = {layer: f"blocks.{layer}.attn.hook_pattern" for layer in request.layer_ids}
    q_hooks = {layer: f"blocks.{layer}.attn.hook_q" for layer in request.layer_ids}
    k_hooks = {layer: f"blocks.{layer}.attn.hook_k" for layer in request.layer_ids}
    graddrop = method is AttributionMethod.ATP_STAR
    needed = set(site_hooks.values())
    if qk_kind is not None:
        needed |= set(pattern_hooks.values()) | set(q_hooks.values()) | set(k_hooks.values())
    if graddrop:
        needed |= {f"blocks.{layer}.hook_{part}_out" for layer in range(n_layers)
                   for part in ("attn", "mlp")}  # fmt: skip
    if request.base_edit is not None or request.source_edit is not None:
        needed.add("hook_embed")
    check_model(model, needed)

    source, source_score = _source_run(model, request, set(site_hooks.values()), metric)
    if qk_kind is None:
        probed, captured = set(site_hooks.values()), set()
    else:
        probed = set(pattern_hooks.values())
        captured = set(q_hooks.values()) | set(k_hooks.values())
    gates = _Gates() if graddrop else None
    base = _base_run(model, request, metric, probed, captured, gates)
    if qk_kind is not None:
        for layer in request.layer_ids:
            scale = _attention_scale(model, layer)
            scores = _scores(base.acts[q_hooks[layer]], base.acts[k_hooks[layer]], scale)
            _check_pattern(scores, base.acts[pattern_hooks[layer]], layer)

    names = sorted(probed)
    # GradDrop: dropping a layer upstream of every swept activation changes no gradient there,
    # so the layers before the first swept one share one plain backward pass
    first = min(request.layer_ids) if site.per_layer else 0
    drops: list[int | None] = [None] if not graddrop or first > 0 else []
    if graddrop:
        drops += list(range(first, n_layers))
    estimates = []
    for index, drop in enumerate(drops):
        if gates is not None:
            gates.drop = drop
        grads = torch.autograd.grad(
            base.value,
            [base.probes[name] for name in names],
            retain_graph=index < len(drops) - 1,
            allow_unused=True,
        )
        unused = [name for name, g in zip(names, grads, strict=True) if g is None]
        if unused and base.discarded:
            raise SiteError(
                f"site {site.name!r} cannot be attributed on this model: its hook {unused[0]!r} "
                "fires after the computation and the model discards what the hook returns (a "
                "TransformerLens bridge delegating to the wrapped module); use a "
                "HookedTransformer or another site"
            )
        # a hook whose output nothing reads (another hook replaced what it feeds) has gradient 0
        gradient = {
            name: torch.zeros_like(base.probes[name]) if g is None else g
            for name, g in zip(names, grads, strict=True)
        }
        per_layer = []
        for layer in request.layer_ids:
            if qk_kind is None:
                hook = site_hooks[layer]
                delta = source[hook].to(base.acts[hook].dtype) - base.acts[hook]
                contribution = (delta * gradient[hook]).sum(0)
                per_layer.append(_reduce(contribution, site.pos_dim, site.head_dim, request))
            else:
                patched = source[site_hooks[layer]].to(base.acts[q_hooks[layer]].dtype)
                per_layer.append(
                    _qk_fix(
                        qk_kind,
                        base.acts[q_hooks[layer]],
                        base.acts[k_hooks[layer]],
                        patched,
                        base.acts[pattern_hooks[layer]],
                        gradient[pattern_hooks[layer]],  # type: ignore[arg-type]
                        _attention_scale(model, layer),
                        request,
                    )
                )
        estimates.append(torch.stack(per_layer))
    if graddrop:
        sizes = torch.stack(estimates).abs()
        if first > 0:  # the plain pass stands for the `first` layers before the swept ones
            sizes[0] *= first
        estimate = sizes.sum(0) / (n_layers - 1)
    else:
        estimate = estimates[0]
    if request.direction is Direction.INJECT:
        return estimate.detach(), base.score, source_score
    return estimate.detach(), source_score, base.score


def _result(
    request: _Request,
    estimate: Tensor,
    clean_score: float,
    corrupted_score: float,
    metric: Callable[[Tensor], Any],
) -> PatchResult:
    dtype = torch.promote_types(estimate.dtype, torch.float32)
    estimate = estimate.to(dtype)
    if request.method is AttributionMethod.ATP_STAR:
        # an unsigned size: `effect` equals it in either direction
        sign = 1.0 if request.direction is Direction.RESTORE else -1.0
        values = (corrupted_score if sign > 0 else clean_score) + sign * estimate
    else:
        base_score = corrupted_score if request.direction is Direction.RESTORE else clean_score
        values = base_score + estimate
    if not bool(torch.isfinite(values).all()):
        raise AttributionError(
            "the estimate is not finite (the metric's gradient overflowed); check the metric"
        )
    common: dict[str, Any] = {
        "values": values,
        "layers": request.layer_ids,
        "positions": request.pos_ids if request.sweep is not Sweep.LAYER_HEAD else (),
        "heads": request.head_ids if request.sweep is not Sweep.LAYER_POS else (),
        "str_tokens": request.str_tokens,
        "spans": request.spans,
        "site": request.site.name,
        "direction": request.direction,
        "metric": metric_name(metric),
        "corruption": request.description,
        "clean_score": clean_score,
        "corrupted_score": corrupted_score,
    }
    if request.sweep is Sweep.LAYER_POS:
        return LayerPosResult(**common)
    if request.sweep is Sweep.LAYER_HEAD:
        return LayerHeadResult(**common)
    return LayerPosHeadResult(**common)


# ---- public API --------------------------------------------------------------------------------


def attribution_patching(
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
    method: AttributionMethod | str = AttributionMethod.ATP,
) -> PatchResult:
    """Estimate a whole activation-patching sweep from gradients.

    The same request as :func:`kloc_lens.activation_patching` (inputs, site, sweep, direction,
    layers, positions, heads) and the same result, with ``values`` estimated from one forward
    pass of each input and one backward pass (``n_layers`` backward passes for ``atp*``),
    whatever the number of components.

    Args:
        model: A hooked model in eval mode.
        clean: Clean token ids ``[batch, pos]``, or a prompt (string, :class:`~kloc_lens.Prompt`,
            :class:`~kloc_lens.TokenizedPrompt`, :class:`~kloc_lens.Fact` for its entity prompt).
        corrupted: Corrupted token ids of the same shape, another prompt of the same token
            length, or a :class:`~kloc_lens.Corruption` applied to the clean prompt.
        metric: ``logits[batch, pos, vocab] -> 0-d tensor``, differentiable in the logits.
        site: Site name or object (see :mod:`kloc_lens.sites`), custom sites included.
        sweep: ``layer_pos``, ``layer_head`` or ``layer_pos_head``.
        direction: ``restore`` (clean into corrupted) or ``inject`` (corrupted into clean).
        layers: Layers to sweep (default all).
        positions: Positions to sweep (default all).
        heads: Heads to sweep (default all).
        method: ``atp``, ``atp_qk`` or ``atp*`` (see :class:`AttributionMethod`).

    Returns:
        :class:`~kloc_lens.LayerPosResult`, :class:`~kloc_lens.LayerHeadResult` or
        :class:`~kloc_lens.LayerPosHeadResult`, labelled as ``activation_patching`` labels them;
        ``values`` are the estimated metric after each patch (``atp*``: the base score moved by
        the estimated size, so that ``effect`` is that size).

    Raises:
        AttributionError: Unknown method, a metric without a gradient, ``atp*`` on a one-layer
            model, or attention the QK fix cannot reproduce.
        SiteError: Unknown site, a head sweep on a site without heads, or a hook whose output
            the model discards.
        SweepError: Unknown sweep or direction, inputs of different lengths,
            layers/positions/heads out of range, heads on a layer_pos sweep or positions on a
            layer_head sweep.
        MetricError: The metric does not return one finite number.
        ModelError: The model is in train mode or lacks the site's hook points.
        HookNotFiredError: A hook point of the site never ran in the forward pass.

    Example:
        >>> import kloc_lens as kl
        >>> from kloc_lens.planted import planted_model
        >>> model, planted = planted_model()
        >>> prompt = kl.tokenize(model, kl.Prompt.from_text(planted.prompt(0), planted.objects[0],
        ...     subject=planted.subjects[0]))
        >>> metric = kl.TargetProb(kl.target_token_ids(model, prompt.prompt)[0])
        >>> heads = attribution_patching(model, prompt, kl.TokenReplacement(planted.subjects[2]),
        ...     metric, site="z", sweep="layer_head", method="atp*")
        >>> heads.values.shape == (model.cfg.n_layers, model.cfg.n_heads)
        True
    """
    request = _parse(model, clean, corrupted, site, sweep, direction, layers, positions, heads,
                     method)  # fmt: skip
    estimate, clean_score, corrupted_score = _attribute(model, request, metric)
    return _result(request, estimate, clean_score, corrupted_score, metric)
