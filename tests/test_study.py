"""The study end to end on the planted model: report, results, numbers."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import kloc_lens as kl
from kloc_lens.edit import planted_corpus
from kloc_lens.study import StudyConfig, headline, run_study


@pytest.fixture(scope="module")
def study(planted, tmp_path_factory):
    model, facts = planted
    spare = facts.spare_objects
    fact_set = [
        kl.Fact(s, "home", o, entity_template=facts.template, new_object=spare[i % len(spare)])
        for i, (s, o) in enumerate(facts.pairs())
    ]
    wrong = kl.Fact(facts.subjects[0], "home", facts.objects[1], entity_template=facts.template)
    out = tmp_path_factory.mktemp("study")
    config = StudyConfig(n_trace=6, samples=4, window=1, n_edit=2, none_target="a")
    result = run_study(
        model, [*fact_set, wrong], config, out=out, progress=False, corpus=planted_corpus(facts)
    )
    return model, facts, result, out


def test_known_facts_and_localization(study):
    _, facts, result, _ = study
    assert (result.known.total, result.known.kept) == (7, 6)
    entity = result.entity
    assert entity.mlp_peak[1] == facts.mlp_layer
    assert entity.attn_peak[0] < 0.05 * entity.mlp_peak[0]  # attention does not act there
    assert len(entity.trace.traces) == 6
    # the planted fact is written by the MLP at the subject: severing it removes the effect
    # of the early residual states, and the MLP share is high
    assert entity.mlp_share > 0.9
    assert entity.severed_mlp_drop > 0.2
    assert result.relation is not None and result.relation.span == "relation"
    numbers = headline(entity.aggregate, "subject")
    assert numbers["mlp_peak"] == entity.mlp_peak


def test_editing_half(study):
    _, facts, result, out = study
    editing = result.editing
    assert editing is not None and editing.layer == facts.mlp_layer
    assert editing.transfer.counts.tolist() == [2, 2]
    # entity edits at the planted MLP flip the planted facts
    assert float(editing.transfer.pre[0, 0]) == 0.0 and float(editing.transfer.post[0, 0]) == 1.0
    summary = result.summary()["editing"]
    assert summary["transfer_post"][0][0] == 1.0
    assert (out / "tensors" / "edit_scores.csv").exists()
    assert "entity edits reach 100% efficacy (from 0%)" in (out / "report.html").read_text()


def test_relation_corruption_does_not_matter_to_the_planted_model(study):
    # the planted circuit never reads the relation word: corrupting it changes nothing
    _, _, result, _ = study
    side = result.relation
    assert abs(side.summary()["clean_p"] - side.summary()["corrupted_p"]) < 1e-3


def test_report_numbers_equal_the_result(study):
    _, _, result, out = study
    page = (out / "report.html").read_text()
    embedded = json.loads(
        re.search(
            r'<script type="application/json" id="kloc-results">(.*?)</script>', page, re.S
        ).group(1)
    )
    summary = result.summary()
    assert embedded == json.loads(json.dumps(summary))
    assert json.loads((out / "results.json").read_text()) == embedded
    side = summary["localization"]["entity"]
    assert f"peaks at layer {side['mlp_peak_layer']} (AIE {side['mlp_peak_aie']:.3f})" in page


def test_report_contains_every_figure_with_the_result_data(study):
    from kloc_lens.report import report_figures

    _, _, result, out = study
    page = (out / "report.html").read_text()
    specs = re.findall(
        r'<script type="application/json" class="kloc-figure" data-target="fig-([\w-]+)">'
        r"(.*?)</script>",
        page,
        re.S,
    )
    expected = report_figures(result)
    assert [s[0] for s in specs] == [f[0] for f in expected]
    for fig_id, spec in specs:
        assert f'<div id="fig-{fig_id}"' in page
        assert json.loads(spec)["data"], fig_id
    grid = json.loads(dict(specs)["entity-grid"])
    mlp = result.entity.aggregate.get("mlp").mean
    torch.testing.assert_close(_array(grid["data"][1]["z"]), mlp)
    assert "Plotly.newPlot" in page and "plotly.js" in page.lower()[:10_000_000]


def _array(spec):
    """A plotly JSON array: a nested list, or a typed-array spec (dtype, base64 data, shape)."""
    if isinstance(spec, list):
        return torch.tensor(spec, dtype=torch.float32)
    values = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(spec["dtype"]))
    shape = [int(n) for n in str(spec.get("shape", len(values))).split(",")]
    return torch.tensor(values.reshape(shape), dtype=torch.float32)


def test_tensors_load_back(study):
    _, _, result, out = study
    back = kl.load_result(out / "tensors" / "entity_aggregate.safetensors")
    for a, b in zip(result.entity.aggregate, back, strict=True):
        assert torch.equal(a.mean, b.mean)
    trace = kl.load_result(out / "tensors" / "entity_example_trace.safetensors")
    assert torch.equal(trace.get("mlp").values, result.entity.trace.traces[0].get("mlp").values)


def test_study_refuses_unknown_facts(planted):
    model, facts = planted
    wrong = kl.Fact(facts.subjects[0], "home", facts.objects[1], entity_template=facts.template)
    with pytest.raises(kl.KlocLensError, match="answers none of the 1 facts"):
        run_study(model, [wrong], StudyConfig(n_trace=1), progress=False)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=15000",
    "--dump-dom",
]


def _render(path, tmp_path):
    """Open a page in headless Chromium: (rendered DOM, console lines)."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is needed for this test (.ci/run installs it)"
    done = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_report_renders_in_a_headless_browser(study, tmp_path):
    from kloc_lens.report import report_figures

    _, _, result, out = study
    # the check itself: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>missingFunction();</script></body></html>")
    _, console = _render(bad, tmp_path)
    assert any("missingFunction" in line for line in console)

    dom, console = _render(out / "report.html", tmp_path)
    assert console == []
    rendered = re.findall(r'<div id="fig-([\w-]+)" class="kloc-plot[^"]*js-plotly-plot', dom)
    assert rendered == [f[0] for f in report_figures(result)]
    assert dom.count('class="main-svg"') >= len(rendered)


def test_edit_site_follows_the_entity_trace_unless_set() -> None:
    from kloc_lens.study import StudyConfig, edit_site

    subject_wins = ((0.20, 5), (0.05, 9))
    last_wins = ((0.01, 1), (0.30, 3))
    assert edit_site(StudyConfig(), *subject_wins) == ("subject_last", 5)
    assert edit_site(StudyConfig(), *last_wins) == ("last", 3)
    assert edit_site(StudyConfig(edit_token="subject_last"), *last_wins) == ("subject_last", 1)
    assert edit_site(StudyConfig(edit_layer=0), *last_wins) == ("last", 0)
    assert edit_site(StudyConfig(edit_token="relation_last"), *last_wins) == ("relation_last", 1)
