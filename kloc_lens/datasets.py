"""Datasets of facts: CounterFact JSON, its relation-augmented form, hand-written real facts, and
filtering to the facts a model knows.

**CounterFact** (Meng et al. 2022) is a JSON list of records::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "relation_id": "P103", "target_true": {"str": "French"},
                           "target_new": {"str": "English"}},
     "paraphrase_prompts": ["... Danielle Darrieux's mother tongue is", ...],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", ...]}

**Relation-augmented CounterFact** (the study's format) adds, inside ``requested_rewrite``, the
relation's surface strings ``relation: {"strs": ["mother tongue", ...]}``, the add prompt
``add_rel_prompt`` (``"The relation between {} and English is"``: subject slot ``{}``, new object
written out), the remove prompt ``rm_rel_prompt`` (same with the true object) and relation
paraphrases ``rel_prompts`` (subject slot ``{}``, true object written out; also accepted at the
record's top level).

Both loaders return :class:`~kloc_lens.facts.Fact` objects and refuse malformed records with a
:class:`DatasetError` that names the record and the field: a file that is not UTF-8 JSON, a
prompt with more than one ``{}`` slot, a field name that looks like a misspelt known one
(``"paraphrase_prompt"``), and a file that mixes plain and relation-augmented records.
kloc_lens' own layout is read strictly: a field that is not one of :class:`Fact`'s is an error.

Example:
    >>> facts = real_world_facts()
    >>> facts[0].entity_prompt().text
    'The mother tongue of Danielle Darrieux is'
    >>> facts[0].new_object
    'English'
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kloc_lens.errors import KlocLensError, choice
from kloc_lens.facts import Fact, Perspective, find_word, target_token_ids, tokenize_batch
from kloc_lens.model import device_of

__all__ = [
    "DatasetError",
    "KnownFacts",
    "facts_from_json",
    "filter_known",
    "load_counterfact",
    "load_facts",
    "load_relation_counterfact",
    "real_world_facts",
]


class DatasetError(KlocLensError):
    """A dataset file or record that cannot be read."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"no dataset file at {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{str(path)!r} is not valid JSON: {err}") from err


def _path(path: object) -> Path:
    if not isinstance(path, (str, Path)):
        raise DatasetError(f"path must be a str or Path, got {type(path).__name__} {path!r}")
    return Path(path)


def _check_limit(limit: object) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")
    return limit


# The fields of CounterFact records (and of the study's relation-augmented form) by level.
_COUNTERFACT_FIELDS = {
    "": {
        "case_id",
        "pararel_idx",
        "requested_rewrite",
        "paraphrase_prompts",
        "neighborhood_prompts",
        "attribute_prompts",
        "generation_prompts",
        "rel_prompts",
    },
    "requested_rewrite": {
        "prompt",
        "subject",
        "relation_id",
        "target_true",
        "target_new",
        "relation",
        "add_rel_prompt",
        "rm_rel_prompt",
        "rel_prompts",
    },
}


def _read_records(path: str | Path) -> list[Any]:
    path = _path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(
            f"{str(path)!r} must hold a JSON list of records, not {type(data).__name__}"
        )
    return data


class _Record:
    """Field access that names the record and the field in every error."""

    def __init__(self, record: Any, index: int) -> None:
        if not isinstance(record, dict):
            raise DatasetError(f"record {index} is a {type(record).__name__}, not an object")
        self.record = record
        case = record.get("case_id")
        self.label = f"record {index}" + (f" (case_id {case})" if case is not None else "")

    def check_fields(self, known: dict[str, set[str]], *, strict: bool) -> None:
        """Refuse unknown field names: every one if ``strict``, else those that look like a
        misspelt known one (CounterFact files may carry fields of their own)."""
        for level, names in known.items():
            fields = self.record if not level else self.record.get(level)
            if not isinstance(fields, dict):
                continue
            for name in fields:
                if name in names:
                    continue
                close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.8)
                where = f"{level}.{name}" if level else name
                if close:
                    raise DatasetError(
                        f"{self.label}: unknown field {where!r}; did you mean {close[0]!r}?"
                    )
                if strict:
                    known_names = ", ".join(sorted(names))
                    raise DatasetError(
                        f"{self.label}: unknown field {where!r} (fields: {known_names})"
                    )

    def get(self, dotted: str, kind: type, *, required: bool = True) -> Any:
        value: Any = self.record
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                if required:
                    raise DatasetError(f"{self.label}: field {dotted!r} is missing")
                return None
            value = value[part]
        if not isinstance(value, kind):
            raise DatasetError(
                f"{self.label}: field {dotted!r} should be {kind.__name__}, "
                f"got {type(value).__name__}"
            )
        if kind is str and not value.strip():
            raise DatasetError(f"{self.label}: field {dotted!r} is empty")
        return value

    def strings(self, dotted: str) -> list[str]:
        values = self.get(dotted, list, required=False) or []
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise DatasetError(f"{self.label}: {dotted}[{i}] should be str")
        return values

    def subject_template(self, text: str, subject: str, dotted: str) -> str:
        """Template of a raw prompt: its ``{}`` slot, else the subject's last occurrence (as
        whole words)."""
        if text.count("{}") > 1:
            raise DatasetError(
                f"{self.label}: {dotted} {text!r} has {text.count('{}')} '{{}}' slots; a prompt "
                "has one subject slot"
            )
        if "{}" in text:
            before, after = text.split("{}", 1)
        else:
            at = find_word(text, subject, last=True)
            if at < 0:
                raise DatasetError(
                    f"{self.label}: {dotted} {text!r} has no '{{}}' slot and no subject {subject!r}"
                )
            before, after = text[:at], text[at + len(subject) :]
        return _escape(before) + "{subject}" + _escape(after)

    def object_template(self, template: str, obj: str, dotted: str) -> str:
        """Replace the object's last occurrence in a template by ``{object}``."""
        text = template
        obj = _escape(obj)
        at = find_word(text, obj, last=True)
        if at < 0:
            raise DatasetError(
                f"{self.label}: {dotted} {text!r} does not contain the object {obj!r}"
            )
        return text[:at] + "{object}" + text[at + len(obj) :]


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _entity_fields(rec: _Record, relations: dict[str, str] | None) -> dict[str, Any]:
    rec.check_fields(_COUNTERFACT_FIELDS, strict=False)
    subject = rec.get("requested_rewrite.subject", str)
    prompt = rec.get("requested_rewrite.prompt", str)
    if "{}" not in prompt:
        raise DatasetError(
            f"{rec.label}: field 'requested_rewrite.prompt' {prompt!r} has no '{{}}' subject slot"
        )
    relation_id = rec.get("requested_rewrite.relation_id", str, required=False)
    paraphrases = [
        rec.subject_template(p, subject, f"paraphrase_prompts[{i}]")
        for i, p in enumerate(rec.strings("paraphrase_prompts"))
    ]
    return {
        "subject": subject,
        "object": rec.get("requested_rewrite.target_true.str", str).strip(),
        "new_object": rec.get("requested_rewrite.target_new.str", str).strip(),
        "relation_id": relation_id,
        "relation": (relations or {}).get(relation_id or "", relation_id or "relation"),
        "entity_template": rec.subject_template(prompt, subject, "requested_rewrite.prompt"),
        "entity_paraphrases": tuple(paraphrases),
        "neighborhood_prompts": tuple(rec.strings("neighborhood_prompts")),
    }


def load_counterfact(
    path: str | Path, *, relations: dict[str, str] | None = None, limit: int | None = None
) -> list[Fact]:
    """Load a CounterFact JSON file.

    Args:
        path: The JSON file.
        relations: Surface form of each relation id (``{"P103": "mother tongue"}``); CounterFact
            itself has none, so without it a fact's relation is its id.
        limit: Read at most this many records.

    Raises:
        DatasetError: The file or a record is malformed (the message names record and field),
            or ``limit`` is not a non-negative integer.
    """
    limit = _check_limit(limit)
    facts = []
    for index, raw in enumerate(_read_records(path)[:limit]):
        rec = _Record(raw, index)
        facts.append(_make_fact(rec, _entity_fields(rec, relations)))
    return facts


def load_relation_counterfact(path: str | Path, *, limit: int | None = None) -> list[Fact]:
    """Load the study's relation-augmented CounterFact JSON (see the module docstring).

    The relation is ``requested_rewrite.relation.strs[0]``; the relation template comes from
    ``rm_rel_prompt`` (true object), its paraphrases from ``rel_prompts``.

    Raises:
        DatasetError: The file or a record is malformed (the message names record and field),
            or ``limit`` is not a non-negative integer.
    """
    limit = _check_limit(limit)
    facts = []
    for index, raw in enumerate(_read_records(path)[:limit]):
        rec = _Record(raw, index)
        fields = _entity_fields(rec, None)
        strs = rec.strings("requested_rewrite.relation.strs")
        if not strs or not strs[0].strip():
            raise DatasetError(
                f"{rec.label}: field 'requested_rewrite.relation.strs' is missing or empty"
            )
        fields["relation"] = strs[0].strip()
        subject, obj, new = fields["subject"], fields["object"], fields["new_object"]
        remove = rec.get("requested_rewrite.rm_rel_prompt", str)
        add = rec.get("requested_rewrite.add_rel_prompt", str)
        template = rec.object_template(
            rec.subject_template(remove, subject, "requested_rewrite.rm_rel_prompt"),
            obj,
            "requested_rewrite.rm_rel_prompt",
        )
        add_template = rec.object_template(
            rec.subject_template(add, subject, "requested_rewrite.add_rel_prompt"),
            new,
            "requested_rewrite.add_rel_prompt",
        )
        if add_template != template:
            raise DatasetError(
                f"{rec.label}: add_rel_prompt {add!r} and rm_rel_prompt {remove!r} differ in more "
                "than the object"
            )
        paraphrase_field = "requested_rewrite.rel_prompts"
        paraphrases = rec.strings(paraphrase_field) or rec.strings("rel_prompts")
        if not rec.strings(paraphrase_field):
            paraphrase_field = "rel_prompts"
        fields["relation_template"] = template
        fields["relation_paraphrases"] = tuple(
            rec.object_template(
                rec.subject_template(p, subject, f"{paraphrase_field}[{i}]"),
                obj,
                f"{paraphrase_field}[{i}]",
            )
            for i, p in enumerate(paraphrases)
        )
        facts.append(_make_fact(rec, fields))
    return facts


def _make_fact(rec: _Record, fields: dict[str, Any]) -> Fact:
    try:
        return Fact(**fields)
    except KlocLensError as err:
        raise DatasetError(f"{rec.label}: {err}") from err


_FACT_FIELDS = {
    "subject": str,
    "relation": str,
    "object": str,
    "entity_template": str,
    "relation_template": str,
    "entity_paraphrases": list,
    "relation_paraphrases": list,
    "new_object": str,
    "relation_id": str,
    "neighborhood_prompts": list,
}


def facts_from_json(data: Any, *, source: str = "facts") -> list[Fact]:
    """Facts from kloc_lens' own JSON layout: ``{"facts": [{"subject": ..., ...}, ...]}`` with
    the fields of :class:`~kloc_lens.facts.Fact` (lists for the tuple fields).

    Raises:
        DatasetError: A record is malformed or has a field :class:`Fact` does not have (the
            message names record and field).
    """
    if not isinstance(data, dict) or not isinstance(data.get("facts"), list):
        raise DatasetError(f"{source}: expected an object with a 'facts' list")
    facts = []
    for index, raw in enumerate(data["facts"]):
        rec = _Record(raw, index)
        rec.check_fields({"": set(_FACT_FIELDS)}, strict=True)
        fields: dict[str, Any] = {}
        for name, kind in _FACT_FIELDS.items():
            required = name in ("subject", "relation", "object")
            value = rec.get(name, kind, required=required)
            if value is not None:
                fields[name] = tuple(rec.strings(name)) if kind is list else value
        facts.append(_make_fact(rec, fields))
    return facts


def load_facts(path: str | Path, *, limit: int | None = None) -> list[Fact]:
    """Load facts from any supported file, recognising its format.

    kloc_lens JSON (``{"facts": [...]}``), relation-augmented CounterFact (records with
    ``add_rel_prompt``) or plain CounterFact.

    Raises:
        DatasetError: The file is in none of these formats, mixes plain and relation-augmented
            CounterFact records, or a record is malformed.
    """
    limit = _check_limit(limit)
    path = _path(path)
    data = _read_json(path)
    if isinstance(data, dict):
        return facts_from_json(data, source=str(path))[:limit]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        kinds = [_record_kind(raw) for raw in data]
        first = kinds[0]
        for index, kind in enumerate(kinds):
            if kind != first:
                label = _Record(data[index], index).label
                raise DatasetError(
                    f"{str(path)!r} mixes record formats: {label} is {kind}, but record 0 is "
                    f"{first}; a file holds one format"
                )
        if first == "relation-augmented CounterFact":
            return load_relation_counterfact(path, limit=limit)
        return load_counterfact(path, limit=limit)
    raise DatasetError(f"{str(path)!r} is neither kloc_lens facts JSON nor CounterFact")


def _record_kind(raw: Any) -> str:
    rewrite = raw.get("requested_rewrite") if isinstance(raw, dict) else None
    if isinstance(rewrite, dict) and "add_rel_prompt" in rewrite:
        return "relation-augmented CounterFact"
    return "plain CounterFact"


def real_world_facts() -> list[Fact]:
    """A small hand-written set of real-world facts with both perspectives (for real models)."""
    text = resources.files("kloc_lens").joinpath("data/real_facts.json").read_text("utf-8")
    return facts_from_json(json.loads(text), source="real_facts.json")


@dataclass(frozen=True)
class KnownFacts:
    """The facts a model gets right, with the counts.

    Attributes:
        facts: The facts kept.
        total: How many were checked.
        perspective: Which prompt was checked.
        correct: Whether each checked fact was answered right (same order as the input).
    """

    facts: tuple[Fact, ...]
    total: int
    perspective: Perspective
    correct: tuple[bool, ...]

    @property
    def kept(self) -> int:
        """How many facts were kept."""
        return len(self.facts)

    @property
    def accuracy(self) -> float:
        """Fraction answered right."""
        return self.kept / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"{self.kept}/{self.total} facts answered right from the {self.perspective.value} "
            f"perspective ({100 * self.accuracy:.1f}%)"
        )


def filter_known(
    model: Any,
    facts: Sequence[Fact],
    perspective: Perspective | str = Perspective.ENTITY,
    *,
    batch_size: int = 64,
) -> KnownFacts:
    """Keep the facts whose answer is the model's top-1 next token (first token of the answer).

    The study keeps only correctly predicted facts before tracing or editing.

    Raises:
        DatasetError: An unknown perspective, or a batch size that is not a positive integer.
    """
    perspective = choice(Perspective, perspective, "perspective", DatasetError)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    correct: list[bool] = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        prompts = [
            f.entity_prompt() if perspective is Perspective.ENTITY else f.relation_prompt()
            for f in chunk
        ]
        batch = tokenize_batch(model, prompts)
        targets = torch.tensor([target_token_ids(model, p)[0] for p in prompts])
        with torch.no_grad():
            logits = model(batch.tokens.to(device_of(model)))
        rows = torch.arange(len(chunk))
        predicted = logits[rows, batch.last.to(logits.device)].argmax(-1).cpu()
        correct.extend(bool(x) for x in (predicted == targets))
    kept = tuple(f for f, ok in zip(facts, correct, strict=True) if ok)
    return KnownFacts(kept, len(facts), perspective, tuple(correct))
