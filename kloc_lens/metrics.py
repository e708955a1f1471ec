"""Metrics: what a sweep measures on the logits of one patched run.

A metric is any callable ``logits[batch, pos, d_vocab] -> 0-d tensor``: the
``transformer_lens.patching`` convention, so the same function works in both libraries. The
built-in metrics read each row at its own position (padded batches) and declare it through
``reads_positions`` (the :class:`ReadsPositions` protocol): a sweep then computes logits at that
one position per row only, instead of the full-vocabulary unembedding of every position. A
metric of your own may declare the same; one that does not declare it gets every position.

Example:
    >>> import torch
    >>> metric = TargetProb(target=3, positions=-1)
    >>> logits = torch.zeros(2, 4, 5)
    >>> round(float(metric(logits)), 6)  # uniform over 5 tokens
    0.2
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kloc_lens.errors import MetricError
from kloc_lens.types import Logits, Scalar

__all__ = [
    "LogitDiff",
    "Metric",
    "ReadsPositions",
    "TargetProb",
    "check_metric_value",
    "metric_name",
    "read_positions",
]

Metric = Callable[[Logits], Scalar]
"""Any callable from a batch's logits to one number (a 0-d tensor)."""


@runtime_checkable
class ReadsPositions(Protocol):
    """A metric that reads the logits of exactly one position in each row.

    ``reads_positions`` is that position: one int for every row or one per row, ``-1`` for the
    last. The metric promises to read nothing else, so an executor may hand it logits that are
    correct at those positions only (the others may hold any values).
    """

    @property
    def reads_positions(self) -> int | Sequence[int] | Tensor: ...


def read_positions(metric: Any, rows: int, n_pos: int) -> Int[Tensor, " batch"] | None:
    """The position each row's score reads, if ``metric`` declares it (else ``None``).

    Negative positions count from the end; every position must lie in ``0..n_pos-1``.

    >>> read_positions(TargetProb(target=3, positions=-1), rows=2, n_pos=5).tolist()
    [4, 4]
    >>> read_positions(lambda logits: logits.sum(), rows=2, n_pos=5) is None
    True

    Raises:
        MetricError: The declared positions do not fit the batch.
    """
    if not isinstance(metric, ReadsPositions):
        return None
    index = _as_index(metric.reads_positions, rows, "reads_positions").clone()
    index = torch.where(index < 0, index + n_pos, index)
    if bool(((index < 0) | (index >= n_pos)).any()):
        raise MetricError(
            f"metric {metric_name(metric)!r} reads positions {index.tolist()} outside "
            f"0..{n_pos - 1}"
        )
    return index


def _as_index(value: int | Sequence[int] | Tensor, rows: int, what: str) -> Int[Tensor, " batch"]:
    index = torch.as_tensor(value, dtype=torch.long).reshape(-1)
    if index.numel() == 1:
        return index.expand(rows)
    if index.numel() != rows:
        raise MetricError(f"{what} has {index.numel()} entries for a batch of {rows} rows")
    return index


def _token_ids(value: object, what: str) -> int:
    """Check token ids (one, a sequence or an integer tensor) once; return the largest."""
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise MetricError(f"{what} must hold integer token ids, got a {value.dtype} tensor")
        ids = [int(i) for i in value.reshape(-1).tolist()]
    else:
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        ids = []
        for item in items:
            if isinstance(item, bool):
                raise MetricError(f"{what} must hold integer token ids, got {item!r}")
            try:
                ids.append(operator.index(item))  # type: ignore[arg-type]
            except TypeError:
                raise MetricError(
                    f"{what} must hold integer token ids, got {type(item).__name__} {item!r}"
                ) from None
    if not ids:
        raise MetricError(f"{what} holds no token ids")
    negative = [i for i in ids if i < 0]
    if negative:
        raise MetricError(f"{what} holds negative token ids {negative}; ids are 0..d_vocab-1")
    return max(ids)


def _check_vocab(top: int, logits: Logits, what: str) -> None:
    if top >= logits.shape[-1]:
        raise MetricError(
            f"{what} id {top} is outside the model's vocabulary of {logits.shape[-1]} tokens "
            f"(0..{logits.shape[-1] - 1})"
        )


def _gather(logits: Logits, positions: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, positions.to(logits.device)]


@dataclass(frozen=True)
class TargetProb:
    """Mean probability of a target token at a position, over the rows of a batch.

    ROME's causal-tracing score: ``p(object)`` at the last position, averaged over noise samples.

    Attributes:
        target: Target token id, one for all rows or one per row.
        positions: Position read in each row (one for all rows or one per row; ``-1`` = last).

    Raises:
        MetricError: A target id that is not an integer or is negative (at construction), or one
            outside the vocabulary of the logits it is called on.
    """

    target: int | Sequence[int] | Tensor
    positions: int | Sequence[int] | Tensor = -1
    _top: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_top", _token_ids(self.target, "TargetProb.target"))

    def __call__(self, logits: Logits) -> Scalar:
        _check_vocab(self._top, logits, "TargetProb.target")
        rows = logits.shape[0]
        last = _gather(logits, _as_index(self.positions, rows, "positions"))
        probs = torch.softmax(last.float(), dim=-1)
        target = _as_index(self.target, rows, "target").to(logits.device)
        return probs.gather(-1, target[:, None]).mean()

    @property
    def name(self) -> str:
        """Label for results."""
        return "p(target)"

    @property
    def reads_positions(self) -> int | Sequence[int] | Tensor:
        """The one position read in each row (see :class:`ReadsPositions`)."""
        return self.positions


@dataclass(frozen=True)
class LogitDiff:
    """Mean logit difference ``answer - wrong`` at a position, over the rows of a batch.

    Attributes:
        answer: Correct token id (one, or one per row).
        wrong: Contrasting token id (one, or one per row).
        positions: Position read in each row (``-1`` = last).

    Raises:
        MetricError: An id that is not an integer or is negative (at construction), or one
            outside the vocabulary of the logits it is called on.
    """

    answer: int | Sequence[int] | Tensor
    wrong: int | Sequence[int] | Tensor
    positions: int | Sequence[int] | Tensor = -1
    _top: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        top = max(
            _token_ids(self.answer, "LogitDiff.answer"), _token_ids(self.wrong, "LogitDiff.wrong")
        )
        object.__setattr__(self, "_top", top)

    def __call__(self, logits: Logits) -> Scalar:
        _check_vocab(self._top, logits, "LogitDiff token")
        rows = logits.shape[0]
        last = _gather(logits, _as_index(self.positions, rows, "positions"))
        answer = _as_index(self.answer, rows, "answer").to(logits.device)
        wrong = _as_index(self.wrong, rows, "wrong").to(logits.device)
        return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None])).mean()

    @property
    def name(self) -> str:
        """Label for results."""
        return "logit diff"

    @property
    def reads_positions(self) -> int | Sequence[int] | Tensor:
        """The one position read in each row (see :class:`ReadsPositions`)."""
        return self.positions


def metric_name(metric: Any) -> str:
    """A label for a metric: its ``name`` attribute, else the function's name."""
    name = getattr(metric, "name", None)
    if isinstance(name, str):
        return name
    return getattr(metric, "__name__", type(metric).__name__)


def check_metric_value(value: Any, metric: Any) -> Scalar:
    """Turn a metric's return value into a 0-d float tensor, or refuse it.

    Raises:
        MetricError: The metric did not return exactly one number.
    """
    if isinstance(value, (int, float)):
        return torch.tensor(float(value))
    if not isinstance(value, Tensor):
        raise MetricError(
            f"metric {metric_name(metric)!r} returned {type(value).__name__}, expected a "
            "0-d tensor (one number per run)"
        )
    if value.dim() != 0:
        raise MetricError(
            f"metric {metric_name(metric)!r} returned a tensor of shape {tuple(value.shape)}, "
            "expected a 0-d tensor: one number per run (reduce over the batch, e.g. with .mean())"
        )
    return value.detach().reshape(()).float()
