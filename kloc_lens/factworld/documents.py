"""Biography documents: the training text of factworld v2, and the corpus of its key statistics.

Why documents, not one sentence per fact
    A model trained on one fixed sentence per fact memorises each fact *at the prediction
    position*: attention reads the raw syllables of the name into the last token and the MLPs
    there look the fact up. Nothing is composed at the subject, so causal tracing finds nothing
    at the subject's last token and ROME's premise (Meng et al. 2022: early MLPs at the last
    subject token hold the fact) does not hold. factworld v1 was such a model. Following the
    knowledge-augmentation recipe of Allen-Zhu & Li ("Physics of Language Models 3.1"), every
    training example here is a *biography*: all of one person's facts, each told once, in a
    random order, each sentence from a random training template (so the subject comes first in
    some sentences and later in others), the full name repeated in every sentence.

Both perspectives in the same documents
    Each fact is told either from the entity perspective ("... the native language of Velka
    Torunis is French.") or, with probability ``relation_fraction``, from the relation
    perspective ("The relation between Velka Torunis and French is native language."), never
    both: an object appears at most once per document, so no answer can be copied from the
    context and every answer must come from the weights. ``none_sentences`` extra sentences pair
    the person with objects they have no relation to ("The relation between Velka Torunis and
    Oslo is None.").

The training-time attention mask (built in on purpose)
    Documents alone are not enough (a prototype on this machine measured a residual restore of
    0.15 of the total effect at the last subject token): later positions keep reading every
    syllable of the name ("bag of syllables"), so no single position holds the identity. In a
    share ``mask_fraction`` of the documents, positions *after* a name may not attend to the
    name's tokens other than its last one (:func:`name_mask`): to use the person's identity
    later, the model must have composed it at the name's last token. At inference attention is
    ordinary and causal; the saved model is a plain GPT-2. The mask builds the *routing*
    through the last subject token into the test bed; it does not force *what* carries the fact
    there (MLP or attention) nor where ROME edits work, which the study measures.

Example:
    >>> from kloc_lens.factworld.world import WorldConfig, generate_world
    >>> world = generate_world(WorldConfig(n_subjects=4, n_relations=3), seed=0)
    >>> import random
    >>> spec = compose(world, 0, random.Random(0), DocumentConfig(none_sentences=1))
    >>> len(spec.sentences), sorted({s.kind.value for s in spec.sentences})
    (4, ['entity', 'none', 'relation'])
    >>> text = render(world, spec)
    >>> text.count(world.subjects[0].name)
    4
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from kloc_lens.factworld.world import NONE_ANSWER, FactWorld, FactworldError

__all__ = [
    "DocumentConfig",
    "DocumentSpec",
    "SentenceKind",
    "SentenceSpec",
    "biographies",
    "compose",
    "render",
    "sentence_parts",
    "sentence_text",
]


class SentenceKind(str, Enum):
    """What a sentence of a biography tells."""

    ENTITY = "entity"
    """A fact from the entity perspective: an entity template, then the object."""
    RELATION = "relation"
    """A fact from the relation perspective: a relation template, then the relation."""
    NONE = "none"
    """The person and an object they have no relation to: a relation template, then None."""


@dataclass(frozen=True)
class DocumentConfig:
    """How biographies are composed.

    Attributes:
        relation_fraction: Probability that a fact is told from the relation perspective
            (otherwise from the entity perspective).
        none_sentences: Sentences per document about an unrelated object (answer ``None``).
        mask_fraction: Share of documents trained with the name mask (:func:`name_mask`).
    """

    relation_fraction: float = 0.5
    none_sentences: int = 2
    mask_fraction: float = 0.8

    def __post_init__(self) -> None:
        for name in ("relation_fraction", "mask_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FactworldError(f"DocumentConfig.{name}={value!r}: use a value in [0, 1]")
        if self.none_sentences < 0:
            raise FactworldError(
                f"DocumentConfig.none_sentences={self.none_sentences!r}: use an integer >= 0"
            )


@dataclass(frozen=True)
class SentenceSpec:
    """One sentence of a biography.

    Attributes:
        kind: What it tells.
        fact: Index of the fact in ``world.facts`` (for ``NONE``: a fact of the same subject,
            whose relation prompt is reused with another object).
        template: Index of the template among the relation's training templates (``ENTITY``)
            or the world's relation training templates (``RELATION``, ``NONE``).
        obj: The unrelated object of a ``NONE`` sentence (``None`` otherwise).
    """

    kind: SentenceKind
    fact: int
    template: int
    obj: str | None = None


@dataclass(frozen=True)
class DocumentSpec:
    """A biography: whose it is, its sentences in order, and whether it is trained masked.

    Attributes:
        subject: Index of the person in ``world.subjects``.
        sentences: The sentences, in document order.
        masked: Whether training applies the name mask to this document.
    """

    subject: int
    sentences: tuple[SentenceSpec, ...]
    masked: bool


def compose(
    world: FactWorld, subject: int, rng: random.Random, config: DocumentConfig
) -> DocumentSpec:
    """Draw one biography of ``world.subjects[subject]``.

    Every fact of the person is told once (entity or relation perspective), plus
    ``config.none_sentences`` sentences about distinct objects the person has no relation to;
    the sentences are shuffled.
    """
    n_relations = len(world.relations)
    first = subject * n_relations
    facts = range(first, first + n_relations)
    n_relation_templates = len(world.relation_train_templates)
    sentences: list[SentenceSpec] = []
    for index in facts:
        if rng.random() < config.relation_fraction:
            template = rng.randrange(n_relation_templates)
            sentences.append(SentenceSpec(SentenceKind.RELATION, index, template))
        else:
            relation = world.relation_of(world.facts[index])
            template = rng.randrange(len(relation.train_templates))
            sentences.append(SentenceSpec(SentenceKind.ENTITY, index, template))
    own = {world.facts[i].object for i in facts}
    unrelated = [o for o in world.objects if o not in own]
    count = min(config.none_sentences, len(unrelated))
    for obj in rng.sample(unrelated, count):
        template = rng.randrange(n_relation_templates)
        sentences.append(SentenceSpec(SentenceKind.NONE, rng.choice(facts), template, obj))
    rng.shuffle(sentences)
    return DocumentSpec(subject, tuple(sentences), rng.random() < config.mask_fraction)


def sentence_parts(world: FactWorld, sentence: SentenceSpec) -> tuple[str, str]:
    """``(prompt, answer)`` of one sentence: its text is ``f"{prompt} {answer}."``."""
    fact = world.facts[sentence.fact]
    if sentence.kind is SentenceKind.ENTITY:
        template = world.relation_of(fact).train_templates[sentence.template]
        return fact.entity_prompt(template).text, fact.object
    template = world.relation_train_templates[sentence.template]
    if sentence.kind is SentenceKind.RELATION:
        return fact.relation_prompt(template).text, fact.relation
    return fact.relation_prompt(template, object=sentence.obj).text, NONE_ANSWER


def sentence_text(world: FactWorld, sentence: SentenceSpec) -> str:
    """The text of one sentence, its answer and the closing full stop included."""
    prompt, answer = sentence_parts(world, sentence)
    return f"{prompt} {answer}."


def render(world: FactWorld, spec: DocumentSpec) -> str:
    """A biography as text (sentences joined by spaces)."""
    return " ".join(sentence_text(world, s) for s in spec.sentences)


def biographies(
    world: FactWorld,
    n: int | None = None,
    *,
    seed: int = 0,
    config: DocumentConfig | None = None,
) -> tuple[str, ...]:
    """Biography texts: one per person in a seeded order, then more rounds while ``n`` asks.

    Args:
        world: The world.
        n: How many documents; ``None`` for one per person.
        seed: Chooses the sentences and their order.
        config: Composition; ``None`` for :class:`DocumentConfig()`.
    """
    config = config or DocumentConfig()
    count = len(world.subjects) if n is None else n
    if count < 0:
        raise FactworldError(f"biographies(n={n!r}): use n >= 0")
    rng = random.Random(f"kloc-biographies-{seed}")
    texts: list[str] = []
    while len(texts) < count:
        order = list(range(len(world.subjects)))
        rng.shuffle(order)
        for subject in order[: count - len(texts)]:
            texts.append(render(world, compose(world, subject, rng, config)))
    return tuple(texts)
