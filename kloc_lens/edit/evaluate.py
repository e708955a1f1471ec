"""Evaluating edits from both perspectives, and the cross-perspective transfer matrix.

Every edit is scored on both perspectives of its fact, before (the unedited model) and after
(the edit applied as hooks, so the model is never changed). A metric compares the probabilities
of two answers on some prompts: its *score* is the fraction of prompts where the first wins, its
*margin* the mean probability difference (the CounterFact "magnitude"). For a multi-token answer
the probability is the geometric mean of its tokens' teacher-forced probabilities; an answer
wins when its mean log-probability is higher by more than :data:`WIN_TOLERANCE`. Its
*generated* score asks what the model says without teacher forcing: the fraction of prompts
whose greedy continuation begins with the first answer, whole words
(:mod:`kloc_lens.edit.generate`; as many tokens as the longest answer of the fact plus one).
Reports give the generated score first: teacher forcing inflates edit success ("The Mirage of
Model Editing", 2025).

===================  ===========  ==============================================  ================
metric               perspective  prompts                                         wins if
===================  ===========  ==============================================  ================
efficacy             entity       the edited entity prompt                        new > old
paraphrase           entity       the fact's entity paraphrases                   new > old
neighborhood         entity       entity prompts of the request's ``neighbors``   theirs > new
same_subject         entity       entity prompts of the request's ``related``     own object top-1
relation_add         relation     relation prompt with the new object (add)       relation > None
relation_paraphrase  relation     relation paraphrases with the new object        relation > None
relation_remove      relation     relation prompt with the old object (remove)    None > relation
===================  ===========  ==============================================  ================

(``neighborhood`` uses each neighbour's own object, which is the old object in CounterFact's
neighbourhood prompts. ``same_subject`` is RETS's relation specificity: the subject's other facts
must still answer their own object, as the argmax at the prompt's last position (first token);
its ``post_margin`` is the mean change of the probability of the token the unedited model put
first, ``pre_margin`` 0.) The *transfer matrix* crosses the perspective an edit was made from with
the perspective evaluated, using one headline metric per evaluated perspective (efficacy for the
entity side, relation_add for the relation side): the study's question is whether an entity
edit moves the relation-side answer, and the other way round.

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.facts import Fact
    >>> from kloc_lens.edit import EditRequest, RomeEditor, planted_corpus, second_moment
    >>> model, planted = planted_model()
    >>> facts = [Fact(s, "home", o, entity_paraphrases=("{subject} lives in",))
    ...     for s, o in planted.pairs()]
    >>> request = EditRequest(facts[0], "Quito", neighbors=(facts[1],), none_target="a")
    >>> stats = second_moment(model, planted.mlp_layer, planted_corpus(planted), progress=False)
    >>> editor = RomeEditor(layer=planted.mlp_layer, stats=stats)
    >>> result = evaluate_editor(model, [request], editor, progress=False)
    >>> score = result.facts[0].score("efficacy")
    >>> score.pre, score.post, result.facts[0].score("neighborhood").post
    (0.0, 1.0, 1.0)
    >>> result.transfer().post.shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens.edit._errors import EditError, choice, integer
from kloc_lens.edit._tokens import encode, pad_rows, target_ids
from kloc_lens.edit.apply import Edit, edit_hooks, row_edit_hooks, row_forward
from kloc_lens.edit.generate import generate_greedy, generates
from kloc_lens.edit.request import EditRequest
from kloc_lens.facts import Perspective, Prompt
from kloc_lens.model import model_identity

__all__ = [
    "EditEvaluation",
    "EditMetric",
    "Editor",
    "FactEvaluation",
    "MetricScore",
    "TransferMatrix",
    "evaluate_edit",
    "evaluate_editor",
    "evaluate_edits",
]


class EditMetric(str, Enum):
    """What an evaluation measures (see the module docstring for the prompts)."""

    EFFICACY = "efficacy"
    """Entity side: the new object beats the old on the edited entity prompt."""
    PARAPHRASE = "paraphrase"
    """Entity side: the new object beats the old on the fact's entity paraphrases."""
    NEIGHBORHOOD = "neighborhood"
    """Entity side: other subjects keep their object against the new one (specificity)."""
    SAME_SUBJECT = "same_subject"
    """Entity side: the subject's other facts still answer their own object, top-1 (relation
    specificity)."""
    RELATION_ADD = "relation_add"
    """Relation side: the relation beats "None" on the relation prompt with the new object."""
    RELATION_PARAPHRASE = "relation_paraphrase"
    """Relation side: the relation beats "None" on relation paraphrases with the new object."""
    RELATION_REMOVE = "relation_remove"
    """Relation side: "None" beats the relation on the relation prompt with the old object."""

    @property
    def perspective(self) -> Perspective:
        """The perspective the metric is evaluated on."""
        if self in (
            EditMetric.EFFICACY,
            EditMetric.PARAPHRASE,
            EditMetric.NEIGHBORHOOD,
            EditMetric.SAME_SUBJECT,
        ):
            return Perspective.ENTITY
        return Perspective.RELATION


WIN_TOLERANCE = 1e-5
"""An answer wins when its mean token log-probability exceeds the other's by more than this
(float rounding does not decide a tie)."""

HEADLINE: dict[Perspective, EditMetric] = {
    Perspective.ENTITY: EditMetric.EFFICACY,
    Perspective.RELATION: EditMetric.RELATION_ADD,
}
"""The metric of each evaluated perspective in the transfer matrix."""


@dataclass(frozen=True)
class MetricScore:
    """One metric of one edited fact, before and after the edit.

    Attributes:
        metric: The metric.
        n_prompts: How many prompts it was measured on (0: not measurable, scores are NaN).
        pre: Fraction of prompts won before the edit (by more than :data:`WIN_TOLERANCE` in
            mean token log-probability).
        post: Fraction of prompts won with the edit.
        pre_margin: Mean probability difference (first minus second answer) before.
        post_margin: The same with the edit.
        pre_generated: Fraction of prompts whose greedy continuation gives the first answer,
            before the edit (NaN: not measured).
        post_generated: The same with the edit.
    """

    metric: EditMetric
    n_prompts: int
    pre: float
    post: float
    pre_margin: float
    post_margin: float
    pre_generated: float = math.nan
    post_generated: float = math.nan

    @property
    def change(self) -> float:
        """``post - pre``."""
        return self.post - self.pre


@dataclass(frozen=True)
class FactEvaluation:
    """Every metric of one edited fact.

    Attributes:
        subject: The fact's subject.
        relation: Its relation.
        old_object: The object before the edit.
        new_object: The object asked for.
        edited: The perspective the edit was made from.
        scores: One score per metric, in :class:`EditMetric` order.
    """

    subject: str
    relation: str
    old_object: str
    new_object: str
    edited: Perspective
    scores: tuple[MetricScore, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (undefined numbers as ``None``)."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "subject": self.subject,
            "relation": self.relation,
            "old_object": self.old_object,
            "new_object": self.new_object,
            "edited": self.edited.value,
            "scores": [
                {
                    "metric": s.metric.value,
                    "n_prompts": s.n_prompts,
                    "pre": clean(s.pre),
                    "post": clean(s.post),
                    "pre_margin": clean(s.pre_margin),
                    "post_margin": clean(s.post_margin),
                    "pre_generated": clean(s.pre_generated),
                    "post_generated": clean(s.post_generated),
                }
                for s in self.scores
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactEvaluation:
        """Read :meth:`as_dict` back.

        Raises:
            EditError: A missing field or an unknown metric or perspective.
        """

        def number(x: Any) -> float:
            return math.nan if x is None else float(x)

        try:
            scores = tuple(
                MetricScore(
                    choice(EditMetric, s["metric"], "metric"),
                    int(s["n_prompts"]),
                    number(s["pre"]),
                    number(s["post"]),
                    number(s["pre_margin"]),
                    number(s["post_margin"]),
                    number(s.get("pre_generated")),
                    number(s.get("post_generated")),
                )
                for s in data["scores"]
            )
            return cls(
                subject=str(data["subject"]),
                relation=str(data["relation"]),
                old_object=str(data["old_object"]),
                new_object=str(data["new_object"]),
                edited=choice(Perspective, data["edited"], "edited"),
                scores=scores,
            )
        except KeyError as err:
            raise EditError(f"fact evaluation lacks field {err.args[0]!r}") from None

    def score(self, metric: EditMetric | str) -> MetricScore:
        """The score of ``metric``."""
        wanted = EditMetric(metric)
        for score in self.scores:
            if score.metric is wanted:
                return score
        raise EditError(f"no {wanted.value} score for {self.subject!r}")


@dataclass(frozen=True, eq=False)
class TransferMatrix:
    """Edited perspective x evaluated perspective: mean headline score over the facts.

    Attributes:
        pre: Mean score before the edits (NaN where no fact was edited from that side).
        post: Mean score with the edits.
        counts: Facts edited from each perspective.
        perspectives: The order of both axes (entity, relation).
        metrics: The headline metric of each evaluated perspective.
    """

    pre: Float[Tensor, "edited evaluated"]
    post: Float[Tensor, "edited evaluated"]
    counts: Int[Tensor, " edited"]
    perspectives: tuple[Perspective, ...]
    metrics: tuple[EditMetric, ...]

    @property
    def change(self) -> Float[Tensor, "edited evaluated"]:
        """``post - pre``: what the edits moved."""
        return self.post - self.pre

    def to_dataframe(self) -> pd.DataFrame:
        """One row per cell: edited, evaluated, metric, n_facts, pre, post, change."""
        rows = []
        for i, edited in enumerate(self.perspectives):
            for j, evaluated in enumerate(self.perspectives):
                rows.append(
                    {
                        "edited": edited.value,
                        "evaluated": evaluated.value,
                        "metric": self.metrics[j].value,
                        "n_facts": int(self.counts[i]),
                        "pre": float(self.pre[i, j]),
                        "post": float(self.post[i, j]),
                        "change": float(self.change[i, j]),
                    }
                )
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class EditEvaluation:
    """Evaluations of edited facts, with a tidy DataFrame, a summary and the transfer matrix.

    Attributes:
        facts: One evaluation per edited fact.
        editor: What made the edits.
        model: :func:`~kloc_lens.model.model_identity` of the model.
    """

    facts: tuple[FactEvaluation, ...]
    editor: str
    model: str

    def __len__(self) -> int:
        return len(self.facts)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (fact, metric): the fact's labels, the metric and its numbers."""
        rows = []
        for index, fact in enumerate(self.facts):
            for score in fact.scores:
                rows.append(
                    {
                        "fact": index,
                        "subject": fact.subject,
                        "relation": fact.relation,
                        "old_object": fact.old_object,
                        "new_object": fact.new_object,
                        "edited": fact.edited.value,
                        "metric": score.metric.value,
                        "evaluated": score.metric.perspective.value,
                        "n_prompts": score.n_prompts,
                        "pre_generated": score.pre_generated,
                        "post_generated": score.post_generated,
                        "pre": score.pre,
                        "post": score.post,
                        "pre_margin": score.pre_margin,
                        "post_margin": score.post_margin,
                    }
                )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Means over facts per (edited perspective, metric), with ``n_facts`` counted.

        Facts on which a metric has no prompts are left out of its row.
        """
        frame = self.to_dataframe()
        columns = ["pre_generated", "post_generated", "pre", "post", "pre_margin", "post_margin"]
        if frame.empty:
            return pd.DataFrame(
                columns=["edited", "metric", "evaluated", "n_facts", "n_prompts", *columns]
            )
        frame = frame[frame["n_prompts"] > 0]
        grouped = frame.groupby(["edited", "metric", "evaluated"], sort=False)
        summary = grouped[columns].mean()
        summary.insert(0, "n_prompts", grouped["n_prompts"].sum())
        summary.insert(0, "n_facts", grouped["fact"].count())
        summary = summary.reset_index()
        summary["change"] = summary["post"] - summary["pre"]
        return summary

    def transfer(self) -> TransferMatrix:
        """The 2 x 2 matrix of headline scores: edited perspective x evaluated perspective."""
        order = (Perspective.ENTITY, Perspective.RELATION)
        metrics = tuple(HEADLINE[p] for p in order)
        pre = torch.full((2, 2), math.nan)
        post = torch.full((2, 2), math.nan)
        counts = torch.zeros(2, dtype=torch.long)
        for i, edited in enumerate(order):
            facts = [f for f in self.facts if f.edited is edited]
            counts[i] = len(facts)
            for j, metric in enumerate(metrics):
                scores = [f.score(metric) for f in facts if f.score(metric).n_prompts > 0]
                if scores:
                    pre[i, j] = sum(s.pre for s in scores) / len(scores)
                    post[i, j] = sum(s.post for s in scores) / len(scores)
        return TransferMatrix(pre, post, counts, order, metrics)


@runtime_checkable
class Editor(Protocol):
    """Anything that computes an edit from requests (:class:`RomeEditor`, :class:`MemitEditor`)."""

    @property
    def name(self) -> str:
        """A label for reports."""
        ...

    def compute(self, model: Any, requests: EditRequest | Sequence[EditRequest]) -> Any:
        """The edit (an :class:`~kloc_lens.edit.apply.Edit`) of the requests."""
        ...


_Comparison = tuple[EditMetric, Prompt, str, str]


def _comparisons(request: EditRequest) -> list[_Comparison]:
    fact, new, none = request.fact, request.target, request.none_target
    items: list[_Comparison] = [(EditMetric.EFFICACY, request.entity_prompt(), new, fact.object)]
    for template in fact.entity_paraphrases:
        items.append((EditMetric.PARAPHRASE, fact.entity_prompt(template), new, fact.object))
    for neighbor in request.neighbors:
        items.append((EditMetric.NEIGHBORHOOD, neighbor.entity_prompt(), neighbor.object, new))
    if not request.neighbors:  # CounterFact's own: other subjects whose answer is the old object
        for text in fact.neighborhood_prompts:
            items.append((EditMetric.NEIGHBORHOOD, Prompt(text, fact.object, {}), fact.object, new))
    items.append((EditMetric.RELATION_ADD, request.add_prompt(), fact.relation, none))
    for template in fact.relation_paraphrases:
        prompt = fact.relation_prompt(template, object=new)
        items.append((EditMetric.RELATION_PARAPHRASE, prompt, fact.relation, none))
    items.append((EditMetric.RELATION_REMOVE, request.remove_prompt(), none, fact.relation))
    return items


Forward = Callable[[Tensor, Sequence[int]], Tensor]
"""Logits of a right-padded token batch whose rows belong to the given edits (their indices)."""

_ROWS = 128
"""Rows per forward pass of an evaluation."""


def _unedited(model: Any) -> Forward:
    return lambda tokens, _: model(tokens)


def _batched(
    model: Any,
    items: Sequence[Hashable],
    owners: Sequence[int],
    row_of: Callable[[Any], list[int]],
    forward: Forward,
    read: Callable[[Tensor, Sequence[Any]], list[Any]],
) -> list[Any]:
    """``read(logits, items)`` of every item's token row, item ``i`` run under edit
    ``owners[i]``: each distinct (owner, item) once, sorted by row length into batches of
    :data:`_ROWS` (little padding), each result mapped back to every place it was asked for."""
    keys = list(zip(owners, items, strict=True))
    distinct = sorted(dict.fromkeys(keys), key=lambda key: len(row_of(key[1])))
    found: dict[tuple[int, Any], Any] = {}
    with torch.no_grad():
        for start in range(0, len(distinct), _ROWS):
            part = distinct[start : start + _ROWS]
            batch = pad_rows(model, [row_of(item) for _, item in part])
            logits = forward(batch.tokens, [owner for owner, _ in part])
            found.update(zip(part, read(logits, [item for _, item in part]), strict=True))
    return [found[key] for key in keys]


def _log_probabilities(
    model: Any,
    pairs: Sequence[tuple[Prompt, str]],
    forward: Forward,
    owners: Sequence[int],
) -> list[float]:
    """Mean token log-probability of each target after its prompt (teacher forcing), pair
    ``i`` run under the edit ``owners[i]``."""
    rows: dict[tuple[str, str], tuple[list[int], int, list[int]]] = {}
    for prompt, target in pairs:
        if (prompt.text, target) not in rows:
            ids = encode(model, prompt.text)
            wanted = target_ids(model, prompt, target, "answer")
            rows[prompt.text, target] = (ids + wanted[:-1], len(ids), wanted)

    def read(logits: Tensor, part: Sequence[tuple[str, str]]) -> list[float]:
        out = []
        for b, item in enumerate(part):
            _, start, wanted = rows[item]
            logp = logits[b, start - 1 : start - 1 + len(wanted)].float().log_softmax(-1)
            tokens = torch.tensor(wanted, device=logits.device)[:, None]
            out.append(float(logp.gather(-1, tokens)[:, 0].mean()))
        return out

    items = [(prompt.text, target) for prompt, target in pairs]
    return _batched(model, items, owners, lambda item: rows[item][0], forward, read)


def _last_probabilities(
    model: Any, prompts: Sequence[Prompt], forward: Forward, owners: Sequence[int]
) -> Tensor:
    """The next-token probabilities after each prompt, prompt ``i`` under edit ``owners[i]``."""
    rows = {prompt.text: encode(model, prompt.text) for prompt in prompts}

    def read(logits: Tensor, part: Sequence[str]) -> list[Tensor]:
        return [logits[b, len(rows[text]) - 1].float() for b, text in enumerate(part)]

    texts = [prompt.text for prompt in prompts]
    found = _batched(model, texts, owners, rows.__getitem__, forward, read)
    return torch.stack(found).softmax(-1)


def _continuations(
    model: Any,
    items: Sequence[tuple[int, str, int]],
    forward: Forward,
) -> dict[tuple[int, str, int], list[int]]:
    """The greedy continuation of each distinct ``(owner, text, n_tokens)``, under its edit."""
    distinct = list(dict.fromkeys(items))
    out: dict[tuple[int, str, int], list[int]] = {}
    for n_tokens in sorted({n for _, _, n in distinct}):
        group = [item for item in distinct if item[2] == n_tokens]
        group.sort(key=lambda item: len(encode(model, item[1])))
        for chunk in [range(i, min(len(group), i + _ROWS)) for i in range(0, len(group), _ROWS)]:
            part = [group[i] for i in chunk]
            texts = [text for _, text, _ in part]
            owners = [owner for owner, _, _ in part]

            def run(tokens: Tensor, live: Sequence[int], owners: list[int] = owners) -> Tensor:
                return forward(tokens, [owners[i] for i in live])

            runs = generate_greedy(model, texts, n_tokens, forward=run)
            out.update(zip(part, runs, strict=True))
    return out


@dataclass(frozen=True)
class _Plan:
    """What one request's evaluation runs: its comparisons (two answers each), the prompts it
    generates from (comparisons', then the subject's other facts') and how many tokens."""

    request: EditRequest
    owner: int
    comparisons: list[_Comparison]
    related: list[Prompt]
    n_tokens: int

    @property
    def pairs(self) -> list[tuple[Prompt, str]]:
        return [
            (p, answer) for _, p, first, second in self.comparisons for answer in (first, second)
        ]

    @property
    def prompts(self) -> list[Prompt]:
        return [prompt for _, prompt, _, _ in self.comparisons] + self.related


def _plan(model: Any, request: EditRequest, owner: int) -> _Plan:
    comparisons = _comparisons(request)
    related = [fact.entity_prompt() for fact in request.related]
    answers = [(p, a) for _, p, first, second in comparisons for a in (first, second)]
    answers += [(prompt, prompt.target) for prompt in related]
    # greedy continuations long enough to hold any answer whole
    n_tokens = 1 + max(len(target_ids(model, p, a, "answer")) for p, a in answers)
    return _Plan(request, owner, comparisons, related, n_tokens)


def _evaluate(model: Any, plans: Sequence[_Plan], after: Forward) -> list[FactEvaluation]:
    """Every plan's scores, the forward passes of all plans shared: unedited rows run plain,
    edited rows under ``after`` (the edit of each row's owner)."""
    plain = _unedited(model)
    pairs = [pair for plan in plans for pair in plan.pairs]
    owners = [plan.owner for plan in plans for _ in plan.pairs]
    before_lp = _log_probabilities(model, pairs, plain, [-1] * len(pairs))
    after_lp = _log_probabilities(model, pairs, after, owners)
    wanted = [(plan.owner, p.text, plan.n_tokens) for plan in plans for p in plan.prompts]
    gen_before = _continuations(model, [(-1, t, n) for _, t, n in wanted], plain)
    gen_after = _continuations(model, wanted, after)
    related = [p for plan in plans for p in plan.related]
    if related:
        related_owners = [plan.owner for plan in plans for _ in plan.related]
        top_before = _last_probabilities(model, related, plain, [-1] * len(related))
        top_after = _last_probabilities(model, related, after, related_owners)
    out = []
    offset = related_offset = 0
    for plan in plans:
        n_pairs, n_related = len(plan.pairs), len(plan.related)
        generated = (
            {p.text: gen_before[(-1, p.text, plan.n_tokens)] for p in plan.prompts},
            {p.text: gen_after[(plan.owner, p.text, plan.n_tokens)] for p in plan.prompts},
        )
        tops = None
        if n_related:
            rows = slice(related_offset, related_offset + n_related)
            tops = (top_before[rows], top_after[rows])
        out.append(
            _score(
                model,
                plan,
                before_lp[offset : offset + n_pairs],
                after_lp[offset : offset + n_pairs],
                generated,
                tops,
            )
        )
        offset += n_pairs
        related_offset += n_related
    return out


def _same_subject(
    model: Any,
    plan: _Plan,
    tops: tuple[Tensor, Tensor] | None,
    generated: tuple[dict[str, list[int]], dict[str, list[int]]],
) -> MetricScore:
    """Relation specificity: how many of the subject's other facts answer their own object."""
    if tops is None:
        return MetricScore(EditMetric.SAME_SUBJECT, 0, math.nan, math.nan, math.nan, math.nan)
    prompts = plan.related
    p_before, p_after = tops
    before, after = p_before.argmax(-1).tolist(), p_after.argmax(-1).tolist()
    own = [target_ids(model, p, p.target, "related fact's object")[0] for p in prompts]
    n = len(prompts)
    rows = torch.arange(n, device=p_before.device)
    token = torch.tensor(before, device=p_before.device)

    def said(runs: dict[str, list[int]]) -> float:
        return sum(1.0 for p in prompts if generates(model, runs[p.text], p.target)) / n

    return MetricScore(
        EditMetric.SAME_SUBJECT,
        n,
        pre=sum(1.0 for b, o in zip(before, own, strict=True) if b == o) / n,
        post=sum(1.0 for a, o in zip(after, own, strict=True) if a == o) / n,
        pre_margin=0.0,
        post_margin=float((p_after[rows, token] - p_before[rows, token]).mean()),
        pre_generated=said(generated[0]),
        post_generated=said(generated[1]),
    )


def _score(
    model: Any,
    plan: _Plan,
    before: Sequence[float],
    after: Sequence[float],
    generated: tuple[dict[str, list[int]], dict[str, list[int]]],
    tops: tuple[Tensor, Tensor] | None,
) -> FactEvaluation:
    request = plan.request
    # per comparison: (won before, won after, margin before, margin after, generated before,
    # generated after)
    by_metric: dict[EditMetric, list[tuple[bool, bool, float, float, bool, bool]]] = {
        m: [] for m in EditMetric
    }
    for index, (metric, prompt, answer, _) in enumerate(plan.comparisons):
        first, second = 2 * index, 2 * index + 1
        by_metric[metric].append(
            (
                before[first] - before[second] > WIN_TOLERANCE,
                after[first] - after[second] > WIN_TOLERANCE,
                math.exp(before[first]) - math.exp(before[second]),
                math.exp(after[first]) - math.exp(after[second]),
                generates(model, generated[0][prompt.text], answer),
                generates(model, generated[1][prompt.text], answer),
            )
        )
    scores = []
    for metric, results in by_metric.items():
        if metric is EditMetric.SAME_SUBJECT:
            scores.append(_same_subject(model, plan, tops, generated))
            continue
        if not results:
            scores.append(MetricScore(metric, 0, math.nan, math.nan, math.nan, math.nan))
            continue
        n = len(results)
        columns = list(zip(*results, strict=True))
        scores.append(
            MetricScore(
                metric,
                n,
                pre=sum(1.0 for won in columns[0] if won) / n,
                post=sum(1.0 for won in columns[1] if won) / n,
                pre_margin=sum(columns[2]) / n,
                post_margin=sum(columns[3]) / n,
                pre_generated=sum(1.0 for said in columns[4] if said) / n,
                post_generated=sum(1.0 for said in columns[5] if said) / n,
            )
        )
    return FactEvaluation(
        subject=request.fact.subject,
        relation=request.fact.relation,
        old_object=request.fact.object,
        new_object=request.target,
        edited=request.edited,
        scores=tuple(scores),
    )


def _requests_of(edit: Any) -> tuple[EditRequest, ...]:
    if isinstance(getattr(edit, "request", None), EditRequest):
        return (edit.request,)
    requests = getattr(edit, "requests", None)
    if requests:
        return tuple(requests)
    raise EditError(f"{type(edit).__name__} records no requests; pass them to evaluate_edit")


def evaluate_edit(
    model: Any,
    edit: Edit,
    requests: EditRequest | Sequence[EditRequest] | None = None,
    *,
    editor: str = "",
) -> EditEvaluation:
    """Score one edit (possibly of several facts) on both perspectives of each fact.

    Args:
        model: The hooked model the edit was computed on (it is not changed: the edit is
            applied as hooks).
        edit: The edit.
        requests: The facts to score; default: the requests the edit records.
        editor: A label for reports.

    Returns:
        The evaluation, one :class:`FactEvaluation` per request.

    Raises:
        EditError: An answer (e.g. the ``none_target``) is not in the vocabulary, or the edit
            belongs to another model.
    """
    items = (
        _requests_of(edit)
        if requests is None
        else ((requests,) if isinstance(requests, EditRequest) else tuple(requests))
    )
    hooks = edit_hooks(model, edit)
    after: Forward = lambda tokens, _: model.run_with_hooks(tokens, fwd_hooks=list(hooks))  # noqa: E731
    plans = [_plan(model, request, 0) for request in items]
    facts = tuple(_evaluate(model, plans, after))
    return EditEvaluation(facts, editor or type(edit).__name__, model_identity(model))


def evaluate_edits(
    model: Any,
    edits: Sequence[Edit],
    requests: Sequence[EditRequest] | None = None,
    *,
    editor: str = "",
) -> EditEvaluation:
    """Score many edits, each on its own (edit ``i`` with request ``i``), in shared batches.

    Every row of a batch carries its own edit (:func:`~kloc_lens.edit.apply.row_edit_hooks`),
    so scoring ``m`` edits costs about the forward passes of one; each fact's scores equal
    :func:`evaluate_edit` of its edit alone up to float rounding (ties within
    :data:`WIN_TOLERANCE` aside).

    Args:
        model: The hooked model the edits were computed on (it is not changed).
        edits: The edits, each of one fact.
        requests: One request per edit; default: the request each edit records.
        editor: A label for reports.

    Raises:
        EditError: Not one request per edit, an answer not in the vocabulary, or an edit of
            another model.
    """
    if requests is None:
        requests = [_requests_of(edit)[0] for edit in edits]
    if len(requests) != len(edits) or not edits:
        raise EditError(
            f"evaluate_edits needs one request per edit and at least one edit, got "
            f"{len(edits)} edits and {len(requests)} requests"
        )
    chosen = list(edits)
    row_edit_hooks(model, chosen, [])  # every edit checked against the model before any work
    after: Forward = lambda tokens, owners: row_forward(model, tokens, chosen, owners)  # noqa: E731
    plans = [_plan(model, request, i) for i, request in enumerate(requests)]
    facts = tuple(_evaluate(model, plans, after))
    return EditEvaluation(facts, editor or type(edits[0]).__name__, model_identity(model))


def evaluate_editor(
    model: Any,
    requests: Sequence[EditRequest],
    editor: Editor,
    *,
    progress: bool = True,
    batch_size: int = 8,
) -> EditEvaluation:
    """Edit each request on its own (the CounterFact protocol) and score it on both
    perspectives.

    An editor with ``compute_each`` (:class:`RomeEditor`) computes ``batch_size`` one-fact edits
    at a time (each the edit ``compute`` gives for its request alone), scored together by
    :func:`evaluate_edits`; any other editor edits and is scored one request at a time.

    Args:
        model: The hooked model (it is not changed).
        requests: The facts to edit, each from its own perspective.
        editor: A :class:`RomeEditor`, :class:`MemitEditor` or anything with ``name`` and
            ``compute(model, request)``.
        progress: Show a progress bar.
        batch_size: Requests edited and scored together (one-fact edits all the same).

    Returns:
        The evaluation.
    """
    integer(batch_size, "batch_size", minimum=1)
    requests = list(requests)
    each: Callable[[Any, list[EditRequest]], Sequence[Edit]] | None = getattr(
        editor, "compute_each", None
    )
    size = batch_size if callable(each) else 1
    facts = []
    bar = tqdm(total=len(requests), desc=editor.name, disable=not progress, leave=False)
    for start in range(0, len(requests), size):
        chunk = requests[start : start + size]
        edits: list[Edit] = (
            list(each(model, chunk)) if callable(each) else [editor.compute(model, chunk[0])]
        )
        facts.extend(evaluate_edits(model, edits, chunk, editor=editor.name).facts)
        bar.update(len(chunk))
    bar.close()
    return EditEvaluation(tuple(facts), editor.name, model_identity(model))
