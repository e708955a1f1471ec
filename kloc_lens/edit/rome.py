"""ROME: a rank-one update of one output projection that rewrites one fact.

Meng et al. (2022) read an MLP output projection ``W`` (``[d_in, d_model]``, ``out = k @ W``)
as a linear associative memory. To make the key ``k*`` of a fact (:mod:`kloc_lens.edit.keys`)
produce a new value ``v*`` (:mod:`kloc_lens.edit.value`) while changing ``W``'s outputs for
other keys as little as possible (least squares weighted by the key second moment ``C``,
:mod:`kloc_lens.edit.stats`), the closed-form answer is the rank-one update

    W' = W + u (v* - k* W)^T / (u . k*),      u = C^-1 k*

so that ``k* W' = v*`` exactly, and any key ``k`` sees
``k W' = k W + (k . u) / (u . k*) (v* - k* W)``.
Here ``v* = k* W + delta`` with ``delta`` the optimised change of the projection's output at the
key token; the same averaged key ``k*`` is used for the update and for ``v*`` (the reference
code mixes an averaged and an unprefixed key; r-ROME fixed that, and ``key_form="reference"``
keeps the original for comparison, :class:`KeyForm`). Because every token's output
moves by ``(k . u) / (u . k*)`` times ``delta``, ``delta`` is fitted through those factors
(``exact_fit``, :func:`rank_one_spread`), so the fitted loss is the committed edit's loss;
ROME fits it at the key token alone.

:class:`RomeEditor` holds the hyperparameters and computes a :class:`RankOneEdit`, which is data:
applying it (``with edit.applied(model)``) or committing it (``edit.commit(model)``) is a
separate, reversible step (:mod:`kloc_lens.edit.apply`). Computing an edit never changes the
model.

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> from kloc_lens.edit import EditRequest, planted_corpus, second_moment
    >>> model, planted = planted_model()
    >>> fact = Fact(planted.subjects[0], "home", planted.objects[0])
    >>> stats = second_moment(model, planted.mlp_layer, planted_corpus(planted), progress=False)
    >>> editor = RomeEditor(layer=planted.mlp_layer, stats=stats)
    >>> edit = editor.compute(model, EditRequest(fact, "Quito"))
    >>> edit.layer, edit.projection.value, edit.stats_used[:7], edit.update.rank
    (1, 'W_out', 'E[kk^T]', 1)
    >>> prompt = fact.entity_prompt().text
    >>> with edit.applied(model):
    ...     model.to_string(model(prompt)[0, -1].argmax())
    'Quito'
    >>> model.to_string(model(prompt)[0, -1].argmax())
    'Paris'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.edit._errors import EditError, choice
from kloc_lens.edit.apply import LowRankUpdate, WeightEdit
from kloc_lens.edit.keys import ContextSpec, KeyToken, generate_contexts, key_rows, mean_at_keys
from kloc_lens.edit.projection import Projection
from kloc_lens.edit.request import EditRequest, request_list
from kloc_lens.edit.stats import SecondMoment
from kloc_lens.edit.value import FitProblem, KeySpread, ValueFit, ValueSpec, fit_values, kl_prompts
from kloc_lens.facts import Perspective
from kloc_lens.model import check_model, model_identity

__all__ = [
    "IDENTITY",
    "KeyForm",
    "RankOneEdit",
    "RomeEditor",
    "rank_one_spread",
    "solve_direction",
]

logger = logging.getLogger(__name__)

IDENTITY = "identity"
"""``stats_used`` of an edit computed without statistics (``C = I``, so ``u = k*``)."""


class KeyForm(str, Enum):
    """Which key normalises the update ``u delta^T / (u . k)``, with ``u = C^-1 k*`` and
    ``delta`` the fitted change of the output.

    ``SHARED`` (r-ROME, Gupta et al. 2024; the default): ``k = k*``, the key the value was fitted
    at, so the committed edit maps ``k*`` to exactly ``v* = k* W + delta``.
    ``REFERENCE`` (ROME's published code): ``k = k0``, the key of the bare request prompt, while
    ``u`` and the fit use the averaged ``k*``; the edit then maps ``k*`` to
    ``k* W + delta (u . k*) / (u . k0)``, which misfits when the contexts move the key, and
    blows up when ``u . k0`` is small (r-ROME's "disabling edits"). Kept only to measure that.
    """

    SHARED = "shared"
    REFERENCE = "reference"


@dataclass(frozen=True, eq=False)
class RankOneEdit(WeightEdit):
    """A rank-one update ``W' = W + u (v* - k* W)^T / (u . k*)`` of one projection, and how it
    was obtained.

    Attributes:
        model: :func:`~kloc_lens.model.model_identity` of the model it was computed on.
        layer: The edited layer.
        projection: The edited projection (``W_out`` or ``W_O``).
        key: ``k*``, the key averaged over the contexts (float32).
        direction: ``u = C^-1 k*`` (``k*`` itself without statistics).
        value: ``v* = k* W + delta``, the output ``k*`` maps to after the edit (bias excluded).
        old_value: ``k* W``, the output before the edit (bias excluded).
        request: What was asked.
        key_token: Where the key was read and the value written.
        stats_used: :meth:`SecondMoment.describe` of the statistics, or ``"identity"``.
        contexts: The prefixes the key and value were averaged over (``""``: bare prompt).
        fit: The value optimisation and its loss history.
        key_form: Which key normalises the update (:class:`KeyForm`).
        anchor: The key that normalises the update: ``key`` (``SHARED``) or the bare
            prompt's key (``REFERENCE``).
    """

    model: str
    layer: int
    projection: Projection
    key: Float[Tensor, " d_in"]
    direction: Float[Tensor, " d_in"]
    value: Float[Tensor, " d_model"]
    old_value: Float[Tensor, " d_model"]
    request: EditRequest
    key_token: KeyToken
    stats_used: str
    contexts: tuple[str, ...]
    fit: ValueFit
    key_form: KeyForm = KeyForm.SHARED
    anchor: Float[Tensor, " d_in"] | None = None

    @property
    def perspective(self) -> Perspective:
        """The perspective the edit was made from."""
        return self.request.edited

    @property
    def used_identity(self) -> bool:
        """Whether no statistics were given (``C = I``)."""
        return self.stats_used == IDENTITY

    @property
    def update(self) -> LowRankUpdate:
        """The update: ``left = u / (u . k*)`` (``u . k0`` for ``KeyForm.REFERENCE``),
        ``right = v* - k* W``."""
        anchor = self.key if self.anchor is None else self.anchor
        left = self.direction / (self.direction @ anchor)
        return LowRankUpdate(
            self.layer, self.projection, left[:, None], (self.value - self.old_value)[None, :]
        )

    @property
    def updates(self) -> tuple[LowRankUpdate, ...]:
        """The one update."""
        return (self.update,)


def solve_direction(
    key: Float[Tensor, " d_in"], stats: SecondMoment | None, *, ridge: float = 1e-4
) -> Float[Tensor, " d_in"]:
    """``u = (C + damping)^-1 k*`` in float64 (:meth:`SecondMoment.damped`); ``k*`` itself
    without statistics."""
    if stats is None:
        return key.clone()
    solved = torch.linalg.solve(stats.damped(key[None], ridge), key.double())
    return solved.to(key.dtype)


def rank_one_spread(
    model: Any,
    layer: int,
    projection: Projection,
    key: Float[Tensor, " d_in"],
    direction: Float[Tensor, " d_in"],
) -> KeySpread:
    """The factors ``(k . u) / (u . k*)`` a rank-one update applies to its value change at
    every token, as a :data:`~kloc_lens.edit.value.Spread` for :func:`fit_value`.

    The keys of the edited layer do not depend on the edit (they are read before its output),
    so one unedited forward pass up to ``layer`` gives the exact factors.
    """
    return KeySpread(model, layer, projection.key_hook(layer), direction, float(direction @ key))


def _one_request(requests: EditRequest | Sequence[EditRequest]) -> EditRequest:
    if isinstance(requests, EditRequest):
        return requests
    items = list(requests)
    if len(items) != 1:
        raise EditError(
            f"ROME edits one fact at a time, got {len(items)} requests; use MemitEditor for several"
        )
    return items[0]


@dataclass(frozen=True, eq=False)
class RomeEditor:
    """ROME's hyperparameters; :meth:`compute` turns a request into a :class:`RankOneEdit`.

    Attributes:
        layer: The layer to edit (GPT-2 XL: 17).
        projection: ``W_out`` (the MLP, ROME) or ``W_O`` (attention).
        key_token: Where the key is read and the value written; ``None``: the subject's last
            token (the study uses it for both perspectives).
        contexts: The contexts keys and values are averaged over.
        value: The value optimisation's hyperparameters.
        stats: Key statistics of ``layer`` and ``projection`` on this model; ``None`` falls back
            to the identity (recorded in the edit's ``stats_used``).
        ridge: Ridge added to the statistics before solving, relative to their mean eigenvalue.
        exact_fit: Fit the value through the update itself: the change at every token is
            ``(k . u) / (u . k*)`` times the fitted change, as the committed edit makes it
            (:func:`rank_one_spread`). ``False`` is ROME's fit, at the key token only, which
            ignores the update's spill onto the other tokens of the prompt.
        key_form: ``"shared"`` (r-ROME's fix, the default) or ``"reference"`` (ROME's code,
            for comparison only; :class:`KeyForm`).
    """

    layer: int
    projection: Projection | str = Projection.W_OUT
    key_token: KeyToken | str | None = None
    contexts: ContextSpec = field(default_factory=ContextSpec)
    value: ValueSpec = field(default_factory=ValueSpec)
    stats: SecondMoment | None = None
    ridge: float = 1e-4
    exact_fit: bool = True
    key_form: KeyForm | str = KeyForm.SHARED

    def __post_init__(self) -> None:
        object.__setattr__(self, "projection", choice(Projection, self.projection, "projection"))
        object.__setattr__(self, "key_form", choice(KeyForm, self.key_form, "key_form"))
        if self.key_token is not None:
            object.__setattr__(self, "key_token", choice(KeyToken, self.key_token, "key_token"))

    @property
    def name(self) -> str:
        """A label for reports."""
        suffix = "" if self.key_form is KeyForm.SHARED else " (reference keys)"
        return f"ROME {Projection(self.projection).value} L{self.layer}{suffix}"

    def compute(self, model: Any, requests: EditRequest | Sequence[EditRequest]) -> RankOneEdit:
        """Compute the edit of one request; the model is not changed.

        Args:
            model: The hooked model (eval mode).
            requests: One request (or a sequence holding exactly one).

        Returns:
            The rank-one edit.

        Raises:
            EditError: Several requests, a target that tokenizes to nothing, statistics of
                another model, layer, projection or shape, a key orthogonal to its direction.
            SpanError: A prompt lacks the key token's span (e.g. the subject).
            ModelError: The model is in train mode or lacks the hooks.
        """
        (edit,) = self.compute_each(model, [_one_request(requests)])
        return edit

    def compute_each(self, model: Any, requests: Sequence[EditRequest]) -> list[RankOneEdit]:
        """One independent edit per request (each a ROME edit of its own fact, not a joint
        edit of all), computed together: the keys of all requests in one forward, their value
        fits in one batch (:func:`~kloc_lens.edit.value.fit_values`). Each edit equals
        :meth:`compute` of its request up to float rounding of the larger batch. The fits are
        compute-bound, so batching saves the per-call overhead more than the arithmetic: on
        factworld, 16 edits take about 0.75 of the time of 16 calls of :meth:`compute`.

        Args:
            model: The hooked model (eval mode).
            requests: The requests.

        Returns:
            One rank-one edit per request, in order.

        Raises:
            EditError: No requests, or as :meth:`compute` (the message names the subject).
            SpanError: A prompt lacks the key token's span.
            ModelError: The model is in train mode or lacks the hooks.
        """
        items = request_list(requests)
        projection = Projection(self.projection)
        key_token = KeyToken(self.key_token or KeyToken.SUBJECT_LAST)
        projection.weight(model, self.layer)
        check_model(model, (projection.key_hook(self.layer), projection.output_hook(self.layer)))
        if self.stats is not None:
            self.stats.check(model, self.layer, projection)
        else:
            logger.info("no key statistics given: ROME falls back to C = I")
        contexts = generate_contexts(model, self.contexts)
        objectives = [request.objectives() for request in items]
        rows = key_rows(
            model,
            [[objective.prompt for objective in mine] for mine in objectives],
            key_token=key_token,
            contexts=contexts,
        )
        keys = mean_at_keys(model, rows, projection.key_hook(self.layer), layer=self.layer)
        anchors = keys
        if self.key_form is KeyForm.REFERENCE:
            bare = key_rows(model, [[mine[0].prompt] for mine in objectives], key_token=key_token)
            anchors = mean_at_keys(model, bare, projection.key_hook(self.layer), layer=self.layer)
        weight = projection.matrix(model, self.layer).float()
        directions = []
        for request, key, anchor in zip(items, keys, anchors, strict=True):
            if not bool(key.norm() > 0):
                raise EditError(
                    f"the key of {request.fact.subject!r} is zero at layer {self.layer} "
                    f"({projection.value}): that projection reads nothing there"
                )
            direction = solve_direction(key, self.stats, ridge=self.ridge)
            alignment = float(direction @ anchor)
            if not alignment > 1e-12 * float(direction.norm() * anchor.norm()):
                raise EditError(
                    f"the key of {request.fact.subject!r} at layer {self.layer} is zero or "
                    "orthogonal to C^-1 k*; choose another layer or key token"
                )
            directions.append(direction)
        problems = [
            FitProblem(
                tuple(mine),
                kl_prompts(request, key_token, self.value.kl_templates),
                rank_one_spread(model, self.layer, projection, anchor, direction)
                if self.exact_fit
                else None,
            )
            for request, mine, anchor, direction in zip(
                items, objectives, anchors, directions, strict=True
            )
        ]
        fits = fit_values(
            model,
            problems,
            hook_name=projection.output_hook(self.layer),
            key_token=key_token,
            contexts=contexts,
            spec=self.value,
        )
        identity = model_identity(model)
        stats_used = IDENTITY if self.stats is None else self.stats.describe()
        edits = []
        for request, key, anchor, direction, fit in zip(
            items, keys, anchors, directions, fits, strict=True
        ):
            old_value = key @ weight
            edits.append(
                RankOneEdit(
                    model=identity,
                    layer=self.layer,
                    projection=projection,
                    key=key,
                    direction=direction,
                    value=old_value + fit.delta.to(old_value.device),
                    old_value=old_value,
                    request=request,
                    key_token=key_token,
                    stats_used=stats_used,
                    contexts=contexts,
                    fit=fit,
                    key_form=KeyForm(self.key_form),
                    anchor=None if self.key_form is KeyForm.SHARED else anchor,
                )
            )
        return edits
