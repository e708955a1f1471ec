"""Small text corpora for key statistics when no real corpus is at hand.

:func:`second_moment` takes any iterable of strings. For the planted model (whose vocabulary has
a few dozen words) :func:`planted_corpus` writes sentences from its templates and random word
sequences, seeded, so that every word of the vocabulary is seen in many contexts.

Example:
    >>> from kloc_lens.planted import planted_facts
    >>> texts = planted_corpus(planted_facts(), n_texts=4)
    >>> len(texts), texts[0].split()[:3]
    (4, ['The', 'home', 'of'])
"""

from __future__ import annotations

import random

from kloc_lens import planted as planted_module
from kloc_lens.edit._errors import integer
from kloc_lens.planted import PlantedFacts

__all__ = ["planted_corpus"]

_FILLERS = planted_module._FILLERS
"""Template words of the planted vocabulary (the planted model's own list)."""

_SENTENCES = (
    "{template} {object} .",
    "{subject} lives in {object} .",
    "{subject} was born in {object} .",
    "The relation between {subject} and {object} is home .",
    "{subject} is a {word} from {object} , the city where {other} lives .",
)


def planted_corpus(facts: PlantedFacts, *, n_texts: int = 64, seed: int = 0) -> tuple[str, ...]:
    """Texts in the planted model's vocabulary: template sentences and random word runs.

    Args:
        facts: What is planted (:func:`kloc_lens.planted.planted_facts`).
        n_texts: How many texts; each holds two sentences and a run of 6 random words.
        seed: Seed of the choices.

    Returns:
        The texts (every subject and object word occurs in them for ``n_texts >= 16``).

    Raises:
        EditError: ``n_texts`` is not an integer >= 1, or ``seed`` not an integer.
    """
    integer(n_texts, "n_texts", minimum=1)
    integer(seed, "seed")
    rng = random.Random(seed)
    subjects = list(facts.subjects)
    objects = [*facts.objects, *facts.spare_objects]
    words = [*_FILLERS, *" ".join(subjects).split(), *objects]
    texts = []
    for index in range(n_texts):
        subject = subjects[index % len(subjects)]
        obj = objects[(index // len(subjects) + index) % len(objects)]
        parts = []
        for form in (_SENTENCES[index % len(_SENTENCES)], rng.choice(_SENTENCES)):
            parts.append(
                form.format(
                    template=facts.template.format(subject=subject),
                    subject=subject,
                    object=obj,
                    other=rng.choice(subjects),
                    word=rng.choice(words),
                )
            )
        parts.append(" ".join(rng.choice(words) for _ in range(6)))
        texts.append(" ".join(parts))
    return tuple(texts)
