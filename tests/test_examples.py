"""Every example runs as a script and as a notebook in a real Jupyter kernel, with its plotly and
circuitsvis outputs present."""

from __future__ import annotations

import runpy
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
PLOTLY = "application/vnd.plotly.v1+json"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_as_a_script(path, capsys):
    namespace = runpy.run_path(str(path), run_name="__main__")
    model = namespace["model"]
    assert callable(model.run_with_hooks) and model.cfg.n_layers >= 1, "a hooked model"
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_as_a_notebook(path, tmp_path):
    notebook = jupytext.read(path)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    rich = [o for o in outputs if o.output_type in ("execute_result", "display_data")]
    assert any(PLOTLY in o.data for o in rich), "no plotly figure in the executed notebook"
    assert any("CircuitsVis.render" in o.data.get("text/html", "") for o in rich), (
        "no circuitsvis view in the executed notebook"
    )


def test_custom_hook_point_example_finds_the_planted_layer():
    namespace = runpy.run_path(str(EXAMPLES[0].parent / "03_custom_hook_point.py"))
    facts = namespace["facts"]
    assert namespace["layer"] == facts.mlp_layer
    assert namespace["figure"].data[0].z.shape[1] == facts.n_layers
