"""Every example runs as a script on the embedded default."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, capsys):
    namespace = runpy.run_path(str(path), run_name="__main__")
    assert namespace  # ran to the end
    assert capsys.readouterr().out.strip()


def test_custom_hook_point_example_finds_the_planted_layer():
    namespace = runpy.run_path(str(EXAMPLES[0].parent / "custom_hook_point.py"))
    facts = namespace["facts"]
    assert namespace["layer"] == facts.mlp_layer
    assert namespace["figure"].data[0].z.shape[1] == facts.n_layers
