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

from kloc_lens.factworld.world import NONE_ANSWER, FactWorld, FactworldError

__all__ = [
    "Accuracy",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "first_token_accuracy",
    "make_model",
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
        n_ctx: Context length (positions); factworld prompts are under 30 tokens.
        activation: GPT-2 ``activation_function``.
    """

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_mlp: int = 512
    n_ctx: int = 48
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
        batch_size: Examples per step.
        lr: Peak learning rate.
        warmup_steps: Linear warm-up from 0 to ``lr``.
        final_lr_fraction: The cosine decay ends at ``lr * final_lr_fraction``.
        weight_decay: AdamW weight decay (not applied to biases, LayerNorm and embeddings).
        beta2: AdamW second-moment decay (``beta1`` is 0.9).
        grad_clip: Global gradient-norm clip.
        relation_fraction: Share of relation-perspective examples (the rest are entity ones).
        none_fraction: Share of the relation examples about unrelated pairs (answer ``None``).
        prompt_loss_weight: Loss weight of prompt tokens relative to answer tokens.
        bucket_batches: Batches drawn together and sorted by length (1 = no bucketing).
        eval_every: Measure accuracy every this many steps (0 = only at the end).
        eval_size: Prompts per accuracy measured during training.
        threads: ``torch.set_num_threads`` while training; ``None`` keeps the current setting.
        bf16: Mixed precision: matrix products in bfloat16 under ``torch.autocast`` (weights,
            optimiser state and the saved model stay float32). About twice as fast on CPUs
            with native bfloat16 (AMX, AVX512-BF16), slower on others.
    """

    steps: int = 10000
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    beta2: float = 0.98
    grad_clip: float = 1.0
    relation_fraction: float = 0.55
    none_fraction: float = 0.25
    prompt_loss_weight: float = 0.0
    bucket_batches: int = 8
    eval_every: int = 500
    eval_size: int = 512
    threads: int | None = None
    bf16: bool = False

    def __post_init__(self) -> None:
        checks = (
            (self.steps >= 1, "steps"),
            (self.batch_size >= 1, "batch_size"),
            (self.lr > 0, "lr"),
            (0 <= self.relation_fraction <= 1, "relation_fraction"),
            (0 <= self.none_fraction < 1, "none_fraction"),
            (self.prompt_loss_weight >= 0, "prompt_loss_weight"),
            (self.bucket_batches >= 1, "bucket_batches"),
            (self.eval_every >= 0, "eval_every"),
        )
        for ok, name in checks:
            if not ok:
                raise FactworldError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")


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
class _Group:
    """Examples grouped by fact: fact ``f`` owns rows ``offsets[f] .. offsets[f] + counts[f]``."""

    table: _Table
    offsets: Int[Tensor, " n_groups"]
    counts: Int[Tensor, " n_groups"]

    def sample(self, n: int, generator: torch.Generator) -> Int[Tensor, " n"]:
        group = torch.randint(len(self.counts), (n,), generator=generator)
        within = (torch.rand(n, generator=generator) * self.counts[group]).long()
        return self.offsets[group] + within


def _grouped(
    tokenizer: PreTrainedTokenizerFast, groups: Sequence[Sequence[tuple[str, str]]]
) -> _Group:
    flat = [pair for group in groups for pair in group]
    counts = torch.tensor([len(g) for g in groups], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    return _Group(_encode_table(tokenizer, flat), offsets, counts)


@dataclass(frozen=True)
class _Unrelated:
    """Makes ``None`` examples from relation examples by swapping in an unrelated object.

    Relation row ``i`` asks about subject ``subjects[i]`` with its object token at position
    ``object_positions[i]``; the example keeps the prompt, puts a random object the subject has
    for no relation in that position, and answers ``None`` (one token).
    """

    objects: Int[Tensor, " n_objects"]
    owned: Tensor
    subjects: Int[Tensor, " n"]
    object_positions: Int[Tensor, " n"]
    none_id: int

    def apply(
        self,
        rows: Int[Tensor, " batch"],
        tokens: Int[Tensor, "batch width"],
        lengths: Int[Tensor, " batch"],
        answers: Int[Tensor, " batch"],
        generator: torch.Generator,
    ) -> tuple[Int[Tensor, "batch width"], Int[Tensor, " batch"], Int[Tensor, " batch"]]:
        n = len(rows)
        tries = torch.randint(len(self.objects), (n, 8), generator=generator)
        ok = ~self.owned[self.subjects[rows][:, None], tries]
        choice = tries[torch.arange(n), ok.float().argmax(dim=1)]
        tokens = tokens.clone()
        tokens[torch.arange(n), self.object_positions[rows]] = self.objects[choice]
        prompt_lengths = lengths - answers
        tokens[torch.arange(n), prompt_lengths] = self.none_id
        return tokens, prompt_lengths + 1, torch.ones_like(answers)


def _training_groups(
    world: FactWorld, tokenizer: PreTrainedTokenizerFast
) -> tuple[_Group, _Group, _Unrelated]:
    entity = []
    relation = []
    for fact in world.facts:
        templates = world.relation_of(fact).train_templates
        entity.append([(fact.entity_prompt(t).text, fact.object) for t in templates])
        relation.append(
            [(fact.relation_prompt(t).text, fact.relation) for t in world.relation_train_templates]
        )
    entity_group = _grouped(tokenizer, entity)
    relation_group = _grouped(tokenizer, relation)

    def token_id(word: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(word))  # type: ignore[arg-type]

    objects = torch.tensor([token_id(o) for o in world.objects], dtype=torch.long)
    column = {o: i for i, o in enumerate(world.objects)}
    subject_index = {s.name: i for i, s in enumerate(world.subjects)}
    owned = torch.zeros(len(world.subjects), len(objects), dtype=torch.bool)
    for fact in world.facts:
        owned[subject_index[fact.subject], column[fact.object]] = True
    n_templates = len(world.relation_train_templates)
    fact_subject = torch.tensor([subject_index[f.subject] for f in world.facts])
    fact_object = torch.tensor([token_id(f.object) for f in world.facts])
    subjects = fact_subject.repeat_interleave(n_templates)
    table = relation_group.table
    hits = table.tokens == fact_object.repeat_interleave(n_templates)[:, None]
    if not bool((hits.sum(dim=1) == 1).all()):
        raise FactworldError("an object token occurs more than once in a relation prompt")
    unrelated = _Unrelated(
        objects=objects,
        owned=owned,
        subjects=subjects,
        object_positions=hits.float().argmax(dim=1),
        none_id=token_id(NONE_ANSWER),
    )
    return entity_group, relation_group, unrelated


def _batches(
    groups: tuple[_Group, _Group, _Unrelated],
    config: TrainConfig,
    generator: torch.Generator,
) -> Iterator[tuple[Int[Tensor, "batch width"], Int[Tensor, " batch"], Int[Tensor, " batch"]]]:
    """Endless batches ``(tokens, lengths, answer_lengths)``, trimmed to their longest row."""
    entity, relation, unrelated = groups
    n = config.batch_size * config.bucket_batches
    p_none = config.relation_fraction * config.none_fraction
    p_relation = config.relation_fraction - p_none
    while True:
        kind = torch.rand(n, generator=generator)
        parts = []
        for group, mask, swap in (
            (entity, kind >= config.relation_fraction, False),
            (relation, kind < p_relation, False),
            (relation, (kind >= p_relation) & (kind < config.relation_fraction), True),
        ):
            count = int(mask.sum())
            if count == 0:
                continue
            rows = group.sample(count, generator)
            table = group.table
            part = (table.tokens[rows], table.lengths[rows], table.answer_lengths[rows])
            if swap:
                part = unrelated.apply(rows, *part, generator)
            parts.append(part)
        width = max(p[0].shape[1] for p in parts)
        tokens = torch.cat([F.pad(p[0], (0, width - p[0].shape[1])) for p in parts])
        lengths = torch.cat([p[1] for p in parts])
        answers = torch.cat([p[2] for p in parts])
        order = torch.argsort(lengths * n + torch.randperm(n, generator=generator))
        chunks = order.split(config.batch_size)
        for c in torch.randperm(len(chunks), generator=generator).tolist():
            rows = chunks[c]
            longest = int(lengths[rows].max())
            yield tokens[rows, :longest], lengths[rows], answers[rows]


def _loss(
    model: GPT2LMHeadModel,
    tokens: Int[Tensor, "batch width"],
    lengths: Int[Tensor, " batch"],
    answer_lengths: Int[Tensor, " batch"],
    prompt_weight: float,
) -> Tensor:
    """Weighted next-token loss: weight 1 on answer tokens, ``prompt_weight`` on the prompt."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    position = torch.arange(1, tokens.shape[1], device=tokens.device)[None, :]
    answer_start = (lengths - answer_lengths)[:, None]
    is_answer = (position >= answer_start) & (position < lengths[:, None])
    weight = is_answer.float()
    if prompt_weight > 0:
        weight = weight + prompt_weight * (position < answer_start).float()
    keep = weight > 0
    mask = torch.ones_like(inputs)  # bos doubles as padding: say that nothing is padding
    hidden = model.transformer(input_ids=inputs, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[keep]).float()
    losses = F.cross_entropy(logits, targets[keep], reduction="none")
    w = weight[keep]
    return (losses * w).sum() / w.sum()


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
        groups = _training_groups(world, tokenizer)
        longest = max(g.table.tokens.shape[1] for g in groups[:2])
        if longest > model_config.n_ctx:
            raise FactworldError(
                f"training sequences reach {longest} tokens, over n_ctx={model_config.n_ctx}"
            )
        generator = torch.Generator().manual_seed(seed)
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
        batches = _batches(groups, config, generator)
        running, count = 0.0, 0
        bar = tqdm(range(config.steps), disable=not progress, desc="factworld", unit="step")
        model.train()
        for step in bar:
            lr = config.lr * _lr_factor(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, lengths, answers = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = _loss(model, tokens, lengths, answers, config.prompt_loss_weight)
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
