"""Corruption schemes: how the corrupted run of a patching sweep is made.

Each scheme is a small frozen dataclass that applies to a span of a tokenized prompt
(``"subject"``, ``"relation"``, ``"object"``, ``"last"``) or to explicit token positions, and
produces a :class:`CorruptedInput`: the corrupted token rows (one per sample) and, for schemes that
act on embeddings, an edit applied at ``hook_embed``. The same :class:`CorruptedInput` serves every
patch of a sweep, so every restore sees the same noise (ROME's protocol).

==========================  =================================================================
scheme                      corrupted run
==========================  =================================================================
:class:`GaussianNoise`      add seeded Gaussian noise to the span's token embeddings (ROME)
:class:`TokenReplacement`   swap the span's text for another of the same token length
:class:`Resample`           other whole prompts of the same token length, one row each
:class:`ZeroAblation`       set the span's token embeddings to zero
:class:`MeanAblation`       set the span's token embeddings to a mean embedding
==========================  =================================================================

Example:
    >>> noise = GaussianNoise(scale=0.1, samples=10, seed=0, span="subject")
    >>> noise.describe()
    'Gaussian noise (scale 0.1, 10 samples, seed 0) on subject'
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kloc_lens.errors import CorruptionError, SpanError
from kloc_lens.facts import Prompt, TokenizedPrompt, tokenize

__all__ = [
    "CorruptedInput",
    "Corruption",
    "GaussianNoise",
    "MeanAblation",
    "Resample",
    "TokenReplacement",
    "ZeroAblation",
    "embedding_std",
]

EmbedEdit = Callable[[Float[Tensor, "row pos d_model"]], Float[Tensor, "row pos d_model"]]


@dataclass(frozen=True)
class CorruptedInput:
    """The corrupted run of a sweep.

    Attributes:
        tokens: Corrupted token ids, one row per sample.
        embed_edit: Applied to the token embeddings (``hook_embed``) of those rows, or ``None``.
        positions: The token positions the corruption touched.
        description: What was done, for labels and reports.
    """

    tokens: Int[Tensor, "row pos"]
    embed_edit: EmbedEdit | None
    positions: tuple[int, ...]
    description: str

    @property
    def rows(self) -> int:
        """Number of corrupted rows (samples)."""
        return int(self.tokens.shape[0])


def _where_label(where: str | Sequence[int]) -> str:
    return where if isinstance(where, str) else f"positions {list(where)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_index(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _check_span(span: object, owner: str) -> None:
    """A span name or a sequence of integer positions; anything else is refused by name."""
    if isinstance(span, str):
        return
    if not isinstance(span, (Sequence, Tensor)) or not all(_is_index(p) for p in span):
        raise CorruptionError(
            f"{owner}.span must be a span name ('subject', 'relation', 'object', 'last') or a "
            f"sequence of integer positions, got {span!r}"
        )


def _check_positive(value: object, what: str) -> float:
    """A finite number above zero (not a bool, a string or a tensor), else a named error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptionError(
            f"{what} must be a positive finite number, got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise CorruptionError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


class Corruption(ABC):
    """A way to corrupt a prompt. Subclass it to add a scheme: implement :meth:`apply` and
    :meth:`describe`."""

    span: str | Sequence[int]

    @abstractmethod
    def apply(self, model: Any, prompt: TokenizedPrompt) -> CorruptedInput:
        """Build the corrupted run of ``prompt`` on ``model``."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what the scheme does."""

    def __str__(self) -> str:
        return self.describe()


def embedding_std(model: Any, prompts: Iterable[TokenizedPrompt], span: str = "subject") -> float:
    """Standard deviation of the token embeddings of a span over a set of prompts.

    ROME's noise scale is three times this value over the subjects of a fact set.

    Raises:
        SpanError: A prompt lacks the span.
        CorruptionError: No prompts were given.
    """
    ids = [int(t) for p in prompts for t in p.tokens[list(p.span(span).positions)]]
    if not ids:
        raise CorruptionError("embedding_std needs at least one prompt")
    with torch.no_grad():
        embeds = model.W_E[torch.tensor(ids, device=model.W_E.device)]
    std = float(embeds.float().std())
    if not math.isfinite(std):
        raise CorruptionError(
            f"the {span} token embeddings have standard deviation {std} (a single token, or "
            "non-finite embeddings): no noise scale can be derived from them"
        )
    return std


@dataclass(frozen=True)
class GaussianNoise(Corruption):
    """Add Gaussian noise to the token embeddings of a span (ROME's corruption).

    The noise of all samples is drawn once from a generator seeded with ``seed``; every patch of a
    sweep sees the same noise.

    Attributes:
        scale: Standard deviation of the noise. ``None`` takes 3 x the standard deviation of the
            whole token-embedding matrix; :meth:`from_prompts` gives ROME's 3 x the std of
            subject-token embeddings over a fact set.
        samples: Number of noisy rows.
        seed: Seed of the noise.
        span: Span name or explicit positions.
        replace: Replace the embeddings by the noise instead of adding it (an option of ROME's
            code).
    """

    scale: float | None = None
    samples: int = 10
    seed: int = 0
    span: str | Sequence[int] = "subject"
    replace: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.samples) or self.samples < 1:
            raise CorruptionError(
                f"GaussianNoise.samples must be an integer >= 1, got {self.samples!r}"
            )
        if self.scale is not None:
            _check_positive(self.scale, "GaussianNoise.scale")
        if not _is_int(self.seed):
            raise CorruptionError(f"GaussianNoise.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.replace, bool):
            raise CorruptionError(f"GaussianNoise.replace must be a bool, got {self.replace!r}")
        _check_span(self.span, "GaussianNoise")

    @classmethod
    def from_prompts(
        cls,
        model: Any,
        prompts: Iterable[TokenizedPrompt],
        *,
        factor: float = 3.0,
        samples: int = 10,
        seed: int = 0,
        span: str | Sequence[int] = "subject",
    ) -> GaussianNoise:
        """ROME's noise: ``factor`` x the std of the span's token embeddings over ``prompts``.

        Raises:
            CorruptionError: ``factor`` is not a positive finite number, or the embeddings'
                standard deviation is not finite.
        """
        _check_positive(factor, "GaussianNoise.from_prompts factor")
        name = span if isinstance(span, str) else "subject"
        scale = factor * embedding_std(model, prompts, name)
        return cls(scale=scale, samples=samples, seed=seed, span=span)

    def resolved_scale(self, model: Any) -> float:
        """The noise scale used on ``model``.

        Raises:
            CorruptionError: The default scale (3 x the std of ``W_E``) is not finite.
        """
        if self.scale is not None:
            return float(self.scale)
        with torch.no_grad():
            scale = 3.0 * float(model.W_E.float().std())
        if not math.isfinite(scale):
            raise CorruptionError(
                f"the default noise scale 3 x std(W_E) is {scale}: the embedding holds "
                "non-finite values; pass GaussianNoise(scale=...)"
            )
        return scale

    def apply(self, model: Any, prompt: TokenizedPrompt) -> CorruptedInput:
        positions = prompt.positions(self.span)
        scale = self.resolved_scale(model)
        generator = torch.Generator().manual_seed(self.seed)
        noise = scale * torch.randn(
            self.samples, len(positions), model.cfg.d_model, generator=generator
        )
        index = torch.tensor(positions)
        replace = self.replace

        def edit(embed: Float[Tensor, "row pos d_model"]) -> Float[Tensor, "row pos d_model"]:
            rows = embed.shape[0]
            if rows % noise.shape[0]:
                raise CorruptionError(f"noise of {noise.shape[0]} samples cannot cover {rows} rows")
            full = torch.zeros_like(embed)
            full[:, index] = noise.to(embed).repeat(rows // noise.shape[0], 1, 1)
            if replace:
                keep = torch.ones(embed.shape[1], 1, dtype=embed.dtype, device=embed.device)
                keep[index] = 0
                return embed * keep + full
            return embed + full

        tokens = prompt.tokens[None].expand(self.samples, -1).clone()
        return CorruptedInput(tokens, edit, positions, self._describe(scale))

    def _describe(self, scale: float | None) -> str:
        shown = "3 x std(W_E)" if scale is None else f"{scale:.4g}"
        verb = "replacing" if self.replace else "on"
        return (
            f"Gaussian noise (scale {shown}, {self.samples} samples, seed {self.seed}) "
            f"{verb} {_where_label(self.span)}"
        )

    def describe(self) -> str:
        return self._describe(self.scale)


@dataclass(frozen=True)
class TokenReplacement(Corruption):
    """Replace the text of a span by another string of the same token length (symmetric token
    replacement, e.g. another fact's subject).

    Attributes:
        replacement: The text put in place of the span.
        span: The span name.
    """

    replacement: str
    span: str = "subject"

    def __post_init__(self) -> None:
        if not isinstance(self.replacement, str) or not self.replacement.strip():
            raise CorruptionError(
                f"TokenReplacement.replacement must be a non-empty string, got {self.replacement!r}"
            )
        if not isinstance(self.span, str):
            raise CorruptionError(
                f"TokenReplacement.span must be a span name ('subject', 'relation', 'object'), "
                f"got {self.span!r}"
            )

    def apply(self, model: Any, prompt: TokenizedPrompt) -> CorruptedInput:
        if self.span not in prompt.prompt.char_spans:
            raise SpanError(f"prompt {prompt.text!r} has no {self.span!r} span to replace")
        start, end = prompt.prompt.char_spans[self.span]
        text = prompt.text[:start] + self.replacement + prompt.text[end:]
        spans = dict(prompt.prompt.char_spans)
        shift = len(self.replacement) - (end - start)
        spans = {
            name: (a if a < end else a + shift, b if b < end else b + shift)
            for name, (a, b) in spans.items()
        }
        spans[self.span] = (start, start + len(self.replacement))
        corrupted = tokenize(model, Prompt(text, prompt.prompt.target, spans))
        if len(corrupted) != len(prompt):
            raise CorruptionError(
                f"token replacement changes the length: {prompt.text!r} has {len(prompt)} tokens, "
                f"{text!r} has {len(corrupted)}; choose a replacement of the same token length"
            )
        if corrupted.span(self.span) != prompt.span(self.span):
            raise CorruptionError(
                f"replacement {self.replacement!r} does not occupy the same token positions as "
                f"the {self.span} of {prompt.text!r}"
            )
        positions = tuple(
            i for i in range(len(prompt)) if int(prompt.tokens[i]) != int(corrupted.tokens[i])
        )
        return CorruptedInput(corrupted.tokens[None].clone(), None, positions, self.describe())

    def describe(self) -> str:
        return f"token replacement of {self.span} by {self.replacement!r}"


@dataclass(frozen=True)
class Resample(Corruption):
    """Use other prompts of the same token length as the corrupted run, one row each.

    Attributes:
        prompts: The replacement prompts.
    """

    prompts: Sequence[str]
    span: str | Sequence[int] = ()

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str) or not self.prompts:
            raise CorruptionError("Resample.prompts must be a non-empty tuple of prompt strings")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        for index, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise CorruptionError(
                    f"Resample.prompts[{index}] must be a prompt string, got "
                    f"{type(prompt).__name__} {prompt!r}"
                )
        _check_span(self.span, "Resample")

    def apply(self, model: Any, prompt: TokenizedPrompt) -> CorruptedInput:
        rows = []
        for text in self.prompts:
            other = tokenize(model, text)
            if len(other) != len(prompt):
                raise CorruptionError(
                    f"resampled prompt {text!r} has {len(other)} tokens, but {prompt.text!r} "
                    f"has {len(prompt)}"
                )
            rows.append(other.tokens)
        tokens = torch.stack(rows)
        changed = (tokens != prompt.tokens[None]).any(0).nonzero().flatten().tolist()
        return CorruptedInput(tokens, None, tuple(changed), self.describe())

    def describe(self) -> str:
        return f"resampling from {len(self.prompts)} prompt(s)"


@dataclass(frozen=True)
class ZeroAblation(Corruption):
    """Set the token embeddings of a span to zero."""

    span: str | Sequence[int] = "subject"

    def __post_init__(self) -> None:
        _check_span(self.span, "ZeroAblation")

    def apply(self, model: Any, prompt: TokenizedPrompt) -> CorruptedInput:
        positions = prompt.positions(self.span)
        index = torch.tensor(positions)

        def edit(embed: Float[Tensor, "row pos d_model"]) -> Float[Tensor, "row pos d_model"]:
            out = embed.clone()
            out[:, index] = 0.0
            return out

        return CorruptedInput(prompt.tokens[None].clone(), edit, positions, self.describe())

    def describe(self) -> str:
        return f"zero ablation of {_where_label(self.span)} embeddings"


@dataclass(frozen=True)
class MeanAblation(Corruption):
    """Set the token embeddings of a span to a mean embedding.

    Attributes:
        span: Span name or explicit positions.
        mean: The vector to use; ``None`` takes the mean of the token-embedding matrix.
            :meth:`from_prompts` takes the mean embedding of a span over a set of prompts.
    """

    span: str | Sequence[int] = "subject"
    mean: Float[Tensor, " d_model"] | None = None

    def __post_init__(self) -> None:
        _check_span(self.span, "MeanAblation")
        if self.mean is None:
            return
        if not isinstance(self.mean, Tensor) or self.mean.dim() != 1:
            shown = tuple(self.mean.shape) if isinstance(self.mean, Tensor) else self.mean
            raise CorruptionError(
                f"MeanAblation.mean must be a vector [d_model] or None, got {shown!r}"
            )
        _check_finite_mean(self.mean, "MeanAblation.mean")

    @classmethod
    def from_prompts(
        cls, model: Any, prompts: Iterable[TokenizedPrompt], span: str = "subject"
    ) -> MeanAblation:
        """Mean ablation with the mean embedding of ``span`` tokens over ``prompts``."""
        ids = [int(t) for p in prompts for t in p.tokens[list(p.span(span).positions)]]
        if not ids:
            raise CorruptionError("MeanAblation.from_prompts needs at least one prompt")
        with torch.no_grad():
            mean = model.W_E[torch.tensor(ids, device=model.W_E.device)].mean(0).detach().clone()
        return cls(span=span, mean=mean)

    def apply(self, model: Any, prompt: TokenizedPrompt) -> CorruptedInput:
        positions = prompt.positions(self.span)
        with torch.no_grad():
            mean = self.mean if self.mean is not None else model.W_E.mean(0).detach().clone()
        if self.mean is None:
            _check_finite_mean(mean, "the mean of W_E")
        if mean.shape != (model.cfg.d_model,):
            raise CorruptionError(
                f"MeanAblation.mean has shape {tuple(mean.shape)}, expected ({model.cfg.d_model},)"
            )
        index = torch.tensor(positions)

        def edit(embed: Float[Tensor, "row pos d_model"]) -> Float[Tensor, "row pos d_model"]:
            out = embed.clone()
            out[:, index] = mean.to(embed)
            return out

        return CorruptedInput(prompt.tokens[None].clone(), edit, positions, self.describe())

    def describe(self) -> str:
        source = "mean of W_E" if self.mean is None else "given mean"
        return f"mean ablation ({source}) of {_where_label(self.span)} embeddings"


def _check_finite_mean(mean: Tensor, what: str) -> None:
    bad = ~torch.isfinite(mean)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise CorruptionError(
            f"{what} holds {int(bad.sum())} non-finite value(s) ({float(mean[first])} at "
            f"index {first}); mean ablation needs a finite vector"
        )
