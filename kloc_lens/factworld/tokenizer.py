"""The factworld tokenizer: whole words for the language, syllables for invented names.

A real model's tokenizer splits rare names into several pieces and keeps common words whole;
factworld's does the same by construction, with a vocabulary of a few hundred tokens:

- the vocabulary is learned by ``tokenizers``' ``WordLevelTrainer`` from the world's texts
  (its corpus and every template) in which each name has been written as its syllables,
  ``Vel ##ka To ##ru ##nis``; so it holds every template word, object, relation word and name
  syllable the world uses, and nothing else (ids are then ordered deterministically: the special
  tokens, then the rest sorted);
- text is encoded by a ``WordPiece`` model over that vocabulary (greedy longest match after a
  ``Whitespace`` pre-split into words and punctuation), so a known word is one token and a name
  comes out as exactly the syllables it was built from (the world generator rejects names for
  which the greedy match would differ);
- a ``TemplateProcessing`` post-processor prepends ``<bos>`` (also EOS and padding), and the
  ``WordPiece`` decoder glues ``##`` pieces back onto their word.

The result is wrapped as a ``transformers.PreTrainedTokenizerFast`` (with the ``init_kwargs``
TransformerLens needs) and saved with ``save_pretrained`` next to the model.

Example:
    >>> from kloc_lens.factworld.world import WorldConfig, generate_world
    >>> world = generate_world(WorldConfig(n_subjects=4, n_relations=2), seed=0)
    >>> tokenizer = build_tokenizer(world)
    >>> subject = world.subjects[0]
    >>> ids = tokenizer(subject.name, add_special_tokens=False)["input_ids"]
    >>> tuple(tokenizer.convert_ids_to_tokens(ids)) == subject.tokens
    True
    >>> tokenizer.decode(ids) == subject.name
    True
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kloc_lens._tokenizers import wrap_tokenizer
from kloc_lens.factworld.world import (
    _FIELD_RE,
    _WORD_RE,
    CONTINUATION,
    NONE_ANSWER,
    FactWorld,
    FactworldError,
)

__all__ = ["BOS", "FACTWORLD_NAME", "UNK", "build_tokenizer", "check_tokenizer"]

BOS = "<bos>"
"""Beginning of text; also the EOS and padding token."""
UNK = "<unk>"
"""Unknown word (never produced for the world's own texts)."""
FACTWORLD_NAME = "kloc-factworld"
"""The name the tokenizer (and the model) carry as ``name_or_path`` before they are saved."""


def _presplit_texts(world: FactWorld) -> Iterator[str]:
    """The world's texts, pre-split into words, names written as their syllables."""
    names = {}
    for subject in world.subjects:
        for word, pieces in zip(subject.name.split(), subject.pieces, strict=True):
            names[word] = " ".join(
                piece if i == 0 else CONTINUATION + piece for i, piece in enumerate(pieces)
            )
    texts: list[str] = list(world.corpus())
    for relation in world.relations:
        texts.extend(relation.train_templates)
        texts.extend(relation.heldout_templates)
        texts.append(relation.surface)
        texts.extend(relation.objects)
    texts.extend(world.relation_train_templates)
    texts.extend(world.relation_heldout_templates)
    texts.append(NONE_ANSWER)
    texts.extend(subject.name for subject in world.subjects)
    for text in texts:
        words = _WORD_RE.findall(_FIELD_RE.sub(" ", text))
        yield " ".join(names.get(word, word) for word in words)


def build_tokenizer(world: FactWorld, *, n_ctx: int = 64) -> PreTrainedTokenizerFast:
    """Learn the world's vocabulary and build its tokenizer.

    Args:
        world: The world whose texts define the vocabulary.
        n_ctx: ``model_max_length`` of the tokenizer (the model's context length).

    Returns:
        A fast tokenizer that prepends ``<bos>``, splits names into their syllables and keeps
        every other word of the world whole.

    Raises:
        FactworldError: A word of the world does not encode as expected (see
            :func:`check_tokenizer`).
    """
    learner = Tokenizer(models.WordLevel(unk_token=UNK))
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        special_tokens=[BOS, UNK], min_frequency=1, show_progress=False
    )
    learner.train_from_iterator(_presplit_texts(world), trainer=trainer)
    learned = set(learner.get_vocab()) - {BOS, UNK}
    vocab = {token: index for index, token in enumerate([BOS, UNK, *sorted(learned)])}

    backend = Tokenizer(
        models.WordPiece(
            vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION,
            max_input_chars_per_word=100,
        )
    )  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=True)
    tokenizer = wrap_tokenizer(backend, name=FACTWORLD_NAME, n_ctx=n_ctx, bos=BOS, unk=UNK)
    check_tokenizer(tokenizer, world)
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerFast, world: FactWorld) -> None:
    """Check that a tokenizer encodes the world as factworld expects.

    Every name must split into exactly its syllables, every other word of the world must be
    one token, and the first tokens of the objects (and of the relation surface forms) must be
    distinct, since answers are scored by their first token.

    Raises:
        FactworldError: The first violation found, naming the word.
    """

    def tokens(text: str) -> list[str]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.convert_ids_to_tokens(ids)  # type: ignore[return-value]

    for subject in world.subjects:
        got = tuple(tokens(subject.name))
        if got != subject.tokens:
            raise FactworldError(
                f"name {subject.name!r} tokenizes to {got}, expected {subject.tokens}"
            )
    for word in sorted(world.words()):
        for piece in word.split():
            got = tuple(tokens(piece))
            if len(got) != 1 or got[0] == UNK:
                raise FactworldError(f"word {piece!r} tokenizes to {got}, expected one token")
    firsts: dict[str, str] = {}
    answers = [*world.objects, *(r.surface for r in world.relations), NONE_ANSWER]
    for answer in answers:
        first = tokens(answer)[0]
        if first in firsts:
            raise FactworldError(
                f"answers {firsts[first]!r} and {answer!r} share their first token {first!r}"
            )
        firsts[first] = answer
