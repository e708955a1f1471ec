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
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from kloc_lens._hooks import keep_activation
from kloc_lens.edit._errors import EditError, choice
from kloc_lens.edit._tokens import device_of, pad_rows, target_ids
from kloc_lens.edit.keys import KeyToken, key_position, with_context
from kloc_lens.edit.request import EditRequest, Objective
from kloc_lens.engine.adapter import BlockDriver, capture_block_inputs
from kloc_lens.engine.skip import block_of
from kloc_lens.facts import Prompt, check_template, format_template, tokenize

__all__ = [
    "FitProblem",
    "KeySpread",
    "Spread",
    "ValueFit",
    "ValueSpec",
    "fit_value",
    "fit_values",
    "frozen",
    "kl_prompts",
]

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


@dataclass(frozen=True, eq=False)
class KeySpread:
    """A :data:`Spread` read from the keys of one layer: the factor at each token is
    ``(k . direction) / scale`` with ``k`` the activation of ``key_hook`` there (a rank-one
    update's spill, :func:`~kloc_lens.edit.rome.rank_one_spread`).

    The keys do not depend on a change made at or after their own block, so one unedited
    forward up to ``layer`` gives the exact factors; :func:`fit_values` reads the factors of
    several key spreads of one hook in a single forward.

    Attributes:
        model: The hooked model.
        layer: The block ``key_hook`` belongs to (the forward stops after it).
        key_hook: Where the keys are read, e.g. ``"blocks.1.mlp.hook_post"``.
        direction: ``u``.
        scale: ``u . k*``.
    """

    model: Any
    layer: int
    key_hook: str
    direction: Float[Tensor, " d_in"]
    scale: float

    def keys(self, tokens: Tensor) -> Tensor:
        """The keys at every token of ``tokens``, ``[batch, pos, d_in]`` in float32."""
        seen: list[Tensor] = []

        def capture(activation: Tensor, hook: Any) -> None:
            seen.append(activation.detach())

        with torch.no_grad():
            self.model.run_with_hooks(
                tokens, fwd_hooks=[(self.key_hook, capture)], stop_at_layer=self.layer + 1
            )
        if not seen:
            raise EditError(f"hook {self.key_hook!r} did not fire")
        return seen[-1].reshape(*tokens.shape, -1).float()

    def factors(self, keys: Tensor) -> Tensor:
        """``(k . direction) / scale`` for keys ``[..., d_in]``."""
        return (keys @ self.direction.to(keys.device).float()) / self.scale

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.factors(self.keys(tokens))


@dataclass(frozen=True)
class FitProblem:
    """One value change to fit: the objectives of one request, its KL prompts and its spread.

    :func:`fit_values` fits several at once in one batch; each keeps its own change, loss,
    early stop and clamp, so the fits are those of :func:`fit_value` run one by one (up to
    float rounding of the larger batch).

    Attributes:
        objectives: Prompts and targets (:meth:`EditRequest.objectives`).
        kl: Prompts whose next-token distribution should stay (:func:`kl_prompts`).
        spread: How much of the change reaches each token (see :func:`fit_value`); ``None``:
            the key token only.
    """

    objectives: tuple[Objective, ...]
    kl: tuple[Prompt, ...] = ()
    spread: Spread | None = None


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
    problem = FitProblem(tuple(objectives), tuple(kl), spread)
    (fit,) = fit_values(
        model, [problem], hook_name=hook_name, key_token=key_token, contexts=contexts, spec=spec
    )
    return fit


def fit_values(
    model: Any,
    problems: Sequence[FitProblem],
    *,
    hook_name: str,
    key_token: KeyToken | str = KeyToken.SUBJECT_LAST,
    contexts: Sequence[str] = ("",),
    spec: ValueSpec | None = None,
) -> list[ValueFit]:
    """:func:`fit_value` for several problems at once: one batch, one forward and backward
    per step for all of them.

    The loss is the sum of the problems' losses, so each change gets the gradient of its own
    loss; Adam works elementwise, so each change follows the steps it would take alone. A
    problem whose loss falls below ``stop_loss`` keeps its change from then on while the others
    go on; each is clamped against its own initial activation and checked for convergence on
    its own. On a small model most of a step's time is per-forward overhead, so fitting many
    edits together is several times faster than fitting them one by one.

    Args:
        model: The hooked model (in eval mode; it is not changed).
        problems: The fits (:class:`FitProblem`), e.g. one per request.
        hook_name: Where the changes are added (see :func:`fit_value`).
        key_token: The token each change is added at.
        contexts: Prefixes of the objective prompts (``""`` is the bare prompt).
        spec: Hyperparameters shared by all (default :class:`ValueSpec()`).

    Returns:
        One fit per problem, in order.

    Raises:
        EditError: No problems; a target is empty or unknown to the tokenizer; a problem has no
            target; a loss turns non-finite; a change that reaches no prediction.
        SpanError: A prompt lacks the key token's span.
    """
    spec = spec or ValueSpec()
    key_token = choice(KeyToken, key_token, "key_token")
    if not contexts:
        raise EditError("no contexts (include '' for the bare prompt)")
    if not problems:
        raise EditError("no value fits to run (problems is empty)")
    rows: list[_Row] = []
    problem_of_row: list[int] = []
    for index, problem in enumerate(problems):
        mine = _rows(model, problem.objectives, problem.kl, key_token, contexts)
        if not any(row.kind != "kl" for row in mine):
            raise EditError(
                f"no objective of value fit {index} has a target to increase or decrease"
            )
        rows.extend(mine)
        problem_of_row.extend([index] * len(mine))
    n_ctx = getattr(model.cfg, "n_ctx", None)
    longest = max(rows, key=lambda row: len(row.tokens))
    if isinstance(n_ctx, int) and len(longest.tokens) > n_ctx:
        raise EditError(
            f"a rewrite prompt with its context and target is {len(longest.tokens)} tokens long, "
            f"more than the model's context of n_ctx={n_ctx}; use shorter contexts or prompts"
        )
    n_problems = len(problems)
    # Rows of one problem that feed the model the same tokens (an increase and a decrease
    # target of one token each after the same prompt) share one sequence of the batch.
    sequences: dict[tuple[int, tuple[int, ...], int], int] = {}
    sequence_of = [
        sequences.setdefault((p, tuple(row.tokens), row.key), len(sequences))
        for p, row in zip(problem_of_row, rows, strict=True)
    ]
    unique = list(sequences)
    batch = pad_rows(model, [list(tokens) for _, tokens, _ in unique])
    device = device_of(model)
    n_sequences, width = batch.tokens.shape
    n_rows = len(rows)
    seq_problem = torch.tensor([p for p, _, _ in unique], device=device)
    key_index = torch.tensor([key for _, _, key in unique], device=device)
    key_mask = torch.zeros(n_sequences, width, device=device)
    key_mask[torch.arange(n_sequences, device=device), key_index] = 1.0
    shared = [problem.spread for problem in problems if isinstance(problem.spread, KeySpread)]
    one_read = len(shared) > 1 and len({(k.layer, k.key_hook, id(k.model)) for k in shared}) == 1
    if one_read:
        # One forward reads the keys of every sequence; each problem applies its own direction.
        keys = shared[0].keys(batch.tokens)
        for index, problem in enumerate(problems):
            if isinstance(problem.spread, KeySpread):
                mine = [s for s, (p, _, _) in enumerate(unique) if p == index]
                key_mask[mine] = problem.spread.factors(keys[mine]).to(device)
    for index, problem in enumerate(problems):
        if problem.spread is None or (one_read and isinstance(problem.spread, KeySpread)):
            continue
        mine = [s for s, (p, _, _) in enumerate(unique) if p == index]
        own = batch.tokens[mine][:, : max(len(unique[s][1]) for s in mine)]
        factors = problem.spread(own).detach().to(device=device, dtype=torch.float32)
        if factors.shape != own.shape:
            raise EditError(
                f"spread returned factors of shape {tuple(factors.shape)} for a batch of shape "
                f"{tuple(own.shape)}"
            )
        key_mask[mine] = 0.0
        key_mask[mine, : own.shape[1]] = factors
    rewrite_seqs = sorted({sequence_of[i] for i, row in enumerate(rows) if row.kind != "kl"})
    rewrite_index = torch.tensor(rewrite_seqs, device=device)

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
    row_problem = torch.tensor(problem_of_row, device=device)
    kinds = [row.kind for row in rows]
    is_inc = torch.tensor([k == "increase" for k in kinds], device=device)
    is_dec = torch.tensor([k == "decrease" for k in kinds], device=device)
    kl_read = torch.tensor([rows[i].kind == "kl" for i in owner], device=device)

    def per_problem_mean(values: Tensor, mask: Tensor) -> Tensor:
        """Mean of ``values`` over each problem's rows in ``mask`` (0 where it has none)."""
        where = row_problem[mask]
        total = torch.zeros(n_problems, device=device).index_add(0, where, values[mask])
        count = torch.zeros(n_problems, device=device).index_add(
            0, where, torch.ones_like(values[mask])
        )
        return total / count.clamp(min=1)

    d_model = int(model.cfg.d_model)
    delta = torch.zeros(n_problems, d_model, device=device, dtype=torch.float32)
    delta.requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=spec.lr)
    initial: list[Tensor] = []
    lengths = torch.tensor(batch.lengths, device=device)
    read_problem = row_problem[read_owner]

    history: list[list[tuple[float, float, float, float]]] = [[] for _ in problems]
    active = torch.ones(n_problems, dtype=torch.bool, device=device)
    stopped = [False] * n_problems
    updates = [0] * n_problems
    kl_init: Tensor | None = None
    # Below the block of the hook the rows never change: after the first pass (which reads the
    # residual stream entering that block) the steps run from that block on, where the engine
    # drives the model's blocks, at the first pass's width.
    start = block_of(hook_name) or None  # block 0: nothing below it to skip
    entering: dict[int, Tensor] = {}
    driver: BlockDriver | None = None
    with frozen(model):
        for step in range(spec.steps + 1):
            # Only the sequences of problems still fitting run (a stopped one keeps its change).
            seqs = active[seq_problem].nonzero()[:, 0]
            remap = torch.full((n_sequences,), -1, dtype=torch.long, device=device)
            remap[seqs] = torch.arange(len(seqs), device=device)
            width = int(batch.tokens.shape[1] if driver is not None else lengths[seqs].max())
            tokens = batch.tokens[seqs, :width]
            mask = key_mask[seqs, : tokens.shape[1], None]
            owners = seq_problem[seqs]

            def add_delta(activation: Tensor, hook: Any) -> Tensor:
                if not initial:  # the first pass runs every sequence, unchanged
                    at_key = activation[rewrite_index, key_index[rewrite_index]].detach().float()
                    sums = torch.zeros(n_problems, at_key.shape[-1], device=device)
                    sums.index_add_(0, seq_problem[rewrite_index], at_key)
                    count = torch.bincount(seq_problem[rewrite_index], minlength=n_problems)
                    initial.append(sums / count.clamp(min=1)[:, None])
                change = mask * delta[owners][:, None, :]  # noqa: B023 (used in this step)
                return activation + change.to(activation.dtype)

            if driver is not None and start is not None:
                with model.hooks(fwd_hooks=[(hook_name, add_delta)]):
                    logits = driver.run_from(start, entering[start][seqs])
            elif start is not None and step == 0:
                resid = f"blocks.{start}.hook_resid_pre"
                hooks = [(hook_name, add_delta), (resid, partial(keep_activation, entering, start))]
                with capture_block_inputs(model) as block_inputs:
                    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                driver = BlockDriver.for_model(model)[0]
                if driver is not None and driver.prepare(block_inputs) is not None:
                    driver = None
            else:
                logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, add_delta)])
            live = active[read_problem]
            log_probs = logits[remap[read_rows[live]], read_pos[live]].float().log_softmax(-1)
            picked = log_probs.gather(-1, read_target[live].clamp(min=0)[:, None])[:, 0]
            per_row = torch.zeros(n_rows, device=device).index_add(0, read_owner[live], picked)
            counts = torch.zeros(n_rows, device=device).index_add(
                0, read_owner[live], torch.ones_like(picked)
            )
            mean_logp = per_row / counts.clamp(min=1)
            nll = -per_problem_mean(mean_logp, is_inc)
            p_seq = per_row.exp().clamp(max=1.0 - 1e-6)  # the whole target's probability
            unlikelihood = per_problem_mean(-torch.log1p(-p_seq), is_dec)
            kl_term = torch.zeros(n_problems, device=device)
            live_kl = live & kl_read
            if bool(live_kl.any()):
                current = log_probs[kl_read[live]]
                if kl_init is None:  # the first pass: every KL read, no change yet
                    kl_init = current.detach()
                reference = kl_init[live_kl[kl_read]] if kl_init is not None else current
                divergence = (current.exp() * (current - reference)).sum(-1)
                where = read_problem[live_kl]
                total = torch.zeros(n_problems, device=device).index_add(0, where, divergence)
                kl_term = total / torch.bincount(where, minlength=n_problems).clamp(min=1)
            scale = initial[0].norm(dim=-1).clamp(min=1e-12)
            decay = spec.weight_decay * delta.norm(dim=-1) / scale**2
            loss = nll + spec.decrease_weight * unlikelihood + spec.kl_factor * kl_term + decay
            numbers = torch.stack([loss, nll, unlikelihood, kl_term], dim=-1).detach().tolist()
            for index in active.nonzero()[:, 0].tolist():
                total_loss, n, u, k = numbers[index]
                history[index].append((total_loss, n, u, k))
                if not math.isfinite(total_loss):
                    raise EditError(
                        f"the value fit at {hook_name} reached a {total_loss} loss at step "
                        f"{step} (NLL {n}, unlikelihood {u}, KL {k}): the model's "
                        "activations or logits are not finite; check the model's weights"
                    )
                if total_loss < spec.stop_loss:
                    stopped[index] = True
            fitting = active & ~torch.tensor(stopped, device=device)
            if step == spec.steps or not bool(fitting.any()):
                break
            (grad,) = torch.autograd.grad(loss[fitting].sum(), [delta])
            if step == 0:
                dead = [
                    i for i in fitting.nonzero()[:, 0].tolist() if not bool(grad[i].abs().sum() > 0)
                ]
                if dead:
                    raise EditError(
                        f"a change at {hook_name} at the {key_token.value} token does not reach "
                        "the predictions of the objectives (no attention reads that token "
                        "later?); choose a lower layer or another key token"
                        + (f" (value fits {dead})" if n_problems > 1 else "")
                    )
            active = fitting
            kept = delta.detach()[~active].clone()
            delta.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                delta[~active] = kept
                limit = spec.clamp * scale
                norm = delta.norm(dim=-1)
                over = active & (norm > limit)
                delta[over] *= (limit[over] / norm[over])[:, None]
            for index in active.nonzero()[:, 0].tolist():
                updates[index] += 1
    fits = []
    for index in range(n_problems):
        losses, nlls, unlikely, kls = (tuple(x) for x in zip(*history[index], strict=True))
        rewrite_loss = nlls[-1] + spec.decrease_weight * unlikely[-1]
        converged = rewrite_loss <= spec.converge_factor * spec.stop_loss
        if not converged:
            logger.warning(
                "the value fit at %s did not converge: its rewrite loss (NLL + unlikelihood) is "
                "%.4g after %d steps, more than %g x the stop loss %g; the edit is unlikely to "
                "hold (more steps, a higher lr or another layer may help)",
                hook_name,
                rewrite_loss,
                updates[index],
                spec.converge_factor,
                spec.stop_loss,
            )
        fits.append(
            ValueFit(
                hook=hook_name,
                delta=delta[index].detach().clone(),
                initial=initial[0][index],
                losses=losses,
                nll=nlls,
                unlikelihood=unlikely,
                kl=kls,
                updates=updates[index],
                stopped_early=stopped[index],
                spread=problems[index].spread is not None,
                converged=converged,
            )
        )
    return fits
