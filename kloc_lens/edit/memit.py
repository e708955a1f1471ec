"""MEMIT: several facts at once, the change spread over several layers.

Meng et al. (2023) edit many facts together and share each fact's change among the output
projections of a range of layers (GPT-2 XL: the MLPs of layers 13-17):

1. For every fact ``i``, optimise a change ``delta_i`` of the residual stream after the last
   edited layer ``L`` at the key token (:func:`~kloc_lens.edit.value.fit_values`, all facts in
   one batch); the target is ``z_i = h_L + delta_i``.
2. For each edited layer ``l``, lowest first, with the updates of the layers below already
   applied: read the keys ``K`` (one row per fact, averaged over contexts) and the current
   ``h_L``, take the residual ``R = (z - h_L) / (layers left)``, and solve

       ΔW_l = (λ C_l + K^T K)^-1 K^T R

   (``C_l``: the key second moment, ``λ``: ``covariance_weight``). ``ΔW_l`` has rank at most the
   number of facts; with one fact and ``λ → 0`` it is ROME's update.

The result, a :class:`MultiLayerEdit`, applies and commits like a :class:`RankOneEdit`
(:mod:`kloc_lens.edit.apply`); computing it leaves the model unchanged (the per-layer updates
are applied as hooks while the later layers are solved).

Without statistics ``C_l`` falls back to ``s I`` with ``s`` the mean squared norm of the edited
keys over their length (so that ``λ`` keeps its meaning), which each edit records.

Example (two facts at once; in the planted model only layer 1's MLP reads anything, so the
spread is over that one layer):
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> from kloc_lens.edit import EditRequest, planted_corpus, second_moment
    >>> model, planted = planted_model()
    >>> requests = [EditRequest(Fact(planted.subjects[i], "home", planted.objects[i]), new)
    ...     for i, new in ((0, "Quito"), (2, "Seoul"))]
    >>> stats = second_moment(model, 1, planted_corpus(planted), progress=False)
    >>> editor = MemitEditor(layers=(1,), stats=stats, covariance_weight=1.0)
    >>> edit = editor.compute(model, requests)
    >>> [u.layer for u in edit.updates], edit.updates[0].rank, edit.keys.shape
    ([1], 2, torch.Size([1, 2, 512]))
    >>> with edit.applied(model):
    ...     [model.to_string(model(planted.prompt(i))[0, -1].argmax()) for i in (0, 1, 2)]
    ['Quito', 'Rome', 'Seoul']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.edit._errors import EditError, choice
from kloc_lens.edit.apply import LowRankEdit, LowRankUpdate, WeightEdit, edit_hooks
from kloc_lens.edit.keys import ContextSpec, KeyToken, generate_contexts, key_rows, mean_at_keys
from kloc_lens.edit.projection import Projection
from kloc_lens.edit.request import EditRequest
from kloc_lens.edit.stats import SecondMoment
from kloc_lens.edit.value import FitProblem, ValueFit, ValueSpec, fit_values, kl_prompts
from kloc_lens.model import check_model, model_identity

__all__ = ["MemitEditor", "MultiLayerEdit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class MultiLayerEdit(WeightEdit):
    """Low-rank updates at several layers that rewrite several facts, and how they were found.

    Attributes:
        model: :func:`~kloc_lens.model.model_identity` of the model.
        updates: One update per edited layer, lowest first; rank up to the number of facts.
        requests: The facts, in the order of the ``fact`` axes.
        layers: The edited layers.
        projection: The edited projection.
        key_token: Where keys were read and targets set.
        target_layer: The layer after which the residual targets are set (the highest edited).
        targets: ``z``, the residual stream after ``target_layer`` at each fact's key token.
        keys: The keys of each layer as its update was solved (lower updates applied).
        stats_used: Per layer, the statistics' description or ``"identity (scale s)"``.
        contexts: The prefixes keys and targets were averaged over.
        fits: The value optimisation of each fact.
        covariance_weight: ``λ``.
    """

    model: str
    updates: tuple[LowRankUpdate, ...]
    requests: tuple[EditRequest, ...]
    layers: tuple[int, ...]
    projection: Projection
    key_token: KeyToken
    target_layer: int
    targets: Float[Tensor, "fact d_model"]
    keys: Float[Tensor, "layer fact d_in"]
    stats_used: tuple[str, ...]
    contexts: tuple[str, ...]
    fits: tuple[ValueFit, ...]
    covariance_weight: float


def _stats_by_layer(
    stats: SecondMoment | Sequence[SecondMoment] | None, layers: Sequence[int]
) -> dict[int, SecondMoment]:
    if stats is None:
        return {}
    items = [stats] if isinstance(stats, SecondMoment) else list(stats)
    by_layer = {item.layer: item for item in items}
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise EditError(
            f"statistics given for layers {sorted(by_layer)} but not for edited layers {missing}"
        )
    return by_layer


@dataclass(frozen=True, eq=False)
class MemitEditor:
    """MEMIT's hyperparameters; :meth:`compute` turns requests into a :class:`MultiLayerEdit`.

    Attributes:
        layers: The layers to spread the change over (GPT-2 XL: 13-17).
        projection: ``W_out`` (MEMIT) or ``W_O``.
        key_token: Where keys are read and targets set; ``None``: the subject's last token.
        contexts: The contexts keys and targets are averaged over.
        value: The value optimisation's hyperparameters.
        stats: Key statistics for every edited layer (one or a sequence); ``None``: identity.
        covariance_weight: ``λ`` (MEMIT's ``mom2_update_weight``, 15000 for GPT-2 XL and GPT-J).
            Its effect scales with ``k^T C^-1 k``, about the key length: small models need a
            smaller weight (about 2.3 x ``d_in`` keeps GPT-2 XL's balance).
        ridge: Ridge added to the statistics before solving, relative to their mean eigenvalue.
    """

    layers: tuple[int, ...]
    projection: Projection | str = Projection.W_OUT
    key_token: KeyToken | str | None = None
    contexts: ContextSpec = field(default_factory=ContextSpec)
    value: ValueSpec = field(default_factory=ValueSpec)
    stats: SecondMoment | tuple[SecondMoment, ...] | None = None
    covariance_weight: float = 15000.0
    ridge: float = 1e-4

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", choice(Projection, self.projection, "projection"))
        if self.key_token is not None:
            object.__setattr__(self, "key_token", choice(KeyToken, self.key_token, "key_token"))

    @property
    def name(self) -> str:
        """A label for reports."""
        layers = ",".join(str(layer) for layer in sorted(set(self.layers)))
        return f"MEMIT {Projection(self.projection).value} L{layers}"

    def compute(self, model: Any, requests: EditRequest | Sequence[EditRequest]) -> MultiLayerEdit:
        """Compute one edit for all requests; the model is not changed.

        Args:
            model: The hooked model (eval mode).
            requests: One or more requests.

        Returns:
            The multi-layer edit.

        Raises:
            EditError: No layers or requests, statistics missing for a layer or of another
                model / shape, a target that tokenizes to nothing.
            SpanError: A prompt lacks the key token's span.
        """
        items = [requests] if isinstance(requests, EditRequest) else list(requests)
        if not items:
            raise EditError("no edit requests given")
        layers = tuple(sorted(set(self.layers)))
        if not layers:
            raise EditError("MEMIT needs at least one layer to edit")
        if self.covariance_weight < 0:
            raise EditError(f"covariance_weight must be >= 0, got {self.covariance_weight}")
        projection = Projection(self.projection)
        key_token = KeyToken(self.key_token or KeyToken.SUBJECT_LAST)
        for layer in layers:
            projection.weight(model, layer)
        target_layer = layers[-1]
        z_hook = f"blocks.{target_layer}.hook_resid_post"
        check_model(
            model,
            [z_hook]
            + [
                name
                for layer in layers
                for name in (projection.key_hook(layer), projection.output_hook(layer))
            ],
        )
        by_layer = _stats_by_layer(self.stats, layers)
        for layer, stats in by_layer.items():
            if layer in layers:
                stats.check(model, layer, projection)
        identity = model_identity(model)
        contexts = generate_contexts(model, self.contexts)
        groups = [[objective.prompt for objective in r.objectives()] for r in items]
        rows = key_rows(model, groups, key_token=key_token, contexts=contexts)
        start = mean_at_keys(model, rows, z_hook, layer=target_layer)

        fits = fit_values(
            model,
            [
                FitProblem(
                    tuple(request.objectives()),
                    kl_prompts(request, key_token, self.value.kl_templates),
                )
                for request in items
            ],
            hook_name=z_hook,
            key_token=key_token,
            contexts=contexts,
            spec=self.value,
        )
        targets = start + torch.stack([fit.delta.to(start.device) for fit in fits])

        updates: list[LowRankUpdate] = []
        all_keys: list[Tensor] = []
        used: list[str] = []
        for index, layer in enumerate(layers):
            hooks = edit_hooks(model, LowRankEdit(identity, tuple(updates))) if updates else []
            keys = mean_at_keys(
                model, rows, projection.key_hook(layer), layer=layer, fwd_hooks=hooks
            )
            current = mean_at_keys(model, rows, z_hook, layer=target_layer, fwd_hooks=hooks)
            residual = (targets - current) / (len(layers) - index)
            left, description = self._solve(layer, keys, by_layer.get(layer))
            updates.append(LowRankUpdate(layer, projection, left, residual))
            all_keys.append(keys)
            used.append(description)
        return MultiLayerEdit(
            model=identity,
            updates=tuple(updates),
            requests=tuple(items),
            layers=layers,
            projection=projection,
            key_token=key_token,
            target_layer=target_layer,
            targets=targets,
            keys=torch.stack(all_keys),
            stats_used=tuple(used),
            contexts=contexts,
            fits=tuple(fits),
            covariance_weight=float(self.covariance_weight),
        )

    def _solve(
        self, layer: int, keys: Float[Tensor, "fact d_in"], stats: SecondMoment | None
    ) -> tuple[Float[Tensor, "d_in fact"], str]:
        """``(λ C + K^T K)^-1 K^T`` in float64, and a description of ``C``."""
        size = keys.shape[1]
        k64 = keys.double()
        norms = k64.norm(dim=1)
        if bool((norms == 0).any()):
            dead = [i for i, n in enumerate(norms.tolist()) if n == 0]
            site = Projection(self.projection).value
            raise EditError(
                f"the keys of facts {dead} are zero at layer {layer} ({site}): "
                "that projection reads nothing there; leave the layer out"
            )
        key_scale = float((norms**2).mean()) / size
        if stats is None:
            matrix = key_scale * torch.eye(size, dtype=torch.float64, device=keys.device)
            description = f"identity (scale {key_scale:.4g})"
        else:
            matrix = stats.damped(keys, self.ridge)
            description = stats.describe()
        if self.covariance_weight == 0:
            return torch.linalg.pinv(k64).float(), description + ", weight 0: pseudo-inverse"
        system = self.covariance_weight * matrix + k64.T @ k64
        left = torch.linalg.solve(system, k64.T)
        return left.float(), description
