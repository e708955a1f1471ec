"""The settings of a study run, and its error type."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, no_type_check

from kloc_lens.errors import KlocLensError
from kloc_lens.trace import default_window

__all__ = ["StudyConfig", "StudyError"]


class StudyError(KlocLensError):
    """The study cannot run as asked: no known fact, bad settings, a foreign output directory."""


# The settings check themselves in __post_init__ with named errors (a float count is a StudyError
# naming the setting); no_type_check keeps the test suite's runtime type checker (jaxtyping's
# import hook) from answering first with its own error.
@no_type_check
@dataclass(frozen=True)
class StudyConfig:
    """Settings of a study run (all recorded in ``results.json``).

    Attributes:
        n_trace: Known facts traced per perspective (sampled with ``seed``).
        n_trace_relation_prompts: Facts known from both perspectives whose relation-perspective
            prompt ("The relation between {subject} and {object} is") is traced twice, once
            with the subject and once with the object corrupted (the second reading of
            relation-side tracing); 0 skips it.
        n_edit: Known facts edited per perspective at the chosen layer.
        n_layer_sweep: Of those, how many are also edited at every layer of ``edit_layers`` (the
            layer trade-off: efficacy against relation specificity).
        edit_layers: Layers of the trade-off sweep; ``None`` for every layer.
        n_retrace: Of the edited facts, how many are traced again on the edited model (each
            perspective): did the causal site move? (:func:`~kloc_lens.edit.retrace_edit`).
        window: MLP/attention window; ``None`` for :func:`~kloc_lens.trace.default_window`.
        samples: Noise samples per trace.
        noise_factor: Noise scale in standard deviations of the span's token embeddings
            (ROME: 3).
        seed: Seed of the fact sampling and of the noise.
        edit_layer: The layer edited; ``None`` takes it from the entity trace (the layer of
            the MLP-window peak at the last subject token).
        edit_steps: Cap on the value fit's steps; ``None`` keeps the editor's default (ROME's
            20). The fit stops once its loss is met.
        edit_contexts: Generated contexts per length (5 and 10 tokens) that keys are averaged
            over and the value is fitted in, besides the bare prompt; ``None`` keeps the
            editor's default (ROME's 10, 21 prompts in all); 0 reads keys from the bare prompt.
            ``kloc-lens study`` on a factworld model takes
            :data:`~kloc_lens.factworld.EDIT_CONTEXTS` (3), measured there.
        none_target: The relation-perspective answer meaning "no relation" (the study's
            ``"None"``).
        n_bootstrap: Resamples of every bootstrap interval.
        n_queries: Facts known from both perspectives whose knowledge neurons are found for
            every prompt of both perspectives (query localization, :mod:`.queries`); 0 skips it.
        neuron_steps: Integrated-gradient steps of the knowledge neurons (Dai et al.: 20).
        neuron_threshold: A prompt's neurons have at least this share of its largest
            attribution (Dai et al.: 0.2).
        neuron_share: A perspective's selected neurons are kept on more than this share of
            its prompts (Dai et al.: 0.5).
    """

    n_trace: int = 300
    n_trace_relation_prompts: int = 100
    n_edit: int = 200
    n_layer_sweep: int = 30
    edit_layers: tuple[int, ...] | None = None
    n_retrace: int = 10
    window: int | None = None
    samples: int = 10
    noise_factor: float = 3.0
    seed: int = 0
    edit_layer: int | None = None
    edit_steps: int | None = None
    edit_contexts: int | None = None
    none_target: str = "None"
    n_bootstrap: int = 1000
    n_queries: int = 50
    neuron_steps: int = 20
    neuron_threshold: float = 0.2
    neuron_share: float = 0.5

    def __post_init__(self) -> None:
        counts = {
            "n_trace": (self.n_trace, 1),
            "n_trace_relation_prompts": (self.n_trace_relation_prompts, 0),
            "n_edit": (self.n_edit, 0),
            "n_layer_sweep": (self.n_layer_sweep, 0),
            "n_retrace": (self.n_retrace, 0),
            "samples": (self.samples, 1),
            "n_bootstrap": (self.n_bootstrap, 1),
            "seed": (self.seed, 0),
            "n_queries": (self.n_queries, 0),
            "neuron_steps": (self.neuron_steps, 1),
        }
        for name, (value, least) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise StudyError(f"StudyConfig.{name}={value!r}: use an integer >= {least}")
        optional = {
            "window": (self.window, 1),
            "edit_layer": (self.edit_layer, 0),
            "edit_steps": (self.edit_steps, 0),
            "edit_contexts": (self.edit_contexts, 0),
        }
        for name, (value, least) in optional.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise StudyError(f"StudyConfig.{name}={value!r}: use None or an integer >= {least}")
        if not (isinstance(self.noise_factor, (int, float)) and math.isfinite(self.noise_factor)):
            raise StudyError(f"StudyConfig.noise_factor={self.noise_factor!r}: use a finite number")
        if self.noise_factor <= 0:
            raise StudyError(f"StudyConfig.noise_factor={self.noise_factor!r}: use a number > 0")
        for name, inside, where in (
            ("neuron_threshold", lambda x: 0.0 < x <= 1.0, "(0, 1]"),
            ("neuron_share", lambda x: 0.0 <= x < 1.0, "[0, 1)"),
        ):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and inside(value)):
                raise StudyError(f"StudyConfig.{name}={value!r}: use a number in {where}")
        if self.edit_layers is not None:
            layers = tuple(self.edit_layers)
            if not layers or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers
            ):
                raise StudyError(
                    f"StudyConfig.edit_layers={self.edit_layers!r}: use None (every layer) or "
                    "a non-empty list of layer indices >= 0"
                )
            object.__setattr__(self, "edit_layers", tuple(sorted(set(layers))))
        if not self.none_target.strip():
            raise StudyError("StudyConfig.none_target is blank")

    def window_for(self, n_layers: int) -> int:
        """The window used on a model with ``n_layers`` layers."""
        return self.window if self.window is not None else default_window(n_layers)

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """The layers of the trade-off sweep on a model with ``n_layers`` layers.

        Raises:
            StudyError: A layer outside the model.
        """
        if self.edit_layers is None:
            return tuple(range(n_layers))
        outside = [x for x in self.edit_layers if x >= n_layers]
        if outside:
            raise StudyError(
                f"StudyConfig.edit_layers has {outside}, outside the model's layers "
                f"0..{n_layers - 1}"
            )
        return self.edit_layers

    def check_for(self, n_layers: int) -> None:
        """Refuse settings that do not fit a model of ``n_layers`` layers (before any work)."""
        self.layers_for(n_layers)
        if self.edit_layer is not None and self.edit_layer >= n_layers:
            raise StudyError(
                f"StudyConfig.edit_layer={self.edit_layer} is outside the model's layers "
                f"0..{n_layers - 1}"
            )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        data = asdict(self)
        if self.edit_layers is not None:
            data["edit_layers"] = list(self.edit_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyConfig:
        """Read :meth:`as_dict` back.

        Raises:
            StudyError: An unknown or missing setting.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise StudyError(f"unknown study settings {unknown}; known: {sorted(names)}")
        values = dict(data)
        if values.get("edit_layers") is not None:
            values["edit_layers"] = tuple(values["edit_layers"])
        return cls(**values)
