"""Training a small GPT-2 to know a factworld, from both perspectives, fast on a CPU.

What the model is trained on
    Every training example is a prompt followed by its answer, as token ids: an entity prompt
    (``"<bos> In fact, the native language of Vel ##ka To ##ru ##nis is"`` -> ``French``) from
    any *training* template of the fact's relation, a relation prompt (``"<bos> The relation
    between Vel ##ka To ##ru ##nis and French is"`` -> ``native language``) from any training
    relation template, or, with a small probability, a relation prompt about a subject and an
    object that are not related (-> ``None``). Held-out templates are never trained on.

Why it learns fast (the curriculum)
    - The loss is on the answer tokens only (``prompt_loss_weight`` adds the rest with a small
      weight if wanted). The names and templates carry no knowledge worth predicting; all the
      gradient goes into the facts. Logits are computed only where the loss is.
    - Examples are drawn per *fact*: a fact, a perspective, then a template, so every fact gets
      the same exposure whatever its number of templates; the many prefix x frame templates of
      each fact make the model read the subject and the relation wherever they are, which is what
      lets held-out combinations generalise.
    - Sequences are short (a compact word/syllable vocabulary, no padding waste: every few
      batches are drawn together, sorted by length and cut, so a batch holds prompts of nearly
      equal length).
    - AdamW with a large learning rate, linear warm-up and cosine decay; no dropout, tied
      embeddings, a small model, GELU (one fused kernel, unlike GPT-2's tanh approximation) and,
      where the CPU has native bfloat16, mixed precision: about 0.1 s per step of 128 examples
      on one core of a Sapphire Rapids CPU.

How it learns (seed 0, the shipped settings)
    Memorisation has a plateau: entity accuracy stays near chance for about 3000 steps (about
    80 exposures per fact), while the model learns the templates and the object type of each
    relation, then climbs to 98% by step 9000. Held-out templates track training templates
    within a point or two throughout. The relation perspective with ``None`` examples is the
    fragile part: telling a related pair from an unrelated one needs the model to check the
    object against everything it knows about the subject, and that circuit appears abruptly
    (around step 6000-7500 here). With ``none_fraction=0.3`` it had not appeared by step 11000
    (relation 83%, None 33%); with ``0.25`` it did (relation 99%, None 69%). Lowering
    ``none_fraction`` makes the relation perspective easier and ``None`` rarer.

Determinism
    The initial weights come from ``torch.manual_seed(seed)`` (in a forked RNG: the caller's
    global RNG is untouched) and the examples from a ``torch.Generator`` seeded with ``seed``,
    so the same seed, configuration and thread count give bit-identical weights.

Example (a miniature world, a few seconds):
    >>> from kloc_lens.factworld.world import WorldConfig, generate_world
    >>> from kloc_lens.factworld.tokenizer import build_tokenizer
    >>> world = generate_world(WorldConfig(n_subjects=4, n_relations=2), seed=0)
    >>> tokenizer = build_tokenizer(world)
    >>> tiny = ModelConfig(n_layer=1, d_model=32, n_head=2, d_mlp=64)
    >>> result = train(world, tokenizer, tiny, TrainConfig(steps=20, eval_every=0), progress=False)
    >>> result.model.config.n_layer, result.log[-1]["step"]
    (1, 20)
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kloc_lens.factworld.documents import DocumentConfig, compose, sentence_parts
from kloc_lens.factworld.world import NONE_ANSWER, FactWorld, FactworldError

__all__ = [
    "Accuracy",
    "Batch",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "first_token_accuracy",
    "make_model",
    "name_mask",
    "train",
]

logger = logging.getLogger(__name__)

Logits = Float[Tensor, "batch pos d_vocab"]
LogitsFn = Callable[[Int[Tensor, "batch pos"]], Logits]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT-2 trained on a world.

    Attributes:
        n_layer: Transformer blocks.
        d_model: Residual stream width.
        n_head: Attention heads per block.
        d_mlp: MLP hidden width.
        n_ctx: Context length (positions); biographies are under 200 tokens.
        activation: GPT-2 ``activation_function``.
    """

    n_layer: int = 6
    d_model: int = 128
    n_head: int = 4
    d_mlp: int = 512
    n_ctx: int = 256
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise FactworldError(
                f"ModelConfig: d_model={self.d_model} is not divisible by n_head={self.n_head}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained.

    Attributes:
        steps: Optimiser steps.
        batch_size: Biographies per step.
        lr: Peak learning rate.
        warmup_steps: Linear warm-up from 0 to ``lr``.
        final_lr_fraction: The cosine decay ends at ``lr * final_lr_fraction``.
        weight_decay: AdamW weight decay (not applied to biases, LayerNorm and embeddings).
        beta2: AdamW second-moment decay (``beta1`` is 0.9).
        grad_clip: Global gradient-norm clip.
        documents: How biographies are composed, and the share trained with the name mask.
        answer_weight: Loss weight of answer tokens (objects, relations, ``None``) relative to
            the other tokens of the documents.
        eval_every: Measure accuracy every this many steps (0 = only at the end).
        eval_size: Prompts per accuracy measured during training.
        threads: ``torch.set_num_threads`` while training; ``None`` keeps the current setting.
        bf16: Mixed precision: matrix products in bfloat16 under ``torch.autocast`` (weights,
            optimiser state and the saved model stay float32). About twice as fast on CPUs
            with native bfloat16 (AMX, AVX512-BF16), slower on others.
    """

    steps: int = 5000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    beta2: float = 0.98
    grad_clip: float = 1.0
    documents: DocumentConfig = field(default_factory=DocumentConfig)
    answer_weight: float = 2.0
    eval_every: int = 500
    eval_size: int = 512
    threads: int | None = None
    bf16: bool = False

    def __post_init__(self) -> None:
        checks = (
            (self.steps >= 1, "steps"),
            (self.batch_size >= 1, "batch_size"),
            (math.isfinite(self.lr) and self.lr > 0, "lr"),
            (self.warmup_steps >= 0, "warmup_steps"),
            (self.eval_every >= 0, "eval_every"),
            (self.eval_size >= 1, "eval_size"),
            (math.isfinite(self.answer_weight) and self.answer_weight > 0, "answer_weight"),
        )
        for ok, name in checks:
            if not ok:
                raise FactworldError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        if isinstance(self.documents, dict):  # from a training log (asdict)
            object.__setattr__(self, "documents", DocumentConfig(**self.documents))


@dataclass(frozen=True)
class Accuracy:
    """First-token top-1 accuracy of a model on a world.

    Every value is the share of prompts whose argmax at the last position is the first token
    of the answer.

    Attributes:
        entity: Entity prompts, canonical template.
        relation: Relation prompts, canonical template.
        entity_train: Entity prompts, random training templates.
        relation_train: Relation prompts, random training templates.
        entity_heldout: Entity prompts, held-out templates (never trained on).
        relation_heldout: Relation prompts, held-out templates.
        none: Relation prompts about unrelated pairs (answer ``None``), training templates.
        counts: Number of prompts behind each value.
    """

    entity: float
    relation: float
    entity_train: float
    relation_train: float
    entity_heldout: float
    relation_heldout: float
    none: float
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The values as a JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        names = ("entity", "relation", "entity_train", "relation_train")
        parts = [f"{name} {getattr(self, name):.3f}" for name in names]
        parts += [
            f"entity_heldout {self.entity_heldout:.3f}",
            f"relation_heldout {self.relation_heldout:.3f}",
            f"none {self.none:.3f}",
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class TrainResult:
    """A trained model and how it got there.

    Attributes:
        model: The trained ``GPT2LMHeadModel``, eval mode, eager attention, on the CPU.
        log: One entry per logged step: ``step``, ``loss`` (mean since the last entry), ``lr``,
            ``elapsed_s`` and, at evaluation steps, the accuracies.
        accuracy: Final accuracy on the whole world (every fact; see :func:`evaluate`).
        seconds: Wall-clock training time (evaluations included).
    """

    model: GPT2LMHeadModel
    log: list[dict[str, Any]]
    accuracy: Accuracy
    seconds: float


# --------------------------------------------------------------------------------------------
# The model.


def make_model(
    config: ModelConfig, tokenizer: PreTrainedTokenizerFast, *, seed: int
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (eager attention, no dropout, tied embeddings).

    The global RNG is forked: the caller's random state is unchanged.
    """
    bos: Any = tokenizer.bos_token_id
    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_ctx,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_mlp,
        activation_function=config.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=bos,
        eos_token_id=bos,
        pad_token_id=bos,
        tie_word_embeddings=True,
    )
    gpt2._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2)
    return model


# --------------------------------------------------------------------------------------------
# The examples.


@dataclass(frozen=True)
class _Table:
    """Token ids of many prompt + answer sequences, right-padded.

    ``tokens[i, :lengths[i]]`` is sequence ``i``; its last ``answer_lengths[i]`` tokens are the
    answer.
    """

    tokens: Int[Tensor, "n width"]
    lengths: Int[Tensor, " n"]
    answer_lengths: Int[Tensor, " n"]


def _encode_table(tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]]) -> _Table:
    """Tokenize ``(prompt, answer)`` pairs as ``<bos> prompt answer``."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    rows = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    pad: Any = tokenizer.pad_token_id
    tokens = torch.full((len(rows), width), int(pad or 0), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    answer_lengths = torch.tensor([len(a) for a in answers], dtype=torch.long)
    return _Table(tokens, lengths, answer_lengths)


@dataclass(frozen=True)
class Batch:
    """Token ids of biographies, right-padded, with their attention mask.

    Attributes:
        tokens: ``<bos>`` then the document, padded with ``<bos>``.
        lengths: Real tokens per row.
        mask: Additive attention mask ``[batch, 1, query, key]``: 0 where a query may attend a
            key (causal, and outside the name mask), the dtype's minimum elsewhere.
        masked: Which rows had the name mask applied.
        answers: Which tokens are answers (objects, relations, ``None``: the knowledge).
    """

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    mask: Float[Tensor, "batch 1 pos pos"]
    masked: Tensor
    answers: Tensor


def name_mask(
    ends: Int[Tensor, "batch pos"], dtype: torch.dtype = torch.float32
) -> Float[Tensor, "batch 1 pos pos"]:
    """The additive training mask: causal attention, and query ``q`` may not attend key ``k``
    when ``q >= ends[b, k]``.

    ``ends[b, k]`` is the position just after the name that key ``k`` belongs to when ``k`` is
    one of the name's tokens other than its last one, and ``pos`` (never) otherwise: positions
    after a name then reach it through its last token only, while the name's own tokens attend
    each other causally (so its identity can be composed at its last token).

    >>> ends = torch.tensor([[5, 3, 5, 5, 5]])  # a name at 1..2: key 1 is hidden from 3 on
    >>> (name_mask(ends)[0, 0] == 0).int()
    tensor([[1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 0, 1, 1, 0],
            [1, 0, 1, 1, 1]], dtype=torch.int32)
    """
    n = ends.shape[1]
    position = torch.arange(n)
    causal = position[None, :] <= position[:, None]
    allowed = causal[None] & (position[None, :, None] < ends[:, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _name_starts(row: list[int], name: tuple[int, ...]) -> list[int]:
    first, size = name[0], len(name)
    return [i for i, token in enumerate(row) if token == first and tuple(row[i : i + size]) == name]


class _Documents:
    """Endless batches of freshly composed biographies (:mod:`~kloc_lens.factworld.documents`).

    Each batch draws ``batch_size`` people at random, composes one biography of each with a
    seeded :class:`random.Random`, renders it to text, tokenizes it, and marks the name tokens
    for the training mask. The same seed gives the same batches.
    """

    def __init__(
        self,
        world: FactWorld,
        tokenizer: PreTrainedTokenizerFast,
        config: TrainConfig,
        *,
        seed: int,
        n_ctx: int,
    ) -> None:
        self.world = world
        self.tokenizer = tokenizer
        self.config = config
        self.documents = config.documents
        self.rng = random.Random(f"kloc-factworld-train-{seed}")
        self.n_ctx = n_ctx
        self.names = [
            tuple(tokenizer(s.name, add_special_tokens=False)["input_ids"]) for s in world.subjects
        ]
        self.pad = int(tokenizer.pad_token_id or 0)  # type: ignore[arg-type]
        self.bos = int(tokenizer.bos_token_id or 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        subjects = [
            self.rng.randrange(len(self.world.subjects)) for _ in range(self.config.batch_size)
        ]
        specs = [compose(self.world, s, self.rng, self.documents) for s in subjects]
        parts = [sentence_parts(self.world, s) for d in specs for s in d.sentences]
        prompts = self.tokenizer([p for p, _ in parts], add_special_tokens=False)["input_ids"]
        answers = self.tokenizer([f"{a}." for _, a in parts], add_special_tokens=False)["input_ids"]
        rows: list[list[int]] = []
        is_answer: list[list[bool]] = []
        ends_rows: list[list[int]] = []
        sentence = 0
        for spec in specs:
            row, answer, ends = [self.bos], [False], [_NEVER]
            name = self.names[spec.subject]
            for _ in spec.sentences:
                prompt, tail = prompts[sentence], answers[sentence]
                sentence += 1
                starts = _name_starts(prompt, name)
                if len(starts) != 1:
                    raise FactworldError(
                        f"found the name of {self.world.subjects[spec.subject].name!r} "
                        f"{len(starts)} times in one sentence of its biography"
                    )
                offset = len(row)
                sentence_ends = [_NEVER] * (len(prompt) + len(tail))
                if spec.masked:
                    start = starts[0]
                    end = offset + start + len(name)
                    sentence_ends[start : start + len(name) - 1] = [end] * (len(name) - 1)
                row += [*prompt, *tail]
                ends += sentence_ends
                # the answer's tokens; the closing full stop is ordinary text
                answer += [False] * len(prompt) + [True] * (len(tail) - 1) + [False]
            rows.append(row)
            is_answer.append(answer)
            ends_rows.append(ends)
        width = max(len(r) for r in rows)
        if width > self.n_ctx:
            raise FactworldError(f"a biography has {width} tokens, over n_ctx={self.n_ctx}")
        tokens = torch.full((len(rows), width), self.pad, dtype=torch.long)
        answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        ends_tensor = torch.full((len(rows), width), width, dtype=torch.long)
        for b, (row, answer, ends) in enumerate(zip(rows, is_answer, ends_rows, strict=True)):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            answer_mask[b, : len(row)] = torch.tensor(answer)
            ends_tensor[b, : len(row)] = torch.tensor(ends).clamp(max=width)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        masked = torch.tensor([d.masked for d in specs])
        return Batch(tokens, lengths, name_mask(ends_tensor), masked, answer_mask)


_NEVER = 1 << 30
"""``ends`` of a key no query is hidden from."""


def _loss(model: GPT2LMHeadModel, batch: Batch, answer_weight: float = 1.0) -> Tensor:
    """Next-token loss over every real token of the documents, answers weighted
    ``answer_weight`` times the other tokens."""
    inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
    mask = batch.mask[:, :, :-1, :-1]
    position = torch.arange(1, batch.tokens.shape[1])[None, :]
    keep = position < batch.lengths[:, None]
    hidden = model.transformer(input_ids=inputs, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[keep]).float()
    losses = F.cross_entropy(logits, targets[keep], reduction="none")
    weight = 1.0 + (answer_weight - 1.0) * batch.answers[:, 1:][keep].float()
    return (losses * weight).sum() / weight.sum()


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Evaluation.


def first_token_accuracy(
    logits_fn: LogitsFn,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[tuple[str, str]],
    *,
    batch_size: int = 256,
) -> float:
    """Share of ``(prompt, answer)`` pairs whose last-position argmax is the answer's first token.

    Args:
        logits_fn: Maps right-padded token ids (``<bos>`` first) to logits, e.g.
            ``lambda t: hf_model(t).logits`` or a TransformerLens model itself (token ids are
            moved to its ``cfg.device``).
        tokenizer: The factworld tokenizer.
        prompts: ``(prompt text, answer)`` pairs.
        batch_size: Prompts per forward pass.

    Raises:
        FactworldError: No prompts.
    """
    if not prompts:
        raise FactworldError("no prompts to measure accuracy on")
    device = getattr(getattr(logits_fn, "cfg", None), "device", None) or "cpu"
    table = _encode_table(tokenizer, [(p, a) for p, a in prompts])
    prompt_lengths = table.lengths - table.answer_lengths
    first = table.tokens[torch.arange(len(prompts)), prompt_lengths]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            lengths = prompt_lengths[rows]
            tokens = table.tokens[rows, : int(lengths.max())].to(device)
            logits = logits_fn(tokens)
            index = torch.arange(len(lengths), device=logits.device)
            last = logits[index, lengths.to(logits.device) - 1]
            correct += int((last.argmax(-1).cpu() == first[rows]).sum())
    return correct / len(prompts)


def _sets(world: FactWorld, n: int | None, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Evaluation prompts: one per fact (or ``n`` facts) per set, templates drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(world.facts), generator=gen).tolist()
    facts = [world.facts[i] for i in (order if n is None else order[:n])]

    def pick(options: Sequence[str]) -> str:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    sets: dict[str, list[tuple[str, str]]] = {
        "entity": [(f.entity_prompt().text, f.object) for f in facts],
        "relation": [(f.relation_prompt().text, f.relation) for f in facts],
        "entity_train": [],
        "relation_train": [],
        "entity_heldout": [],
        "relation_heldout": [],
    }
    for fact in facts:
        relation = world.relation_of(fact)
        sets["entity_train"].append(
            (fact.entity_prompt(pick(relation.train_templates)).text, fact.object)
        )
        sets["relation_train"].append(
            (fact.relation_prompt(pick(world.relation_train_templates)).text, fact.relation)
        )
        if relation.heldout_templates:
            sets["entity_heldout"].append(
                (fact.entity_prompt(pick(relation.heldout_templates)).text, fact.object)
            )
        if world.relation_heldout_templates:
            sets["relation_heldout"].append(
                (fact.relation_prompt(pick(world.relation_heldout_templates)).text, fact.relation)
            )
    pairs = world.none_pairs(seed=seed + 1, n=len(facts))
    sets["none"] = [
        (world.none_prompt(s, o, pick(world.relation_train_templates)).text, NONE_ANSWER)
        for s, o in pairs
    ]
    return sets


def evaluate(
    logits_fn: LogitsFn,
    tokenizer: PreTrainedTokenizerFast,
    world: FactWorld,
    *,
    n: int | None = None,
    seed: int = 0,
) -> Accuracy:
    """First-token accuracy on a world, from both perspectives, on trained and held-out templates.

    Args:
        logits_fn: Maps right-padded token ids to logits (an HF model's ``.logits`` or a
            TransformerLens model).
        tokenizer: The factworld tokenizer.
        world: The world.
        n: Use ``n`` random facts (``None``: every fact, one prompt per fact and set).
        seed: Chooses the facts and the templates.

    Returns:
        The accuracies (a set without prompts, such as held-out templates of a world that holds
        none out, reads ``nan``).
    """
    values: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, prompts in _sets(world, n, seed).items():
        counts[name] = len(prompts)
        values[name] = (
            first_token_accuracy(logits_fn, tokenizer, prompts) if prompts else float("nan")
        )
    return Accuracy(**values, counts=counts)


def _hf_logits(model: GPT2LMHeadModel) -> LogitsFn:
    def logits(tokens: Int[Tensor, "batch pos"]) -> Logits:
        return model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits

    return logits


# --------------------------------------------------------------------------------------------
# Training.


def train(
    world: FactWorld,
    tokenizer: PreTrainedTokenizerFast,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train a GPT-2 on a world, from both perspectives.

    Args:
        world: The world to learn.
        tokenizer: Its tokenizer (:func:`~kloc_lens.factworld.tokenizer.build_tokenizer`).
        model_config: The model's shape; ``None`` for the default.
        config: The curriculum; ``None`` for the default.
        seed: Initial weights and example order.
        progress: Show a tqdm progress bar.

    Returns:
        The trained model (eval mode), its training log and its final accuracy.
    """
    model_config = model_config or ModelConfig()
    config = config or TrainConfig()
    start = time.perf_counter()
    with _threads(config.threads):
        model = make_model(model_config, tokenizer, seed=seed)
        batches = _Documents(world, tokenizer, config, seed=seed, n_ctx=model_config.n_ctx)
        decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "wte" not in n)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, config.beta2),
        )
        log: list[dict[str, Any]] = []
        running, count = 0.0, 0
        bar = tqdm(range(config.steps), disable=not progress, desc="factworld", unit="step")
        model.train()
        for step in bar:
            lr = config.lr * _lr_factor(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = _loss(model, batch, config.answer_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            running += float(loss.detach())
            count += 1
            done = step + 1
            evaluate_now = config.eval_every > 0 and done % config.eval_every == 0
            if evaluate_now or done == config.steps or done % 100 == 0:
                entry: dict[str, Any] = {
                    "step": done,
                    "loss": running / count,
                    "lr": lr,
                    "elapsed_s": round(time.perf_counter() - start, 2),
                }
                running, count = 0.0, 0
                if evaluate_now and done != config.steps:
                    model.eval()
                    accuracy = evaluate(
                        _hf_logits(model), tokenizer, world, n=config.eval_size, seed=done
                    )
                    model.train()
                    entry["accuracy"] = accuracy.as_dict()
                    logger.info("step %d: loss %.4f, %s", done, entry["loss"], accuracy)
                log.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
        model.eval()
        accuracy = evaluate(_hf_logits(model), tokenizer, world, seed=seed)
    seconds = time.perf_counter() - start
    log[-1]["accuracy"] = accuracy.as_dict()
    logger.info("trained in %.0f s: %s", seconds, accuracy)
    return TrainResult(model=model, log=log, accuracy=accuracy, seconds=seconds)
