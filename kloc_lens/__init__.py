"""kloc_lens: locate and edit factual knowledge in hooked language models.

The public API, by concept:

- substrate: :func:`load_model`, :func:`from_hf`
- facts and spans: :class:`Fact`, :class:`Prompt`, :func:`tokenize`, :func:`tokenize_batch`
- corruption: :class:`GaussianNoise`, :class:`TokenReplacement`, :class:`Resample`,
  :class:`ZeroAblation`, :class:`MeanAblation`
- sites: :func:`register_site`, :func:`get_site`, :func:`list_sites`
- sweeps: :func:`activation_patching`, :func:`causal_trace`, :func:`default_window`, and the
  execution options all of them take, :class:`ExecutionOptions`
- gradient estimates: :func:`attribution_patching` (AtP, AtP*), :func:`screen_then_patch`
- knowledge neurons: :func:`knowledge_neurons`, :class:`KnowledgeNeurons`
- metrics: :class:`TargetProb`, :class:`LogitDiff`
- results: :class:`LayerPosResult`, :class:`LayerHeadResult`, :class:`LayerPosHeadResult`,
  :class:`TraceResult`, :class:`TraceSet`, :func:`load_result`
- editing: :class:`RomeEditor`, :class:`MemitEditor`, :class:`EditRequest`,
  :class:`RankOneEdit`, :func:`evaluate_editor`, :func:`edit_layer_sweep`,
  :func:`trace_edit_regression` (more in :mod:`kloc_lens.edit`)
- datasets and the study: :mod:`kloc_lens.datasets`, :mod:`kloc_lens.aggregate`,
  :mod:`kloc_lens.study`, :mod:`kloc_lens.factworld`
- figures and views: :mod:`kloc_lens.plot`, :mod:`kloc_lens.vis`
"""

from kloc_lens.attribution import AttributionError, AttributionMethod, attribution_patching
from kloc_lens.corrupt import (
    CorruptedInput,
    Corruption,
    GaussianNoise,
    MeanAblation,
    Resample,
    TokenReplacement,
    ZeroAblation,
)
from kloc_lens.edit import (
    CommittedEdit,
    EditEvaluation,
    EditRequest,
    MemitEditor,
    RankOneEdit,
    RomeEditor,
    SecondMoment,
    TransferMatrix,
    edit_layer_sweep,
    evaluate_edit,
    evaluate_editor,
    second_moment,
    trace_edit_regression,
)
from kloc_lens.engine import ExecutionOptions, Precision
from kloc_lens.errors import (
    CorruptionError,
    EditError,
    HookNotFiredError,
    KlocLensError,
    MetricError,
    ModelError,
    PromptError,
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
from kloc_lens.neurons import KnowledgeNeurons, NeuronAttribution, NeuronError, knowledge_neurons
from kloc_lens.results import (
    LayerHeadResult,
    LayerPosHeadResult,
    LayerPosResult,
    PatchResult,
    TraceResult,
    TraceSet,
    load_result,
)
from kloc_lens.screen import ScreenedPatching, screen_then_patch
from kloc_lens.sites import (
    Site,
    add_hook_point,
    get_site,
    list_sites,
    register_site,
    unregister_site,
)
from kloc_lens.trace import Sweep, activation_patching, causal_trace, default_window
from kloc_lens.types import Direction, TraceKind

__version__ = "0.1.0"

__all__ = [
    "AttributionError",
    "AttributionMethod",
    "CommittedEdit",
    "CorruptedInput",
    "Corruption",
    "CorruptionError",
    "Direction",
    "EditError",
    "EditEvaluation",
    "EditRequest",
    "ExecutionOptions",
    "Fact",
    "GaussianNoise",
    "HookNotFiredError",
    "KlocLensError",
    "KnowledgeNeurons",
    "LayerHeadResult",
    "LayerPosHeadResult",
    "LayerPosResult",
    "LogitDiff",
    "MeanAblation",
    "MemitEditor",
    "MetricError",
    "ModelError",
    "NeuronAttribution",
    "NeuronError",
    "PatchResult",
    "Perspective",
    "Precision",
    "Prompt",
    "PromptBatch",
    "PromptError",
    "RankOneEdit",
    "Resample",
    "ResultError",
    "RomeEditor",
    "ScreenedPatching",
    "SecondMoment",
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
    "TransferMatrix",
    "ZeroAblation",
    "activation_patching",
    "add_hook_point",
    "attribution_patching",
    "causal_trace",
    "check_model",
    "default_window",
    "edit_layer_sweep",
    "evaluate_edit",
    "evaluate_editor",
    "from_hf",
    "get_site",
    "knowledge_neurons",
    "list_sites",
    "load_model",
    "load_result",
    "register_site",
    "screen_then_patch",
    "second_moment",
    "target_token_ids",
    "tokenize",
    "tokenize_batch",
    "trace_edit_regression",
    "unregister_site",
]
