"""What the model knows, from both perspectives: first-token accuracy on every prompt set.

The study checks each fact on five prompt sets (a fact without paraphrases or a new object has
no prompt in the sets that need them and is left out of those):

=====================  =================================================  ==================
set                    prompts                                            answer
=====================  =================================================  ==================
entity                 the canonical entity prompt                        the object
entity_paraphrase      the fact's entity paraphrases                      the object
relation               the canonical relation prompt                      the relation
relation_paraphrase    the fact's relation paraphrases                    the relation
none                   the relation prompt with the fact's ``new_object`` the "no relation"
                       (a pair the fact does not relate)                  answer
=====================  =================================================  ==================

A prompt is right when the answer's first token is the model's top-1 next token. A fact's value
in a set is the share of its prompts that are right; the set's accuracy is the mean over facts,
with a bootstrap interval over facts. The facts right on the canonical entity prompt are the
*known* facts the study traces and edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kloc_lens.facts import Fact, Prompt, target_token_ids, tokenize_batch
from kloc_lens.intervals import Estimate, bootstrap

__all__ = [
    "KNOWLEDGE_SETS",
    "Knowledge",
    "fact_knowledge",
    "summarize_knowledge",
    "top1_right",
]

KNOWLEDGE_SETS = ("entity", "entity_paraphrase", "relation", "relation_paraphrase", "none")
"""The prompt sets, in report order."""


def _prompt_sets(fact: Fact, none_target: str) -> dict[str, list[tuple[Prompt, str]]]:
    sets: dict[str, list[tuple[Prompt, str]]] = {
        "entity": [(fact.entity_prompt(), fact.object)],
        "entity_paraphrase": [
            (fact.entity_prompt(t), fact.object) for t in fact.entity_paraphrases
        ],
        "relation": [(fact.relation_prompt(), fact.relation)],
        "relation_paraphrase": [
            (fact.relation_prompt(t), fact.relation) for t in fact.relation_paraphrases
        ],
        "none": [],
    }
    if fact.new_object:
        sets["none"] = [(fact.relation_prompt(object=fact.new_object), none_target)]
    return sets


def top1_right(model: Any, pairs: Sequence[tuple[Prompt, str]], batch_size: int = 64) -> list[bool]:
    """Per ``(prompt, answer)`` pair: is the answer's first token the model's top-1 next token?
    Prompts go through the model in right-padded batches of ``batch_size``."""
    right: list[bool] = []
    device = next(iter(model.parameters())).device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = tokenize_batch(model, [p for p, _ in chunk])
        wanted = torch.tensor([target_token_ids(model, p, a)[0] for p, a in chunk])
        with torch.no_grad():
            logits = model(batch.tokens.to(device))
        rows = torch.arange(len(chunk), device=logits.device)
        top = logits[rows, batch.last.to(logits.device)].argmax(-1).cpu()
        right.extend(bool(x) for x in (top == wanted))
    return right


def fact_knowledge(
    model: Any, facts: Sequence[Fact], none_target: str
) -> list[dict[str, float | None]]:
    """Per fact and set, the share of its prompts answered right (``None``: no prompt).

    All prompts of all facts go through the model in batches.
    """
    flat: list[tuple[Prompt, str]] = []
    owners: list[tuple[int, str]] = []
    for index, fact in enumerate(facts):
        for name, pairs in _prompt_sets(fact, none_target).items():
            flat.extend(pairs)
            owners.extend((index, name) for _ in pairs)
    right = top1_right(model, flat) if flat else []
    totals = [{name: [0, 0] for name in KNOWLEDGE_SETS} for _ in facts]
    for (index, name), ok in zip(owners, right, strict=True):
        totals[index][name][0] += int(ok)
        totals[index][name][1] += 1
    return [{name: (hits / n if n else None) for name, (hits, n) in row.items()} for row in totals]


@dataclass(frozen=True)
class Knowledge:
    """First-token accuracy of the model on the study's facts, per prompt set.

    Attributes:
        accuracy: Per set, the mean over facts of the share of prompts right, with its interval.
        n_checked: Facts checked.
        known: Indices (into the checked facts) of the facts right on the canonical entity
            prompt: the facts the study traces and edits.
        known_both: Of those, the facts also right on the canonical relation prompt: the facts
            of the query localization, which needs both perspectives.
    """

    accuracy: dict[str, Estimate]
    n_checked: int
    known: tuple[int, ...]
    known_both: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "checked": self.n_checked,
            "known": len(self.known),
            "known_indices": list(self.known),
            "known_both_indices": list(self.known_both),
            "accuracy": {name: est.as_dict() for name, est in self.accuracy.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Knowledge:
        """Read :meth:`as_dict` back."""
        accuracy = {name: Estimate.from_dict(v) for name, v in data["accuracy"].items()}
        known = tuple(int(i) for i in data["known_indices"])
        both = tuple(int(i) for i in data["known_both_indices"])
        return cls(accuracy, int(data["checked"]), known, both)

    def sentence(self) -> str:
        """The report's sentence."""
        acc = self.accuracy
        return (
            f"The model answers {acc['entity'].percent()} of the facts' canonical entity prompts "
            f"right ({acc['entity_paraphrase'].percent()} of held-out entity paraphrases) and "
            f"{acc['relation'].percent()} of canonical relation prompts "
            f"({acc['relation_paraphrase'].percent()} of relation paraphrases; "
            f"{acc['none'].percent()} of relation prompts about unrelated pairs answer the "
            "'no relation' answer); the study traces and edits the facts it answers right "
            f"({len(self.known)} of {self.n_checked})."
        )


def summarize_knowledge(
    rows: Sequence[dict[str, float | None]], *, n_bootstrap: int, seed: int
) -> Knowledge:
    """Accuracy per set with bootstrap intervals over facts, from :func:`fact_knowledge` rows."""
    accuracy: dict[str, Estimate] = {}
    for name in KNOWLEDGE_SETS:
        values = torch.tensor([r[name] for r in rows if r[name] is not None], dtype=torch.float64)
        accuracy[name] = bootstrap(lambda x: x.mean(), values, n_resamples=n_bootstrap, seed=seed)
    known = tuple(i for i, r in enumerate(rows) if r["entity"] == 1.0)
    both = tuple(i for i in known if rows[i]["relation"] == 1.0)
    return Knowledge(accuracy, len(rows), known, both)
