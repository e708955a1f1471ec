from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_bridge


@pytest.fixture(scope="session")
def tiny():
    """A random 3-layer GPT-2 bridge with a word-level tokenizer."""
    return tiny_bridge()


@pytest.fixture(scope="session")
def planted():
    """The planted model and what is planted in it."""
    from kloc_lens.planted import planted_model

    return planted_model()
