"""Dataset-level causal tracing: average indirect effects over facts, by position bins.

ROME averages the indirect effect (restored minus corrupted probability) over many facts after
grouping token positions into bins relative to the corrupted span. For subject corruption:

==========================  ========================================================
bin                         positions
==========================  ========================================================
first subject token         the span's first token
middle subject tokens       the tokens strictly between its first and last
last subject token          the span's last token
first subsequent token      the token right after the span
further tokens              the tokens after that, up to (not including) the last
last token                  the prompt's last token
==========================  ========================================================

Relation corruption uses the same bins around the relation span ("first relation token", ...).
Prompts with two spans that matter, such as the relation perspective's "The relation between
{subject} and {object} is", are binned around both (:func:`span_bins`): first, middle and last
token of each span in turn, the other tokens, and the last token (where the relation is the
answer), whichever span is corrupted.
Each fact contributes the mean over its positions in a bin (so a long subject does not weigh
more than a short one); a bin a fact has no token in (a one-token subject has no middle) is left
out for that fact, and the counts say how many facts each bin averages. The spread is the
standard error of the mean over facts.

Example:
    >>> position_bins(span=(2, 5), n_tokens=9, name="subject")["middle subject tokens"]
    (3,)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens.corrupt import Corruption, GaussianNoise
from kloc_lens.engine import ExecutionOptions, Precision, resolve_options
from kloc_lens.errors import ResultError, SpanError
from kloc_lens.facts import TokenizedPrompt
from kloc_lens.results import AggregateSet, AggregateTrace, TraceResult, TraceSet
from kloc_lens.trace import causal_trace
from kloc_lens.types import TraceKind

__all__ = [
    "DatasetTrace",
    "aggregate_traces",
    "bin_names",
    "position_bins",
    "span_bin_names",
    "span_bins",
    "trace_dataset",
]


def bin_names(name: str = "subject") -> tuple[str, ...]:
    """The six bin names around a span called ``name``."""
    return (
        f"first {name} token",
        f"middle {name} tokens",
        f"last {name} token",
        "first subsequent token",
        "further tokens",
        "last token",
    )


def position_bins(
    *, span: tuple[int, int], n_tokens: int, name: str = "subject"
) -> dict[str, tuple[int, ...]]:
    """Token positions of each bin for a span ``[start, end)`` of a prompt of ``n_tokens``.

    Raises:
        SpanError: The span is empty or outside the prompt.
    """
    start, end = span
    if not 0 <= start < end <= n_tokens:
        raise SpanError(f"{name} span {span} does not fit a prompt of {n_tokens} tokens")
    last = n_tokens - 1
    first_name, middle, last_name, subsequent, further, final = bin_names(name)
    return {
        first_name: (start,),
        middle: tuple(range(start + 1, end - 1)),
        last_name: (end - 1,),
        subsequent: (end,) if end <= last else (),
        further: tuple(range(end + 1, last)),
        final: (last,),
    }


def span_bin_names(names: Sequence[str]) -> tuple[str, ...]:
    """The bin names of :func:`span_bins` for spans called ``names``."""
    out: list[str] = []
    for name in names:
        out += [f"first {name} token", f"middle {name} tokens", f"last {name} token"]
    return (*out, "other tokens", "last token")


def span_bins(
    spans: Mapping[str, tuple[int, int]], n_tokens: int, names: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """Token positions of each bin around several spans (``names`` of ``spans``, in order).

    Each span gives its first, middle and last token; *other tokens* are those in no span and
    not last; *last token* is the prompt's last (also counted in a span that ends there).

    Example:
        >>> bins = span_bins({"subject": (3, 5), "object": (6, 8)}, 9, ["subject", "object"])
        >>> bins["last subject token"], bins["other tokens"], bins["last token"]
        ((4,), (0, 1, 2, 5), (8,))

    Raises:
        SpanError: A span is missing, empty, outside the prompt, or overlaps another.
    """
    if len(set(names)) != len(names) or not names:
        raise SpanError(f"span names {list(names)} must be distinct and at least one")
    taken: set[int] = set()
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name not in spans:
            raise SpanError(f"no {name!r} span; spans: {', '.join(spans) or 'none'}")
        start, end = spans[name]
        if not 0 <= start < end <= n_tokens:
            raise SpanError(
                f"{name} span {(start, end)} does not fit a prompt of {n_tokens} tokens"
            )
        inside = set(range(start, end))
        if inside & taken:
            raise SpanError(f"the {name} span {(start, end)} overlaps another of {list(names)}")
        taken |= inside
        out[f"first {name} token"] = (start,)
        out[f"middle {name} tokens"] = tuple(range(start + 1, end - 1))
        out[f"last {name} token"] = (end - 1,)
    last = n_tokens - 1
    out["other tokens"] = tuple(p for p in range(last) if p not in taken)
    out["last token"] = (last,)
    return out


def _bin_effects(
    trace: TraceResult, span: str, bin_spans: Sequence[str] | None = None
) -> dict[str, Tensor]:
    if span not in trace.spans:
        raise SpanError(f"trace of {''.join(trace.str_tokens)!r} has no {span!r} span")
    n_tokens = len(trace.str_tokens)
    if bin_spans is None:
        bins = position_bins(span=trace.spans[span], n_tokens=n_tokens, name=span)
    else:
        bins = span_bins(trace.spans, n_tokens, bin_spans)
    effect = trace.indirect_effect
    out = {}
    for name, positions in bins.items():
        columns = [trace.positions.index(p) for p in positions if p in trace.positions]
        if columns:
            out[name] = effect[:, columns].mean(1)
    return out


def aggregate_traces(
    traces: Sequence[TraceSet], span: str = "subject", *, bin_spans: Sequence[str] | None = None
) -> AggregateSet:
    """Average the traces of many facts into position bins around ``span``.

    Args:
        traces: One :class:`TraceSet` per fact, all with the same kinds and layers.
        span: The corrupted span the bins are placed around.
        bin_spans: Place the bins around each of these spans instead (:func:`span_bins`; the
            corrupted span is still ``span``).

    Raises:
        ResultError: No traces, or traces with different kinds or layers.
        SpanError: A trace lacks the span.
    """
    if not traces:
        raise ResultError("no traces to aggregate")
    labels = [t.label for t in traces[0]]
    names = bin_names(span) if bin_spans is None else span_bin_names(bin_spans)
    out = []
    for index, label in enumerate(labels):
        first = traces[0].traces[index]
        per_bin: dict[str, list[Tensor]] = {name: [] for name in names}
        for trace_set in traces:
            trace = trace_set.traces[index]
            if trace.label != label or trace.layers != first.layers:
                raise ResultError("traces to aggregate must share kinds and layers")
            for name, value in _bin_effects(trace, span, bin_spans).items():
                per_bin[name].append(value)
        n_layers = len(first.layers)
        mean = torch.zeros(len(names), n_layers)
        stderr = torch.zeros(len(names), n_layers)
        counts = []
        for i, name in enumerate(names):
            values = per_bin[name]
            counts.append(len(values))
            if values:
                stacked = torch.stack(values).float()
                mean[i] = stacked.mean(0)
                if len(values) > 1:
                    stderr[i] = stacked.std(0, unbiased=True) / len(values) ** 0.5
        out.append(
            AggregateTrace(
                mean=mean,
                stderr=stderr,
                counts=tuple(counts),
                bins=names,
                layers=first.layers,
                kind=first.kind,
                severed=first.severed,
                window=first.window,
                span=span,
                n_facts=len(traces),
                clean_score=float(sum(t.clean_score for t in traces) / len(traces)),
                corrupted_score=float(sum(t.corrupted_score for t in traces) / len(traces)),
            )
        )
    return AggregateSet(tuple(out))


@dataclass(frozen=True)
class DatasetTrace:
    """Causal traces of a dataset: every fact's traces and their aggregate."""

    traces: tuple[TraceSet, ...]
    aggregate: AggregateSet
    corruption: str


def trace_dataset(
    model: Any,
    prompts: Sequence[TokenizedPrompt],
    *,
    span: str = "subject",
    corruption: Corruption | Callable[[Sequence[TokenizedPrompt]], Corruption] | None = None,
    kinds: Sequence[TraceKind | str] = (TraceKind.RESID, TraceKind.MLP, TraceKind.ATTN),
    sever: Sequence[TraceKind | str] = (TraceKind.MLP, TraceKind.ATTN),
    window: int | None = None,
    samples: int = 10,
    seed: int = 0,
    options: ExecutionOptions | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    precision: Precision | str | None = None,
    progress: bool | None = None,
) -> DatasetTrace:
    """Trace every prompt with ``span`` corrupted and aggregate the indirect effects.

    Args:
        model: The hooked model.
        prompts: Tokenized prompts with the span and a target (filter to known facts first).
        span: The span to corrupt and bin around.
        corruption: A scheme, or a function of the prompts that makes one; default: ROME's
            Gaussian noise, 3 x the std of the span's token embeddings over these prompts.
        kinds: Trace kinds.
        sever: Components for severed residual traces.
        window: MLP/attention window; default
            :func:`~kloc_lens.trace.default_window` of the model's layers.
        samples: Noise samples for the default corruption.
        seed: Noise seed for the default corruption.
        options: How each fact's sweep executes (:class:`~kloc_lens.engine.ExecutionOptions`),
            passed on whole to :func:`~kloc_lens.trace.causal_trace`; its ``progress`` shows one
            bar over the facts instead of one per fact.
        batch_size: Shorthand: overrides ``options.batch_size``.
        memory_budget: Shorthand: overrides ``options.memory_budget``.
        precision: Shorthand: overrides ``options.precision``.
        progress: Shorthand: overrides ``options.progress``.

    Raises:
        ResultError: No prompts.
        SweepError: Bad execution options, kinds or window (see :func:`causal_trace`).
    """
    opts = resolve_options(
        options,
        batch_size=batch_size,
        memory_budget=memory_budget,
        precision=precision,
        progress=progress,
    )
    if not prompts:
        raise ResultError("no prompts to trace")
    if corruption is None:
        scheme: Corruption = GaussianNoise.from_prompts(
            model, prompts, span=span, samples=samples, seed=seed
        )
    elif isinstance(corruption, Corruption):
        scheme = corruption
    else:
        scheme = corruption(prompts)
    traces = tuple(
        causal_trace(
            model,
            prompt,
            corruption=scheme,
            kinds=kinds,
            sever=sever,
            window=window,
            options=opts.replace(progress=False),
        )
        for prompt in tqdm(prompts, desc=f"tracing ({span} corrupted)", disable=not opts.progress)
    )
    return DatasetTrace(traces, aggregate_traces(traces, span), scheme.describe())
