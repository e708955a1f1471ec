"""Tiny models for the tests: random GPT-2 architectures with a word-level tokenizer, built in
memory (no hub)."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = [
    "The",
    "mother",
    "tongue",
    "of",
    "Danielle",
    "Darrieux",
    "is",
    "French",
    "English",
    "the",
    "relation",
    "between",
    "and",
    "Lyon",
    "Beirut",
    "Paris",
    "Rome",
    "twin",
    "city",
    "capital",
    "Edwin",
    "Hubble",
    "works",
    "in",
    "field",
    "astronomy",
    "a",
    "an",
    "Germany",
    "language",
    "native",
    "Toko",
    "Rama",
    "Vela",
    "Suri",
    "Nox",
    "Pell",
    "plays",
    "instrument",
    "piano",
    "violin",
    "Kato",
    "Lind",
    "Mira",
    "Oren",
    ".",
    ",",
    "'s",
    "is",
    "was",
    "in",
    "on",
]


@functools.cache
def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<bos>": 0, "<unk>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<bos>",
        unk_token="<unk>",
    )
    fast.init_kwargs["name_or_path"] = "kloc-test"
    fast.init_kwargs["add_bos_token"] = True
    return fast


def tiny_hf(n_layer: int = 3, n_head: int = 4, n_embd: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(word_tokenizer()),
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).eval()


SUBSTRATE = os.environ.get("KLOC_SUBSTRATE", "bridge")
"""Which hooked model the tests build: ``bridge`` (TransformerBridge in compatibility mode) or
``hooked_transformer`` (a TransformerLens 3.x HookedTransformer)."""


def as_substrate(hf_model: Any, tokenizer: Any, name: str) -> Any:
    """Wrap an in-memory HF model as the hooked model the test run asks for."""
    if SUBSTRATE == "hooked_transformer":
        from kloc_lens.model import load_hooked_transformer

        directory = tempfile.mkdtemp(prefix=f"{name}-")
        hf_model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return load_hooked_transformer(directory)
    from kloc_lens.model import from_hf

    return from_hf(hf_model, tokenizer, name=name)


def tiny_model(**kwargs: Any) -> Any:
    """A random GPT-2 (3 layers, d_model 32, 4 heads) with the word-level tokenizer."""
    return as_substrate(tiny_hf(**kwargs), word_tokenizer(), "kloc-tiny")


@functools.cache
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: leading spaces merge into tokens)."""
    from tokenizers import decoders, trainers

    corpus = [
        "The mother tongue of Danielle Darrieux is French.",
        "The relation between Lyon and Beirut is twin city.",
        "Paris is the capital of France. Rome is the capital of Italy.",
        "Edwin Hubble works in the field of astronomy.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.init_kwargs["name_or_path"] = "kloc-bpe"
    fast.init_kwargs["add_bos_token"] = True
    return fast


def save_tiny_checkpoint(directory: Any, *, tokenizer: bool = True, seed: int = 0) -> None:
    """Write a random GPT-2 with the BPE tokenizer as a ``save_pretrained`` directory."""
    tok = bpe_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    if tokenizer:
        tok.save_pretrained(directory)


# --------------------------------------------------------------------------------------------
# One tiny random model per supported architecture (3 layers, width 32), from its config.


def _gated(config_class: Any, model_class: Any, seed: int, **extra: Any) -> Any:
    """A Llama-family model: rotary embeddings, RMSNorm, gated MLP, grouped-query attention (4
    query / 2 kv heads)."""
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(word_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        **extra,
    )
    config._attn_implementation = "eager"
    return model_class(config).eval()


def _llama():
    return _gated(LlamaConfig, LlamaForCausalLM, seed=1)


def _qwen2():
    """Llama's layout with q/k/v biases."""
    return _gated(Qwen2Config, Qwen2ForCausalLM, seed=5, use_sliding_window=False)


def _neox():
    """Parallel attention and MLP, partial rotary embeddings."""
    torch.manual_seed(2)
    config = GPTNeoXConfig(
        vocab_size=len(word_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        rotary_pct=0.5,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,
        use_parallel_residual=True,
    )
    config._attn_implementation = "eager"
    return GPTNeoXForCausalLM(config).eval()


def _gptj():
    """Parallel attention and MLP (one shared LayerNorm), interleaved rotary embeddings."""
    torch.manual_seed(3)
    config = GPTJConfig(
        vocab_size=len(word_tokenizer()),
        n_embd=32,
        n_layer=3,
        n_head=4,
        rotary_dim=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,
    )
    config._attn_implementation = "eager"
    return GPTJForCausalLM(config).eval()


ARCHITECTURES = {
    "gpt2": lambda: tiny_hf(seed=4),
    "gptj": _gptj,
    "llama": _llama,
    "neox": _neox,
    "qwen2": _qwen2,
}
"""Builders of the architectures every sweep, trace, edit and the study are tested on."""

UNTESTED = {
    "hooked_transformer": {
        "qwen2": "TL 3.9's Qwen2 settings turn this word-level tokenizer's text into no tokens",
    }
}
"""Architectures left out on a substrate, and why (docs/support.md shows them as not run)."""

TESTED = sorted(a for a in ARCHITECTURES if a not in UNTESTED.get(SUBSTRATE, {}))
"""The architectures this run tests."""


@functools.cache
def arch_substrate(arch: str) -> Any:
    """The tiny model of ``arch`` as the hooked model of this test run (built once)."""
    return as_substrate(ARCHITECTURES[arch](), word_tokenizer(), f"kloc-engine-{arch}")
