"""Every docstring example of the editing subpackage runs."""

from __future__ import annotations

import doctest
import importlib

import pytest

pytestmark = pytest.mark.one_thread

MODULES = [
    "kloc_lens.edit",
    "kloc_lens.edit._errors",
    "kloc_lens.edit.apply",
    "kloc_lens.edit.corpus",
    "kloc_lens.edit.evaluate",
    "kloc_lens.edit.keys",
    "kloc_lens.edit.memit",
    "kloc_lens.edit.plot",
    "kloc_lens.edit.projection",
    "kloc_lens.edit.request",
    "kloc_lens.edit.rome",
    "kloc_lens.edit.stats",
    "kloc_lens.edit.value",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_exported_name_imports():
    package = importlib.import_module("kloc_lens.edit")
    assert package.__all__ == sorted(package.__all__)
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    for name in MODULES[1:]:
        module = importlib.import_module(name)
        for exported in getattr(module, "__all__", []):
            assert hasattr(module, exported), f"{name}.{exported}"
