"""Settings shared by the tests under tests/ and the docstring examples under kloc_lens/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctests_on_one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Docstring examples run tiny models: one torch thread beats several by far on a busy
    machine (as for the test modules marked ``one_thread``)."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)
