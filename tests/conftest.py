from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import SUBSTRATE, as_substrate, tiny_model


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the workers share the cores: each takes its share of torch's
    threads, so that two workers on two cores do not run four threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="module", autouse=True)
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Modules marked ``one_thread`` (tiny models) run torch on one thread: it beats several
    by far on a busy machine, and leaves the other cores to other jobs."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


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


@pytest.fixture
def unchecked() -> Iterator[None]:
    """The test runs without the development-time type checker (the jaxtyping + beartype hook
    of this suite), as users run kloc_lens: for tests of the library's own errors on arguments
    of the wrong type, which the hook would otherwise intercept first."""
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
