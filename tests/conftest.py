from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import SUBSTRATE, as_substrate, tiny_model


@pytest.fixture(scope="session")
def tiny():
    """A random 3-layer GPT-2 bridge with a word-level tokenizer."""
    return tiny_model()


@pytest.fixture(scope="session")
def planted():
    """The planted model and what is planted in it."""
    from kloc_lens.planted import build_planted_hf, planted_model

    if SUBSTRATE == "hooked_transformer":
        hf_model, tokenizer, facts = build_planted_hf()
        return as_substrate(hf_model, tokenizer, "kloc-planted"), facts
    return planted_model()
