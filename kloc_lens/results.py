"""Typed sweep results: tensors with the labels that explain them.

Every sweep returns a frozen dataclass whose ``values`` tensor carries its shape in the type
(``Float[Tensor, "layer pos"]`` and so on) and whose other fields say what the numbers are: the
layers, positions, heads and token strings of each axis, the spans of the prompt, the site, the
direction, the metric, the corruption, and the unpatched clean and corrupted scores. Results turn
into tidy pandas DataFrames and save to / load from one ``.safetensors`` file without loss.

A saved file's metadata carries the format tag ``kloc_lens.result/<version>`` (see
:data:`RESULT_FORMAT`), the result class and its labels as JSON; :func:`load_result` refuses a
file of another format, a newer version, a truncated file, labels that are malformed or of the
wrong type, and a tensor whose shape disagrees with its labels, each with a :class:`ResultError`.
Files written before the tag existed (class and labels only) read as version 0.

Example:
    >>> import torch
    >>> r = LayerPosResult(values=torch.tensor([[0.5, 0.9]]), layers=(0,), positions=(0, 1),
    ...     heads=(), str_tokens=("The", " cat"), spans={}, site="resid_pre",
    ...     direction=Direction.RESTORE, metric="p(target)", corruption="noise",
    ...     clean_score=1.0, corrupted_score=0.5)
    >>> r.effect
    tensor([[0.0000, 0.4000]])
    >>> list(r.to_dataframe().columns)
    ['layer', 'pos', 'token', 'value', 'effect']
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from kloc_lens._formats import read_tag, tag
from kloc_lens.errors import ResultError, choice
from kloc_lens.types import Direction, LayerHead, LayerPos, LayerPosHead, TraceKind

__all__ = [
    "RESULT_FORMAT",
    "AggregateSet",
    "AggregateTrace",
    "LayerHeadResult",
    "LayerPosHeadResult",
    "LayerPosResult",
    "PatchResult",
    "TraceResult",
    "TraceSet",
    "load_result",
]


RESULT_FORMAT = "kloc_lens.result"
"""The format name in the metadata of every saved result (with :data:`RESULT_VERSION`)."""
RESULT_VERSION = 1
"""The layout version written; files of a higher version are refused."""


def _file_meta(cls_name: str, labels: Any) -> dict[str, str]:
    return {
        "format": tag(RESULT_FORMAT, RESULT_VERSION),
        "class": cls_name,
        "labels": json.dumps(labels),
    }


@dataclass(frozen=True)
class PatchResult:
    """Fields shared by every sweep result (subclasses fix the shape of ``values``).

    Attributes:
        values: The metric after each patch.
        layers: Layer index of each entry along the ``layer`` axis.
        positions: Token position of each entry along the ``pos`` axis (empty if no such axis).
        heads: Head index of each entry along the ``head`` axis (empty if no such axis).
        str_tokens: Every token of the prompt as a string (empty for token-tensor inputs).
        spans: ``name -> (start, end)`` token spans of the prompt (subject, relation, ...).
        site: The site patched.
        direction: Restore clean into corrupted, or inject corrupted into clean.
        metric: Name of the metric.
        corruption: What the corrupted run was.
        clean_score: The metric on the clean run.
        corrupted_score: The metric on the corrupted run.
    """

    values: Float[Tensor, "..."]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    heads: tuple[int, ...]
    str_tokens: tuple[str, ...]
    spans: Mapping[str, tuple[int, int]]
    site: str
    direction: Direction
    metric: str
    corruption: str
    clean_score: float
    corrupted_score: float

    dims: ClassVar[tuple[str, ...]] = ()

    @property
    def effect(self) -> Float[Tensor, "..."]:
        """How far each patch moves the metric away from the run it was made in.

        Restore: ``value - corrupted_score`` (ROME's indirect effect). Inject:
        ``clean_score - value`` (the damage done).
        """
        if self.direction is Direction.RESTORE:
            return self.values - self.corrupted_score
        return self.clean_score - self.values

    @property
    def normalized(self) -> Float[Tensor, "..."]:
        """``effect`` divided by ``clean_score - corrupted_score`` (1 = full recovery)."""
        gap = self.clean_score - self.corrupted_score
        if gap == 0:
            raise ResultError("clean and corrupted scores are equal; nothing to normalise by")
        return self.effect / gap

    @property
    def total_effect(self) -> float:
        """``clean_score - corrupted_score``."""
        return self.clean_score - self.corrupted_score

    def _axis_labels(self) -> dict[str, tuple[int, ...]]:
        return {"layer": self.layers, "pos": self.positions, "head": self.heads}

    def _rows(self) -> Iterator[dict[str, Any]]:
        axes = [self._axis_labels()[d] for d in self.dims]
        values = self.values.detach().cpu()
        effect = self.effect.detach().cpu()
        for index in torch.cartesian_prod(*[torch.arange(len(a)) for a in axes]).reshape(
            -1, len(axes)
        ):
            key = tuple(int(i) for i in index)
            row: dict[str, Any] = {d: axes[n][key[n]] for n, d in enumerate(self.dims)}
            if "pos" in row:
                row = {
                    **row,
                    "token": self.str_tokens[row["pos"]] if self.str_tokens else "",
                }
            row["value"] = float(values[key])
            row["effect"] = float(effect[key])
            yield row

    def to_dataframe(self) -> pd.DataFrame:
        """One row per entry: the axis labels, the token string, ``value`` and ``effect``."""
        frame = pd.DataFrame(list(self._rows()))
        for name, value in self._extra_columns().items():
            frame[name] = value
        return frame

    def _extra_columns(self) -> dict[str, Any]:
        return {}

    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "values":
                continue
            value = getattr(self, f.name)
            if isinstance(value, (Direction, TraceKind)):
                value = value.value
            elif isinstance(value, Mapping):
                value = {k: list(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            meta[f.name] = value
        return meta

    def save(self, path: str | Path) -> Path:
        """Write the result to one ``.safetensors`` file (tensor + labels as metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = _file_meta(type(self).__name__, self._meta())
        save_file({"values": self.values.detach().cpu().contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchResult:
        """Read a result of this class written by :meth:`save`.

        Raises:
            ResultError: The file is not a kloc_lens result, or holds another class.
        """
        return _expect(load_result(path), cls, path)

    @classmethod
    def _from_parts(cls, values: Tensor, meta: Any, source: str) -> PatchResult:
        labels = _Labels(meta, source)
        kwargs = {f.name: labels.field(f.name) for f in fields(cls) if f.name != "values"}
        shape = tuple(len(kwargs[_AXIS_FIELD[d]]) for d in cls.dims)
        if tuple(values.shape) != shape:
            axes = ", ".join(f"{len(kwargs[_AXIS_FIELD[d]])} {d}s" for d in cls.dims)
            raise ResultError(
                f"{source}: values have shape {tuple(values.shape)}, but the labels name {axes} "
                f"(shape {shape})"
            )
        n_tokens = len(kwargs["str_tokens"])
        if n_tokens and "pos" in cls.dims:
            outside = [p for p in kwargs["positions"] if not 0 <= p < n_tokens]
            if outside:
                raise ResultError(
                    f"{source}: positions {outside} lie outside the {n_tokens} tokens of the prompt"
                )
        return cls(values=values, **kwargs)


@dataclass(frozen=True)
class LayerPosResult(PatchResult):
    """A sweep over layers and token positions."""

    values: LayerPos
    dims: ClassVar[tuple[str, ...]] = ("layer", "pos")


@dataclass(frozen=True)
class LayerHeadResult(PatchResult):
    """A sweep over layers and heads, each head patched at every position."""

    values: LayerHead
    dims: ClassVar[tuple[str, ...]] = ("layer", "head")


@dataclass(frozen=True)
class LayerPosHeadResult(PatchResult):
    """A sweep over layers, positions and heads."""

    values: LayerPosHead
    dims: ClassVar[tuple[str, ...]] = ("layer", "pos", "head")


@dataclass(frozen=True)
class TraceResult(LayerPosResult):
    """A ROME-protocol causal trace of one kind: restored scores per (layer, position).

    ``values[l, t]`` is the target's probability (or the chosen metric) when the clean state is
    restored at layer ``l`` (for MLP/attention: the window of layers around ``l``) and position
    ``t``; :attr:`indirect_effect` subtracts the corrupted score.

    Attributes:
        kind: Residual state, MLP window or attention window.
        window: Window size (1 for residual traces).
        severed: For severed traces, the component frozen to its corrupted outputs.
        target: The target string.
    """

    kind: TraceKind
    window: int
    severed: TraceKind | None
    target: str

    @property
    def indirect_effect(self) -> LayerPos:
        """``restored - corrupted`` score (ROME's indirect effect)."""
        return self.values - self.corrupted_score

    @property
    def label(self) -> str:
        """``"resid"``, ``"mlp"``, ``"attn"`` or ``"resid (MLP severed)"``."""
        if self.severed is None:
            return self.kind.value
        return f"{self.kind.value} ({self.severed.value} severed)"

    def _extra_columns(self) -> dict[str, Any]:
        return {"kind": self.label}


_CLASSES: dict[str, type[PatchResult]] = {
    cls.__name__: cls for cls in (LayerPosResult, LayerHeadResult, LayerPosHeadResult, TraceResult)
}


def _wanted(
    kind: TraceKind | str, severed: TraceKind | str | None
) -> tuple[TraceKind, TraceKind | None]:
    """Parse the ``get(kind, severed)`` of a trace set."""
    return (
        choice(TraceKind, kind, "kind", ResultError),
        None if severed is None else choice(TraceKind, severed, "severed", ResultError),
    )


@dataclass(frozen=True)
class TraceSet:
    """Several causal traces of the same prompt and corruption (residual, MLP, attention and
    severed variants), computed in one sweep."""

    traces: tuple[TraceResult, ...]

    def __iter__(self) -> Iterator[TraceResult]:
        return iter(self.traces)

    def __len__(self) -> int:
        return len(self.traces)

    def get(self, kind: TraceKind | str, severed: TraceKind | str | None = None) -> TraceResult:
        """The trace of ``kind`` (and severed component).

        Raises:
            ResultError: An unknown kind or severed component (the message lists the valid
                values), or the set holds no such trace.
        """
        want = _wanted(kind, severed)
        for trace in self.traces:
            if (trace.kind, trace.severed) == want:
                return trace
        have = ", ".join(t.label for t in self.traces)
        raise ResultError(f"no {want[0].value} trace (severed={want[1]}) in this set: {have}")

    @property
    def clean_score(self) -> float:
        """The metric on the clean run."""
        return self.traces[0].clean_score

    @property
    def corrupted_score(self) -> float:
        """The metric on the corrupted run."""
        return self.traces[0].corrupted_score

    def to_dataframe(self) -> pd.DataFrame:
        """All traces stacked, with a ``kind`` column."""
        return pd.concat([t.to_dataframe() for t in self.traces], ignore_index=True)

    def save(self, path: str | Path) -> Path:
        """Write every trace to one ``.safetensors`` file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # copies: traces may share one tensor, which safetensors refuses to write twice
        tensors = {
            f"trace{i}": t.values.detach().cpu().clone(memory_format=torch.contiguous_format)
            for i, t in enumerate(self)
        }
        labels = [t._meta() for t in self.traces]
        save_file(tensors, str(path), metadata=_file_meta("TraceSet", labels))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TraceSet:
        """Read a trace set written by :meth:`save`.

        Raises:
            ResultError: The file is not a kloc_lens result, or holds another class.
        """
        return _expect(load_result(path), cls, path)


BinMeans = Float[Tensor, "bin layer"]
"""Per-bin, per-layer means of a dataset aggregate."""


@dataclass(frozen=True)
class AggregateTrace:
    """The average indirect effect of one trace kind over a dataset, per position bin and layer.

    Attributes:
        mean: Mean indirect effect per (bin, layer).
        stderr: Standard error of that mean over facts (0 where fewer than two facts).
        counts: Number of facts that contribute to each bin.
        bins: Bin names.
        layers: Layer indices.
        kind: Residual, MLP or attention trace.
        severed: The severed component, for severed traces.
        window: Window size of the trace.
        span: The corrupted span (``"subject"``, ``"relation"``).
        n_facts: Number of facts aggregated.
        clean_score: Mean clean score over facts.
        corrupted_score: Mean corrupted score over facts.
    """

    mean: BinMeans
    stderr: BinMeans
    counts: tuple[int, ...]
    bins: tuple[str, ...]
    layers: tuple[int, ...]
    kind: TraceKind
    severed: TraceKind | None
    window: int
    span: str
    n_facts: int
    clean_score: float
    corrupted_score: float

    @property
    def label(self) -> str:
        """``"resid"``, ``"mlp"``, ``"attn"`` or ``"resid (mlp severed)"``."""
        if self.severed is None:
            return self.kind.value
        return f"{self.kind.value} ({self.severed.value} severed)"

    @property
    def total_effect(self) -> float:
        """Mean clean minus mean corrupted score."""
        return self.clean_score - self.corrupted_score

    def bin(self, name: str) -> Float[Tensor, " layer"]:
        """The per-layer mean effect of one bin.

        Raises:
            ResultError: No bin of that name.
        """
        if name not in self.bins:
            raise ResultError(f"no bin {name!r}; bins: {', '.join(self.bins)}")
        return self.mean[self.bins.index(name)]

    def peak(self, name: str | None = None) -> tuple[str, int, float]:
        """``(bin, layer, effect)`` of the largest mean effect (within one bin if given)."""
        values = self.mean if name is None else self.bin(name)[None]
        flat = int(values.argmax())
        row, col = divmod(flat, values.shape[1])
        return (name or self.bins[row]), self.layers[col], float(values.max())

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (bin, layer): mean, stderr, count, kind."""
        rows = [
            {
                "kind": self.label,
                "bin": b,
                "layer": layer,
                "mean": float(self.mean[i, j]),
                "stderr": float(self.stderr[i, j]),
                "count": self.counts[i],
            }
            for i, b in enumerate(self.bins)
            for j, layer in enumerate(self.layers)
        ]
        return pd.DataFrame(rows)

    def _labels(self) -> dict[str, Any]:
        return {
            "counts": list(self.counts),
            "bins": list(self.bins),
            "layers": list(self.layers),
            "kind": self.kind.value,
            "severed": None if self.severed is None else self.severed.value,
            "window": self.window,
            "span": self.span,
            "n_facts": self.n_facts,
            "clean_score": self.clean_score,
            "corrupted_score": self.corrupted_score,
        }

    @classmethod
    def _from_labels(cls, mean: Tensor, stderr: Tensor, meta: Any, source: str) -> AggregateTrace:
        labels = _Labels(meta, source)
        kwargs = {f.name: labels.field(f.name) for f in fields(cls) if f.name not in _TENSORS}
        shape = (len(kwargs["bins"]), len(kwargs["layers"]))
        for name, tensor in (("mean", mean), ("stderr", stderr)):
            if tuple(tensor.shape) != shape:
                raise ResultError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, but the labels name "
                    f"{shape[0]} bins and {shape[1]} layers (shape {shape})"
                )
        if len(kwargs["counts"]) != shape[0]:
            raise ResultError(
                f"{source}: {len(kwargs['counts'])} counts for {shape[0]} bins {kwargs['bins']}"
            )
        return cls(mean=mean, stderr=stderr, **kwargs)


@dataclass(frozen=True)
class AggregateSet:
    """Aggregated traces of every kind computed for a dataset."""

    traces: tuple[AggregateTrace, ...]

    def __iter__(self) -> Iterator[AggregateTrace]:
        return iter(self.traces)

    def __len__(self) -> int:
        return len(self.traces)

    def get(self, kind: TraceKind | str, severed: TraceKind | str | None = None) -> AggregateTrace:
        """The aggregate of ``kind`` (and severed component).

        Raises:
            ResultError: An unknown kind or severed component (the message lists the valid
                values), or no such aggregate.
        """
        want = _wanted(kind, severed)
        for trace in self.traces:
            if (trace.kind, trace.severed) == want:
                return trace
        raise ResultError(
            f"no {want[0].value} aggregate (severed={want[1]}); have "
            + ", ".join(t.label for t in self.traces)
        )

    def to_dataframe(self) -> pd.DataFrame:
        """All aggregates stacked."""
        return pd.concat([t.to_dataframe() for t in self.traces], ignore_index=True)

    def save(self, path: str | Path) -> Path:
        """Write to one ``.safetensors`` file (read back with :func:`kloc_lens.load_result`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for i, trace in enumerate(self.traces):
            tensors[f"mean{i}"] = (
                trace.mean.detach().cpu().clone(memory_format=torch.contiguous_format)
            )
            tensors[f"stderr{i}"] = (
                trace.stderr.detach().cpu().clone(memory_format=torch.contiguous_format)
            )
        labels = [t._labels() for t in self.traces]
        save_file(tensors, str(path), metadata=_file_meta("AggregateSet", labels))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AggregateSet:
        """Read an aggregate set written by :meth:`save`.

        Raises:
            ResultError: The file is not a kloc_lens result, or holds another class.
        """
        return _expect(load_result(path), cls, path)

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], labels: Any, source: str) -> AggregateSet:
        items = _label_list(labels, source)
        return cls(
            tuple(
                AggregateTrace._from_labels(
                    _tensor(tensors, f"mean{i}", source),
                    _tensor(tensors, f"stderr{i}", source),
                    label,
                    f"{source} aggregate {i}",
                )
                for i, label in enumerate(items)
            )
        )


_AXIS_FIELD = {"layer": "layers", "pos": "positions", "head": "heads"}
_TENSORS = ("values", "mean", "stderr")

R = TypeVar("R")


class _Labels:
    """Typed access to the JSON labels of one result; every error names the file and field."""

    def __init__(self, data: Any, source: str) -> None:
        if not isinstance(data, dict):
            raise ResultError(f"{source}: labels are a {type(data).__name__}, expected an object")
        self.data = data
        self.source = source

    def _bad(self, name: str, expected: str) -> ResultError:
        return ResultError(
            f"{self.source}: label {name!r} is {self.data[name]!r}, expected {expected}"
        )

    def field(self, name: str) -> Any:
        if name not in self.data:
            raise ResultError(f"{self.source}: labels lack field {name!r}")
        value = self.data[name]
        reader = _READERS.get(name)
        if reader is None:  # a field this module does not know how to read: a bug, not the file
            raise ResultError(f"{self.source}: no reader for label {name!r}")
        return reader(self, name, value)

    def ints(self, name: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise self._bad(name, "a list of integers")
        return tuple(value)

    def strs(self, name: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(name, "a list of strings")
        return tuple(value)

    def text(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def integer(self, name: str, value: Any) -> int:
        if not _is_int(value):
            raise self._bad(name, "an integer")
        return int(value)

    def number(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(name, "a number")
        return float(value)

    def direction(self, name: str, value: Any) -> Direction:
        return self._enum(name, value, Direction)

    def kind(self, name: str, value: Any) -> TraceKind:
        return self._enum(name, value, TraceKind)

    def severed(self, name: str, value: Any) -> TraceKind | None:
        return None if value is None else self._enum(name, value, TraceKind)

    def _enum(self, name: str, value: Any, kind: type[Direction] | type[TraceKind]) -> Any:
        try:
            return kind(value)
        except ValueError:
            options = ", ".join(repr(member.value) for member in kind)
            raise self._bad(name, f"one of {options}") from None

    def spans(self, name: str, value: Any) -> dict[str, tuple[int, int]]:
        if not isinstance(value, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_is_int(i) for i in v)
            for v in value.values()
        ):
            raise self._bad(name, "an object of [start, end] integer pairs")
        return {k: (int(v[0]), int(v[1])) for k, v in value.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_READERS = {
    "layers": _Labels.ints,
    "positions": _Labels.ints,
    "heads": _Labels.ints,
    "counts": _Labels.ints,
    "str_tokens": _Labels.strs,
    "bins": _Labels.strs,
    "spans": _Labels.spans,
    "site": _Labels.text,
    "metric": _Labels.text,
    "corruption": _Labels.text,
    "target": _Labels.text,
    "span": _Labels.text,
    "direction": _Labels.direction,
    "kind": _Labels.kind,
    "severed": _Labels.severed,
    "window": _Labels.integer,
    "n_facts": _Labels.integer,
    "clean_score": _Labels.number,
    "corrupted_score": _Labels.number,
}


def _label_list(labels: Any, source: str) -> list[Any]:
    if not isinstance(labels, list):
        raise ResultError(f"{source}: labels are a {type(labels).__name__}, expected a list")
    return labels


def _tensor(tensors: dict[str, Tensor], name: str, source: str) -> Tensor:
    if name not in tensors:
        have = ", ".join(sorted(tensors)) or "none"
        raise ResultError(f"{source} lacks the tensor {name!r} its labels describe (has: {have})")
    return tensors[name]


def _expect(result: object, cls: type[R], path: str | Path) -> R:
    if not isinstance(result, cls):
        raise ResultError(
            f"{str(Path(path))!r} holds a {type(result).__name__}, not a {cls.__name__}; "
            "read it with kloc_lens.load_result"
        )
    return result


def load_result(path: str | Path) -> PatchResult | TraceSet | AggregateSet:
    """Read a result written by ``save``.

    Raises:
        ResultError: The file is missing, not a safetensors file or a truncated one, of another
            format or a newer version, or its labels are malformed, of the wrong type, or disagree
            with the shape of its tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    source = repr(str(path))
    if not path.is_file():
        raise ResultError(f"no result file at {source}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ResultError(
            f"{source} is not a safetensors result file (damaged or truncated?): {err}"
        ) from err
    name = meta.get("class")
    if "format" in meta:
        read_tag(meta["format"], RESULT_FORMAT, RESULT_VERSION, source, ResultError)
    if name is None or "labels" not in meta:
        raise ResultError(f"{source} carries no kloc_lens result metadata")
    try:
        labels = json.loads(meta["labels"])
    except json.JSONDecodeError as err:
        raise ResultError(f"{source}: its labels are not valid JSON ({err})") from None
    if name == "AggregateSet":
        return AggregateSet._from_parts(tensors, labels, source)
    if name == "TraceSet":
        traces = tuple(
            TraceResult._from_parts(
                _tensor(tensors, f"trace{i}", source), label, f"{source} trace {i}"
            )
            for i, label in enumerate(_label_list(labels, source))
        )
        return TraceSet(traces)  # type: ignore[arg-type]
    if name not in _CLASSES:
        known = ", ".join(["AggregateSet", "TraceSet", *_CLASSES])
        raise ResultError(f"{source} holds an unknown result class {name!r} (known: {known})")
    return _CLASSES[name]._from_parts(_tensor(tensors, "values", source), labels, source)
