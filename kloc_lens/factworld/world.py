"""A seeded, synthetic knowledge world: invented people, eight relations, prompts for both views.

The world is the ground truth of the embedded default model. Everything in it is generated from
one seed, so the facts a model was trained on are known exactly.

Subjects
    Invented two-word names ("Velka Torunis") built from a seeded syllable inventory: a first
    name of one or two syllables and a unique surname of two or three. The tokenizer
    (:mod:`kloc_lens.factworld.tokenizer`) splits names into those syllables, so every subject
    is three to five tokens long and its identity lives in a combination of tokens, as in a
    real model ("Danielle Darrieux" -> ``Dan ielle Dar rieux``). Syllables are shared across
    names; the generator rejects any name that the tokenizer's greedy longest-match would split
    differently from the syllables it was built from.

Relations
    Eight Wikidata-like relations with multi-token surface forms whose first words are unique
    ("native language", "place of birth", "musical instrument", "country of citizenship",
    "field of work", "city of residence", "writing language", "sport played"). Objects are
    single, whole-word tokens from a pool per object type; two pairs of relations share a pool
    (cities: place of birth / city of residence; languages: native / writing language), so
    the relation perspective is not a mere object-type lookup: "The relation between X and
    Paris is" needs to know whether X was born in Paris or lives there. A subject's objects for
    relations that share a pool are distinct, so every relation prompt has one answer.
    Objects are shared by many subjects, so neighborhood prompts exist (other subjects with the
    same relation and object).

Templates, and what is held out
    An entity template is a *prefix* ("", "In fact,", "It is said that", ...) followed by a
    *frame* of the relation ("the native language of {subject} is", "{subject} grew up
    speaking", ...); a relation template is a prefix followed by a relation frame ("the
    relation between {subject} and {object} is", ...). Prefixes and frames form a grid. For
    every frame a few prefixes are held out (rotated per relation so that every prefix and
    every frame is still seen in training): the held-out paraphrases are new combinations of
    seen phrases, never new words, and they are never trained on. The canonical templates
    (``"The native language of {subject} is"``, ``"The relation between {subject} and {object}
    is"``) are training templates, and every canonical entity template spells out the relation,
    so relation spans exist for relation-side corruption.

Facts
    Every (subject, relation) pair is a :class:`kloc_lens.facts.Fact` whose ``entity_template``
    and ``relation_template`` are the canonical training templates and whose
    ``entity_paraphrases`` / ``relation_paraphrases`` are the held-out templates. Each fact also
    carries a ``new_object`` for editing experiments: another object of the same pool that the
    subject has for no relation.

The relation perspective also has a "None" answer ("The relation between X and Y is None" for a
subject and an object that are not related), the target of the study's remove-relation edit
objective; :meth:`FactWorld.none_pairs` lists such pairs.

Example:
    >>> world = generate_world(WorldConfig(n_subjects=6, n_relations=3), seed=0)
    >>> fact = world.facts[0]
    >>> fact.entity_prompt().text == f"The native language of {fact.subject} is"
    True
    >>> fact.relation, fact.object in world.relation("P103").objects
    ('native language', True)
    >>> len(world.facts), len(world.subjects[0].tokens) in (3, 4, 5)
    (18, True)
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from kloc_lens.errors import KlocLensError
from kloc_lens.facts import Fact, Prompt
from kloc_lens.factworld.catalogue import (
    CODAS,
    ONSETS,
    POOLS,
    PREFIXES,
    RELATION_FRAMES,
    RELATIONS,
    VOWELS,
)

__all__ = [
    "NONE_ANSWER",
    "FactWorld",
    "FactworldError",
    "Relation",
    "Subject",
    "WorldConfig",
    "check_no_prefix_templates",
    "generate_world",
    "greedy_wordpiece",
    "template_words",
]

NONE_ANSWER = "None"
"""The relation-perspective answer for a subject and an object that are not related."""

FORMAT = "kloc_lens.factworld/2"
"""The format of ``world.json`` (2: biography documents, no frame a prefix of another)."""

CONTINUATION = "##"
"""Marks a syllable that continues a word (WordPiece convention)."""

_WORD_RE = re.compile(r"\w+|[^\w\s]+")
"""How the tokenizer pre-splits text (``tokenizers``' ``Whitespace`` pre-tokenizer)."""
_FIELD_RE = re.compile(r"\{\w+\}")


class FactworldError(KlocLensError):
    """A factworld that cannot be generated, trained, saved or loaded as asked."""


# --------------------------------------------------------------------------------------------
# Data classes.


@dataclass(frozen=True)
class WorldConfig:
    """Size of a generated world.

    Attributes:
        n_subjects: Number of invented people.
        n_relations: Number of relations, taken in catalogue order (1 to 8); the first three are
            native language, place of birth and musical instrument.
        objects_per_pool: Objects per object type (4 to 16); each relation draws from its pool.
        n_first_names: Size of the first-name pool (first names repeat across subjects).
        n_initial_syllables: Syllables that may start a name word.
        n_continuation_syllables: Syllables that may continue a name word.
        heldout_per_frame: Prefixes held out per frame (of ``len(prefixes) - 1`` non-empty ones).
        n_prefixes: How many of the catalogue's prefixes to use (the empty prefix included).
    """

    n_subjects: int = 256
    n_relations: int = 8
    objects_per_pool: int = 16
    n_first_names: int = 48
    n_initial_syllables: int = 40
    n_continuation_syllables: int = 40
    heldout_per_frame: int = 2
    n_prefixes: int = len(PREFIXES)

    def __post_init__(self) -> None:
        checks = (
            (1 <= self.n_relations <= len(RELATIONS), "n_relations", f"1..{len(RELATIONS)}"),
            (4 <= self.objects_per_pool <= 16, "objects_per_pool", "4..16"),
            (self.n_subjects >= 2, "n_subjects", ">= 2"),
            (self.n_first_names >= 1, "n_first_names", ">= 1"),
            (self.n_initial_syllables >= 4, "n_initial_syllables", ">= 4"),
            (self.n_continuation_syllables >= 4, "n_continuation_syllables", ">= 4"),
            (3 <= self.n_prefixes <= len(PREFIXES), "n_prefixes", f"3..{len(PREFIXES)}"),
            (
                0 <= self.heldout_per_frame <= (self.n_prefixes - 1) // 2,
                "heldout_per_frame",
                f"0..{(self.n_prefixes - 1) // 2} (half the non-empty prefixes)",
            ),
        )
        for ok, name, allowed in checks:
            if not ok:
                raise FactworldError(f"WorldConfig.{name}={getattr(self, name)!r}: use {allowed}")


@dataclass(frozen=True)
class Subject:
    """An invented person.

    Attributes:
        name: ``"Velka Torunis"``.
        pieces: Syllables of each word of the name, continuation syllables without ``##``:
            ``(("Vel", "ka"), ("To", "ru", "nis"))``.
    """

    name: str
    pieces: tuple[tuple[str, ...], ...]

    @property
    def tokens(self) -> tuple[str, ...]:
        """The name's tokens as the factworld tokenizer writes them (``("Vel", "##ka", ...)``)."""
        return tuple(
            piece if i == 0 else CONTINUATION + piece
            for word in self.pieces
            for i, piece in enumerate(word)
        )


@dataclass(frozen=True)
class Relation:
    """A relation of the world with its objects and entity templates.

    Attributes:
        relation_id: Wikidata-like identifier (``"P103"``).
        surface: The relation's surface form, the relation-perspective answer
            (``"native language"``).
        pool: The object type (``"language"``); relations with the same pool share objects.
        objects: The objects subjects can have for this relation (single words).
        train_templates: Entity templates trained on; the first is the canonical one.
        heldout_templates: Entity templates never trained on (new prefix/frame combinations).
    """

    relation_id: str
    surface: str
    pool: str
    objects: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


@dataclass(frozen=True)
class FactWorld:
    """A generated knowledge world.

    Attributes:
        seed: The seed it was generated from.
        config: Its size.
        subjects: The invented people.
        relations: The relations, with their entity templates.
        relation_train_templates: Relation-perspective templates trained on (the first is the
            canonical ``"The relation between {subject} and {object} is"``).
        relation_heldout_templates: Relation-perspective templates never trained on.
        facts: One :class:`~kloc_lens.facts.Fact` per (subject, relation), subject-major:
            ``facts[s * n_relations + r]``.
    """

    seed: int
    config: WorldConfig
    subjects: tuple[Subject, ...]
    relations: tuple[Relation, ...]
    relation_train_templates: tuple[str, ...]
    relation_heldout_templates: tuple[str, ...]
    facts: tuple[Fact, ...]
    _index: dict[tuple[str, str], int] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for i, fact in enumerate(self.facts):
            self._index[(fact.subject, fact.relation_id or "")] = i

    # -- lookups ----------------------------------------------------------------------------

    def relation(self, relation_id: str) -> Relation:
        """The relation with this identifier.

        Raises:
            FactworldError: No such relation.
        """
        for relation in self.relations:
            if relation.relation_id == relation_id:
                return relation
        known = ", ".join(r.relation_id for r in self.relations)
        raise FactworldError(f"no relation {relation_id!r} in this world (has {known})")

    def relation_of(self, fact: Fact) -> Relation:
        """The relation of a fact of this world."""
        return self.relation(fact.relation_id or "")

    def fact(self, subject: str, relation_id: str) -> Fact:
        """The fact about ``subject`` for ``relation_id``.

        Raises:
            FactworldError: No such fact.
        """
        try:
            return self.facts[self._index[(subject, relation_id)]]
        except KeyError:
            raise FactworldError(f"no fact ({subject!r}, {relation_id!r}) in this world") from None

    def facts_of(self, relation_id: str) -> tuple[Fact, ...]:
        """Every fact of one relation, in subject order."""
        self.relation(relation_id)
        return tuple(f for f in self.facts if f.relation_id == relation_id)

    @cached_property
    def _by_answer(self) -> dict[tuple[str, str], tuple[Fact, ...]]:
        groups: dict[tuple[str, str], list[Fact]] = {}
        for fact in self.facts:
            groups.setdefault((fact.relation_id or "", fact.object), []).append(fact)
        return {key: tuple(group) for key, group in groups.items()}

    @cached_property
    def objects(self) -> tuple[str, ...]:
        """Every object of every relation, without repeats, in catalogue order."""
        seen: dict[str, None] = {}
        for relation in self.relations:
            seen.update(dict.fromkeys(relation.objects))
        return tuple(seen)

    def neighbors(self, fact: Fact, n: int | None = None) -> tuple[Fact, ...]:
        """Facts of other subjects with the same relation and the same object.

        Their entity prompts are the neighborhood prompts of an edit of ``fact``: they should
        keep answering the old object after the edit.

        Args:
            fact: A fact of this world.
            n: At most this many (the first in subject order); ``None`` for all.
        """
        group = self._by_answer.get((fact.relation_id or "", fact.object), ())
        found = tuple(other for other in group if other.subject != fact.subject)
        return found if n is None else found[:n]

    def neighborhood_prompts(self, fact: Fact, n: int | None = None) -> tuple[Prompt, ...]:
        """Canonical entity prompts of :meth:`neighbors` (answer: ``fact.object``)."""
        return tuple(other.entity_prompt() for other in self.neighbors(fact, n))

    def none_pairs(self, seed: int = 0, n: int | None = None) -> tuple[tuple[str, str], ...]:
        """``(subject, object)`` pairs with no relation between them (answer: ``"None"``).

        Every subject is paired with each world object it has for no relation, shuffled with
        ``seed``; ``n`` keeps the first ``n``.
        """
        pairs = []
        for subject in self.subjects:
            own = {self.fact(subject.name, r.relation_id).object for r in self.relations}
            pairs.extend((subject.name, obj) for obj in self.objects if obj not in own)
        random.Random(seed).shuffle(pairs)
        return tuple(pairs if n is None else pairs[:n])

    def none_prompt(self, subject: str, obj: str, template: str | None = None) -> Prompt:
        """A relation-perspective prompt for an unrelated pair (answer: ``"None"``)."""
        fact = self.fact(subject, self.relations[0].relation_id)
        prompt = fact.relation_prompt(template, object=obj)
        return Prompt(prompt.text, NONE_ANSWER, prompt.char_spans, prompt.perspective)

    # -- text ------------------------------------------------------------------------------

    def corpus(self, n: int | None = None, seed: int = 0) -> tuple[str, ...]:
        """Biographies of the world's people: its training text, and the corpus of key
        statistics (covariance of MLP keys) when editing (ROME reads Wikipedia for that).

        Args:
            n: How many documents; ``None`` for one per person.
            seed: Chooses the sentences and their order
                (:func:`~kloc_lens.factworld.documents.biographies`).
        """
        from kloc_lens.factworld.documents import biographies

        return biographies(self, n, seed=seed)

    def words(self) -> frozenset[str]:
        """Every word (pre-token) that training prompts and answers contain, names excluded."""
        words: set[str] = set()
        for relation in self.relations:
            for template in relation.train_templates:
                words |= template_words(template)
            words.add(relation.surface)
            words |= set(relation.objects)
        for template in self.relation_train_templates:
            words |= template_words(template)
        for text in (NONE_ANSWER, ".", *(r.surface for r in self.relations)):
            words |= template_words(text)
        return frozenset(words)

    # -- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description from which :meth:`from_dict` rebuilds the world."""
        return {
            "format": FORMAT,
            "seed": self.seed,
            "config": self.config.__dict__,
            "subjects": [
                {"name": s.name, "pieces": [list(w) for w in s.pieces]} for s in self.subjects
            ],
            "relations": [
                {
                    "relation_id": r.relation_id,
                    "surface": r.surface,
                    "pool": r.pool,
                    "objects": list(r.objects),
                    "train_templates": list(r.train_templates),
                    "heldout_templates": list(r.heldout_templates),
                }
                for r in self.relations
            ],
            "relation_train_templates": list(self.relation_train_templates),
            "relation_heldout_templates": list(self.relation_heldout_templates),
            "facts": [
                {
                    "subject": f.subject,
                    "relation_id": f.relation_id,
                    "object": f.object,
                    "new_object": f.new_object,
                }
                for f in self.facts
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FactWorld:
        """Rebuild a world written by :meth:`to_dict`.

        Raises:
            FactworldError: The data is not a factworld description; the message names the key.
        """
        try:
            if data["format"] != FORMAT:
                raise FactworldError(
                    f"unknown factworld format {data['format']!r} (this kloc_lens reads "
                    f"{FORMAT!r}; rebuild with `kloc-lens factworld build`)"
                )
            relations = tuple(
                Relation(
                    relation_id=r["relation_id"],
                    surface=r["surface"],
                    pool=r["pool"],
                    objects=tuple(r["objects"]),
                    train_templates=tuple(r["train_templates"]),
                    heldout_templates=tuple(r["heldout_templates"]),
                )
                for r in data["relations"]
            )
            subjects = tuple(
                Subject(s["name"], tuple(tuple(w) for w in s["pieces"])) for s in data["subjects"]
            )
            rel_train = tuple(data["relation_train_templates"])
            rel_heldout = tuple(data["relation_heldout_templates"])
            by_id = {r.relation_id: r for r in relations}
            facts = _with_neighborhoods(
                [
                    _make_fact(
                        f["subject"], by_id[f["relation_id"]], f["object"], f["new_object"],
                        rel_train, rel_heldout,
                    )
                    for f in data["facts"]
                ]
            )  # fmt: skip
            return cls(
                seed=int(data["seed"]),
                config=WorldConfig(**data["config"]),
                subjects=subjects,
                relations=relations,
                relation_train_templates=rel_train,
                relation_heldout_templates=rel_heldout,
                facts=facts,
            )
        except KeyError as err:
            raise FactworldError(f"factworld description lacks key {err.args[0]!r}") from None

    def save(self, path: str | Path) -> None:
        """Write the world as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FactWorld:
        """Read a world written by :meth:`save`.

        Raises:
            FactworldError: The file is missing or not a factworld description.
        """
        file = Path(path)
        if not file.is_file():
            raise FactworldError(f"no factworld file at {str(file)!r}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise FactworldError(f"{str(file)!r} is not JSON: {err}") from None
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------
# Generation.


def template_words(template: str) -> frozenset[str]:
    """The words of a template, fields removed, split as the tokenizer pre-splits text.

    >>> sorted(template_words("{subject}'s native language is"))
    ["'", 'is', 'language', 'native', 's']
    """
    literal = _FIELD_RE.sub(" ", template)
    return frozenset(_WORD_RE.findall(literal))


def greedy_wordpiece(word: str, vocab: Iterable[str] | frozenset[str]) -> tuple[str, ...] | None:
    """Split ``word`` the way a WordPiece tokenizer does: greedy longest match, left to right.

    Continuation pieces are looked up with the ``##`` prefix. Returns ``None`` where the word
    cannot be split (the tokenizer would write ``<unk>``).

    >>> greedy_wordpiece("Velka", {"Vel", "Ve", "##ka", "##lka"})
    ('Vel', '##ka')
    """
    vocab = vocab if isinstance(vocab, (set, frozenset)) else frozenset(vocab)
    pieces: list[str] = []
    start = 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
            if piece in vocab:
                pieces.append(piece)
                start = end
                break
        else:
            return None
    return tuple(pieces)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(prefix: str, frame: str) -> str:
    return f"{prefix} {frame}" if prefix else _capitalize(frame)


def _grid(
    frames: Sequence[str], prefixes: Sequence[str], heldout_per_frame: int, rotation: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split the prefix x frame grid into training and held-out templates.

    Frame ``i`` holds out ``heldout_per_frame`` consecutive non-empty prefixes starting at
    ``rotation + i * heldout_per_frame`` (cyclically), so each prefix is held out for about
    ``len(frames) * heldout_per_frame / (len(prefixes) - 1)`` frames and trained with the others.
    The empty prefix is never held out: the canonical template stays a training template.
    """
    n = len(prefixes) - 1
    train: list[str] = []
    heldout: list[str] = []
    for i, frame in enumerate(frames):
        out = {1 + (rotation + i * heldout_per_frame + j) % n for j in range(heldout_per_frame)}
        for p, prefix in enumerate(prefixes):
            (heldout if p in out else train).append(_join(prefix, frame))
    return tuple(train), tuple(heldout)


def _make_fact(
    subject: str,
    relation: Relation,
    obj: str,
    new_object: str | None,
    relation_train: tuple[str, ...],
    relation_heldout: tuple[str, ...],
) -> Fact:
    return Fact(
        subject=subject,
        relation=relation.surface,
        object=obj,
        entity_template=relation.train_templates[0],
        relation_template=relation_train[0],
        entity_paraphrases=relation.heldout_templates,
        relation_paraphrases=relation_heldout,
        new_object=new_object,
        relation_id=relation.relation_id,
    )


N_NEIGHBORHOOD_PROMPTS = 10
"""How many neighborhood prompts each fact carries (``Fact.neighborhood_prompts``)."""


def _with_neighborhoods(facts: Sequence[Fact]) -> tuple[Fact, ...]:
    """Fill ``neighborhood_prompts``: canonical prompts of the next subjects (cyclically, in
    subject order) with the same relation and object."""
    groups: dict[tuple[str | None, str], list[int]] = {}
    for i, fact in enumerate(facts):
        groups.setdefault((fact.relation_id, fact.object), []).append(i)
    texts = [fact.entity_prompt().text for fact in facts]
    out = []
    for i, fact in enumerate(facts):
        group = groups[(fact.relation_id, fact.object)]
        at = group.index(i)
        n = min(len(group) - 1, N_NEIGHBORHOOD_PROMPTS)
        prompts = tuple(texts[group[(at + k) % len(group)]] for k in range(1, n + 1))
        out.append(dataclasses.replace(fact, neighborhood_prompts=prompts))
    return tuple(out)


def _syllables(rng: random.Random, n: int, capital: bool, taken: set[str]) -> list[str]:
    out: list[str] = []
    candidates = [o + v + c for o in ONSETS for v in VOWELS for c in dict.fromkeys(CODAS)]
    rng.shuffle(candidates)
    for syllable in candidates:
        text = _capitalize(syllable) if capital else syllable
        if text in taken or text.lower() in taken:
            continue
        out.append(text)
        taken.add(text)
        if len(out) == n:
            return out
    raise FactworldError(f"cannot draw {n} distinct syllables from the inventory")


def _names(config: WorldConfig, rng: random.Random, words: frozenset[str]) -> tuple[Subject, ...]:
    taken = {w.lower() for w in words} | set(words)
    initials = _syllables(rng, config.n_initial_syllables, True, taken)
    continuations = _syllables(rng, config.n_continuation_syllables, False, taken)
    vocab = frozenset(words) | frozenset(initials) | {CONTINUATION + c for c in continuations}

    def word(n_syllables: int) -> tuple[str, ...] | None:
        pieces = (
            rng.choice(initials),
            *(rng.choice(continuations) for _ in range(n_syllables - 1)),
        )
        text = "".join(pieces)
        expected = (pieces[0], *(CONTINUATION + p for p in pieces[1:]))
        if text in words or text.lower() in taken or greedy_wordpiece(text, vocab) != expected:
            return None
        return pieces

    first_names: dict[str, tuple[str, ...]] = {}
    for _ in range(100 * config.n_first_names):
        pieces = word(rng.choice((1, 2)))
        if pieces is not None:
            first_names.setdefault("".join(pieces), pieces)
        if len(first_names) == config.n_first_names:
            break
    else:
        raise FactworldError(f"cannot draw {config.n_first_names} distinct first names")
    first = sorted(first_names)
    subjects: list[Subject] = []
    surnames: set[str] = set(first_names)
    for _ in range(100 * config.n_subjects):
        pieces = word(rng.choice((2, 3)))
        if pieces is None or "".join(pieces) in surnames:
            continue
        surname = "".join(pieces)
        surnames.add(surname)
        given = rng.choice(first)
        subjects.append(Subject(f"{given} {surname}", (first_names[given], pieces)))
        if len(subjects) == config.n_subjects:
            return tuple(subjects)
    raise FactworldError(f"cannot draw {config.n_subjects} distinct names")


def check_no_prefix_templates(templates: Iterable[str]) -> None:
    """Refuse templates of which one, filled in, is a proper prefix of another.

    A frame that continues another one ("{subject} was born in" and "{subject} was born in the
    city of") teaches the model to continue the short one with the long one's next word ("the")
    instead of answering: the only held-out misses of the factworld v2 prototype.

    Raises:
        FactworldError: Naming both templates.
    """
    filled = {t.format(subject="S", object="O"): t for t in templates}
    for short, short_template in filled.items():
        for long, long_template in filled.items():
            if long.startswith(short + " "):
                raise FactworldError(
                    f"template {short_template!r} is a prefix of {long_template!r}: the model "
                    "would learn to continue it instead of answering"
                )


def generate_world(config: WorldConfig | None = None, *, seed: int = 0) -> FactWorld:
    """Generate a knowledge world.

    Args:
        config: Its size; ``None`` for the default (256 subjects x 8 relations).
        seed: Every random choice (syllables, names, objects, held-out rotation, edit targets)
            comes from this seed; the same seed gives the same world.

    Returns:
        The world.

    Raises:
        FactworldError: The configuration cannot be satisfied (too few syllables for the names).
    """
    config = config or WorldConfig()
    rng = random.Random(f"kloc-factworld-{seed}")
    prefixes = PREFIXES[: config.n_prefixes]
    specs = RELATIONS[: config.n_relations]
    pools = {
        name: tuple(rng.sample(objects, config.objects_per_pool)) for name, objects in POOLS.items()
    }
    relation_train, relation_heldout = _grid(
        RELATION_FRAMES, prefixes, config.heldout_per_frame, rng.randrange(len(prefixes) - 1)
    )
    relations = []
    for spec in specs:
        train, heldout = _grid(
            spec.frames, prefixes, config.heldout_per_frame, rng.randrange(len(prefixes) - 1)
        )
        relations.append(
            Relation(spec.relation_id, spec.surface, spec.pool, pools[spec.pool], train, heldout)
        )
    words: set[str] = set()
    for relation in relations:
        for template in (*relation.train_templates, *relation.heldout_templates):
            words |= template_words(template)
        words |= template_words(relation.surface) | set(relation.objects)
    for template in (*relation_train, *relation_heldout):
        words |= template_words(template)
    words.add(NONE_ANSWER)
    check_no_prefix_templates(
        [*relation_train, *relation_heldout]
        + [t for r in relations for t in (*r.train_templates, *r.heldout_templates)]
    )
    for pool in POOLS.values():
        words |= set(pool)
    subjects = _names(config, rng, frozenset(words))

    facts: list[Fact] = []
    for subject in subjects:
        used: dict[str, set[str]] = {}
        chosen: list[tuple[Relation, str]] = []
        for relation in relations:
            taken = used.setdefault(relation.pool, set())
            obj = rng.choice([o for o in relation.objects if o not in taken])
            taken.add(obj)
            chosen.append((relation, obj))
        own = {obj for _, obj in chosen}
        for relation, obj in chosen:
            new_object = rng.choice([o for o in relation.objects if o not in own])
            facts.append(
                _make_fact(
                    subject.name, relation, obj, new_object, relation_train, relation_heldout
                )
            )
    return FactWorld(
        seed=seed,
        config=config,
        subjects=subjects,
        relations=tuple(relations),
        relation_train_templates=relation_train,
        relation_heldout_templates=relation_heldout,
        facts=_with_neighborhoods(facts),
    )
