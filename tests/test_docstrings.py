"""Every docstring example runs."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "aggregate",
    "corrupt",
    "datasets",
    "errors",
    "facts",
    "metrics",
    "model",
    "plot",
    "planted",
    "results",
    "sites",
    "trace",
    "types",
    "vis",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"kloc_lens.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
