"""Facts, their prompts from both perspectives, and token spans located from tokenizer offsets.

A :class:`Fact` is a triplet (subject, relation, object) with templates for the two perspectives
of the study:

- entity perspective: ``"The mother tongue of {subject} is"`` -> object (``" French"``);
- relation perspective: ``"The relation between {subject} and {object} is"`` -> relation.

Formatting a template records the character range of every field it fills, so spans never come
from searching the text (a subject that also occurs elsewhere in the prompt is still found where
the template put it). :func:`tokenize` maps those character ranges to token positions with the
tokenizer's offset mapping, so leading spaces, a BOS token and multi-token names are handled the
way the tokenizer itself splits the text.

Example:
    >>> fact = Fact("Danielle Darrieux", "mother tongue", "French")
    >>> prompt = fact.entity_prompt()
    >>> prompt.text, prompt.target
    ('The mother tongue of Danielle Darrieux is', 'French')
    >>> prompt.text[slice(*prompt.char_spans["subject"])]
    'Danielle Darrieux'
"""

from __future__ import annotations

import operator
import re
import string
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from kloc_lens._tokens import bos_id, encode, pad_id, pad_rows
from kloc_lens.errors import PromptError, SpanError, choice

__all__ = [
    "Fact",
    "Perspective",
    "Prompt",
    "PromptBatch",
    "TokenSpan",
    "TokenizedPrompt",
    "check_template",
    "check_tokens",
    "find_word",
    "target_token_ids",
    "tokenize",
    "tokenize_batch",
]

SPAN_NAMES = ("subject", "relation", "object")


class Perspective(str, Enum):
    """From which side a fact is asked."""

    ENTITY = "entity"
    """Subject and relation are given; the answer is the object."""
    RELATION = "relation"
    """Subject and object are given; the answer is the relation."""


@dataclass(frozen=True)
class Prompt:
    """A prompt text, its expected continuation and the character ranges of its parts.

    Attributes:
        text: The prompt.
        target: The expected answer, without leading space (``"French"``).
        char_spans: ``name -> (start, end)`` character ranges of ``subject``, ``relation``,
            ``object`` where the prompt contains them.
        perspective: The perspective the prompt asks from, if it comes from a fact.
    """

    text: str
    target: str = ""
    char_spans: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    perspective: Perspective | None = None

    @classmethod
    def from_text(cls, text: str, target: str = "", **parts: str) -> Prompt:
        """A prompt whose spans are found by searching ``text`` for each given part.

        The first occurrence as a whole word is used (a relation ``"age"`` is not found inside
        ``"language"``); build prompts from templates (:class:`Fact`) when a part occurs more
        than once.

        Raises:
            PromptError: ``text`` or a part is not a string.
            SpanError: A part does not occur in ``text`` as a whole word.
        """
        if not isinstance(text, str):
            raise PromptError(f"prompt text must be a string, got {type(text).__name__}")
        spans: dict[str, tuple[int, int]] = {}
        for name, part in parts.items():
            if not isinstance(part, str):
                raise PromptError(f"{name} must be a string, got {type(part).__name__} {part!r}")
            start = find_word(text, part)
            if not part or start < 0:
                raise SpanError(f"{name} {part!r} does not occur in prompt {text!r}")
            spans[name] = (start, start + len(part))
        return cls(text, target, spans)


def find_word(text: str, part: str, *, last: bool = False) -> int:
    """Where ``part`` occurs in ``text`` as whole words (first, or ``last``), else ``-1``.

    A part that starts (ends) with a letter or digit must not continue a word of ``text``
    before (after) it:

    >>> find_word("The language of Ana is", "age"), find_word("Her age is", "age")
    (-1, 4)
    """
    if not part:
        return -1
    before = r"(?<!\w)" if re.match(r"\w", part[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", part[-1]) else ""
    hits = [m.start() for m in re.finditer(before + re.escape(part) + after, text)]
    if not hits:
        return -1
    return hits[-1] if last else hits[0]


_FIELDS = ("subject", "relation", "object")


def check_template(template: object, what: str, fields: Sequence[str] = _FIELDS) -> str:
    """Refuse a template that is not a string, has a stray brace or an unknown field.

    >>> check_template("The {relation} of {subject} is", "entity template")
    'The {relation} of {subject} is'
    >>> check_template("The relation} of {subject} is", "entity template")
    Traceback (most recent call last):
    ...
    kloc_lens.errors.SpanError: entity template 'The relation} of {subject} is' is not a valid
    template (Single '}' encountered in format string); write a literal brace as '{{' or '}}'

    Raises:
        SpanError: The template is malformed; the message names it.
    """
    if not isinstance(template, str):
        raise SpanError(f"{what} must be a string, got {type(template).__name__} {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise SpanError(
            f"{what} {template!r} is not a valid template ({err}); write a literal brace as "
            "'{{' or '}}'"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise SpanError(f"{what} {template!r}: field {{{name}}} may not carry a format spec")
        if name not in fields:
            raise SpanError(
                f"{what} {template!r} has field {{{name}}}, expected only "
                f"{', '.join('{' + key + '}' for key in fields)}"
            )
    return template


def format_template(
    template: str, values: Mapping[str, str]
) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill ``{name}`` fields of ``template`` and record where each field landed (first use).

    Raises:
        SpanError: A stray brace, a format spec or a field not in ``values``.
    """
    pieces: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    length = 0
    check_template(template, "template", tuple(values))
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        length += len(literal)
        if name is None:
            continue
        value = values[name]
        spans.setdefault(name, (length, length + len(value)))
        pieces.append(value)
        length += len(value)
    return "".join(pieces), spans


@dataclass(frozen=True)
class Fact:
    """A knowledge triplet with prompts for both perspectives.

    Templates use ``{subject}``, ``{relation}`` and ``{object}`` fields. Entity templates must
    contain ``{subject}``; relation templates ``{subject}`` and ``{object}``. If an entity
    template spells the relation out literally instead of using ``{relation}``, the relation span
    is found by searching the template's literal text for ``relation``.

    Attributes:
        subject: ``"Danielle Darrieux"``.
        relation: Surface form of the relation, ``"mother tongue"``; the relation-perspective
            answer.
        object: ``"French"``; the entity-perspective answer.
        entity_template: Template of the main entity prompt.
        relation_template: Template of the main relation prompt.
        entity_paraphrases: More entity templates (generalisation).
        relation_paraphrases: More relation templates.
        new_object: Target object of an edit, if any.
        relation_id: Identifier of the relation (``"P103"``), if known.
        neighborhood_prompts: Entity prompts about *other* subjects whose answer is this fact's
            object (specificity checks of edits).
    """

    subject: str
    relation: str
    object: str
    entity_template: str = "The {relation} of {subject} is"
    relation_template: str = "The relation between {subject} and {object} is"
    entity_paraphrases: tuple[str, ...] = ()
    relation_paraphrases: tuple[str, ...] = ()
    new_object: str | None = None
    relation_id: str | None = None
    neighborhood_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("subject", "relation", "object"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise SpanError(f"Fact.{name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise SpanError(f"Fact.{name} is empty")
        for name in ("new_object", "relation_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SpanError(f"Fact.{name} must be a string, got {type(value).__name__}")
        for name in ("entity_paraphrases", "relation_paraphrases", "neighborhood_prompts"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise SpanError(
                    f"Fact.{name} must be a tuple of strings, got {type(value).__name__} {value!r}"
                )
            for item in value:
                if not isinstance(item, str):
                    raise SpanError(f"Fact.{name} holds {item!r}, not a string")
            object.__setattr__(self, name, tuple(value))
        entity = [("entity_template", self.entity_template)] + [
            (f"entity_paraphrases[{i}]", t) for i, t in enumerate(self.entity_paraphrases)
        ]
        relation = [("relation_template", self.relation_template)] + [
            (f"relation_paraphrases[{i}]", t) for i, t in enumerate(self.relation_paraphrases)
        ]
        for what, template in entity + relation:
            check_template(template, f"Fact.{what}")
        for _, template in entity:
            if "{subject}" not in template:
                raise SpanError(f"entity template {template!r} has no {{subject}} field")
        for _, template in relation:
            if "{subject}" not in template or "{object}" not in template:
                raise SpanError(
                    f"relation template {template!r} needs both {{subject}} and {{object}}"
                )

    def _values(self, obj: str | None = None) -> dict[str, str]:
        return {"subject": self.subject, "relation": self.relation, "object": obj or self.object}

    def _prompt(
        self, template: str, target: str, perspective: Perspective, obj: str | None
    ) -> Prompt:
        text, spans = format_template(template, self._values(obj))
        if "relation" not in spans:
            literal = template
            for name, value in self._values(obj).items():
                literal = literal.replace("{" + name + "}", "\0" * len(value))
            start = find_word(literal, self.relation)
            if start >= 0:
                spans["relation"] = (start, start + len(self.relation))
        return Prompt(text, target, spans, perspective)

    def entity_prompt(self, template: str | None = None) -> Prompt:
        """The entity-perspective prompt (answer: the object)."""
        return self._prompt(template or self.entity_template, self.object, Perspective.ENTITY, None)

    def relation_prompt(self, template: str | None = None, *, object: str | None = None) -> Prompt:
        """The relation-perspective prompt (answer: the relation); ``object`` replaces the object
        (the study's add prompt uses the new object)."""
        return self._prompt(
            template or self.relation_template, self.relation, Perspective.RELATION, object
        )

    def prompts(self, perspective: Perspective | str) -> list[Prompt]:
        """The main prompt and every paraphrase of one perspective.

        Raises:
            PromptError: ``perspective`` is not one of ``'entity'``, ``'relation'``.
        """
        if choice(Perspective, perspective, "perspective", PromptError) is Perspective.ENTITY:
            return [self.entity_prompt(t) for t in (self.entity_template, *self.entity_paraphrases)]
        return [
            self.relation_prompt(t) for t in (self.relation_template, *self.relation_paraphrases)
        ]


@dataclass(frozen=True)
class TokenSpan:
    """Token positions ``start .. end-1`` of a part of a tokenized prompt."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise SpanError(f"empty or negative token span [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def positions(self) -> tuple[int, ...]:
        """Every position of the span."""
        return tuple(range(self.start, self.end))

    @property
    def last(self) -> int:
        """The span's last position."""
        return self.end - 1


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as the model sees it.

    Attributes:
        prompt: The prompt.
        tokens: Token ids, BOS included when the model prepends one.
        str_tokens: The tokens as strings.
        offsets: Character range of each token in ``prompt.text`` (``(0, 0)`` for BOS).
        spans: Token spans of ``subject``/``relation``/``object`` where present, and ``last``.
    """

    prompt: Prompt
    tokens: Int[Tensor, " pos"]
    str_tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    spans: Mapping[str, TokenSpan]

    @property
    def text(self) -> str:
        """The prompt text."""
        return self.prompt.text

    def __len__(self) -> int:
        return len(self.str_tokens)

    def span(self, name: str) -> TokenSpan:
        """The token span called ``name``.

        Raises:
            SpanError: The prompt has no such span; the message names the prompt.
        """
        try:
            return self.spans[name]
        except KeyError:
            raise SpanError(
                f"prompt {self.text!r} has no {name!r} span (has: {', '.join(self.spans)})"
            ) from None

    def positions(self, where: str | Sequence[int]) -> tuple[int, ...]:
        """Resolve a span name or explicit positions (negative ones count from the end).

        Raises:
            SpanError: Unknown span, or a position outside the prompt.
        """
        if isinstance(where, str):
            return self.span(where).positions
        try:
            items = list(where)
        except TypeError:
            raise SpanError(
                f"positions must be a span name or a sequence of integers, got "
                f"{type(where).__name__} {where!r}"
            ) from None
        length = len(self)
        resolved = []
        for pos in items:
            try:
                pos = operator.index(pos)
            except TypeError:
                raise SpanError(
                    f"position {pos!r} of prompt {self.text!r} is not an integer"
                ) from None
            idx = pos + length if pos < 0 else pos
            if not 0 <= idx < length:
                raise SpanError(f"position {pos} is outside prompt {self.text!r} ({length} tokens)")
            resolved.append(idx)
        if not resolved:
            raise SpanError(f"no positions given for prompt {self.text!r}")
        return tuple(sorted(set(resolved)))


def _char_to_token_span(
    offsets: Sequence[tuple[int, int]], start: int, end: int, text: str, name: str, bos: bool
) -> TokenSpan:
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and not (bos and i == 0)]
    if not hits:
        raise SpanError(f"{name} {text[start:end]!r} covers no token of prompt {text!r}")
    return TokenSpan(hits[0], hits[-1] + 1)


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _not_a_prompt(prompt: object) -> PromptError:
    kind = type(prompt).__name__
    hint = ""
    if isinstance(prompt, (list, tuple, PromptBatch)):
        hint = " (several prompts: tokenize_batch or trace_dataset, one prompt per call here)"
    elif isinstance(prompt, Fact):
        hint = " (a Fact: pass fact.entity_prompt() or fact.relation_prompt())"
    return PromptError(f"prompt must be a Prompt or a string, got {kind}{hint}")


def _check_ids(
    model: Any, ids: Sequence[int], prompt: Prompt, spans: Mapping[str, TokenSpan]
) -> None:
    """Refuse what the model cannot run: too long, ids outside the vocabulary, unknown tokens."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and len(ids) > n_ctx:
        raise PromptError(
            f"prompt {_shown(prompt.text)} is {len(ids)} tokens long, more than the model's "
            f"context of n_ctx={n_ctx} tokens"
        )
    d_vocab = getattr(model.cfg, "d_vocab", None)
    if isinstance(d_vocab, int) and ids and not 0 <= min(ids) <= max(ids) < d_vocab:
        bad = sorted({i for i in ids if not 0 <= i < d_vocab})
        raise PromptError(
            f"the tokenizer writes prompt {_shown(prompt.text)} with ids {bad}, outside the "
            f"model's vocabulary 0..{d_vocab - 1}"
        )
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is None:
        return
    for name, span in spans.items():
        if name != "last" and any(ids[i] == unk for i in span.positions):
            start, end = prompt.char_spans[name]
            raise PromptError(
                f"{name} {prompt.text[start:end]!r} of prompt {_shown(prompt.text)} is not in the "
                f"vocabulary: it tokenizes to the unknown token {model.tokenizer.unk_token!r}"
            )


def check_tokens(model: Any, tokens: Tensor, what: str) -> None:
    """Refuse token ids the model cannot embed, before any forward pass.

    For token tensors given directly (clean or corrupted runs of a sweep) rather than through
    :func:`tokenize`, which checks its own prompts.

    Args:
        model: The hooked model (``cfg.d_vocab``, ``cfg.n_ctx``).
        tokens: Token ids, ``[pos]`` or ``[batch, pos]``.
        what: The argument, as messages should name it (``"corrupted tokens"``).

    Raises:
        PromptError: Not an integer tensor, ids outside ``0..d_vocab-1``, or rows longer than
            the model's context.
    """
    if (
        not isinstance(tokens, Tensor)
        or tokens.dtype.is_floating_point
        or tokens.dtype
        in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        )
    ):
        shown = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
        raise PromptError(f"{what} must be an integer tensor of token ids, got {shown}")
    if tokens.numel() == 0:
        raise PromptError(f"{what} hold no tokens")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and tokens.shape[-1] > n_ctx:
        raise PromptError(
            f"{what} are {tokens.shape[-1]} tokens long, more than the model's context of "
            f"n_ctx={n_ctx} tokens"
        )
    d_vocab = int(model.cfg.d_vocab)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        bad = sorted({int(i) for i in tokens.flatten().tolist() if not 0 <= int(i) < d_vocab})
        raise PromptError(
            f"{what} hold ids {bad[:10]}, outside the model's vocabulary 0..{d_vocab - 1}"
        )


def tokenize(model: Any, prompt: Prompt | str, **parts: str) -> TokenizedPrompt:
    """Tokenize a prompt and locate its spans from the tokenizer's offsets.

    Every sweep and edit tokenizes through here, so this is where a prompt the model cannot
    take is refused, before any forward pass.

    Args:
        model: A hooked model (its tokenizer and ``cfg.default_prepend_bos`` are used).
        prompt: A :class:`Prompt`, or a plain string whose parts are given as keywords.
        **parts: For a plain string: ``subject="..."`` and so on, located as whole words.

    Returns:
        The tokenized prompt with spans ``subject``/``relation``/``object`` (where present) and
        ``last``.

    Raises:
        PromptError: ``prompt`` is not a prompt (a list, a :class:`PromptBatch`, ...); the prompt
            is longer than the model's context (``cfg.n_ctx``) or tokenizes to ids outside its
            vocabulary; a subject, relation or object tokenizes to the unknown token.
        SpanError: A part is not in the prompt or covers no token.
    """
    if isinstance(prompt, TokenizedPrompt):
        prompt = prompt.prompt
    if isinstance(prompt, str):
        prompt = Prompt.from_text(prompt, **parts)
    elif not isinstance(prompt, Prompt):
        raise _not_a_prompt(prompt)
    elif parts:
        raise SpanError("give parts as keywords only with a plain-string prompt")
    ids, offsets = encode(model, prompt.text)
    if not ids:
        raise SpanError(f"prompt {prompt.text!r} tokenizes to nothing")
    prepend = bos_id(model) is not None
    spans = {
        name: _char_to_token_span(offsets, start, end, prompt.text, name, prepend)
        for name, (start, end) in prompt.char_spans.items()
    }
    spans["last"] = TokenSpan(len(ids) - 1, len(ids))
    _check_ids(model, ids, prompt, spans)
    str_tokens = _str_tokens(model.tokenizer, ids)
    return TokenizedPrompt(
        prompt=prompt,
        tokens=torch.tensor(ids, dtype=torch.long),
        str_tokens=str_tokens,
        offsets=tuple(offsets),
        spans=spans,
    )


_DECODED: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _str_tokens(tokenizer: Any, ids: Sequence[int]) -> tuple[str, ...]:
    """Each id decoded alone, remembered per tokenizer (one token's text needs no context, and
    studies tokenize the same few thousand ids hundreds of thousands of times)."""
    try:
        known = _DECODED.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: decode every time
        return tuple(tokenizer.decode([i]) for i in ids)
    for i in ids:
        if i not in known:
            known[i] = tokenizer.decode([i])
    return tuple(known[i] for i in ids)


def target_token_ids(model: Any, prompt: Prompt | str, target: str | None = None) -> list[int]:
    """Token ids of a target as a continuation of the prompt (``prompt + " " + target``).

    The target is tokenized in context, so a tokenizer that merges the leading space into the
    first token (GPT-2's ``" French"``) gives the same ids the model would produce.

    Raises:
        PromptError: The prompt or target is not a string, or a token of the target is the
            tokenizer's unknown token (its first included).
        SpanError: The target is empty or tokenizes to nothing.
    """
    if isinstance(prompt, TokenizedPrompt):
        prompt = prompt.prompt
    if not isinstance(prompt, (Prompt, str)):
        raise _not_a_prompt(prompt)
    text = prompt.text if isinstance(prompt, Prompt) else prompt
    if target is None:
        if not isinstance(prompt, Prompt):
            raise SpanError("no target given for a plain-string prompt")
        target = prompt.target
    if not isinstance(target, str):
        raise PromptError(f"target must be a string, got {type(target).__name__} {target!r}")
    stripped = target.strip()
    if not stripped:
        raise SpanError(f"target {target!r} for prompt {text!r} is empty")
    full = f"{text} {stripped}"
    encoded = model.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = [
        int(i)
        for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        if b > len(text) and a >= len(text) - 0 and b > a
    ]
    if not ids:
        raise SpanError(f"target {target!r} tokenizes to nothing after prompt {text!r}")
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        which = "its first token" if ids[0] == unk else f"token {ids.index(unk)} of it"
        raise PromptError(
            f"target {target!r} is not in the vocabulary: {which} is the unknown token "
            f"{model.tokenizer.unk_token!r}"
        )
    return ids


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of different lengths padded on the right into one batch.

    Right padding keeps every real token at its own position, so with causal attention each
    row's numbers equal those of the prompt run alone; read logits at ``last``.
    """

    prompts: tuple[TokenizedPrompt, ...]
    tokens: Int[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return len(self.prompts)


def tokenize_batch(model: Any, prompts: Sequence[Prompt | str | TokenizedPrompt]) -> PromptBatch:
    """Tokenize prompts and pad them on the right into one batch.

    Raises:
        PromptError: ``prompts`` is a single string or prompt rather than a sequence of them, or
            one of them cannot be tokenized (see :func:`tokenize`).
        SpanError: No prompts.
    """
    if isinstance(prompts, (str, Prompt, TokenizedPrompt)):
        raise PromptError(
            f"tokenize_batch takes a sequence of prompts, got one {type(prompts).__name__}"
        )
    if not prompts:
        raise SpanError("no prompts to tokenize")
    items = tuple(p if isinstance(p, TokenizedPrompt) else tokenize(model, p) for p in prompts)
    tokens = pad_rows([item.tokens for item in items], pad_id(model))
    last = torch.tensor([len(p) - 1 for p in items], dtype=torch.long)
    return PromptBatch(items, tokens, last)
