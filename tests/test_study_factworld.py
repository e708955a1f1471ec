"""The study end to end on a tiny factworld, through the command line: report, figures, numbers."""

from __future__ import annotations

import json
import re

import pytest

from kloc_lens.cli import main
from kloc_lens.factworld import ModelConfig, TrainConfig, WorldConfig, build

WORLD = WorldConfig(n_subjects=8, n_relations=2, objects_per_pool=4, n_first_names=4)
MODEL = ModelConfig(n_layer=2, d_model=64, n_head=2, d_mlp=128, n_ctx=32)
TRAIN = TrainConfig(
    steps=250, batch_size=32, lr=5e-3, warmup_steps=20, eval_every=125, eval_size=16, threads=1
)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_factworld")
    build(
        directory,
        seed=3,
        world_config=WORLD,
        model_config=MODEL,
        train_config=TRAIN,
        verify=False,
        progress=False,
    )
    return directory


def test_study_command_on_a_tiny_factworld(tiny_world, tmp_path, capsys):
    out = tmp_path / "study"
    code = main(
        [
            "--no-progress",
            "study",
            "--model",
            str(tiny_world),
            "--out",
            str(out),
            "--n-trace",
            "4",
            "--n-edit",
            "2",
            "--samples",
            "3",
        ]
    )
    assert code == 0, capsys.readouterr().out
    page = (out / "report.html").read_text()
    results = json.loads((out / "results.json").read_text())
    embedded = json.loads(
        re.search(
            r'<script type="application/json" id="kloc-results">(.*?)</script>', page, re.S
        ).group(1)
    )
    assert embedded == results
    figures = re.findall(r'class="kloc-figure" data-target="fig-([\w-]+)"', page)
    assert figures == [
        "headline",
        "entity-grid",
        "entity-curves",
        "relation-grid",
        "relation-curves",
        "example-trace",
        "transfer",
        "edit-metrics",
    ]
    assert results["known_facts"]["checked"] == 16
    assert results["localization"]["relation"]["span"] == "relation"
    assert results["editing"]["counts"] == [2, 2]
    side = results["localization"]["entity"]
    # The editing half edits at the token where the entity trace's MLP effect peaks, with
    # factworld's own layer (capped by this 2-layer model) and bare-prompt keys.
    last_wins = side["mlp_peak_aie_last_token"] > side["mlp_peak_aie"]
    assert results["editing"]["key_token"] == ("last" if last_wins else "subject_last")
    assert results["editing"]["layer"] == results["config"]["edit_layer"] == 1
    assert results["config"]["edit_contexts"] == 0
    assert f"(AIE {side['mlp_peak_aie']:.3f})" in page
    assert "The model answers" in capsys.readouterr().out


def test_edit_and_trace_commands_on_a_tiny_factworld(tiny_world, tmp_path):
    assert (
        main(
            [
                "--no-progress",
                "edit",
                "--model",
                str(tiny_world),
                "--index",
                "1",
                "--layer",
                "0",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert {row["edited"] for row in summary["scores"]} == {"entity", "relation"}
    assert (tmp_path / "e" / "edit_transfer.html").stat().st_size > 0
    assert (
        main(
            [
                "--no-progress",
                "trace",
                "--model",
                str(tiny_world),
                "--span",
                "relation",
                "--window",
                "1",
                "--samples",
                "3",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    assert (tmp_path / "t" / "trace_trace.html").exists()


def test_study_options_override_the_factworld_settings(tiny_world, tmp_path):
    out = tmp_path / "study"
    args = ["--no-progress", "study", "--model", str(tiny_world), "--out", str(out)]
    args += ["--n-trace", "2", "--n-edit", "1", "--samples", "2"]
    args += ["--edit-layer", "0", "--edit-token", "subject_last", "--edit-contexts", "1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["edit_layer"] == results["editing"]["layer"] == 0
    assert results["config"]["edit_token"] == results["editing"]["key_token"] == "subject_last"
    assert results["config"]["edit_contexts"] == 1
