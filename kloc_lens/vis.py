"""circuitsvis views of prompts, attention and traces, for notebooks and offline HTML.

Every function returns a :class:`View`: a circuitsvis ``RenderedHTML`` whose ``_repr_html_``
always uses the JavaScript bundled with circuitsvis (so it renders in Jupyter without a network,
and without circuitsvis' own "am I online?" probe at display time), and whose :meth:`View.save`
writes a standalone page that works offline.

Spans are marked in token labels: subject tokens as ``«Danielle»``, relation tokens as
``‹mother›``, object tokens as ``[French]``.

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Prompt, tokenize
    >>> model, facts = planted_model()
    >>> prompt = tokenize(model, Prompt.from_text(facts.prompt(0), subject=facts.subjects[0]))
    >>> marked_tokens(prompt)
    ['<bos>', 'The', 'home', 'of', '«Ana»', '«Bel»', 'is']
    >>> view = attention_view(model, prompt, heads=[(facts.attn_layer, facts.head)])
    >>> "CircuitsVis.AttentionHeads" in view._repr_html_()
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from circuitsvis.attention import attention_heads
from circuitsvis.tokens import colored_tokens
from circuitsvis.utils.render import RenderedHTML

from kloc_lens.errors import ResultError, SweepError
from kloc_lens.facts import TokenizedPrompt
from kloc_lens.results import LayerHeadResult, LayerPosResult
from kloc_lens.sites import get_site

__all__ = ["View", "attention_view", "effect_tokens", "marked_tokens", "top_heads_view"]

_MARKS = {"subject": ("«", "»"), "relation": ("‹", "›"), "object": ("[", "]")}


class View(RenderedHTML):
    """A circuitsvis view that always renders from the bundled JavaScript (offline)."""

    def _repr_html_(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def save(self, path: str | Path, *, title: str = "kloc_lens view") -> Path:
        """Write a standalone HTML page (works offline)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        page = (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body>{self.local_src}</body></html>"
        )
        path.write_text(page, encoding="utf-8")
        return path


def _view(rendered: RenderedHTML) -> View:
    return View(rendered.local_src, rendered.cdn_src)


def marked_tokens(prompt: TokenizedPrompt) -> list[str]:
    """The prompt's tokens with subject, relation and object tokens marked."""
    tokens = [t.strip() or t for t in prompt.str_tokens]
    for name, (left, right) in _MARKS.items():
        if name in prompt.spans:
            for pos in prompt.spans[name].positions:
                tokens[pos] = f"{left}{tokens[pos]}{right}"
    return tokens


def attention_view(
    model: Any, prompt: TokenizedPrompt, heads: Sequence[tuple[int, int]] | int
) -> View:
    """Attention patterns of chosen heads on a prompt, spans marked.

    Args:
        model: The hooked model.
        prompt: A tokenized prompt (its spans are marked in the labels).
        heads: ``(layer, head)`` pairs, or a layer for all of its heads.

    Raises:
        SweepError: A layer or head out of range.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    pairs = [(heads, h) for h in range(n_heads)] if isinstance(heads, int) else list(heads)
    for layer, head in pairs:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise SweepError(f"head L{layer}H{head} outside {n_layers} layers x {n_heads} heads")
    if not pairs:
        raise SweepError("no heads to show")
    site = get_site("pattern")
    names = {site.hook_name(layer) for layer, _ in pairs}
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt.tokens[None], names_filter=lambda n: n in names)
    patterns = torch.stack([cache[site.hook_name(layer)][0, head] for layer, head in pairs])
    return _view(
        attention_heads(
            attention=patterns.detach().cpu().float(),
            tokens=marked_tokens(prompt),
            attention_head_names=[f"L{layer}H{head}" for layer, head in pairs],
        )
    )


def effect_tokens(result: LayerPosResult, layer: int, *, value: str = "effect") -> View:
    """The prompt's tokens coloured by a trace's (or sweep's) effect at one layer.

    Raises:
        ResultError: The layer was not swept, or the result has no token strings.
    """
    if layer not in result.layers:
        raise ResultError(f"layer {layer} is not in the result (layers {list(result.layers)})")
    if not result.str_tokens:
        raise ResultError("the result carries no token strings (it was run on token ids)")
    row = result.layers.index(layer)
    numbers = {"effect": result.effect, "value": result.values}.get(value)
    if numbers is None:
        raise ResultError(f"value must be 'effect' or 'value', got {value!r}")
    tokens = [result.str_tokens[p].strip() or result.str_tokens[p] for p in result.positions]
    for name, (left, right) in _MARKS.items():
        if name in result.spans:
            start, end = result.spans[name]
            for i, p in enumerate(result.positions):
                if start <= p < end:
                    tokens[i] = f"{left}{tokens[i]}{right}"
    return _view(colored_tokens(tokens=tokens, values=numbers[row].detach().cpu().float()))


def top_heads_view(
    model: Any, prompt: TokenizedPrompt, result: LayerHeadResult, *, k: int = 4
) -> View:
    """Attention patterns of the ``k`` heads a layer x head sweep ranks highest (by effect)."""
    if k < 1:
        raise ResultError(f"k must be >= 1, got {k}")
    effect = result.effect.flatten()
    order = effect.argsort(descending=True)[:k].tolist()
    n_heads = len(result.heads)
    pairs = [(result.layers[i // n_heads], result.heads[i % n_heads]) for i in order]
    return attention_view(model, prompt, pairs)
