"""Editing factworld: ROME with its ordinary defaults, key statistics over the world's text.

factworld v2 stores facts the way ROME assumes (early MLPs at the subject's last token), so the
generic :class:`~kloc_lens.edit.RomeEditor` edits it unchanged: key at the subject's last token,
keys averaged over the model's own generated contexts, ROME's value fit. The only factworld part
is the corpus of the key statistics: the world's biographies (:meth:`FactWorld.corpus`), its
training text, as ROME reads Wikipedia for GPT-2 XL. The layer, :data:`EDIT_LAYER`, is the one
``kloc-lens study`` takes from the shipped model's trace.

Example::

    from kloc_lens.edit import EditRequest
    from kloc_lens.factworld import NONE_ANSWER, load_factworld, rome_editor

    model, world = load_factworld()
    editor = rome_editor(model, world)
    fact = world.facts[0]
    edit = editor.compute(model, EditRequest(fact, none_target=NONE_ANSWER))
    with edit.applied(model):
        ...  # the model answers fact.new_object
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kloc_lens.edit.rome import RomeEditor
from kloc_lens.edit.stats import second_moment

if TYPE_CHECKING:
    from kloc_lens.factworld.world import FactWorld

__all__ = ["EDIT_CONTEXTS", "EDIT_LAYER", "rome_editor"]

EDIT_LAYER = 1
"""The layer ``kloc-lens study`` edits on the shipped model: its entity trace's MLP-window peak
at the last subject token."""

EDIT_CONTEXTS = 3
"""Generated contexts per length (5 and 10 tokens) that ``kloc-lens study`` averages keys over
on a factworld model (``StudyConfig.edit_contexts``): 7 prompts with the bare one, near MEMIT's
6, instead of ROME's 21, which halves the editing half's time. Measured on the shipped model,
40 facts at layer 1 (``kloc-lens study --n-trace 20 --n-edit 40 --n-layer-sweep 0 --n-queries 0
--edit-layer 1``, with ``--edit-contexts 10`` for ROME's): entity efficacy 90% vs 80%,
paraphrases 93% vs 81%, other subjects kept 100% vs 100%, the subject's other relations 75% vs
77%. Not a general default: on the planted model ROME's 21 flip both edited facts and 7 only
one, so other models keep ROME's recipe."""


def rome_editor(
    model: Any,
    world: FactWorld,
    *,
    layer: int = EDIT_LAYER,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **settings: Any,
) -> RomeEditor:
    """A :class:`~kloc_lens.edit.RomeEditor` with ROME's defaults and key statistics over the
    world's biographies.

    Args:
        model: The factworld model (:func:`load_factworld`).
        world: Its world.
        layer: The layer to edit.
        cache_dir: Where to cache the statistics (see :func:`~kloc_lens.edit.second_moment`).
        progress: Show the statistics' progress bar.
        **settings: Other :class:`~kloc_lens.edit.RomeEditor` fields (``key_token``,
            ``value``, ``contexts``, ``exact_fit``...): ROME's defaults where not given.

    Returns:
        The editor (computing an edit with it never changes the model).
    """
    stats = second_moment(model, layer, world.corpus(), cache_dir=cache_dir, progress=progress)
    return RomeEditor(layer=layer, stats=stats, **settings)
