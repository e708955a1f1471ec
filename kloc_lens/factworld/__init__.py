"""factworld: a synthetic knowledge world and a small GPT-2 that knows it (the embedded default).

No pretrained weights can be downloaded where kloc_lens is built and tested, and users without a
GPU still need a real model to run the study on. factworld is that model: a seeded world of
invented people with multi-token names and eight relations, a word/syllable tokenizer, and a
6-layer GPT-2 trained by kloc_lens's own code on *biographies* of those people (every fact told
from the entity or the relation perspective, names repeated, sentences permuted), shipped inside
the package and loaded through :func:`kloc_lens.load_model` like any local checkpoint. Because
the world is generated, every fact the model knows is known exactly.

Version 2 builds ROME's signature into the test bed on purpose: during training only, in most
documents the positions after a name may not attend to the name's tokens other than its last
(:mod:`~kloc_lens.factworld.documents`), so the model composes the subject at its last token,
as large pretrained models do on their own. What carries the fact there (MLP or attention) and
where edits work are not built in; the study measures them.

- :mod:`~kloc_lens.factworld.world`: the world (subjects, relations, templates, held-out
  paraphrases, :class:`~kloc_lens.facts.Fact` objects, neighbors);
- :mod:`~kloc_lens.factworld.documents`: biographies, the training text and the corpus;
- :mod:`~kloc_lens.factworld.tokenizer`: its tokenizer;
- :mod:`~kloc_lens.factworld.train`: the model, the training mask, first-token accuracy;
- :mod:`~kloc_lens.factworld.build`: build from scratch, save, load the shipped model;
- :mod:`~kloc_lens.factworld.editing`: ROME on it (the generic editor, the world's corpus).

Example::

    from kloc_lens.factworld import load_factworld
    model, world = load_factworld()
    fact = world.facts[0]          # Fact(subject='...', relation='native language', ...)
    neighbors = world.neighbors(fact)
"""

from kloc_lens.factworld.build import (
    DEFAULT_MODEL,
    DEFAULT_TRAIN,
    DEFAULT_WORLD,
    SHIPPED_SEED,
    build,
    build_main,
    describe_factworld,
    factworld_path,
    load_factworld,
)
from kloc_lens.factworld.documents import DocumentConfig, biographies
from kloc_lens.factworld.editing import EDIT_CONTEXTS, EDIT_LAYER, rome_editor
from kloc_lens.factworld.tokenizer import build_tokenizer, check_tokenizer
from kloc_lens.factworld.train import (
    Accuracy,
    ModelConfig,
    TrainConfig,
    TrainResult,
    evaluate,
    first_token_accuracy,
    make_model,
    train,
)
from kloc_lens.factworld.world import (
    NONE_ANSWER,
    FactWorld,
    FactworldError,
    Relation,
    Subject,
    WorldConfig,
    generate_world,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TRAIN",
    "DEFAULT_WORLD",
    "EDIT_CONTEXTS",
    "EDIT_LAYER",
    "NONE_ANSWER",
    "SHIPPED_SEED",
    "Accuracy",
    "DocumentConfig",
    "FactWorld",
    "FactworldError",
    "ModelConfig",
    "Relation",
    "Subject",
    "TrainConfig",
    "TrainResult",
    "WorldConfig",
    "biographies",
    "build",
    "build_main",
    "build_tokenizer",
    "check_tokenizer",
    "describe_factworld",
    "evaluate",
    "factworld_path",
    "first_token_accuracy",
    "generate_world",
    "load_factworld",
    "make_model",
    "rome_editor",
    "train",
]
