"""The benchmarks' workload: a random GPT-2-shaped model and the prompt, corruptions and metric
every sweep of the suite runs on. Not a test: see ``sweep_speed.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import kloc_lens as kl
from kloc_lens.model import device_of


@dataclass(frozen=True)
class Shape:
    """A GPT-2-shaped model and prompt length."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int = 50257
    n_pos: int = 16

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model


GPT2_SMALL = Shape("GPT-2-small shape", 12, 768, 12)
GPT2_XL = Shape("GPT-2-XL shape", 48, 1600, 25)
SMOKE = Shape("smoke shape", 4, 128, 4)

SUBJECT = ("Sa", "Sb", "Sc", "Sd")  # 4 tokens right after BOS: the least favourable placement
WORDS = (
    *SUBJECT,
    "speaks",
    "the",
    "language",
    "of",
    "its",
    "old",
    "home",
    "town",
    "which",
    "they",
    "call",
)
ANSWER, WRONG = "French", "English"


def synthetic_tokenizer(n_vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``n_vocab`` entries (``<bos>``, ``<unk>``, the prompt's
    words, then filler words)."""
    vocab = {"<bos>": 0, "<unk>": 1}
    for word in (*WORDS, ANSWER, WRONG, "Xa", "Xb", "Xc", "Xd"):
        vocab.setdefault(word, len(vocab))
    index = 0
    while len(vocab) < n_vocab:
        vocab.setdefault(f"w{index}", len(vocab))
        index += 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<bos>",
        unk_token="<unk>",
    )
    tok.init_kwargs["name_or_path"] = "kloc-bench"
    tok.init_kwargs["add_bos_token"] = True
    return tok


def build_model(shape: Shape, device: str = "cpu", seed: int = 0) -> Any:
    """A random GPT-2 of ``shape`` (HF default initialisation) as a TransformerBridge."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=shape.d_vocab,
        n_positions=1024,
        n_embd=shape.d_model,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    hf = GPT2LMHeadModel(config).eval()
    model = kl.from_hf(hf, synthetic_tokenizer(shape.d_vocab), name="kloc-bench")
    del hf
    if device != "cpu":
        model.to(device, print_details=False)
    return model


@dataclass
class Inputs:
    prompt: Any
    clean: torch.Tensor
    corrupted: torch.Tensor
    patch_metric: Any
    target: int
    noise: Any
    noisy_tokens: torch.Tensor
    embed_edit: Any


def make_inputs(model: Any, shape: Shape) -> Inputs:
    words = WORDS[: shape.n_pos - 1]
    text = " ".join(words)
    prompt = kl.tokenize(model, kl.Prompt.from_text(text, ANSWER, subject=" ".join(SUBJECT)))
    assert len(prompt) == shape.n_pos, (len(prompt), shape.n_pos)
    corrupted = kl.TokenReplacement("Xa Xb Xc Xd").apply(model, prompt).tokens
    answer = kl.target_token_ids(model, prompt.prompt)[0]
    wrong = kl.target_token_ids(model, prompt.prompt, WRONG)[0]
    noise = kl.GaussianNoise(samples=10, seed=0)
    made = noise.apply(model, prompt)
    device = device_of(model)
    return Inputs(
        prompt=prompt,
        clean=prompt.tokens[None].to(device),
        corrupted=corrupted.to(device),
        patch_metric=kl.LogitDiff(answer, wrong),
        target=answer,
        noise=noise,
        noisy_tokens=made.tokens.to(device),
        embed_edit=made.embed_edit,
    )
