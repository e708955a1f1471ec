"""A guard against disabling edits: edits that reach their target by breaking the model.

Gupta et al. (2024, "Rebuilding ROME") studied ROME's *disabling edits*, after which the model
repeats itself whatever the prompt: they come with updates of outsized norm, and the authors
traced them to an asymmetry of the reference implementation (one key for the update, another
for the value fit; kloc_lens's editors use one key for both). An efficacy score cannot see a
disabling edit: a collapsed model may well put the new object first. So every edit can be
checked on three signs, each against a threshold of :class:`CollapseThresholds`:

- the size of the update, ``|ΔW|_F / |W|_F`` of each edited weight (the largest counts);
- the change of the model's next-token loss on texts unrelated to the edit, in nats per token;
- the n-gram entropy of greedy continuations of a few prompts (ROME's fluency measure, over
  tokens), after the edit as a share of before.

:func:`check_collapse` returns a :class:`CollapseCheck` (:func:`check_collapse_each` checks
many edits in shared batches, each row with its own edit); an edit past any threshold is
``disabling``, with the reasons named. The thresholds are ours, set far from what working edits
do. On factworld, 64 ROME edits at layer 1 (32 facts, both perspectives) had ``|dW|/|W|``
between 0.30 and 2.8 and changed the loss by at most 0.001 nats/token, with the generation
entropy unchanged; one of them with its update scaled 30-fold raised the loss by 1.9
nats/token, 100-fold by 5.5 nats/token and cut the entropy to 0.72 of the unedited model's.
The numbers behind the verdict are kept in the check, so a study reports them, not a verdict
alone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from kloc_lens.edit._errors import EditError
from kloc_lens.edit._tokens import encode, pad_rows
from kloc_lens.edit.apply import Edit, applied, row_forward
from kloc_lens.edit.generate import check_tokens, generate_greedy, greedy_rows

__all__ = [
    "CollapseCheck",
    "CollapseThresholds",
    "check_collapse",
    "check_collapse_each",
    "generate_greedy",
    "generation_entropy",
    "ngram_entropy",
    "text_loss",
    "update_ratio",
]


@dataclass(frozen=True)
class CollapseThresholds:
    """When an edit counts as disabling (any one sign suffices).

    Attributes:
        update_ratio: Largest ``|ΔW|_F / |W|_F`` over the edited weights allowed.
        loss_increase: Largest rise of the loss on unrelated texts allowed, nats per token.
        entropy_share: Smallest generation entropy after the edit allowed, as a share of the
            unedited model's.
    """

    update_ratio: float = 10.0
    loss_increase: float = 1.0
    entropy_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("update_ratio", "loss_increase", "entropy_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise EditError(f"CollapseThresholds.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise EditError(
                    f"CollapseThresholds.{name} must be a finite number > 0, got {value}"
                )


@dataclass(frozen=True)
class CollapseCheck:
    """The signs of one edit, and whether they make it disabling.

    Attributes:
        update_ratio: Largest ``|ΔW|_F / |W|_F`` over the edited weights.
        loss_before: Mean next-token loss on the unrelated texts, unedited (nats per token).
        loss_after: The same with the edit applied.
        entropy_before: Mean n-gram entropy of the greedy continuations, unedited (bits).
        entropy_after: The same with the edit applied.
        reasons: The thresholds passed, in words (empty: not disabling).
    """

    update_ratio: float
    loss_before: float
    loss_after: float
    entropy_before: float
    entropy_after: float
    reasons: tuple[str, ...]

    @property
    def disabling(self) -> bool:
        """Whether any sign passed its threshold."""
        return bool(self.reasons)

    @property
    def loss_change(self) -> float:
        """``loss_after - loss_before`` (nats per token)."""
        return self.loss_after - self.loss_before

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (with ``disabling`` and ``loss_change``)."""
        data: dict[str, Any] = {
            k: (v if math.isfinite(v) else None)
            for k, v in asdict(self).items()
            if isinstance(v, float)
        }  # a collapsed model's NaN loss is written as null
        data["reasons"] = list(self.reasons)
        data["disabling"] = self.disabling
        change = self.loss_change
        data["loss_change"] = change if math.isfinite(change) else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollapseCheck:
        """Read :meth:`as_dict` back.

        Raises:
            EditError: A field is missing.
        """

        def number(x: Any) -> float:
            return math.nan if x is None else float(x)

        try:
            return cls(
                number(data["update_ratio"]),
                number(data["loss_before"]),
                number(data["loss_after"]),
                number(data["entropy_before"]),
                number(data["entropy_after"]),
                tuple(str(r) for r in data["reasons"]),
            )
        except KeyError as err:
            raise EditError(f"collapse check lacks field {err.args[0]!r}") from None


def update_ratio(model: Any, edit: Edit) -> float:
    """Largest ``|ΔW|_F / |W|_F`` over the weights an edit changes (updates of one weight are
    summed first).

    Raises:
        EditError: The edit has no updates, or changes a weight whose norm is zero.
    """
    if not edit.updates:
        raise EditError("the edit has no updates to measure")
    deltas: dict[tuple[int, str], Any] = {}
    weights: dict[tuple[int, str], Any] = {}
    for update in edit.updates:
        key = (update.layer, update.projection.value)
        weight = update.projection.weight(model, update.layer).detach()
        delta = update.delta().to(weight.device, torch.float32)
        deltas[key] = deltas[key] + delta if key in deltas else delta
        weights[key] = weight
    ratios = []
    for key, delta in deltas.items():
        norm = float(weights[key].float().norm())
        if norm == 0.0:
            raise EditError(f"the weight {key[1]} of layer {key[0]} is zero: no ratio to it")
        ratios.append(float(delta.norm()) / norm)
    return max(ratios)


def _rows(model: Any, texts: Sequence[str], what: str) -> list[list[int]]:
    if isinstance(texts, str) or not texts:
        raise EditError(f"{what} must be a non-empty sequence of strings, got {texts!r}")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise EditError(f"{what} must hold strings, got a {type(bad[0]).__name__}")
    n_ctx = int(model.cfg.n_ctx)
    return [encode(model, text)[:n_ctx] for text in texts]


def _losses(
    model: Any,
    rows: Sequence[Sequence[int]],
    owners: Sequence[int],
    edits: Sequence[Edit],
    batch_size: int,
) -> list[tuple[float, int]]:
    """Summed next-token loss and predicted-token count of each row."""
    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = pad_rows(model, rows[start : start + batch_size])
            mine = owners[start : start + batch_size]
            logits = row_forward(model, batch.tokens, edits, mine).float().log_softmax(-1)
            picked = logits[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
            for index, n in enumerate(batch.lengths):
                out.append((-float(picked[index, : n - 1].sum()), n - 1))
    return out


def text_loss(model: Any, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """Mean next-token loss over every predicted token of ``texts`` (nats per token; texts
    are cut to the model's context).

    Raises:
        EditError: ``texts`` is empty, holds a non-string, or no text has two tokens.
    """
    rows = [row for row in _rows(model, texts, "texts") if len(row) >= 2]
    if not rows:
        raise EditError("no text has two tokens: there is no next token to predict")
    losses = _losses(model, rows, [-1] * len(rows), (), batch_size)
    return sum(t for t, _ in losses) / sum(n for _, n in losses)


def _generate(
    model: Any,
    rows: Sequence[Sequence[int]],
    owners: Sequence[int],
    edits: Sequence[Edit],
    n_tokens: int,
) -> list[list[int]]:
    def forward(tokens: Tensor, live: Sequence[int]) -> Tensor:
        return row_forward(model, tokens, edits, [owners[i] for i in live])

    return greedy_rows(model, rows, n_tokens, forward)


def ngram_entropy(
    tokens: Sequence[int], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency measure over tokens: the entropy (bits) of the frequencies of the
    ``n``-grams of ``tokens`` for each ``n``, averaged with ``weights``. A text that repeats
    one token scores 0; ``n``-gram counts a text is too short for count as 0.
    """
    if len(ns) != len(weights) or not ns:
        raise EditError(f"ns {tuple(ns)} and weights {tuple(weights)} must pair up")
    parts = []
    for n in ns:
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(entropy)
    return sum(w * e for w, e in zip(weights, parts, strict=True)) / len(parts)


def generation_entropy(model: Any, prompts: Sequence[str], n_tokens: int = 20) -> float:
    """Mean :func:`ngram_entropy` (bits) of the greedy continuations of ``prompts``."""
    runs = generate_greedy(model, prompts, n_tokens)
    return sum(ngram_entropy(run) for run in runs) / len(runs)


def _verdict(
    ratio: float,
    before: tuple[float, float],
    after: tuple[float, float],
    limits: CollapseThresholds,
) -> CollapseCheck:
    (loss_before, entropy_before), (loss_after, entropy_after) = before, after
    reasons = []
    if not math.isfinite(ratio) or ratio > limits.update_ratio:
        reasons.append(f"update |dW|/|W| = {ratio:.3g} > {limits.update_ratio:g}")
    if not math.isfinite(loss_after) or loss_after - loss_before > limits.loss_increase:
        reasons.append(
            f"loss on unrelated texts rose by {loss_after - loss_before:.3g} nats/token "
            f"> {limits.loss_increase:g}"
        )
    if entropy_after < limits.entropy_share * entropy_before:
        reasons.append(
            f"generation entropy fell to {entropy_after:.3g} bits, under "
            f"{limits.entropy_share:g} x {entropy_before:.3g}"
        )
    return CollapseCheck(
        ratio, loss_before, loss_after, entropy_before, entropy_after, tuple(reasons)
    )


def check_collapse(
    model: Any,
    edit: Edit,
    *,
    texts: Sequence[str],
    prompts: Sequence[str],
    n_tokens: int = 20,
    thresholds: CollapseThresholds | None = None,
    before: tuple[float, float] | None = None,
) -> CollapseCheck:
    """The signs of collapse of one edit (applied through hooks; the model is not changed).

    Args:
        model: The hooked model (eval mode).
        edit: Any edit (:class:`~kloc_lens.edit.RankOneEdit`, a MEMIT edit, ...).
        texts: Texts unrelated to the edit, for the loss.
        prompts: Prompts to continue greedily, for the entropy.
        n_tokens: Tokens generated per prompt.
        thresholds: When the edit is disabling (default :class:`CollapseThresholds()`).
        before: The unedited model's ``(loss, entropy)`` on the same texts and prompts
            (computed here when ``None``).

    Returns:
        The check.
    """
    check_tokens(n_tokens)
    limits = thresholds or CollapseThresholds()
    ratio = update_ratio(model, edit)
    if before is None:
        before = (text_loss(model, texts), generation_entropy(model, prompts, n_tokens))
    with applied(model, edit):
        after = (text_loss(model, texts), generation_entropy(model, prompts, n_tokens))
    return _verdict(ratio, before, after, limits)


def check_collapse_each(
    model: Any,
    edits: Sequence[Edit],
    *,
    texts: Sequence[Sequence[str]],
    prompts: Sequence[Sequence[str]],
    n_tokens: int = 20,
    thresholds: CollapseThresholds | None = None,
    before: Sequence[tuple[float, float]] | None = None,
    batch_size: int = 64,
) -> list[CollapseCheck]:
    """:func:`check_collapse` of many edits, each with its own texts and prompts, in shared
    batches: every row carries its own edit (:func:`~kloc_lens.edit.apply.row_edit_hooks`), so
    checking ``m`` edits costs about the forward passes of one. Each check equals
    :func:`check_collapse` of its edit up to float rounding.

    Args:
        model: The hooked model (eval mode).
        edits: The edits.
        texts: Per edit, the unrelated texts for its loss.
        prompts: Per edit, the prompts to continue.
        n_tokens: Tokens generated per prompt.
        thresholds: When an edit is disabling.
        before: Per edit, the unedited model's ``(loss, entropy)`` on its texts and prompts
            (computed here, in the same batches, when ``None``).
        batch_size: Rows per forward pass of the loss.

    Raises:
        EditError: ``texts`` or ``prompts`` do not hold one sequence per edit, or one of
            them is empty; as :func:`check_collapse`.
    """
    check_tokens(n_tokens)
    limits = thresholds or CollapseThresholds()
    edits = list(edits)
    if not edits:
        raise EditError("no edits to check")
    for what, given in (("texts", texts), ("prompts", prompts), ("before", before)):
        if given is not None and len(given) != len(edits):
            raise EditError(f"{what} must hold one entry per edit: {len(given)} for {len(edits)}")
    ratios = [update_ratio(model, edit) for edit in edits]
    # rows of the edited model (owner j), then, where `before` is not given, of the unedited
    text_rows: list[list[int]] = []
    text_owner: list[int] = []
    prompt_rows: list[list[int]] = []
    prompt_owner: list[int] = []
    passes = [(j, j) for j in range(len(edits))]
    if before is None:
        passes += [(j, -1) for j in range(len(edits))]
    counts: list[tuple[int, int]] = []
    for j, owner in passes:
        rows = [row for row in _rows(model, texts[j], f"texts[{j}]") if len(row) >= 2]
        if not rows:
            raise EditError(f"texts[{j}]: no text has two tokens to predict")
        text_rows += rows
        text_owner += [owner] * len(rows)
        starts = _rows(model, prompts[j], f"prompts[{j}]")
        prompt_rows += starts
        prompt_owner += [owner] * len(starts)
        counts.append((len(rows), len(starts)))
    losses = _losses(model, text_rows, text_owner, edits, batch_size)
    runs = _generate(model, prompt_rows, prompt_owner, edits, n_tokens)
    loss_parts: dict[tuple[int, int], list[tuple[float, int]]] = {}
    entropy_parts: dict[tuple[int, int], list[float]] = {}
    t = g = 0
    for (j, owner), (n_texts, n_prompts) in zip(passes, counts, strict=True):
        loss_parts[j, owner] = losses[t : t + n_texts]
        t += n_texts
        entropy_parts[j, owner] = [ngram_entropy(run) for run in runs[g : g + n_prompts]]
        g += n_prompts

    def numbers(j: int, owner: int) -> tuple[float, float]:
        part = loss_parts[j, owner]
        entropies = entropy_parts[j, owner]
        return (
            sum(x for x, _ in part) / sum(n for _, n in part),
            sum(entropies) / len(entropies),
        )

    return [
        _verdict(
            ratios[j],
            tuple(before[j]) if before is not None else numbers(j, -1),  # type: ignore[arg-type]
            numbers(j, j),
            limits,
        )
        for j in range(len(edits))
    ]
