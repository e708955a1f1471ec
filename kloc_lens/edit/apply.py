"""Applying edits: as reversible hooks, or committed to the weights with an exact undo.

An edit is data: a list of low-rank updates ``ΔW = left @ right`` to output projections
(:class:`LowRankUpdate`). Because the projection is linear, ``k @ (W + ΔW) = k @ W + (k @ left)
@ right``: the same edit can be

- **applied as hooks** (:func:`applied`, or ``edit.applied(model)``): a hook on the projection's
  input records the key ``k`` and a hook on its output adds ``(k @ left) @ right``. Nothing in
  the model changes, and the hooks are removed when the ``with`` block ends, also on an
  exception. A whole forward pass during which an edited projection's hook did not run raises
  :class:`~kloc_lens.errors.HookNotFiredError` (the edit would silently change nothing);
- **committed** (:func:`commit`, or ``edit.commit(model)``): ``W += ΔW`` in place on the live
  weight tensor. The returned :class:`CommittedEdit` keeps exact copies of the original weights;
  its ``restore()`` (or leaving it as a context manager) copies them back, bit for bit.

Both forms give the same logits (within float rounding, ~1e-6). Restore committed edits in the
reverse order of committing them (each handle puts back the weights as it found them): restoring
an edit while a later commit that changed the same weights is still in effect would silently
undo that later edit too, so it is refused with an :class:`EditError`.

Example:
    >>> import torch
    >>> from kloc_lens.planted import planted_model
    >>> model, planted = planted_model()
    >>> update = LowRankUpdate(1, Projection.W_OUT, torch.ones(512, 1), torch.ones(1, 128))
    >>> edit = LowRankEdit(model_identity(model), (update,))
    >>> before = model.blocks[1].mlp.W_out.detach().clone()
    >>> with edit.applied(model):
    ...     hooked = model(planted.prompt(0))
    >>> with edit.commit(model):
    ...     committed = model(planted.prompt(0))
    >>> bool((hooked - committed).abs().max() < 1e-4)
    True
    >>> torch.equal(model.blocks[1].mlp.W_out, before)
    True
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens._hooks import not_fired_message
from kloc_lens.edit._errors import EditError, choice
from kloc_lens.edit.projection import Projection
from kloc_lens.errors import HookNotFiredError
from kloc_lens.model import model_identity

__all__ = [
    "CommittedEdit",
    "Edit",
    "LowRankEdit",
    "LowRankUpdate",
    "WeightEdit",
    "applied",
    "commit",
    "edit_hooks",
    "row_edit_hooks",
    "row_forward",
]


@dataclass(frozen=True, eq=False)
class LowRankUpdate:
    """``ΔW = left @ right`` added to one projection's weight (as a ``[d_in, d_model]`` matrix).

    Attributes:
        layer: The layer.
        projection: The projection.
        left: ``[d_in, rank]``.
        right: ``[rank, d_model]``.
    """

    layer: int
    projection: Projection
    left: Float[Tensor, "d_in rank"]
    right: Float[Tensor, "rank d_model"]

    def __post_init__(self) -> None:
        projection = choice(Projection, self.projection, "LowRankUpdate.projection")
        object.__setattr__(self, "projection", projection)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise EditError(f"LowRankUpdate.layer must be an integer, got {self.layer!r}")
        where = f"update of {projection.value} at layer {self.layer}"
        for name in ("left", "right"):
            factor = getattr(self, name)
            if not isinstance(factor, Tensor) or factor.dim() != 2:
                shown = tuple(factor.shape) if isinstance(factor, Tensor) else type(factor).__name__
                raise EditError(f"{where}: {name} must be a matrix, got {shown}")
        if self.left.shape[1] != self.right.shape[0]:
            raise EditError(
                f"{where}: left is {tuple(self.left.shape)} and right {tuple(self.right.shape)}; "
                "their ranks differ"
            )
        for name in ("left", "right"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise EditError(
                    f"{where}: {name} holds non-finite values; the edit would turn the logits NaN"
                )

    @property
    def rank(self) -> int:
        """The number of columns of ``left`` (the rank of ``ΔW`` at most)."""
        return int(self.left.shape[1])

    def delta(self) -> Float[Tensor, "d_in d_model"]:
        """The dense ``ΔW``."""
        return self.left @ self.right


@runtime_checkable
class Edit(Protocol):
    """Anything that can be applied or committed: a model identity and low-rank updates."""

    @property
    def model(self) -> str:
        """:func:`~kloc_lens.model.model_identity` of the model the edit was computed on."""
        ...

    @property
    def updates(self) -> tuple[LowRankUpdate, ...]:
        """The updates, at one or several layers."""
        ...


class WeightEdit:
    """Methods shared by every edit class (:class:`RankOneEdit`, :class:`MultiLayerEdit`, ...)."""

    def applied(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """Apply this edit as hooks for the duration of a ``with`` block (see :func:`applied`)."""
        return applied(model, self)  # type: ignore[arg-type]

    def commit(self, model: Any) -> CommittedEdit:
        """Write this edit into the weights (see :func:`commit`)."""
        return commit(model, self)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class LowRankEdit(WeightEdit):
    """The plainest edit: updates and the model they were computed for.

    Attributes:
        model: :func:`~kloc_lens.model.model_identity` of the model.
        updates: The updates.
    """

    model: str
    updates: tuple[LowRankUpdate, ...]


_Key = tuple[int, Projection]


def _grouped(model: Any, edits: Sequence[Edit]) -> dict[_Key, tuple[Tensor, Tensor]]:
    """Check the edits against the model; concatenate the factors per (layer, projection)."""
    if not edits:
        raise EditError("no edits given")
    identity = model_identity(model)
    d_model = int(model.cfg.d_model)
    n_layers = int(model.cfg.n_layers)
    if bool(getattr(model.cfg, "use_normalization_before_and_after", False)):
        raise EditError(
            "this model normalises block outputs after the MLP/attention (post-norm): an edit "
            "applied as a hook would not equal the weight edit"
        )
    parts: dict[_Key, tuple[list[Tensor], list[Tensor]]] = {}
    for edit in edits:
        if not isinstance(edit, Edit):
            raise EditError(f"{type(edit).__name__} is not an edit (it needs model and updates)")
        if edit.model != identity:
            raise EditError(f"the edit was computed on model {edit.model!r}, not {identity!r}")
        for update in edit.updates:
            projection = choice(Projection, update.projection, "projection")
            if not 0 <= update.layer < n_layers:
                raise EditError(f"edit at layer {update.layer}; the model has 0..{n_layers - 1}")
            size = projection.key_size(model)
            if update.left.shape[0] != size or update.right.shape[1] != d_model:
                raise EditError(
                    f"update of {projection.value} at layer {update.layer} is "
                    f"[{update.left.shape[0]}, {update.right.shape[1]}]; the model's is "
                    f"[{size}, {d_model}]"
                )
            lefts, rights = parts.setdefault((update.layer, projection), ([], []))
            lefts.append(update.left)
            rights.append(update.right)
    return {key: (torch.cat(ls, dim=1), torch.cat(rs, dim=0)) for key, (ls, rs) in parts.items()}


_START_HOOK = "hook_embed"
_END_HOOK = "ln_final.hook_normalized"


class _EditFires:
    """Which output hooks of an edit ran during the current whole forward pass.

    A whole pass runs ``hook_embed`` first and ``ln_final`` last; a pass that starts or stops
    mid-stack (``start_at_layer``, ``stop_at_layer``, a sweep's block-by-block passes) misses
    one of them and is not checked: it may legitimately skip the edited layer.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.fired = [False] * len(names)
        self.started = False

    def start(self, activation: Tensor, hook: Any) -> None:
        self.started = True
        self.fired = [False] * len(self.names)

    def end(self, activation: Tensor, hook: Any) -> None:
        started, self.started = self.started, False
        if started and not all(self.fired):
            missing = [n for n, done in zip(self.names, self.fired, strict=True) if not done]
            raise HookNotFiredError(not_fired_message(missing, "a forward pass with an edit"))


def edit_hooks(model: Any, *edits: Edit) -> list[tuple[str, Any]]:
    """The forward hooks that apply ``edits`` (for ``run_with_hooks`` or ``model.hooks``).

    Besides the key and output hooks of each edited projection, two hooks on ``hook_embed`` and
    ``ln_final.hook_normalized`` (where the model has them) check that every output hook ran
    during each whole forward pass: an edit whose hook the model never calls raises
    :class:`~kloc_lens.errors.HookNotFiredError` from that pass instead of changing nothing.

    Raises:
        EditError: An edit computed on another model, or of the wrong shape.
    """
    hooks: list[tuple[str, Any]] = []
    grouped = _grouped(model, edits)
    fires = _EditFires([projection.output_hook(layer) for layer, projection in grouped])
    for index, ((layer, projection), (left, right)) in enumerate(grouped.items()):
        weight = projection.weight(model, layer)
        left = left.to(device=weight.device, dtype=weight.dtype)
        right = right.to(device=weight.device, dtype=weight.dtype)
        seen: list[Tensor] = []

        def read_key(
            activation: Tensor,
            hook: Any,
            seen: list[Tensor] = seen,
            projection: Projection = projection,
        ) -> None:
            seen.append(projection.keys(activation))

        def add_output(
            activation: Tensor,
            hook: Any,
            seen: list[Tensor] = seen,
            left: Tensor = left,
            right: Tensor = right,
            index: int = index,
        ) -> Tensor:
            if not seen:
                raise HookNotFiredError(
                    f"{hook.name}: the key hook of this edit did not run before its output hook"
                )
            fires.fired[index] = True
            key = seen.pop()
            seen.clear()
            return activation + ((key.to(left.dtype) @ left) @ right).to(activation.dtype)

        hooks.append((projection.key_hook(layer), read_key))
        hooks.append((projection.output_hook(layer), add_output))
    available = getattr(model, "hook_dict", {})
    if _START_HOOK in available and _END_HOOK in available:
        hooks = [(_START_HOOK, fires.start), *hooks, (_END_HOOK, fires.end)]
    return hooks


@contextlib.contextmanager
def applied(model: Any, *edits: Edit) -> Iterator[None]:
    """Apply edits as hooks inside a ``with`` block; the weights are never touched.

    Args:
        model: The hooked model.
        *edits: One or more edits (their updates add up).

    Raises:
        EditError: An edit computed on another model, or of the wrong shape.
        HookNotFiredError: From a whole forward pass inside the block during which an edited
            projection's hook did not run (the edit would have changed nothing).
    """
    hooks = edit_hooks(model, *edits)
    with model.hooks(fwd_hooks=hooks):
        yield


_LIVE: weakref.WeakKeyDictionary[Any, list[CommittedEdit]] = weakref.WeakKeyDictionary()
"""The commits still in effect on each model, oldest first (keyed by the model itself)."""


def _weights_label(weights: Sequence[_Key]) -> str:
    return ", ".join(f"{projection.value} of layer {layer}" for layer, projection in weights)


class CommittedEdit:
    """Edits written into a model's weights, with exact copies of the weights they replaced.

    ``restore()`` copies the originals back (bit-identical); using the handle as a context
    manager restores on leaving the block, also after an exception. Restoring twice is a no-op.
    Handles are restored in the reverse order of their commits: restoring one while a later
    commit that changed one of the same weights is still in effect raises :class:`EditError`
    (copying the originals back would silently undo the later edit too, and restoring the later
    one afterwards would bring this one back).
    """

    def __init__(self, model: Any, originals: dict[_Key, Tensor]) -> None:
        self._model = model
        self._originals = originals
        self._restored = False

    @property
    def restored(self) -> bool:
        """Whether the original weights are back."""
        return self._restored

    @property
    def weights(self) -> tuple[tuple[int, Projection], ...]:
        """The ``(layer, projection)`` weights this handle changed."""
        return tuple(self._originals)

    def restore(self) -> None:
        """Put back the original weights, bit for bit.

        Raises:
            EditError: A later commit that changed one of the same weights is still in effect;
                restore it first.
        """
        if self._restored:
            return
        live = _LIVE.get(self._model, [])
        later = live[live.index(self) + 1 :] if self in live else []
        mine = set(self._originals)
        clash = [key for handle in later for key in handle._originals if key in mine]
        if clash:
            raise EditError(
                f"cannot restore this committed edit of {_weights_label(list(self._originals))}: "
                f"a later commit that also changed {_weights_label(sorted(set(clash)))} is still "
                "in effect; restore committed edits in the reverse order of committing them"
            )
        _restore(self._model, self._originals)
        if self in live:
            live.remove(self)
        self._restored = True
        self._originals = {}

    def __enter__(self) -> CommittedEdit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()


def _restore(model: Any, originals: dict[_Key, Tensor]) -> None:
    with torch.no_grad():
        for (layer, projection), original in originals.items():
            projection.weight(model, layer).copy_(original)


def commit(model: Any, *edits: Edit) -> CommittedEdit:
    """Add edits to the live weights in place, keeping exact copies of the originals.

    Each weight is changed with ``W.add_(ΔW)`` under ``torch.no_grad()`` on the tensor the model
    exposes (on a TransformerBridge a view of the wrapped module's weight; never ``W += ΔW`` on
    the attribute, which a bridge applies and then refuses).

    Args:
        model: The hooked model.
        *edits: One or more edits (their updates add up).

    Returns:
        A handle whose ``restore()`` puts the original weights back (handles are restored in
        the reverse order of their commits).

    Raises:
        EditError: An edit computed on another model or of the wrong shape, or a model whose
            weight attributes are copies rather than live tensors (nothing is changed then).
    """
    grouped = _grouped(model, edits)
    originals: dict[_Key, Tensor] = {}
    try:
        with torch.no_grad():
            for (layer, projection), (left, right) in grouped.items():
                weight = projection.weight(model, layer)
                originals[(layer, projection)] = weight.detach().clone()
                change = (left.float() @ right.float()).to(device=weight.device)
                weight.add_(change.to(weight.dtype).view_as(weight))
                if not torch.equal(projection.weight(model, layer), weight):
                    raise EditError(
                        f"{projection.value} of layer {layer} is not a live tensor of "
                        f"{type(model).__name__}; cannot commit an edit to it"
                    )
    except BaseException:
        _restore(model, originals)
        raise
    handle = CommittedEdit(model, originals)
    _LIVE.setdefault(model, []).append(handle)
    return handle


def row_edit_hooks(model: Any, edits: Sequence[Edit], owners: Sequence[int]) -> list[Any]:
    """Forward hooks that apply a different edit to each row of a batch: row ``b`` gets
    ``edits[owners[b]]`` (``-1``: none), so many edits are checked in one forward pass. Each
    row's numbers equal that edit applied alone (:func:`~kloc_lens.edit.applied`).

    Raises:
        EditError: An owner outside ``-1 .. len(edits) - 1``, or an edit of another model.
    """
    if any(not -1 <= o < len(edits) for o in owners):
        raise EditError(f"row owners must lie in -1..{len(edits) - 1}, got {list(owners)}")
    sites: dict[tuple[int, Projection], list[list[LowRankUpdate]]] = {}
    for j, edit in enumerate(edits):
        edit_hooks(model, edit)  # the same checks as applying it
        for update in edit.updates:
            key = (update.layer, update.projection)
            sites.setdefault(key, [[] for _ in edits])[j].append(update)
    hooks: list[Any] = []
    for (layer, projection), per_edit in sites.items():
        weight = projection.weight(model, layer)
        rank = max(1, max(sum(u.rank for u in ups) for ups in per_edit))
        # one slot per edit plus a last, zero slot for rows without an edit
        left = torch.zeros(len(edits) + 1, projection.key_size(model), rank)
        right = torch.zeros(len(edits) + 1, rank, int(model.cfg.d_model))
        for j, ups in enumerate(per_edit):
            if ups:
                ls = torch.cat([u.left for u in ups], dim=1)
                rs = torch.cat([u.right for u in ups], dim=0)
                left[j, :, : ls.shape[1]] = ls.float()
                right[j, : rs.shape[0]] = rs.float()
        index = torch.tensor([o if o >= 0 else len(edits) for o in owners], dtype=torch.long)
        rows_left = left.to(device=weight.device, dtype=weight.dtype)[index.to(weight.device)]
        rows_right = right.to(device=weight.device, dtype=weight.dtype)[index.to(weight.device)]
        seen: list[Tensor] = []

        def read_key(
            activation: Tensor,
            hook: Any,
            seen: list[Tensor] = seen,
            projection: Projection = projection,
        ) -> None:
            seen.append(projection.keys(activation))

        def add_output(
            activation: Tensor,
            hook: Any,
            seen: list[Tensor] = seen,
            rows_left: Tensor = rows_left,
            rows_right: Tensor = rows_right,
        ) -> Tensor:
            key = seen.pop()
            seen.clear()
            change = torch.bmm(torch.bmm(key.to(rows_left.dtype), rows_left), rows_right)
            return activation + change.to(activation.dtype)

        hooks.append((projection.key_hook(layer), read_key))
        hooks.append((projection.output_hook(layer), add_output))
    return hooks


def row_forward(model: Any, tokens: Tensor, edits: Sequence[Edit], owners: Sequence[int]) -> Tensor:
    """Logits of ``tokens`` with row ``b`` under ``edits[owners[b]]`` (``-1``: unedited)."""
    if not edits or all(o < 0 for o in owners):
        return model(tokens)
    return model.run_with_hooks(tokens, fwd_hooks=row_edit_hooks(model, edits, owners))
