"""A tiny GPT-2 with hand-set weights whose factual knowledge lives at a known place.

The planted model is ground truth for causal tracing and model editing: no training, every
weight is written by hand, so *where* each fact is stored is known exactly.

Vocabulary
    A word-level tokenizer (``tokenizers`` ``WordLevel`` + ``WhitespaceSplit``) with ``<bos>``
    (also EOS and padding), ``<unk>``, template words (``The home of ... is``, ``The relation
    between ... and ... is``, ``... lives in``, ...), two-word subjects (``"Ana Bel"``,
    ``"Ana Cor"``, ...; first words are shared in pairs, the last word is unique) and object
    words. The tokenizer prepends ``<bos>`` itself.

Residual stream
    A seeded random orthonormal basis of the ``d_model - 1`` dimensional subspace orthogonal to
    the all-ones vector (so LayerNorm's mean subtraction is a no-op and LayerNorm only rescales
    every vector to norm ``sqrt(d_model)``). Named directions: ``query`` (in the embedding of
    every token that is not a subject word), ``known`` (written by the lookup MLP), one
    ``object`` direction per object, and one identity direction per token. Every token
    embedding has norm ``sqrt(d_model)``; position embeddings are zero.

The circuit (all other weights and biases are exactly zero, so all other attention layers and
MLPs output exactly zero)
    1. ``blocks.{mlp_layer}.mlp`` is a lookup table. Hidden neuron ``i`` reads the identity
       direction of subject ``i``'s *last* word, with a bias threshold at 60% of the clean
       match: it outputs 1 on that word and 0 elsewhere, including when the embedding is
       swamped by Gaussian noise. Its output weights write ``object(i) + known`` (norm
       ``4 * sqrt(d_model)`` each), so after the MLP the subject's last position carries the
       answer. The remaining hidden neurons read random directions (their activations are
       nonzero, as in a real model, which keeps ROME's key covariance full rank) but have zero
       output weights.
    2. Head ``head`` of ``blocks.{attn_layer}.attn`` moves the answer to later positions: its
       query reads ``query``, its key reads ``known`` (and, more weakly, the ``<bos>`` identity:
       an attention sink for prompts without a known subject), so the last position attends to
       the subject's last position; its OV circuit copies the object subspace.
    3. The unembedding maps each object direction to its object token (``lm_head`` is untied
       from the embedding and centred over the vocabulary, so TransformerLens'
       ``center_unembed`` leaves the logits unchanged).

Consequences used by the tests: the clean prompt ``"The home of Ana Bel is"`` predicts its
object with probability > 0.99; with the subject embeddings corrupted by noise of three times
their standard deviation the lookup does not fire and the probability falls to roughly
``1 / d_vocab``; restoring the clean ``hook_mlp_out`` of ``mlp_layer`` at the subject's last
position, the clean residual stream there at any layer from the embedding up to
``attn_layer``, or the clean ``hook_attn_out`` of ``attn_layer`` at the last position restores
the prediction, and restoring any other MLP or attention output changes nothing.

Example:
    >>> model, facts = planted_model()
    >>> facts.prompt(0), facts.objects[0]
    ('The home of Ana Bel is', 'Paris')
    >>> model.to_string(model(facts.prompt(0))[0, -1].argmax())
    'Paris'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kloc_lens._tokenizers import wrap_tokenizer

__all__ = [
    "PLANTED_NAME",
    "PlantedFacts",
    "build_planted_hf",
    "planted_facts",
    "planted_model",
]

PLANTED_NAME = "kloc-planted"
"""The model name the planted bridge is booted under (``model.cfg.model_name``)."""

BOS = "<bos>"
UNK = "<unk>"

_TEMPLATE = "The home of {subject} is"
_SUBJECTS = ("Ana Bel", "Ana Cor", "Dax Eli", "Dax Fen", "Kip Gus", "Kip Hal")
_OBJECTS = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo")
_SPARE_OBJECTS = ("Quito", "Seoul")
_FILLERS = (
    "The",
    "the",
    "home",
    "of",
    "is",
    "relation",
    "between",
    "and",
    "a",
    "lives",
    "in",
    "was",
    "born",
    "city",
    "where",
    "from",
    "to",
    ",",
    ".",
)

_N_LAYERS = 6
_D_MODEL = 128
_N_HEADS = 4
_D_MLP = 512
_N_CTX = 32
_MLP_LAYER = 1
_ATTN_LAYER = 3
_HEAD = 1

# Circuit constants, in units where every embedding has norm sqrt(d_model).
_THRESHOLD = 0.6  # a lookup neuron fires when its match exceeds 60% of the clean match
_MLP_WRITE = 4.0  # lookup output: 4 * sqrt(d_model) along object(i) and along `known`
_QUERY_GAIN = 2.25  # clean attention score to the subject's last position: about 25
_SINK_GAIN = 0.22  # attention score to <bos>: about 8
_OV_GAIN = 4.0  # the head writes about 31 * object(i) at the last position
_UNEMBED_GAIN = 1.0  # clean logit of the object: about 10.6, all other logits 0


@dataclass(frozen=True)
class PlantedFacts:
    """What is planted in the model and where.

    Attributes:
        subjects: The subjects, two words each; the last word identifies the subject.
        objects: The object word of each subject, in the same order.
        template: The entity template, with a ``{subject}`` field.
        mlp_layer: The layer whose MLP maps a subject's last token to its object.
        attn_layer: The layer whose attention moves the object to the last position.
        head: The head of ``attn_layer`` that does it.
        n_layers: Number of layers of the model.
        spare_objects: Object words that no subject maps to (targets for inserting new facts).
    """

    subjects: tuple[str, ...]
    objects: tuple[str, ...]
    template: str
    mlp_layer: int
    attn_layer: int
    head: int
    n_layers: int
    spare_objects: tuple[str, ...] = ()

    def prompt(self, index: int) -> str:
        """The entity prompt of fact ``index``, e.g. ``"The home of Ana Bel is"``."""
        return self.template.format(subject=self.subjects[index])

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """``(subject, object)`` for every planted fact."""
        return tuple(zip(self.subjects, self.objects, strict=True))


def planted_facts() -> PlantedFacts:
    """The facts planted by :func:`build_planted_hf` (the same for every seed)."""
    return PlantedFacts(
        subjects=_SUBJECTS,
        objects=_OBJECTS,
        template=_TEMPLATE,
        mlp_layer=_MLP_LAYER,
        attn_layer=_ATTN_LAYER,
        head=_HEAD,
        n_layers=_N_LAYERS,
        spare_objects=_SPARE_OBJECTS,
    )


def _vocabulary() -> list[str]:
    words = [BOS, UNK, *_FILLERS]
    for subject in _SUBJECTS:
        for word in subject.split():
            if word not in words:
                words.append(word)
    words.extend(_OBJECTS)
    words.extend(_SPARE_OBJECTS)
    return words


def _build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return wrap_tokenizer(backend, name=PLANTED_NAME, n_ctx=_N_CTX, bos=BOS, unk=UNK)


def _directions(n: int, d_model: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random orthonormal rows of length ``d_model``, each orthogonal to all-ones."""
    if n > d_model - 1:
        raise ValueError(f"{n} directions do not fit in d_model={d_model}")
    raw = torch.randn(d_model, n, generator=generator, dtype=torch.float64)
    raw -= raw.mean(dim=0, keepdim=True)
    basis, _ = torch.linalg.qr(raw)
    basis -= basis.mean(dim=0, keepdim=True)  # remove rounding residue along all-ones
    return basis.T.contiguous()


def build_planted_hf(
    seed: int = 0,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, PlantedFacts]:
    """Build the planted HuggingFace GPT-2, its tokenizer and the description of its facts.

    Args:
        seed: Chooses the random orthonormal directions (and the silent MLP neurons). The
            circuit, the vocabulary and the facts do not depend on it; the same seed gives
            identical weights.

    Returns:
        ``(model, tokenizer, facts)``: an eval-mode ``GPT2LMHeadModel`` with eager attention,
        its word-level tokenizer (which prepends ``<bos>``) and the planted facts.
    """
    facts = planted_facts()
    words = _vocabulary()
    token_id = {word: index for index, word in enumerate(words)}
    tokenizer = _build_tokenizer(words)

    d_model, d_head = _D_MODEL, _D_MODEL // _N_HEADS
    all_objects = (*facts.objects, *facts.spare_objects)
    n_objects = len(all_objects)
    if n_objects > d_head:
        raise ValueError("the object subspace must fit in one head")
    n_named = 2 + n_objects
    generator = torch.Generator().manual_seed(seed)
    basis = _directions(n_named + len(words), d_model, generator)
    query, known = basis[0], basis[1]
    object_dir = basis[2:n_named]
    identity = basis[n_named:]
    root_d = math.sqrt(d_model)

    subject_words = {word for subject in facts.subjects for word in subject.split()}
    embed = torch.zeros(len(words), d_model, dtype=torch.float64)
    for word, index in token_id.items():
        if word == BOS or word in subject_words:
            embed[index] = root_d * identity[index]
        else:
            embed[index] = root_d * (identity[index] + query) / math.sqrt(2.0)

    # Lookup MLP: neuron i fires (value 1) on subject i's last word only.
    w_in = torch.zeros(d_model, _D_MLP, dtype=torch.float64)
    b_in = torch.zeros(_D_MLP, dtype=torch.float64)
    w_out = torch.zeros(_D_MLP, d_model, dtype=torch.float64)
    scale = 1.0 / ((1.0 - _THRESHOLD) * root_d)
    for neuron, (subject, obj) in enumerate(facts.pairs()):
        last = token_id[subject.split()[-1]]
        w_in[:, neuron] = scale * identity[last]
        b_in[neuron] = -_THRESHOLD / (1.0 - _THRESHOLD)
        w_out[neuron] = _MLP_WRITE * root_d * (object_dir[all_objects.index(obj)] + known)
    n_lookup = len(facts.subjects)
    w_in[:, n_lookup:] = torch.randn(
        d_model, _D_MLP - n_lookup, generator=generator, dtype=torch.float64
    ) / math.sqrt(d_model)

    # Mover head: query <- `query`, key <- `known` (+ weak <bos> sink), OV copies objects.
    w_qkv = torch.zeros(d_model, 3 * d_model, dtype=torch.float64)
    w_o = torch.zeros(d_model, d_model, dtype=torch.float64)
    start = facts.head * d_head
    w_qkv[:, start] = _QUERY_GAIN * query
    w_qkv[:, d_model + start] = known + _SINK_GAIN * identity[token_id[BOS]]
    for j in range(n_objects):
        w_qkv[:, 2 * d_model + start + j] = object_dir[j]
        w_o[start + j] = _OV_GAIN * object_dir[j]

    unembed = torch.zeros(len(words), d_model, dtype=torch.float64)
    for j, obj in enumerate(all_objects):
        unembed[token_id[obj]] = _UNEMBED_GAIN * object_dir[j]
    unembed -= unembed.mean(dim=0, keepdim=True)

    config = GPT2Config(
        vocab_size=len(words),
        n_positions=_N_CTX,
        n_embd=d_model,
        n_layer=facts.n_layers,
        n_head=_N_HEADS,
        n_inner=_D_MLP,
        activation_function="relu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=token_id[BOS],
        eos_token_id=token_id[BOS],
        pad_token_id=token_id[BOS],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.fill_(1.0)
            else:
                param.zero_()
        model.transformer.wte.weight.copy_(embed)
        layers: Any = model.transformer.h
        mlp = layers[facts.mlp_layer].mlp
        mlp.c_fc.weight.copy_(w_in)
        mlp.c_fc.bias.copy_(b_in)
        mlp.c_proj.weight.copy_(w_out)
        attn = layers[facts.attn_layer].attn
        attn.c_attn.weight.copy_(w_qkv)
        attn.c_proj.weight.copy_(w_o)
        model.lm_head.weight.copy_(unembed)
    model.eval()
    return model, tokenizer, facts


def planted_model(
    seed: int = 0, device: str | None = None
) -> tuple[TransformerBridge, PlantedFacts]:
    """Boot the planted model as a TransformerLens bridge in compatibility mode.

    The bridge wraps its own HuggingFace model (compatibility mode folds LayerNorm into the
    wrapped weights in place), so its logits equal those of ``build_planted_hf(seed)[0]``.

    Args:
        seed: Passed to :func:`build_planted_hf`.
        device: Where to put the model; ``None`` means the CPU.

    Returns:
        ``(model, facts)``: the bridge, in eval mode with HookedTransformer hook names, and the
        planted facts.
    """
    hf_model, tokenizer, facts = build_planted_hf(seed)
    device = device or "cpu"
    hf_any: Any = hf_model
    hf_any.to(device)
    bridge = TransformerBridge.boot_transformers(
        PLANTED_NAME, hf_model=hf_model, tokenizer=tokenizer, device=device
    )
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return bridge, facts
