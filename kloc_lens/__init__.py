"""kloc_lens: locate and edit factual knowledge in hooked language models.

The public API, by concept:

- substrate: :func:`load_model`, :func:`from_hf`
- facts and spans: :class:`Fact`, :class:`Prompt`, :func:`tokenize`, :func:`tokenize_batch`
- corruption: :class:`GaussianNoise`, :class:`TokenReplacement`, :class:`Resample`,
  :class:`ZeroAblation`, :class:`MeanAblation`
- sites: :func:`register_site`, :func:`get_site`, :func:`list_sites`
- sweeps: :func:`activation_patching`, :func:`causal_trace`
- metrics: :class:`TargetProb`, :class:`LogitDiff`
- results: :class:`LayerPosResult`, :class:`LayerHeadResult`, :class:`LayerPosHeadResult`,
  :class:`TraceResult`, :class:`TraceSet`, :func:`load_result`
- figures: :mod:`kloc_lens.plot`
"""

from kloc_lens.corrupt import (
    CorruptedInput,
    Corruption,
    GaussianNoise,
    MeanAblation,
    Resample,
    TokenReplacement,
    ZeroAblation,
)
from kloc_lens.errors import (
    CorruptionError,
    KlocLensError,
    MetricError,
    ModelError,
    ResultError,
    SiteError,
    SpanError,
    SweepError,
)
from kloc_lens.facts import (
    Fact,
    Perspective,
    Prompt,
    PromptBatch,
    TokenizedPrompt,
    TokenSpan,
    target_token_ids,
    tokenize,
    tokenize_batch,
)
from kloc_lens.metrics import LogitDiff, TargetProb
from kloc_lens.model import check_model, from_hf, load_model
from kloc_lens.results import (
    LayerHeadResult,
    LayerPosHeadResult,
    LayerPosResult,
    PatchResult,
    TraceResult,
    TraceSet,
    load_result,
)
from kloc_lens.sites import (
    Site,
    add_hook_point,
    get_site,
    list_sites,
    register_site,
    unregister_site,
)
from kloc_lens.trace import Sweep, activation_patching, causal_trace
from kloc_lens.types import Direction, TraceKind

__version__ = "0.1.0"

__all__ = [
    "CorruptedInput",
    "Corruption",
    "CorruptionError",
    "Direction",
    "Fact",
    "GaussianNoise",
    "KlocLensError",
    "LayerHeadResult",
    "LayerPosHeadResult",
    "LayerPosResult",
    "LogitDiff",
    "MeanAblation",
    "MetricError",
    "ModelError",
    "PatchResult",
    "Perspective",
    "Prompt",
    "PromptBatch",
    "Resample",
    "ResultError",
    "Site",
    "SiteError",
    "SpanError",
    "Sweep",
    "SweepError",
    "TargetProb",
    "TokenReplacement",
    "TokenSpan",
    "TokenizedPrompt",
    "TraceKind",
    "TraceResult",
    "TraceSet",
    "ZeroAblation",
    "activation_patching",
    "add_hook_point",
    "causal_trace",
    "check_model",
    "from_hf",
    "get_site",
    "list_sites",
    "load_model",
    "load_result",
    "register_site",
    "target_token_ids",
    "tokenize",
    "tokenize_batch",
    "unregister_site",
]
