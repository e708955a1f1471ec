"""Value optimisation: the output change at the key token that makes the new answer likely.

ROME finds the new value ``v*`` by gradient descent on a vector ``delta`` added to an activation
(the edited projection's output for ROME, the residual stream after the last edited layer for
MEMIT) at the key token of every rewrite prompt (the objective prompts, each prefixed by the same
contexts as the key):

    loss = NLL(increase targets)                          (mean over prompts, per token)
         + decrease_weight * -log(1 - p(decrease targets))
         + kl_factor * KL(p_delta || p_0)                  on "{subject} is a"-style prompts
         + weight_decay * |delta| / |v_init|^2

with Adam, ``delta`` clamped to ``clamp * |v_init|`` after each step (``v_init``: the unedited
activation at the key token, averaged over the rewrite prompts). A ``spread`` scales ``delta``
at every token instead of adding it at the key token only, as a rank-one update will. The
model's parameters are frozen while it runs (their ``requires_grad`` flags are restored
afterwards) and only ``delta`` is differentiated (``torch.autograd.grad``), so no parameter's
``.grad`` is ever written and no weight changes. The loop stops early once the loss falls
below ``stop_loss``. A fit whose rewrite terms (NLL and weighted unlikelihood: what the edit is
for; the KL and norm terms have a floor every edit pays) end far above it, more than
``ValueSpec.converge_factor`` times ``stop_loss``, is marked ``converged=False`` and logs a
warning: the edit it gives is unlikely to hold. A loss that turns non-finite stops the fit with an
:class:`EditError`.

The defaults are ROME's for GPT-2 XL: lr 0.5, 20 steps, KL factor 0.0625, weight decay 0.5,
clamp 4. The KL term is read at the last position of each KL prompt (the prediction after
``"{subject} is a"``), the delta being added there at the key token as well.

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> from kloc_lens.edit.request import EditRequest
    >>> model, planted = planted_model()
    >>> request = EditRequest(Fact(planted.subjects[0], "home", planted.objects[0]), "Quito")
    >>> fit = fit_value(model, request.objectives(), kl_prompts(request),
    ...     hook_name="blocks.1.hook_mlp_out")
    >>> fit.losses[-1] < fit.losses[0], fit.delta.shape
    (True, torch.Size([128]))
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens.edit._errors import EditError, choice
from kloc_lens.edit._tokens import device_of, pad_rows, target_ids
from kloc_lens.edit.keys import KeyToken, key_position, with_context
from kloc_lens.edit.request import EditRequest, Objective
from kloc_lens.facts import Prompt, check_template, format_template, tokenize

__all__ = ["Spread", "ValueFit", "ValueSpec", "fit_value", "frozen", "kl_prompts"]

logger = logging.getLogger(__name__)

Spread = Callable[[Tensor], Tensor]
"""Token ids ``[batch, pos]`` -> the factor of the value change at each position."""

_DEFAULT_KL = {
    KeyToken.SUBJECT_LAST: ("{subject} is a",),
    KeyToken.RELATION_LAST: ("{relation} is a",),
    KeyToken.OBJECT_LAST: ("{object} is a",),
    KeyToken.LAST: ("{subject} is a",),
}


@dataclass(frozen=True)
class ValueSpec:
    """Hyperparameters of the value optimisation (defaults: ROME on GPT-2 XL).

    Attributes:
        lr: Adam learning rate.
        steps: At most this many Adam steps.
        kl_factor: Weight of the KL term.
        weight_decay: Weight of the norm penalty ``|delta| / |v_init|^2``.
        clamp: ``|delta|`` is kept below ``clamp * |v_init|``.
        stop_loss: Stop once the loss is below this.
        decrease_weight: Weight of ``-log(1 - p)`` for targets to make unlikely (the old object
            of an entity edit, the relation on the study's remove prompt); 0 gives plain ROME.
        kl_templates: Templates of the KL prompts (fields ``{subject}``, ``{relation}``,
            ``{object}``, the key token's span among them); ``None``: ``"{subject} is a"`` for
            subject keys, ``"{relation} is a"`` / ``"{object} is a"`` for relation / object keys.
        converge_factor: A fit whose final rewrite loss (NLL plus weighted unlikelihood) is
            above ``converge_factor * stop_loss`` has not converged: :attr:`ValueFit.converged`
            is ``False`` and a warning is logged.

    Raises:
        EditError: A number that is not finite, of the wrong type or out of range (the
            message names the field and the value); a KL template that is malformed.
    """

    lr: float = 0.5
    steps: int = 20
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    stop_loss: float = 5e-2
    decrease_weight: float = 1.0
    kl_templates: tuple[str, ...] | None = None
    converge_factor: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise EditError(f"ValueSpec.steps must be an integer >= 0, got {self.steps!r}")
        positive = ("lr", "clamp", "converge_factor")
        for name in (*positive, "kl_factor", "weight_decay", "stop_loss", "decrease_weight"):
            value = getattr(self, name)
            bound = "> 0" if name in positive else ">= 0"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise EditError(
                    f"ValueSpec.{name} must be a finite number {bound}, got "
                    f"{type(value).__name__} {value!r}"
                )
            if not math.isfinite(value) or value < 0 or (name in positive and value == 0):
                raise EditError(f"ValueSpec.{name} must be a finite number {bound}, got {value!r}")
        if self.kl_templates is not None:
            if isinstance(self.kl_templates, str) or not isinstance(
                self.kl_templates, (tuple, list)
            ):
                raise EditError(
                    f"ValueSpec.kl_templates must be a tuple of templates or None, got "
                    f"{self.kl_templates!r}"
                )
            object.__setattr__(self, "kl_templates", tuple(self.kl_templates))
            for index, template in enumerate(self.kl_templates):
                check_template(template, f"ValueSpec.kl_templates[{index}]")


@dataclass(frozen=True, eq=False)
class ValueFit:
    """How a value change was found.

    Attributes:
        hook: The hook the change was added at.
        delta: The change, in float32.
        initial: The unedited activation at the key token, averaged over the rewrite prompts.
        losses: Total loss before each step, and after the last one.
        nll: Its NLL term at each entry of ``losses``.
        unlikelihood: Its ``-log(1 - p)`` term (before weighting).
        kl: Its KL term (before weighting).
        updates: How many Adam steps were taken.
        stopped_early: Whether the loss fell below ``stop_loss``.
        spread: Whether the change was fitted through a spread over all tokens (``False``: at
            the key token only).
        converged: Whether the final rewrite loss (NLL plus weighted unlikelihood) is at most
            the spec's ``converge_factor * stop_loss``; a fit that ends far above its stop loss
            gives an edit unlikely to hold.
    """

    hook: str
    delta: Float[Tensor, " d_model"]
    initial: Float[Tensor, " d_model"]
    losses: tuple[float, ...]
    nll: tuple[float, ...]
    unlikelihood: tuple[float, ...]
    kl: tuple[float, ...]
    updates: int
    stopped_early: bool
    spread: bool = False
    converged: bool = True

    @property
    def final_loss(self) -> float:
        """The loss with the final ``delta``."""
        return self.losses[-1]


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter for the block; restore the flags after."""
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


def kl_prompts(
    request: EditRequest,
    key_token: KeyToken | str = KeyToken.SUBJECT_LAST,
    templates: Sequence[str] | None = None,
) -> tuple[Prompt, ...]:
    """The KL prompts of a request: ``templates`` filled with the fact's subject, relation and
    (old) object; default templates per key token (see :class:`ValueSpec`)."""
    key_token = choice(KeyToken, key_token, "key_token")
    fact = request.fact
    values = {"subject": fact.subject, "relation": fact.relation, "object": fact.object}
    prompts = []
    for template in templates if templates is not None else _DEFAULT_KL[key_token]:
        text, spans = format_template(template, values)
        prompts.append(Prompt(text, "", spans))
    return tuple(prompts)


@dataclass(frozen=True)
class _Row:
    tokens: list[int]
    key: int
    scored: tuple[int, ...]  # positions whose logits are read
    targets: tuple[int, ...]  # token expected at each scored position (-1: KL row)
    kind: str  # "increase", "decrease" or "kl"


def _rows(
    model: Any,
    objectives: Sequence[Objective],
    kl: Sequence[Prompt],
    key_token: KeyToken,
    contexts: Sequence[str],
) -> list[_Row]:
    rows: list[_Row] = []
    for objective in objectives:
        wanted = [
            (kind, target, target_ids(model, objective.prompt, target, f"{kind} target"))
            for kind, target in (("increase", objective.increase), ("decrease", objective.decrease))
            if target is not None
        ]
        for prefix in contexts:
            tokenized = tokenize(model, with_context(objective.prompt, prefix))
            key = key_position(tokenized, key_token)
            ids = tokenized.tokens.tolist()
            for kind, _, target in wanted:
                start = len(ids) - 1
                rows.append(
                    _Row(
                        ids + target[:-1],
                        key,
                        tuple(range(start, start + len(target))),
                        tuple(target),
                        kind,
                    )
                )
    for prompt in kl:
        tokenized = tokenize(model, prompt)
        ids = tokenized.tokens.tolist()
        rows.append(_Row(ids, key_position(tokenized, key_token), (len(ids) - 1,), (-1,), "kl"))
    return rows


def fit_value(
    model: Any,
    objectives: Sequence[Objective],
    kl: Sequence[Prompt] = (),
    *,
    hook_name: str,
    key_token: KeyToken | str = KeyToken.SUBJECT_LAST,
    contexts: Sequence[str] = ("",),
    spec: ValueSpec | None = None,
    spread: Spread | None = None,
) -> ValueFit:
    """Optimise the change added at ``hook_name``'s key token so the objectives are met.

    Args:
        model: The hooked model (in eval mode; it is not changed).
        objectives: Prompts and targets (:meth:`EditRequest.objectives`).
        kl: Prompts whose next-token distribution should stay (:func:`kl_prompts`).
        hook_name: Where the change is added, e.g. ``"blocks.1.hook_mlp_out"``; its activation
            must be ``[batch, pos, d_model]``.
        key_token: The token the change is added at, in every prompt.
        contexts: Prefixes of the objective prompts (``""`` is the bare prompt).
        spec: Hyperparameters (default :class:`ValueSpec()`).
        spread: How much of the change reaches each token: given the batch's token ids
            ``[batch, pos]``, the factor of ``delta`` at every position. ``None``: ``delta`` at
            the key token only (ROME). :class:`~kloc_lens.edit.rome.RomeEditor` passes the
            factors ``(k . u) / (u . k*)`` its committed rank-one update will apply, so the fit
            sees exactly what the edit does, spill onto other tokens included.

    Returns:
        The change and its loss history.

    Raises:
        EditError: A target is empty or unknown to the tokenizer; no objective has a target.
        SpanError: A prompt lacks the key token's span.
    """
    spec = spec or ValueSpec()
    key_token = choice(KeyToken, key_token, "key_token")
    if not contexts:
        raise EditError("no contexts (include '' for the bare prompt)")
    rows = _rows(model, objectives, kl, key_token, contexts)
    rewrite = [i for i, row in enumerate(rows) if row.kind != "kl"]
    if not rewrite:
        raise EditError("no objective has a target to increase or decrease")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    longest = max(rows, key=lambda row: len(row.tokens))
    if isinstance(n_ctx, int) and len(longest.tokens) > n_ctx:
        raise EditError(
            f"a rewrite prompt with its context and target is {len(longest.tokens)} tokens long, "
            f"more than the model's context of n_ctx={n_ctx}; use shorter contexts or prompts"
        )
    # Rows that feed the model the same tokens (an increase and a decrease target of one token
    # each after the same prompt) share one sequence of the batch.
    sequences: dict[tuple[tuple[int, ...], int], int] = {}
    sequence_of = [
        sequences.setdefault((tuple(row.tokens), row.key), len(sequences)) for row in rows
    ]
    unique = list(sequences)
    batch = pad_rows(model, [list(tokens) for tokens, _ in unique])
    device = device_of(model)
    n_sequences, width = batch.tokens.shape
    n_rows = len(rows)
    key_mask = torch.zeros(n_sequences, width, device=device)
    key_index = torch.tensor([key for _, key in unique], device=device)
    key_mask[torch.arange(n_sequences, device=device), key_index] = 1.0
    if spread is not None:
        factors = spread(batch.tokens).detach().to(device=device, dtype=torch.float32)
        if factors.shape != key_mask.shape:
            raise EditError(
                f"spread returned factors of shape {tuple(factors.shape)} for a batch of shape "
                f"{tuple(key_mask.shape)}"
            )
        key_mask = factors
    rewrite_index = torch.tensor(sorted({sequence_of[i] for i in rewrite}), device=device)

    flat_rows: list[int] = []
    flat_pos: list[int] = []
    owner: list[int] = []
    for index, row in enumerate(rows):
        for pos in row.scored:
            flat_rows.append(sequence_of[index])
            flat_pos.append(pos)
            owner.append(index)
    read_rows = torch.tensor(flat_rows, device=device)
    read_pos = torch.tensor(flat_pos, device=device)
    read_owner = torch.tensor(owner, device=device)
    read_target = torch.tensor([t for row in rows for t in row.targets], device=device)
    kinds = [rows[i].kind for i in owner]
    inc = torch.tensor([k == "increase" for k in kinds], device=device)
    dec = torch.tensor([k == "decrease" for k in kinds], device=device)
    kl_read = torch.tensor([k == "kl" for k in kinds], device=device)
    inc_rows = [i for i, r in enumerate(rows) if r.kind == "increase"]
    dec_rows = [i for i, r in enumerate(rows) if r.kind == "decrease"]

    d_model = int(model.cfg.d_model)
    delta = torch.zeros(d_model, device=device, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=spec.lr)
    initial: list[Tensor] = []

    def add_delta(activation: Tensor, hook: Any) -> Tensor:
        if not initial:
            at_key = activation[rewrite_index, key_index[rewrite_index]]
            initial.append(at_key.detach().float().mean(dim=0))
        return activation + key_mask[..., None].to(activation.dtype) * delta.to(activation.dtype)

    losses: list[float] = []
    nlls: list[float] = []
    unlikely: list[float] = []
    kls: list[float] = []
    kl_init: Tensor | None = None
    stopped = False
    updates = 0
    with frozen(model):
        for step in range(spec.steps + 1):
            logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(hook_name, add_delta)])
            log_probs = logits[read_rows, read_pos].float().log_softmax(dim=-1)
            picked = log_probs.gather(-1, read_target.clamp(min=0)[:, None])[:, 0]
            zero = torch.zeros((), device=device)
            per_row = torch.zeros(n_rows, device=device).index_add(0, read_owner, picked)
            counts = torch.zeros(n_rows, device=device).index_add(
                0, read_owner, torch.ones_like(picked)
            )
            nll = zero
            if inc.any():
                rows_inc = torch.tensor(inc_rows, device=device)
                nll = -(per_row[rows_inc] / counts[rows_inc]).mean()
            unlikelihood = zero
            if dec.any():
                rows_dec = torch.tensor(dec_rows, device=device)
                p_seq = per_row[rows_dec].exp().clamp(max=1.0 - 1e-6)
                unlikelihood = -torch.log1p(-p_seq).mean()
            kl_term = zero
            if kl_read.any():
                current = log_probs[kl_read]
                if kl_init is None:
                    kl_init = current.detach()
                kl_term = (current.exp() * (current - kl_init)).sum(-1).mean()
            scale = initial[0].norm().clamp(min=1e-12)
            decay = spec.weight_decay * delta.norm() / scale**2
            loss = nll + spec.decrease_weight * unlikelihood + spec.kl_factor * kl_term + decay
            losses.append(float(loss.detach()))
            nlls.append(float(nll.detach()))
            unlikely.append(float(unlikelihood.detach()))
            kls.append(float(kl_term.detach()))
            if not math.isfinite(losses[-1]):
                raise EditError(
                    f"the value fit at {hook_name} reached a {losses[-1]} loss at step {step} "
                    f"(NLL {nlls[-1]}, unlikelihood {unlikely[-1]}, KL {kls[-1]}): the model's "
                    "activations or logits are not finite; check the model's weights"
                )
            if losses[-1] < spec.stop_loss:
                stopped = True
                break
            if step == spec.steps:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            if step == 0 and not bool(grad.abs().sum() > 0):
                raise EditError(
                    f"a change at {hook_name} at the {key_token.value} token does not reach the "
                    "predictions of the objectives (no attention reads that token later?); "
                    "choose a lower layer or another key token"
                )
            delta.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            with torch.no_grad():
                limit = spec.clamp * scale
                norm = delta.norm()
                if norm > limit:
                    delta.mul_(limit / norm)
    rewrite_loss = nlls[-1] + spec.decrease_weight * unlikely[-1]
    converged = rewrite_loss <= spec.converge_factor * spec.stop_loss
    if not converged:
        logger.warning(
            "the value fit at %s did not converge: its rewrite loss (NLL + unlikelihood) is "
            "%.4g after %d steps, more than %g x the stop loss %g; the edit is unlikely to hold "
            "(more steps, a higher lr or another layer may help)",
            hook_name,
            rewrite_loss,
            updates,
            spec.converge_factor,
            spec.stop_loss,
        )
    return ValueFit(
        hook=hook_name,
        delta=delta.detach().clone(),
        initial=initial[0],
        losses=tuple(losses),
        nll=tuple(nlls),
        unlikelihood=tuple(unlikely),
        kl=tuple(kls),
        updates=updates,
        stopped_early=stopped,
        spread=spread is not None,
        converged=converged,
    )
