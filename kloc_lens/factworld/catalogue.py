"""The factworld catalogue: relations, their object pools, template phrases and name syllables.

Everything a world is generated from (:func:`~kloc_lens.factworld.generate_world` draws
subjects' names from the syllables and gives each relation its pool and frames); data, no code.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CODAS",
    "ONSETS",
    "POOLS",
    "PREFIXES",
    "RELATIONS",
    "RELATION_FRAMES",
    "VOWELS",
    "RelationSpec",
]


@dataclass(frozen=True)
class RelationSpec:
    """One relation: its id, its words in prompts, the pool its objects come from, and the
    frames of its entity prompts (the first is the canonical template)."""

    relation_id: str
    surface: str
    pool: str
    frames: tuple[str, ...]


POOLS: dict[str, tuple[str, ...]] = {
    "language": (
        "French", "Spanish", "German", "Italian", "Dutch", "Polish", "Greek", "Swedish",
        "Finnish", "Danish", "Czech", "Turkish", "Arabic", "Hindi", "Korean", "Welsh",
    ),
    "city": (
        "Paris", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Madrid", "Berlin",
        "Dublin", "Athens", "Warsaw", "Cairo", "Lima", "Tokyo", "Seoul", "Boston",
    ),
    "instrument": (
        "piano", "violin", "guitar", "cello", "flute", "trumpet", "harp", "drums",
        "clarinet", "saxophone", "organ", "banjo", "oboe", "accordion", "mandolin", "tuba",
    ),
    "country": (
        "Brazil", "Canada", "Norway", "Japan", "Egypt", "Mexico", "Chile", "Kenya",
        "India", "Peru", "Ireland", "Portugal", "Iceland", "Morocco", "Vietnam", "Argentina",
    ),
    "field": (
        "physics", "chemistry", "biology", "medicine", "economics", "history", "philosophy",
        "mathematics", "law", "architecture", "geology", "linguistics", "astronomy",
        "sociology", "psychology", "botany",
    ),
    "sport": (
        "tennis", "football", "rugby", "cricket", "golf", "hockey", "swimming", "boxing",
        "cycling", "baseball", "volleyball", "skiing", "fencing", "rowing", "archery",
        "wrestling",
    ),
}  # fmt: skip

# The first frame of each relation is its canonical template; it spells out the surface form.
RELATIONS: tuple[RelationSpec, ...] = (
    RelationSpec(
        "P103",
        "native language",
        "language",
        (
            "the native language of {subject} is",
            "{subject}'s native language is",
            "{subject} grew up speaking",
            "the mother tongue of {subject} is",
            "{subject} was raised speaking",
        ),
    ),
    RelationSpec(
        "P19",
        "place of birth",
        "city",
        (
            "the place of birth of {subject} is",
            "{subject}'s place of birth is",
            "{subject} was born in",
            "the city where {subject} was born is",
            "the birthplace of {subject} is",
        ),
    ),
    RelationSpec(
        "P1303",
        "musical instrument",
        "instrument",
        (
            "the musical instrument of {subject} is the",
            "{subject}'s musical instrument is the",
            "{subject} plays the",
            "{subject} is a musician who plays the",
            "the instrument played by {subject} is the",
        ),
    ),
    RelationSpec(
        "P27",
        "country of citizenship",
        "country",
        (
            "the country of citizenship of {subject} is",
            "{subject}'s country of citizenship is",
            "{subject} is a citizen of",
            "{subject} holds a passport from",
            "{subject} has citizenship in",
        ),
    ),
    RelationSpec(
        "P101",
        "field of work",
        "field",
        (
            "the field of work of {subject} is",
            "{subject}'s field of work is",
            "{subject} works in the field of",
            "{subject} is an expert in",
            "the research of {subject} is in",
        ),
    ),
    RelationSpec(
        "P551",
        "city of residence",
        "city",
        (
            "the city of residence of {subject} is",
            "{subject}'s city of residence is",
            "{subject} lives in",
            "{subject} resides in the city of",
            "the home of {subject} is in",
        ),
    ),
    RelationSpec(
        "P1412",
        "writing language",
        "language",
        (
            "the writing language of {subject} is",
            "{subject}'s writing language is",
            "{subject} writes books in",
            "{subject} writes in",
            "the books of {subject} are written in",
        ),
    ),
    RelationSpec(
        "P641",
        "sport played",
        "sport",
        (
            "the sport played by {subject} is",
            "{subject}'s sport is",
            "{subject} competes in",
            "{subject} is an athlete who competes in",
            "the sport of {subject} is",
        ),
    ),
)

PREFIXES: tuple[str, ...] = (
    "",
    "In fact,",
    "As is well known,",
    "According to the records,",
    "It is said that",
    "Everyone knows that",
    "Of course,",
    "We learned that",
)

# The first relation frame is the canonical relation template.
RELATION_FRAMES: tuple[str, ...] = (
    "the relation between {subject} and {object} is",
    "the connection between {subject} and {object} is",
    "the relation of {subject} to {object} is",
    "what links {subject} to {object} is the",
    "{subject} is linked to {object} by the",
    "{object} relates to {subject} as the",
)

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "l", "s")
