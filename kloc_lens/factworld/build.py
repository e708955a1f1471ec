"""Build, save and load the factworld model: the embedded default of kloc_lens.

:func:`build` regenerates everything from a seed: the world
(:func:`~kloc_lens.factworld.world.generate_world`), its tokenizer
(:func:`~kloc_lens.factworld.tokenizer.build_tokenizer`), the trained model
(:func:`~kloc_lens.factworld.train.train`), and writes one directory that
:func:`kloc_lens.load_model` loads like any ``save_pretrained`` checkpoint:

====================== =================================================================
``config.json``,       the GPT-2 (``save_pretrained``)
``model.safetensors``
``tokenizer.json``,    the tokenizer (``save_pretrained``)
``tokenizer_config.json``
``world.json``         the world: subjects, relations, templates, facts
``training_log.json``  seed, configurations, the loss/accuracy log, final accuracies, time
``accuracy.txt``       the final accuracies in words
====================== =================================================================

The shipped model lives in ``kloc_lens/factworld/data`` (:func:`factworld_path`);
:func:`load_factworld` loads it, so nobody retrains by default.

Example (loading the shipped model)::

    model, world = load_factworld()
    fact = world.facts[0]
    model.to_string(model(fact.entity_prompt().text)[0, -1].argmax())  # == fact.object
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kloc_lens.factworld.tokenizer import build_tokenizer
from kloc_lens.factworld.train import (
    Accuracy,
    ModelConfig,
    TrainConfig,
    TrainResult,
    evaluate,
    train,
)
from kloc_lens.factworld.world import FactWorld, FactworldError, WorldConfig, generate_world

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TRAIN",
    "DEFAULT_WORLD",
    "SHIPPED_SEED",
    "build",
    "build_main",
    "describe_factworld",
    "factworld_path",
    "load_factworld",
]

logger = logging.getLogger(__name__)

SHIPPED_SEED = 0
"""The seed of the shipped world and model."""
DEFAULT_WORLD = WorldConfig()
"""The shipped world's size."""
DEFAULT_MODEL = ModelConfig()
"""The shipped model's shape."""
DEFAULT_TRAIN = TrainConfig(bf16=True, threads=2)
"""The shipped model's curriculum: mixed precision (the CPU it was built on has AMX) on two
threads; ``build(out_dir)`` with the same seed and thread count reproduces the weights bit for
bit on such a CPU."""

WORLD_FILE = "world.json"
LOG_FILE = "training_log.json"
SUMMARY_FILE = "accuracy.txt"


def factworld_path() -> Path:
    """The directory of the shipped factworld model (inside the installed package)."""
    return Path(__file__).resolve().parent / "data"


def build(
    out_dir: str | Path,
    *,
    seed: int = SHIPPED_SEED,
    steps: int | None = None,
    world_config: WorldConfig | None = None,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    threads: int | None = None,
    verify: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Regenerate a factworld from scratch and save it: world, tokenizer, trained model, log.

    Args:
        out_dir: Directory to write (created if missing; files of the same names are replaced).
        seed: Seed of the world, the initial weights and the example order.
        steps: Training steps; ``None`` keeps ``train_config.steps``.
        world_config: The world's size; ``None`` for :data:`DEFAULT_WORLD`.
        model_config: The model's shape; ``None`` for :data:`DEFAULT_MODEL`.
        train_config: The curriculum; ``None`` for :data:`DEFAULT_TRAIN`.
        threads: CPU threads while training; ``None`` keeps ``train_config.threads``.
        verify: Load the written directory back with :func:`kloc_lens.load_model` and measure
            its accuracy through TransformerLens (recorded in the log as ``bridge_accuracy``).
        progress: Show progress bars.

    Returns:
        The training result (model, log, final accuracy, time).
    """
    train_config = train_config or DEFAULT_TRAIN
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = steps
    if threads is not None:
        overrides["threads"] = threads
    if overrides:
        train_config = TrainConfig(**{**asdict(train_config), **overrides})
    model_config = model_config or DEFAULT_MODEL
    world = generate_world(world_config or DEFAULT_WORLD, seed=seed)
    tokenizer = build_tokenizer(world, n_ctx=model_config.n_ctx)
    logger.info(
        "factworld: %d subjects x %d relations = %d facts, vocabulary %d",
        len(world.subjects),
        len(world.relations),
        len(world.facts),
        len(tokenizer),
    )
    result = train(world, tokenizer, model_config, train_config, seed=seed, progress=progress)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    world.save(out / WORLD_FILE)
    record: dict[str, Any] = {
        "seed": seed,
        "world_config": asdict(world.config),
        "model_config": asdict(model_config),
        "train_config": asdict(train_config),
        "n_facts": len(world.facts),
        "n_parameters": sum(p.numel() for p in result.model.parameters()),
        "vocab_size": len(tokenizer),
        "train_seconds": round(result.seconds, 1),
        "accuracy": result.accuracy.as_dict(),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": train_config.threads,
        },
        "log": result.log,
    }
    bridge_accuracy: Accuracy | None = None
    if verify:
        from kloc_lens.model import load_model

        bridge = load_model(out, device="cpu")
        bridge_accuracy = evaluate(bridge, bridge.tokenizer, world, n=512, seed=seed + 1)
        record["bridge_accuracy"] = bridge_accuracy.as_dict()
    (out / LOG_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (out / SUMMARY_FILE).write_text(_summary(record, result.accuracy, bridge_accuracy))
    logger.info("factworld written to %s", out)
    return result


def _summary(record: dict[str, Any], accuracy: Accuracy, bridge: Accuracy | None) -> str:
    lines = [
        "factworld: first-token top-1 accuracy (argmax at the last position)",
        f"seed {record['seed']}, {record['n_facts']} facts, {record['n_parameters']} parameters, "
        f"vocabulary {record['vocab_size']}, trained in {record['train_seconds']} s "
        f"({record['train_config']['steps']} steps, {record['environment']['threads']} threads)",
        "",
        "every fact, one prompt per fact and set (HuggingFace model):",
    ]
    lines += [
        f"  {name:<17} {value:.4f}  (n={accuracy.counts[name]})" for name, value in _rows(accuracy)
    ]
    if bridge is not None:
        lines += [
            "",
            f"{bridge.counts['entity']} random facts, through kloc_lens.load_model:",
        ]
        lines += [
            f"  {name:<17} {value:.4f}  (n={bridge.counts[name]})" for name, value in _rows(bridge)
        ]
    lines += [
        "",
        "entity / relation: canonical templates; *_train: random training templates;",
        "*_heldout: held-out paraphrase templates (never trained on);",
        "none: relation prompts about unrelated pairs (answer None)",
    ]
    return "\n".join(lines) + "\n"


def _rows(accuracy: Accuracy) -> list[tuple[str, float]]:
    return [(k, v) for k, v in accuracy.as_dict().items() if k != "counts"]


def load_factworld(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[Any, FactWorld]:
    """Load a factworld model and its world.

    Args:
        path: A directory written by :func:`build`; ``None`` for the shipped one.
        device: Where to put the model; ``None`` means the CPU.
        dtype: Parameter dtype (``float32``, ``bfloat16``, ``float16``); ``None`` means the
            float32 it was trained in.

    Returns:
        ``(model, world)``: the model as a TransformerLens bridge in compatibility mode (through
        :func:`kloc_lens.load_model`), and the world whose facts it was trained on.

    Raises:
        FactworldError: The directory holds no factworld (missing ``world.json`` or weights).
    """
    from kloc_lens.model import load_model

    directory = Path(path) if path is not None else factworld_path()
    missing = [
        name for name in (WORLD_FILE, "config.json", "tokenizer.json")
        if not (directory / name).is_file()
    ]  # fmt: skip
    if missing:
        raise FactworldError(
            f"{str(directory)!r} holds no factworld model (missing {', '.join(missing)}); "
            "build one with kloc_lens.factworld.build(out_dir)"
        )
    world = FactWorld.load(directory / WORLD_FILE)
    model = load_model(directory, device=device or "cpu", dtype=dtype)
    return model, world


def describe_factworld(path: str | Path | None = None) -> str:
    """One sentence on how a factworld model was trained (from its ``training_log.json``), for
    reports: a reader must know the signature the study finds is built into this test bed.

    Raises:
        FactworldError: The directory has no training log.
    """
    directory = Path(path) if path is not None else factworld_path()
    log = directory / LOG_FILE
    if not log.is_file():
        raise FactworldError(f"{str(directory)!r} has no {LOG_FILE}")
    record = json.loads(log.read_text())
    model, train = record["model_config"], record["train_config"]
    documents = train.get("documents") or {}
    mask = float(documents.get("mask_fraction", 0.0))
    sentence = (
        f"The model is factworld: a {model['n_layer']}-layer GPT-2 (d_model {model['d_model']}, "
        f"{record['n_parameters']:,} parameters) trained from scratch for {train['steps']:,} "
        f"steps on biographies of {record['n_facts']:,} invented facts (every fact of a person "
        "in one document, told from the entity or the relation perspective, with unrelated "
        "pairs answering None)"
    )
    if mask > 0:
        sentence += (
            f"; in {100 * mask:.0f}% of the documents, positions after a name could not attend "
            "to the name's tokens other than its last during training (ordinary attention at "
            "inference), so composing the subject at its last token is built into this test bed, "
            "while what carries the fact there is not"
        )
    return sentence + "."


def build_main(argv: Sequence[str] | None = None) -> int:
    """Command line of :func:`build` (``kloc-lens factworld build``).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="kloc-lens factworld build",
        description="Regenerate the factworld (world, tokenizer, trained GPT-2) from scratch.",
    )
    parser.add_argument(
        "--out", default="factworld", help="output directory (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=SHIPPED_SEED)
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_TRAIN.steps}")
    parser.add_argument(
        "--subjects", type=int, default=None, help=f"default {DEFAULT_WORLD.n_subjects}"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help=f"CPU threads (default {DEFAULT_TRAIN.threads})"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the TransformerLens check")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    args = parser.parse_args(argv)
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        world_config = None
        if args.subjects is not None:
            world_config = WorldConfig(**{**asdict(DEFAULT_WORLD), "n_subjects": args.subjects})
        result = build(
            args.out,
            seed=args.seed,
            steps=args.steps,
            world_config=world_config,
            threads=args.threads,
            verify=not args.no_verify,
            progress=not args.quiet,
        )
    except FactworldError as err:
        logger.error("factworld build failed: %s", err)
        return 1
    logger.info(
        "done in %.0f s: %s (written to %s)", time.perf_counter() - start, result.accuracy, args.out
    )
    return 0
