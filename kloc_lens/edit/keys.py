"""Keys: what an edited projection reads at the token where a fact is recalled.

ROME treats an output projection ``W`` as a key-value memory: the activation it reads at the
subject's last token (the *key* ``k``) selects what it writes (the *value* ``k @ W``). The key
of a fact is that activation averaged over the fact's prompt prefixed by short texts the model
generates itself, so that the edit does not depend on one exact wording before the subject:

    k* = mean over contexts c and prompts p of  key_hook(c + p)[key token]

The contexts are sampled from the model (top-k sampling from BOS, seeded), e.g. 10 of 5 tokens
and 10 of 10 tokens plus the bare prompt. The key token is the subject's last token for entity
edits (ROME); the last token of the relation or object span, or the prompt's last token, are
options (for relation edits, see ``notes/knowledge-localization.md``).

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> model, planted = planted_model()
    >>> contexts = generate_contexts(model, ContextSpec(count=2, lengths=(3,)))
    >>> len(contexts), contexts[0]
    (3, '')
    >>> prompt = Fact(planted.subjects[0], "home", planted.objects[0]).entity_prompt()
    >>> compute_key(model, [prompt], layer=planted.mlp_layer, contexts=contexts).shape
    torch.Size([512])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.edit._errors import EditError, choice
from kloc_lens.edit._tokens import Rows, device_of, pad_rows
from kloc_lens.edit.projection import Projection
from kloc_lens.facts import Prompt, TokenizedPrompt, tokenize

__all__ = [
    "ContextSpec",
    "KeyRows",
    "KeyToken",
    "compute_key",
    "generate_contexts",
    "key_position",
    "key_rows",
    "mean_at_keys",
    "with_context",
]

Hook = tuple[str, Callable[..., Any]]
"""A forward hook as ``run_with_hooks`` takes it: ``(hook_name, function)``."""


class KeyToken(str, Enum):
    """Which token of the prompt the key is read at (and the value is written at)."""

    SUBJECT_LAST = "subject_last"
    """The subject's last token (ROME; the default for entity edits)."""
    RELATION_LAST = "relation_last"
    """The last token of the relation span (prompts that spell the relation out)."""
    OBJECT_LAST = "object_last"
    """The last token of the object span (relation prompts; RETS's choice)."""
    LAST = "last"
    """The prompt's last token."""

    @property
    def span(self) -> str:
        """The name of the span whose last token this is."""
        return self.value.removesuffix("_last")


def key_position(prompt: TokenizedPrompt, key_token: KeyToken | str) -> int:
    """The position of the key token in a tokenized prompt.

    Raises:
        SpanError: The prompt has no such span (e.g. a subject absent from the prompt).
    """
    return prompt.span(choice(KeyToken, key_token, "key_token").span).last


@dataclass(frozen=True)
class ContextSpec:
    """How to generate the contexts that prefix a prompt when averaging keys.

    Attributes:
        count: Contexts per length.
        lengths: Lengths of the contexts, in generated tokens.
        seed: Seed of the sampling.
        top_k: Sample each token from the model's ``top_k`` most likely tokens.
        bare: Include the bare prompt (an empty context) first.
        separator: Text between a context and the prompt.
    """

    count: int = 10
    lengths: tuple[int, ...] = (5, 10)
    seed: int = 0
    top_k: int = 5
    bare: bool = True
    separator: str = ". "

    def __post_init__(self) -> None:
        if self.count < 0 or any(length < 1 for length in self.lengths):
            raise EditError(
                f"context count must be >= 0 and lengths >= 1, got count {self.count}, "
                f"lengths {self.lengths}"
            )
        if self.top_k < 1:
            raise EditError(f"top_k must be >= 1, got {self.top_k}")
        if not self.bare and (self.count == 0 or not self.lengths):
            raise EditError("no contexts: set bare=True or count and lengths")


def generate_contexts(model: Any, spec: ContextSpec | None = None) -> tuple[str, ...]:
    """Sample short texts from the model to prefix prompts with.

    Generation starts from the BOS token (EOS if there is none), samples each token from the
    ``top_k`` most likely ones (special tokens excluded) with a seeded generator on the CPU, and
    decodes without special tokens. The same model and spec give the same contexts.

    Args:
        model: The hooked model.
        spec: How many contexts of which lengths; default :class:`ContextSpec()`.

    Returns:
        The prefixes, separator included (``""`` first for the bare prompt when ``spec.bare``).
    """
    spec = spec or ContextSpec()
    tokenizer = model.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise EditError("the tokenizer has neither a BOS nor an EOS token to start generating from")
    banned = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    generator = torch.Generator().manual_seed(spec.seed)
    device = device_of(model)
    contexts: list[str] = [""] if spec.bare else []
    with torch.no_grad():
        for length in spec.lengths:
            if spec.count == 0:
                continue
            tokens = torch.full((spec.count, 1), int(start), dtype=torch.long, device=device)
            for _ in range(length):
                logits = model(tokens)[:, -1].detach().float().cpu()
                logits[:, banned[banned < logits.shape[-1]]] = -torch.inf
                top = logits.topk(min(spec.top_k, logits.shape[-1]), dim=-1)
                choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
                tokens = torch.cat([tokens, top.indices.gather(-1, choice).to(device)], dim=1)
            for row in tokens[:, 1:].tolist():
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                contexts.append(text + spec.separator if text else "")
    return tuple(contexts)


def with_context(prompt: Prompt, prefix: str) -> Prompt:
    """The prompt with ``prefix`` in front, its character spans shifted."""
    if not prefix:
        return prompt
    shift = len(prefix)
    spans = {name: (start + shift, end + shift) for name, (start, end) in prompt.char_spans.items()}
    return Prompt(prefix + prompt.text, prompt.target, spans, prompt.perspective)


@dataclass(frozen=True)
class KeyRows:
    """Every prompt of every group under every context, tokenized, with its key position.

    Attributes:
        rows: The padded token rows.
        positions: The key position of each row.
        groups: The group of each row (one group per fact).
        n_groups: How many groups.
    """

    rows: Rows
    positions: tuple[int, ...]
    groups: tuple[int, ...]
    n_groups: int


def key_rows(
    model: Any,
    groups: Sequence[Sequence[Prompt]],
    *,
    key_token: KeyToken | str = KeyToken.SUBJECT_LAST,
    contexts: Sequence[str] = ("",),
) -> KeyRows:
    """Tokenize each group's prompts under each context and locate the key token.

    Raises:
        SpanError: A prompt lacks the key token's span.
        EditError: No prompts or no contexts.
    """
    if not contexts:
        raise EditError("no contexts to average keys over (include '' for the bare prompt)")
    tokens: list[list[int]] = []
    positions: list[int] = []
    owners: list[int] = []
    for group, prompts in enumerate(groups):
        if not prompts:
            raise EditError(f"group {group} has no prompts to read keys from")
        for prompt in prompts:
            for prefix in contexts:
                tokenized = tokenize(model, with_context(prompt, prefix))
                tokens.append(tokenized.tokens.tolist())
                positions.append(key_position(tokenized, key_token))
                owners.append(group)
    if not tokens:
        raise EditError("no prompts to read keys from")
    return KeyRows(pad_rows(model, tokens), tuple(positions), tuple(owners), len(groups))


def mean_at_keys(
    model: Any,
    rows: KeyRows,
    hook_name: str,
    *,
    layer: int,
    fwd_hooks: Sequence[Hook] = (),
) -> Float[Tensor, "group width"]:
    """The activation of ``hook_name`` at each row's key position, averaged per group.

    Args:
        model: The hooked model.
        rows: From :func:`key_rows`.
        hook_name: A hook of block ``layer`` (the forward stops after that block); its
            activation's axes after ``[batch, pos]`` are flattened.
        layer: The block ``hook_name`` belongs to.
        fwd_hooks: More hooks to run with (e.g. edits already made at lower layers).

    Returns:
        One flattened activation per group, in float32.
    """
    seen: list[Tensor] = []

    def capture(activation: Tensor, hook: Any) -> None:
        seen.append(activation.detach())

    with torch.no_grad():
        model.run_with_hooks(
            rows.rows.tokens,
            fwd_hooks=[*fwd_hooks, (hook_name, capture)],
            stop_at_layer=layer + 1,
        )
    if not seen:
        raise EditError(f"hook {hook_name!r} did not fire")
    activation = seen[-1]
    index = torch.arange(activation.shape[0], device=activation.device)
    positions = torch.tensor(rows.positions, device=activation.device)
    at_key = activation[index, positions].reshape(activation.shape[0], -1).float()
    owners = torch.tensor(rows.groups, device=activation.device)
    sums = torch.zeros(rows.n_groups, at_key.shape[-1], device=at_key.device)
    sums.index_add_(0, owners, at_key)
    counts = torch.bincount(owners, minlength=rows.n_groups).clamp(min=1)
    return sums / counts[:, None].to(sums.dtype)


def compute_key(
    model: Any,
    prompts: Sequence[Prompt],
    *,
    layer: int,
    projection: Projection | str = Projection.W_OUT,
    key_token: KeyToken | str = KeyToken.SUBJECT_LAST,
    contexts: Sequence[str] = ("",),
    fwd_hooks: Sequence[Hook] = (),
) -> Float[Tensor, " d_in"]:
    """The key ``k*`` of a fact: the projection's input at the key token, averaged over the
    prompts under every context.

    Args:
        model: The hooked model.
        prompts: The fact's prompts (with spans).
        layer: The edited layer.
        projection: ``W_out`` (key: ``mlp.hook_post``) or ``W_O`` (key: ``attn.hook_z``).
        key_token: Where the key is read.
        contexts: Prefixes from :func:`generate_contexts` (``""`` is the bare prompt).
        fwd_hooks: More hooks to run with.

    Returns:
        The key, of length :meth:`Projection.key_size`.

    Raises:
        SpanError: A prompt lacks the key token's span.
    """
    projection = choice(Projection, projection, "projection")
    rows = key_rows(model, [list(prompts)], key_token=key_token, contexts=contexts)
    keys = mean_at_keys(model, rows, projection.key_hook(layer), layer=layer, fwd_hooks=fwd_hooks)
    return keys[0]
