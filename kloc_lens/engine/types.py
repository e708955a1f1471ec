"""What the executor takes and returns: patches, runs, execution options, results.

A sweep is a list of *configurations*; each configuration is a tuple of :class:`Patch`
operations that copy one hook point's activation (at a position and head, or all of them) from
the clean or the corrupted :class:`Run` into the run being executed.

>>> from kloc_lens.sites import get_site
>>> patch = Patch(get_site("mlp_out"), layer=2, position=5, head=None, source=Source.CLEAN)
>>> patch.hook
'blocks.2.hook_mlp_out'
>>> ExecutionOptions(batch_size=8, precision="bf16").precision
<Precision.BF16: 'bf16'>
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from jaxtyping import Float, Int
from torch import Tensor

from kloc_lens.engine.budget import DEFAULT_MEMORY_BUDGET
from kloc_lens.errors import SweepError, choice
from kloc_lens.sites import Site

__all__ = [
    "Config",
    "ExecutionOptions",
    "ExecutionResult",
    "ExecutionStats",
    "Patch",
    "Precision",
    "Run",
    "Source",
    "resolve_options",
]


class Source(str, Enum):
    """Which cached run a patch copies from."""

    CLEAN = "clean"
    """The clean run."""
    CORRUPTED = "corrupted"
    """The corrupted run."""


class Precision(str, Enum):
    """Arithmetic of the patched passes (the clean and corrupted runs stay float32)."""

    FP32 = "fp32"
    """float32 throughout: the default and the reference."""
    TF32 = "tf32"
    """float32 tensors with TF32 matmuls (CUDA only; about 1e-3 relative error)."""
    BF16 = "bf16"
    """bfloat16 autocast (meant for GPUs; about 1e-2 relative error)."""
    FP16 = "fp16"
    """float16 autocast (meant for GPUs; about 1e-3 relative error, may overflow)."""


@dataclass(frozen=True)
class Patch:
    """Copy ``site``'s activation at ``layer`` from ``source`` into the executed run.

    ``position``/``head`` of ``None`` mean every position / every head.
    """

    site: Site
    layer: int
    position: int | None
    head: int | None
    source: Source
    hook: str = field(init=False, repr=False, compare=False)
    """The hook name (computed once: sweeps read it for every patch many times)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hook", self.site.hook_name(self.layer))


Config = Sequence[Patch]
"""One patch configuration: the patches applied together in one run."""


@dataclass(frozen=True)
class Run:
    """An input: token rows plus an optional edit of their token embeddings."""

    tokens: Int[Tensor, "row pos"]
    embed_edit: Callable[[Tensor], Tensor] | None = None


def _count(value: object, what: str, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise SweepError(f"{what} must be an integer >= 1, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise SweepError(f"{what} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        unit = " byte" if what == "memory_budget" else ""
        raise SweepError(f"{what} must be >= 1{unit}, got {number}")
    return number


@dataclass(frozen=True, init=False)
class ExecutionOptions:
    """How a sweep executes: one value taken by every sweep entry point.

    :func:`~kloc_lens.trace.activation_patching`, :func:`~kloc_lens.trace.causal_trace` and
    :func:`~kloc_lens.aggregate.trace_dataset` take it as ``options=`` and pass it on whole, so
    no entry point can drop one of its fields. None of them changes a sweep's numbers beyond
    float rounding, except ``precision`` (on request only).

    Attributes:
        batch_size: Configurations per forward pass; ``None`` chooses from ``memory_budget``.
        memory_budget: Bytes of activations one forward pass may use (at most half the memory
            free on the model's device when a sweep starts is used).
        precision: Arithmetic of the patched passes: ``fp32`` (default, the reference),
            ``tf32`` (CUDA), ``bf16`` or ``fp16`` autocast (GPUs; about 1e-2 / 1e-3 relative
            error). The clean and corrupted runs stay float32. Given as a :class:`Precision` or
            its value.
        progress: Show a progress bar.

    Raises:
        SweepError: A batch size or budget that is not an integer >= 1, an unknown precision,
            or a progress flag that is not a bool.
    """

    batch_size: int | None
    memory_budget: int
    precision: Precision
    progress: bool

    def __init__(
        self,
        batch_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        precision: Precision | str = Precision.FP32,
        progress: bool = True,
    ) -> None:
        if not isinstance(progress, bool):
            raise SweepError(f"progress must be True or False, got {progress!r}")
        object.__setattr__(self, "batch_size", _count(batch_size, "batch_size", optional=True))
        object.__setattr__(
            self, "memory_budget", _count(memory_budget, "memory_budget", optional=False)
        )
        object.__setattr__(self, "precision", choice(Precision, precision, "precision", SweepError))
        object.__setattr__(self, "progress", progress)

    def replace(
        self,
        *,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        precision: Precision | str | None = None,
        progress: bool | None = None,
    ) -> ExecutionOptions:
        """These options with the given fields changed (``None`` keeps a field).

        >>> ExecutionOptions().replace(progress=False).progress
        False
        """
        if batch_size is None and memory_budget is None and precision is None and progress is None:
            return self
        return ExecutionOptions(
            batch_size=self.batch_size if batch_size is None else batch_size,
            memory_budget=self.memory_budget if memory_budget is None else memory_budget,
            precision=self.precision if precision is None else precision,
            progress=self.progress if progress is None else progress,
        )


def resolve_options(
    options: ExecutionOptions | None,
    *,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    precision: Precision | str | None = None,
    progress: bool | None = None,
) -> ExecutionOptions:
    """``options`` (default :class:`ExecutionOptions`) with the shorthand keywords an entry
    point was given applied on top.

    >>> resolve_options(ExecutionOptions(batch_size=4), precision="bf16")
    ExecutionOptions(batch_size=4, memory_budget=2147483648, precision=<Precision.BF16: 'bf16'>, progress=True)

    Raises:
        SweepError: ``options`` is not an :class:`ExecutionOptions`, or a bad field value.
    """  # noqa: E501
    if options is None:
        options = ExecutionOptions()
    elif not isinstance(options, ExecutionOptions):
        raise SweepError(
            f"options must be an ExecutionOptions, got {type(options).__name__}: pass "
            "kloc_lens.ExecutionOptions(batch_size=..., memory_budget=..., precision=..., "
            "progress=...)"
        )
    return options.replace(
        batch_size=batch_size, memory_budget=memory_budget, precision=precision, progress=progress
    )


@dataclass(frozen=True)
class ExecutionStats:
    """How the configurations of one sweep were executed.

    Attributes:
        unchanged: Configurations whose patches change nothing (they score the base score).
        fast: Configurations run block by block from their first changed layer and position.
        plain: Configurations run as full forward passes.
        passes: Packed forward passes (block-by-block and full) after the two cached runs.
        work: Token-layers computed by the patched passes, as a share of a full forward pass of
            every configuration's rows.
        fallback: Why a shortcut was not taken (configurations on the plain path, or positions
            recomputed from the first one), or ``None``.
    """

    unchanged: int = 0
    fast: int = 0
    plain: int = 0
    passes: int = 0
    work: float = 1.0
    fallback: str | None = None


@dataclass(frozen=True)
class ExecutionResult:
    """Metric values of every configuration plus the two unpatched scores."""

    values: Float[Tensor, " config"]
    clean_score: float
    corrupted_score: float
    stats: ExecutionStats = field(default_factory=ExecutionStats)
