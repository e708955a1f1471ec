"""The command line's main job writes real figures and results."""

from __future__ import annotations

import json

import torch

import kloc_lens as kl
from kloc_lens.cli import main


def test_demo_writes_figures_and_results(tmp_path, capsys):
    assert main(["--no-progress", "demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    planted = summary["planted"]
    peaks = summary["trace"]["peaks"]
    assert peaks["mlp"]["layer"] == planted["mlp_layer"]
    assert peaks["attn"]["layer"] == planted["attn_layer"]
    for name in summary["files"]:
        assert (tmp_path / name).stat().st_size > 0
    html = (tmp_path / "planted_trace.html").read_text()
    assert "plotly" in html.lower() and "Plotly.newPlot" in html
    traces = kl.load_result(tmp_path / "planted_trace.safetensors")
    assert isinstance(traces, kl.TraceSet)
    assert float(traces.get("mlp").indirect_effect.max()) == peaks["mlp"]["indirect_effect"]
    heads = kl.load_result(tmp_path / "planted_heads.safetensors")
    layer, head = divmod(int(heads.effect.argmax()), heads.values.shape[1])
    assert (layer, head) == (planted["attn_layer"], planted["head"])
    assert torch.isfinite(heads.values).all()
    assert "peak at layer" in capsys.readouterr().out


def test_trace_command_on_a_local_checkpoint(tmp_path, capsys):
    from models import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "ckpt")
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            {
                "facts": [
                    {
                        "subject": "Edwin Hubble",
                        "relation": "field",
                        "object": "astronomy",
                        "entity_template": "{subject} works in the field of",
                    },
                    {
                        "subject": "Danielle Darrieux",
                        "relation": "mother tongue",
                        "object": "French",
                    },
                ]
            }
        )
    )
    code = main(
        [
            "--no-progress",
            "trace",
            "--model",
            str(tmp_path / "ckpt"),
            "--facts",
            str(facts),
            "--subject",
            "Danielle Darrieux",
            "--window",
            "2",
            "--samples",
            "3",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert (tmp_path / "o" / "trace_trace.html").exists()
    assert (
        main(
            [
                "--no-progress",
                "trace",
                "--model",
                str(tmp_path / "ckpt"),
                "--facts",
                str(facts),
                "--subject",
                "Nobody",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no fact about subject 'Nobody'" in capsys.readouterr().err


def test_cli_reports_bad_input(tmp_path, capsys):
    code = main(
        [
            "--no-progress",
            "trace",
            "--model",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err
