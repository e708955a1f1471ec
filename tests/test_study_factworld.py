"""The study end to end on a tiny factworld, through the command line: report, figures, numbers,
resume, and two processes under torchrun giving the single process's numbers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kloc_lens.cli import main
from kloc_lens.factworld import DocumentConfig, ModelConfig, TrainConfig, WorldConfig, build

WORLD = WorldConfig(n_subjects=8, n_relations=2, objects_per_pool=4, n_first_names=4)
MODEL = ModelConfig(n_layer=2, d_model=64, n_head=2, d_mlp=128, n_ctx=96)
TRAIN = TrainConfig(
    steps=250,
    batch_size=16,
    lr=5e-3,
    warmup_steps=20,
    eval_every=125,
    eval_size=16,
    threads=1,
    documents=DocumentConfig(none_sentences=1),
)
SMALL = [
    *("--n-trace", "4", "--n-trace-relation-prompts", "3", "--n-edit", "2"),
    *("--n-layer-sweep", "2", "--n-queries", "3"),
    *("--neuron-steps", "4", "--samples", "3"),
]


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


def _numbers(path: Path) -> dict:
    """results.json without the record of how the run went (timings, units found, ranks)."""
    results = json.loads((path / "results.json").read_text())
    return {k: v for k, v in results.items() if k != "run"}


@pytest.fixture(scope="module")
def study_out(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    code = main(["--no-progress", "study", "--model", str(tiny_world), "--out", str(out), *SMALL])
    assert code == 0
    return out


def test_study_command_on_a_tiny_factworld(study_out):
    page = (study_out / "report.html").read_text()
    results = json.loads((study_out / "results.json").read_text())
    embedded = json.loads(
        re.search(
            r'<script type="application/json" id="kloc-results">(.*?)</script>', page, re.S
        ).group(1)
    )
    assert embedded == results
    figures = re.findall(r'class="kloc-figure" data-target="fig-([\w-]+)"', page)
    assert figures == [
        "headline",
        "signature",
        "entity-grid",
        "entity-curves",
        "relation-grid",
        "relation-curves",
        "relation_prompt_subject-grid",
        "relation_prompt_subject-curves",
        "relation_prompt_object-grid",
        "relation_prompt_object-curves",
        "example-trace",
        "queries-overlap",
        "queries-suppression",
        "queries-layers",
        "transfer",
        "edit-metrics",
        "layer-sweep",
        "informs",
        "retrace",
    ]
    assert results["knowledge"]["checked"] == 16  # 8 subjects x 2 relations
    for name in ("entity", "entity_paraphrase", "relation", "relation_paraphrase", "none"):
        assert results["knowledge"]["accuracy"][name]["n"] > 0
    assert results["localization"]["relation"]["span"] == "relation"
    # the relation-perspective prompts of 3 facts known from both, subject then object corrupted
    n_both = min(3, len(results["knowledge"]["known_both_indices"]))
    for span in ("subject", "object"):
        side = results["localization"][f"relation_prompt_{span}"]
        what = (side["perspective"], side["span"], side["n_facts"])
        assert what == ("relation_prompt", span, n_both)
        assert side["numbers"]["mlp_share_last_token"]["n"] == n_both > 0
    assert "Relation-perspective prompts (the relation is the answer, object corrupted" in page
    assert "second claim, that relational knowledge runs substantially" in page
    # query localization on facts known from both perspectives, with its settings
    queries = results["queries"]
    both = results["knowledge"]["known_both_indices"]
    assert set(both) <= set(results["knowledge"]["known_indices"])
    assert queries["n_facts"] == min(3, len(both)) > 0
    assert (queries["steps"], queries["threshold"], queries["share"]) == (4, 0.2, 0.5)
    assert all(len(v) == queries["n_facts"] for v in queries["per_fact"].values())
    assert "Query localization" in page and "Paraphrases of the entity query" in page
    editing = results["editing"]
    assert editing["n_facts"] == {"entity": 2, "relation": 2}
    assert editing["key_token"] == "subject_last"
    # the layer comes from the entity trace's MLP peak at the last subject token
    peak = results["localization"]["entity"]["layers"]["mlp_last_span"]
    assert editing["layer"] == peak and editing["layer_choice"]["source"] == "trace"
    assert sorted(editing["layer_sweep"]["layers"]) == ["0", "1"]
    # Hase et al.'s regression on the sweep's 2 facts x 2 layers, per perspective
    informs = editing["informs"]
    assert informs["layers"] == [0, 1] and informs["n_facts_per_perspective"] == 2
    assert set(informs["regressions"]) == {"entity", "relation"}
    assert "Does localization inform editing?" in page
    # every edited fact (n_edit=2 < n_retrace) traced again on its edited model
    retrace = editing["retrace"]
    assert set(retrace) == {"entity", "relation"}
    for side in retrace.values():
        assert side["n_facts"] == 2 and side["layers"] == [0, 1]
        for unit in side["facts"]:
            assert {unit["peak_before"], unit["peak_after"]} <= {0, 1, None}
            assert unit["clean_after"] > 0  # the new answer has probability on the edited model
        sited = [u for u in side["facts"] if None not in (u["peak_before"], u["peak_after"])]
        if sited:
            moved = sum(u["peak_before"] != u["peak_after"] for u in sited) / len(sited)
            assert side["moved"]["value"] == moved
        assert side["moved"]["n"] == len(sited)
    assert "Traced again after the edit" in page
    scores = json.loads((study_out / "tensors" / "edit_scores.json").read_text())
    column = informs["layers"].index(editing["layer"])
    for perspective, metric in (("entity", "efficacy"), ("relation", "relation_add")):
        assert set(informs["regressions"][perspective]) == {"mlp", "resid"}
        # the success table's chosen-layer column is the chosen layer's own edit units
        margins = [
            None  # a disabling edit is a missing cell
            if row["collapse"]["reasons"]
            else next(s["post_margin"] for s in row["scores"] if s["metric"] == metric)
            for row in scores
            if row["edited"] == perspective
        ]
        table = informs["success"][perspective]
        assert len(table) == 2 and all(len(row) == 2 for row in table)
        assert [row[column] for row in table] == pytest.approx(margins)
        # the stored numbers are the regression of the stored tables
        from kloc_lens.edit import trace_edit_regression

        nan = float("nan")
        fit = trace_edit_regression(
            [[nan if x is None else x for x in row] for row in table],
            [
                [nan if x is None else x for x in row]
                for row in informs["effects"][perspective]["mlp"]
            ],
            layers=informs["layers"],
            n_resamples=results["config"]["n_bootstrap"],
            seed=results["config"]["seed"],
        )
        assert fit.as_dict() == informs["regressions"][perspective]["mlp"][metric]
    # the report says how the test bed was trained, mask included
    assert "could not attend" in results["about"] and results["about"] in page


def test_load_study_reads_the_factworld_study_back(study_out):
    from kloc_lens.study import load_study, report_figures

    back = load_study(study_out)
    assert back.summary() == json.loads((study_out / "results.json").read_text())
    assert back.queries is not None and back.queries.n_facts > 0
    assert "queries-overlap" in [f[0] for f in report_figures(back)]


def test_rerun_finds_every_unit_and_reports_the_same_numbers(tiny_world, study_out):
    first = json.loads((study_out / "results.json").read_text())
    code = main(
        ["--no-progress", "study", "--model", str(tiny_world), "--out", str(study_out), *SMALL]
    )
    assert code == 0
    again = json.loads((study_out / "results.json").read_text())
    assert again["run"]["units_computed"] == 0 and again["run"]["units_found"] > 0
    assert {k: v for k, v in again.items() if k != "run"} == {
        k: v for k, v in first.items() if k != "run"
    }


def test_other_settings_in_the_same_directory_are_refused(tiny_world, study_out, capsys):
    args = ["--no-progress", "study", "--model", str(tiny_world), "--out", str(study_out)]
    code = main([*args, *SMALL[:-1], "2"])  # --samples 2 instead of 3
    assert code == 2
    assert "samples=3 -> 2" in capsys.readouterr().err


def test_two_processes_under_torchrun_equal_one(tiny_world, study_out, tmp_path):
    out = tmp_path / "ranks"
    # float32 reductions depend on the number of threads a kernel splits them over: the ranks use
    # as many as the single-process run did (study_out, in this process), so "equal" means exactly.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kloc_lens",
        "--no-progress",
        "study",
        "--model",
        str(tiny_world),
        "--out",
        str(out),
        *SMALL,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["run"]["ranks"] == 2
    assert _numbers(out) == _numbers(study_out)
    assert done.stdout.count("wrote report.html") == 1  # rank 0 alone reports


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


def test_study_options_reach_the_editor(tiny_world, tmp_path):
    out = tmp_path / "study"
    args = ["--no-progress", "study", "--model", str(tiny_world), "--out", str(out)]
    args += ["--n-trace", "2", "--n-edit", "1", "--n-layer-sweep", "0", "--samples", "2"]
    args += ["--edit-layer", "0", "--edit-contexts", "1", "--edit-steps", "5", "--n-queries", "0"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["n_queries"] == 0 and results["queries"] is None
    assert results["config"]["edit_layer"] == results["editing"]["layer"] == 0
    assert results["editing"]["layer_choice"]["source"] == "setting"
    assert results["config"]["edit_contexts"] == 1 and results["config"]["edit_steps"] == 5
    assert results["editing"]["layer_sweep"]["layers"] == {}


def test_bfloat16_study_is_finite_and_close_to_float32(tiny_world, study_out, tmp_path):
    """--dtype bfloat16 loads the weights in bfloat16 (the run records it, and its units are
    not float32's); probabilities are still compared in float32, so the trace's numbers stay
    finite and within bfloat16's rounding (3 significant digits per weight) of float32's."""
    out = tmp_path / "bf16"
    args = ["--no-progress", "study", "--model", str(tiny_world), "--out", str(out), *SMALL]
    assert main([*args, "--n-edit", "0", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    low = json.loads((out / "results.json").read_text())
    full = json.loads((study_out / "results.json").read_text())
    assert (low["run"]["dtype"], low["run"]["device"]) == ("bfloat16", "cpu")
    assert full["run"]["dtype"] == "float32"
    assert low["run"]["units_found"] == 0
    for side in ("entity", "relation"):
        numbers = low["localization"][side]["numbers"]
        reference = full["localization"][side]["numbers"]
        for name, number in numbers.items():
            # undefined (None) exactly where float32's is (a ratio over a zero peak), else finite
            assert (number["value"] is None) == (reference[name]["value"] is None), name
            assert number["value"] is None or math.isfinite(number["value"]), name
        for name in ("total_effect", "resid_last_span"):
            assert numbers[name]["value"] == pytest.approx(reference[name]["value"], abs=0.05)


@pytest.mark.parametrize(
    ("flags", "phrase"),
    [
        (["--device", "cuda:99"], "device 'cuda:99' is not on this machine; it has cpu"),
        (["--device", "tpu0"], "device 'tpu0' is not a device name"),
    ],
)
def test_a_device_this_machine_lacks_is_named(tiny_world, tmp_path, capsys, flags, phrase):
    args = ["--no-progress", "study", "--model", str(tiny_world), "--out", str(tmp_path / "o")]
    assert main([*args, *SMALL, *flags]) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "refused before any work"


def test_an_unknown_dtype_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--dtype", "fp8"])
    assert exit_info.value.code == 2
    assert "'float32', 'bfloat16', 'float16'" in capsys.readouterr().err


def test_factworld_report_with_every_section_renders_in_a_headless_browser(study_out, tmp_path):
    """The planted study has no relation side, query localization or layer sweep; this report
    has them all, and every figure draws without a console error."""
    from test_study import _render

    from kloc_lens.study import load_study, report_figures

    dom, console = _render(study_out / "report.html", tmp_path)
    assert console == []
    rendered = re.findall(r'<div id="fig-([\w-]+)" class="kloc-plot[^"]*js-plotly-plot', dom)
    assert rendered == [f[0] for f in report_figures(load_study(study_out))]
    assert {"queries-overlap", "queries-suppression", "queries-layers"} <= set(rendered)


def test_memory_budget_reaches_every_trace_and_bad_sizes_are_named(
    tiny_world, tmp_path, monkeypatch, capsys
):
    import kloc_lens.trace as trace_module

    budgets = []
    real = trace_module.causal_trace

    def spy(*args, **kwargs):
        budgets.append(kwargs["options"].memory_budget)
        return real(*args, **kwargs)

    monkeypatch.setattr(trace_module, "causal_trace", spy)
    args = ["--no-progress", "study", "--model", str(tiny_world), "--out", str(tmp_path / "m")]
    args += ["--n-trace", "2", "--n-edit", "0", "--n-queries", "0", "--samples", "2"]
    assert main([*args, "--memory-budget", "3MiB"]) == 0
    assert budgets and set(budgets) == {3 * 2**20}
    with pytest.raises(SystemExit):
        main([*args, "--memory-budget", "lots"])
    assert "must be a size such as 2GiB, 512MiB, 1.5GB" in capsys.readouterr().err


def test_a_factworld_that_does_not_fit_is_refused_before_it_loads(tiny_world, monkeypatch, capsys):
    import kloc_lens.factworld as factworld_module
    import kloc_lens.model as model_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_module, "available_bytes", lambda device: 2**20)
    monkeypatch.setattr(factworld_module, "load_factworld", never)
    args = ["--no-progress", "study", "--model", str(tiny_world), "--memory-budget", "1GiB"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit on cpu" in err and "the memory budget 1.00 GiB" in err
