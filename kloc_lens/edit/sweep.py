"""Edits at every layer: where does editing a fact work, and does the trace say so?

Hase et al. (2023, "Does Localization Inform Editing?") edit each fact at each layer and ask
whether the causal trace at the edited site predicts where the edit succeeds.
:func:`edit_layer_sweep` makes the first half of that a call: for every request and every
layer, an editor made for that layer (ROME at one layer, MEMIT over a window ending there, or
anything with ``name`` and ``compute``) edits the fact on its own and the edit is scored on
both perspectives (:func:`~kloc_lens.edit.evaluate.evaluate_edit`), optionally with the
collapse guard (:mod:`~kloc_lens.edit.guard`). The result is a typed ``[request, layer]``
table (:class:`EditLayerSweep`); :mod:`kloc_lens.edit.informs` regresses it on trace effects.

Example (two facts of the shipped factworld model, edited at each of its first three layers):
    >>> from kloc_lens.edit import ContextSpec, EditRequest, RomeEditor
    >>> from kloc_lens.factworld import NONE_ANSWER, load_factworld
    >>> model, world = load_factworld()
    >>> requests = [EditRequest(f, none_target=NONE_ANSWER) for f in world.facts[:2]]
    >>> sweep = edit_layer_sweep(
    ...     model, requests, lambda layer: RomeEditor(layer=layer, contexts=ContextSpec(count=1)),
    ...     layers=[0, 1, 2], progress=False)
    >>> sweep.shape, sweep.post("efficacy").shape
    ((2, 3), torch.Size([2, 3]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens.edit._errors import EditError
from kloc_lens.edit.evaluate import EditMetric, FactEvaluation, evaluate_edit
from kloc_lens.edit.guard import (
    CollapseCheck,
    CollapseThresholds,
    check_collapse_each,
    generation_entropy,
    text_loss,
)
from kloc_lens.edit.request import EditRequest, request_list
from kloc_lens.model import model_identity

__all__ = ["EditLayerSweep", "edit_layer_sweep"]

CHUNK = 8
"""Requests an editor with ``compute_each`` computes together (one forward for their keys, one
batch for their value fits)."""


@dataclass(frozen=True, eq=False)
class EditLayerSweep:
    """Every request edited at every layer, each edit on its own.

    Attributes:
        requests: The edited requests (rows).
        layers: The layers (columns); the editor of column ``j`` was made for ``layers[j]``.
        evaluations: ``evaluations[i][j]``: request ``i`` edited at ``layers[j]``.
        collapse: The collapse checks in the same layout, or ``None`` if not checked.
        editors: The editor's name per layer.
        model: :func:`~kloc_lens.model.model_identity` of the model.
    """

    requests: tuple[EditRequest, ...]
    layers: tuple[int, ...]
    evaluations: tuple[tuple[FactEvaluation, ...], ...]
    collapse: tuple[tuple[CollapseCheck, ...], ...] | None
    editors: tuple[str, ...]
    model: str

    def __post_init__(self) -> None:
        shape = (len(self.requests), len(self.layers))
        rows = [len(row) for row in self.evaluations]
        if len(rows) != shape[0] or any(n != shape[1] for n in rows):
            raise EditError(f"evaluations must be {shape[0]} rows of {shape[1]} layers: {rows}")
        if self.collapse is not None and [len(r) for r in self.collapse] != rows:
            raise EditError("collapse checks must have the layout of the evaluations")
        if len(self.editors) != shape[1]:
            raise EditError(f"editors must name one editor per layer: {len(self.editors)}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(requests, layers)``."""
        return len(self.requests), len(self.layers)

    def _table(self, metric: EditMetric | str, field: str) -> Float[Tensor, "request layer"]:
        wanted = _metric(metric)
        return torch.tensor(
            [[getattr(e.score(wanted), field) for e in row] for row in self.evaluations],
            dtype=torch.float64,
        ).reshape(self.shape)

    def post(self, metric: EditMetric | str) -> Float[Tensor, "request layer"]:
        """Fraction of the metric's prompts won after each edit (NaN: no prompts)."""
        return self._table(metric, "post")

    def generated(self, metric: EditMetric | str) -> Float[Tensor, "request layer"]:
        """Share of the metric's prompts whose greedy continuation gives the answer, after
        each edit (no teacher forcing; :mod:`kloc_lens.edit.generate`)."""
        return self._table(metric, "post_generated")

    def margin(self, metric: EditMetric | str) -> Float[Tensor, "request layer"]:
        """The metric's mean probability margin after each edit (a continuous success)."""
        return self._table(metric, "post_margin")

    def disabling(self) -> Tensor:
        """``[request, layer]`` booleans: the edit was flagged disabling (all ``False`` when
        the sweep ran without the guard)."""
        if self.collapse is None:
            return torch.zeros(self.shape, dtype=torch.bool)
        return torch.tensor([[c.disabling for c in row] for row in self.collapse]).reshape(
            self.shape
        )

    def best_layers(self, metric: EditMetric | str, *, margin: bool = True) -> list[int]:
        """Per request, the layer whose edit scored highest (the margin by default; the
        first of equal ones; disabling edits and NaN scores never win)."""
        table = self.margin(metric) if margin else self.post(metric)
        table = table.masked_fill(self.disabling() | table.isnan(), -math.inf)
        return [self.layers[int(j)] for j in table.argmax(1)]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (request, layer, metric), with the disabling flag."""
        flags = self.disabling()
        rows = []
        for i, row in enumerate(self.evaluations):
            for j, evaluation in enumerate(row):
                for score in evaluation.scores:
                    rows.append(
                        {
                            "fact": i,
                            "subject": evaluation.subject,
                            "relation": evaluation.relation,
                            "edited": evaluation.edited.value,
                            "layer": self.layers[j],
                            "metric": score.metric.value,
                            "n_prompts": score.n_prompts,
                            "pre_generated": score.pre_generated,
                            "post_generated": score.post_generated,
                            "pre": score.pre,
                            "post": score.post,
                            "pre_margin": score.pre_margin,
                            "post_margin": score.post_margin,
                            "disabling": bool(flags[i, j]),
                        }
                    )
        return pd.DataFrame(rows)


def _metric(metric: EditMetric | str) -> EditMetric:
    try:
        return EditMetric(metric)
    except ValueError:
        valid = ", ".join(m.value for m in EditMetric)
        raise EditError(f"metric={metric!r} is not a metric; use one of: {valid}") from None


def _layers(model: Any, layers: Sequence[int] | str) -> tuple[int, ...]:
    n_layers = int(model.cfg.n_layers)
    if isinstance(layers, str):
        if layers != "all":
            raise EditError(f"layers={layers!r}: use 'all' or a sequence of layer indices")
        return tuple(range(n_layers))
    chosen = tuple(layers)
    if not chosen:
        raise EditError("layers is empty: give at least one layer or 'all'")
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise EditError(f"layers holds {layer!r}: use integers in [0, {n_layers})")
    if len(set(chosen)) != len(chosen):
        raise EditError(f"layers={list(chosen)} repeats a layer")
    return chosen


def edit_layer_sweep(
    model: Any,
    requests: Sequence[EditRequest],
    editor_factory: Callable[[int], Any],
    layers: Sequence[int] | str = "all",
    *,
    texts: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    thresholds: CollapseThresholds | None = None,
    n_tokens: int = 8,
    progress: bool = True,
) -> EditLayerSweep:
    """Edit each request at each layer, each edit on its own, and score every edit.

    Args:
        model: The hooked model (eval mode; it is not changed).
        requests: The facts to edit, each from its own perspective.
        editor_factory: ``layer -> editor``: e.g. ``lambda l: RomeEditor(layer=l, stats=...)``
            or, for MEMIT windows ending at ``l``, ``lambda l: MemitEditor(layers=range(l - 2,
            l + 1))``. An editor with ``compute_each`` (ROME) computes :data:`CHUNK` requests
            together; others compute one request at a time.
        layers: The layers to edit at (``"all"``: every layer of the model).
        texts: Unrelated texts for the collapse guard's loss; with ``prompts``, every edit is
            checked (:func:`~kloc_lens.edit.guard.check_collapse_each`).
        prompts: Prompts whose greedy continuations the guard scores for entropy.
        thresholds: When the guard calls an edit disabling.
        n_tokens: Tokens the guard generates per prompt.
        progress: Show a progress bar.

    Returns:
        The ``[request, layer]`` evaluations.

    Raises:
        EditError: No requests, a request that is not an :class:`EditRequest`, a bad layer, or
            only one of ``texts`` and ``prompts``; as the editor.
    """
    items = request_list(requests)
    chosen = _layers(model, layers)
    if (texts is None) != (prompts is None):
        raise EditError("the collapse guard needs both texts and prompts (or neither)")
    guard: tuple[list[str], list[str], tuple[float, float]] | None = None
    if texts is not None and prompts is not None:
        texts, prompts = list(texts), list(prompts)
        before = (text_loss(model, texts), generation_entropy(model, prompts, n_tokens))
        guard = (texts, prompts, before)
    columns: list[list[FactEvaluation]] = []
    checks: list[list[CollapseCheck]] = []
    names: list[str] = []
    bar = tqdm(total=len(items) * len(chosen), desc="edit layer sweep", disable=not progress)
    for layer in chosen:
        editor = editor_factory(layer)
        names.append(str(getattr(editor, "name", type(editor).__name__)))
        column: list[FactEvaluation] = []
        flags: list[CollapseCheck] = []
        for start in range(0, len(items), CHUNK):
            batch = items[start : start + CHUNK]
            if hasattr(editor, "compute_each"):
                edits = list(editor.compute_each(model, batch))
            else:
                edits = [editor.compute(model, request) for request in batch]
            for edit, request in zip(edits, batch, strict=True):
                column.extend(evaluate_edit(model, edit, request, editor=names[-1]).facts)
            if guard is not None:
                flags.extend(
                    check_collapse_each(
                        model,
                        edits,
                        texts=[guard[0]] * len(edits),
                        prompts=[guard[1]] * len(edits),
                        n_tokens=n_tokens,
                        thresholds=thresholds,
                        before=[guard[2]] * len(edits),
                    )
                )
            bar.update(len(batch))
        columns.append(column)
        checks.append(flags)
    bar.close()
    rows = tuple(tuple(column[i] for column in columns) for i in range(len(items)))
    collapse = (
        tuple(tuple(flags[i] for flags in checks) for i in range(len(items)))
        if guard is not None
        else None
    )
    return EditLayerSweep(
        requests=tuple(items),
        layers=chosen,
        evaluations=rows,
        collapse=collapse,
        editors=tuple(names),
        model=model_identity(model),
    )
