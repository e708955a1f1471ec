"""Slow reference loops: one forward pass per patch configuration, written independently of the
executor (TransformerLens's own cache, explicit index assignment). They are the test oracle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

# One patch: (hook name, position or None for all, head index or None for all, source name,
# position axis after batch, head axis after batch or None).
RefPatch = tuple[str, "int | None", "int | None", str, int, "int | None"]


def _index(act_dims: int, pos_dim: int, head_dim: int | None, pos: int | None, head: int | None):
    index: list[Any] = [slice(None)] * (act_dims)
    if pos is not None:
        index[1 + pos_dim] = pos
    if head is not None and head_dim is not None:
        index[1 + head_dim] = head
    return tuple(index)


def run_cached(model: Any, tokens: Tensor, embed_edit: Callable | None) -> dict[str, Tensor]:
    hooks = [] if embed_edit is None else [("hook_embed", lambda act, hook: embed_edit(act))]
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens)
    return {name: cache[name] for name in cache.keys()}  # noqa: SIM118 (ActivationCache)


def reference_sweep(
    model: Any,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    configs: Sequence[Sequence[RefPatch]],
    metric: Callable[[Tensor], Tensor],
    *,
    base: str,
    corrupted_embed_edit: Callable | None = None,
) -> Tensor:
    """Metric after each configuration, one forward pass each."""
    rows = max(clean_tokens.shape[0], corrupted_tokens.shape[0])
    caches = {
        "clean": run_cached(model, clean_tokens, None),
        "corrupted": run_cached(model, corrupted_tokens, corrupted_embed_edit),
    }
    base_tokens = (clean_tokens if base == "clean" else corrupted_tokens).expand(rows, -1)
    base_edit = corrupted_embed_edit if base == "corrupted" else None
    values = []
    for config in configs:
        hooks: list[tuple[str, Callable]] = []
        if base_edit is not None:
            hooks.append(("hook_embed", lambda act, hook: base_edit(act)))
        for name, pos, head, source, pos_dim, head_dim in config:

            def patch(
                act,
                hook,
                name=name,
                pos=pos,
                head=head,
                source=source,
                pos_dim=pos_dim,
                head_dim=head_dim,
            ):
                out = act.clone()
                src = caches[source][name].expand_as(out)
                index = _index(out.dim(), pos_dim, head_dim, pos, head)
                out[index] = src[index]
                return out

            hooks.append((name, patch))
        with torch.no_grad():
            logits = model.run_with_hooks(base_tokens, fwd_hooks=hooks)
        values.append(metric(logits).detach().float().reshape(()))
    return torch.stack(values)


def rome_trace_loop(
    model: Any,
    clean_tokens: Tensor,
    noisy_tokens: Tensor,
    embed_edit: Callable,
    target: int,
    kind: str,
    window: int,
    *,
    sever: str | None = None,
) -> Tensor:
    """ROME's own procedure: for every (layer, token) one forward of [clean row + noisy rows]
    with the restore hooks; score = mean p(target) at the last position over the noisy rows.

    Restores happen inside the batch (noisy rows take row 0's activation), as in ROME's
    ``trace_with_patch``; severed traces take frozen values from a first, unpatched pass."""
    n_layers = model.cfg.n_layers
    n_pos = clean_tokens.shape[1]
    rows = noisy_tokens.shape[0]
    tokens = torch.cat([clean_tokens, noisy_tokens])

    def noise(act, hook):
        out = act.clone()
        out[1:] = embed_edit(act[1:])
        return out

    with model.hooks(fwd_hooks=[("hook_embed", noise)]):
        _, corrupted_cache = model.run_with_cache(tokens)
    result = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        for pos in range(n_pos):
            if kind == "resid":
                restore = [f"blocks.{layer}.hook_resid_post"]
            else:
                site = "hook_mlp_out" if kind == "mlp" else "hook_attn_out"
                lo, hi = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
                restore = [f"blocks.{other}.{site}" for other in range(lo, hi)]
            freeze = []
            if sever is not None:
                site = "hook_mlp_out" if sever == "mlp" else "hook_attn_out"
                freeze = [f"blocks.{other}.{site}" for other in range(layer + 1, n_layers)]

            def restore_hook(act, hook, pos=pos):
                out = act.clone()
                out[1:, pos] = act[0, pos]
                return out

            def freeze_hook(act, hook, pos=pos, name=None):
                out = act.clone()
                out[1:, pos] = corrupted_cache[name][1:, pos]
                return out

            hooks = [("hook_embed", noise)]
            hooks += [(name, restore_hook) for name in restore]
            hooks += [(name, partial(freeze_hook, name=name)) for name in freeze]
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
            probs = torch.softmax(logits[1:, -1].float(), dim=-1)[:, target]
            assert probs.shape == (rows,)
            result[layer, pos] = probs.mean()
    return result
