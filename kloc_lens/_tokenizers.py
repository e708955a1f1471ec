"""The Hugging Face wrapper around the word-level tokenizers kloc_lens builds itself (factworld's
and the planted model's)."""

from __future__ import annotations

from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["wrap_tokenizer"]


def wrap_tokenizer(
    backend: Tokenizer, *, name: str, n_ctx: int, bos: str = "<bos>", unk: str = "<unk>"
) -> PreTrainedTokenizerFast:
    """A fast tokenizer over ``backend`` whose ``bos`` is also its EOS and padding token and is
    prepended to every text, as TransformerLens expects (``add_bos_token``).

    Args:
        backend: The ``tokenizers`` tokenizer (model, pre-tokenizer, decoder); its post-processor
            is set here.
        name: ``name_or_path`` until the tokenizer is saved.
        n_ctx: ``model_max_length``.
        bos: The BOS token, in ``backend``'s vocabulary.
        unk: The unknown token.
    """
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B:1",
        special_tokens=[(bos, backend.token_to_id(bos))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=bos,
        pad_token=bos,
        unk_token=unk,
        model_max_length=n_ctx,
    )
    tokenizer.init_kwargs["name_or_path"] = name
    tokenizer.init_kwargs["add_bos_token"] = True
    return tokenizer
