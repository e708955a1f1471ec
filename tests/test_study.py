"""The study end to end on the planted model: numbers, report, units, resume, foreign outputs."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import kloc_lens as kl
from kloc_lens.edit import planted_corpus
from kloc_lens.study import StudyConfig, StudyError, load_study, report_figures, run_study

CONFIG = StudyConfig(
    n_trace=6,
    samples=4,
    window=1,
    n_edit=2,
    n_layer_sweep=1,
    edit_layers=(1,),  # the planted MLP; the other MLPs are zero (no key)
    none_target="a",
    n_bootstrap=200,
)


def _facts(facts):
    spare = facts.spare_objects
    known = [
        kl.Fact(s, "home", o, entity_template=facts.template, new_object=spare[i % len(spare)])
        for i, (s, o) in enumerate(facts.pairs())
    ]
    wrong = kl.Fact(facts.subjects[0], "home", facts.objects[1], entity_template=facts.template)
    return [*known, wrong]


def _run(planted, out, config=CONFIG, **kwargs):
    model, facts = planted
    return run_study(
        model,
        _facts(facts),
        config,
        out=out,
        progress=False,
        corpus=planted_corpus(facts),
        **kwargs,
    )


@pytest.fixture(scope="module")
def study(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return planted[0], planted[1], _run(planted, out), out


def _numbers(summary):
    """results.json without the record of how the run went (timings, units found)."""
    return {k: v for k, v in summary.items() if k != "run"}


def test_known_facts_and_localization(study):
    _, facts, result, _ = study
    assert (result.knowledge.n_checked, len(result.knowledge.known)) == (7, 6)
    accuracy = result.knowledge.accuracy["entity"]
    assert accuracy.n == 7 and accuracy.value == pytest.approx(6 / 7)
    entity = result.entity
    assert entity.n_facts == 6
    # the planted fact is written by the MLP at the subject and moved by one head later
    assert entity.layers["mlp_last_span"] == facts.mlp_layer
    numbers = entity.numbers
    assert numbers["attn_last_span"].value < 0.05 * numbers["mlp_last_span"].value
    assert numbers["mlp_share"].value > 0.9
    assert numbers["severed_mlp_drop"].value > 0.2
    # every number has its interval and n; the interval holds the value
    for estimate in numbers.values():
        assert estimate.n == 6
        if estimate.low == estimate.low:  # defined
            assert estimate.low - 1e-9 <= estimate.value <= estimate.high + 1e-9
    assert result.relation is not None and result.relation.span == "relation"


def test_numbers_equal_a_direct_computation(study):
    # the total effect and the peak at the last subject token, recomputed from the traces
    _, _, result, _ = study
    agg = result.entity.aggregate
    resid = agg.get("resid")
    te = resid.total_effect
    half = max(1, len(resid.layers) // 2)
    expected = float(resid.bin("last subject token")[:half].max()) / te
    assert result.entity.numbers["resid_last_span"].value == pytest.approx(expected, rel=1e-5)
    assert result.entity.numbers["total_effect"].value == pytest.approx(te, rel=1e-5)
    # the MLP share at the last token, from the MLP and attention windows' peaks there
    mlp = max(float(agg.get("mlp").bin("last token").max()), 0.0)
    attn = max(float(agg.get("attn").bin("last token").max()), 0.0)
    share = result.entity.numbers["mlp_share_last_token"].value
    assert share == pytest.approx(mlp / (mlp + attn), rel=1e-5)


def test_editing_half(study):
    _, facts, result, out = study
    editing = result.editing
    assert editing is not None
    assert editing.layer == facts.mlp_layer and editing.choice.source == "trace"
    assert len(editing.evaluation.facts) == 4  # 2 facts x 2 perspectives
    entity = editing.metrics["entity"]
    # entity edits at the planted MLP flip the planted facts
    assert entity["efficacy"]["pre"].value == 0.0 and entity["efficacy"]["post"].value == 1.0
    # without teacher forcing too: the edited planted model says the new object
    assert entity["efficacy"]["pre_generated"].value == 0.0
    assert entity["efficacy"]["post_generated"].value == 1.0
    assert sorted(editing.layer_sweep) == [1]
    assert editing.layer_sweep[1]["entity"]["efficacy"]["post"].n == 1
    summary = result.summary()["editing"]
    assert summary["transfer"]["entity"]["entity"]["post"]["value"] == 1.0
    report = (out / "report.html").read_text()
    assert "entity edits reach 100% (95% CI 100-100, n=2) efficacy" in report
    generated = "make the model say the new object on 100% (95% CI 100-100, n=2)"
    assert generated in report
    assert report.index(generated) < report.index("Teacher-forced, entity edits")
    # every edit was checked for collapse, and none of these small updates is disabling
    assert len(editing.collapse) == 4 and not any(c.disabling for c in editing.collapse)
    assert all(0 < c.update_ratio < 1 for c in editing.collapse)
    assert summary["collapse"]["checked"] == 4 and summary["collapse"]["n_disabling"] == 0
    assert "None of the 4 edits at layer 1 was disabling" in (out / "report.html").read_text()
    # traced again after the edit: the planted fact and its replacement live at the planted MLP
    # (the other MLPs are zero: a site can only be there, or absent when the new answer
    # survives corrupting the subject)
    side = editing.retrace["entity"]
    assert side["n_facts"] == 2
    assert all(u["peak_before"] == facts.mlp_layer for u in side["facts"])
    assert all(u["peak_after"] in (None, facts.mlp_layer) for u in side["facts"])
    unsited = sum(u["peak_after"] is None for u in side["facts"]) / 2
    assert side["no_site_after"]["value"] == unsited
    if unsited < 1:
        assert side["moved"]["value"] == 0.0
    assert "Traced again after the edit (entity edits, 2 facts" in report


def test_disabling_edits_are_counted_and_left_out_of_the_numbers(planted, tmp_path, monkeypatch):
    """With a guard strict enough to flag some of the planted edits, the flagged ones stay in
    the per-fact scores but leave the metrics, and the report counts them."""
    import kloc_lens.study.edits as edits
    from kloc_lens.edit.guard import CollapseThresholds

    first = _run(planted, tmp_path / "a").editing
    ratios = sorted(c.update_ratio for c in first.collapse)
    limit = (ratios[1] + ratios[2]) / 2  # the two largest updates pass it
    monkeypatch.setattr(edits, "CollapseThresholds", lambda: CollapseThresholds(update_ratio=limit))
    result = _run(planted, tmp_path / "b")
    editing = result.editing
    flagged = [c.update_ratio > limit for c in editing.collapse]
    assert flagged == [c.disabling for c in editing.collapse] and sum(flagged) == 2
    kept = [f for f, bad in zip(editing.evaluation.facts, flagged, strict=True) if not bad]
    for perspective, by_metric in editing.metrics.items():
        n_kept = sum(1 for f in kept if f.edited.value == perspective)
        assert by_metric["efficacy"]["post"].n == n_kept
    assert len(editing.kept.facts) == 2 and len(editing.evaluation.facts) == 4
    summary = result.summary()["editing"]["collapse"]
    assert summary["n_disabling"] == 2 and len(summary["disabling"]) == 2
    assert summary["thresholds"]["update_ratio"] == limit
    page = (tmp_path / "b" / "report.html").read_text()
    assert "2 of 4 edits at layer 1 were disabling and are left out of the numbers above" in page
    scores = json.loads((tmp_path / "b" / "tensors" / "edit_scores.json").read_text())
    assert [item["collapse"]["disabling"] for item in scores] == flagged
    back = load_study(tmp_path / "b")
    assert back.summary() == json.loads(json.dumps(result.summary()))


def test_relation_corruption_does_not_matter_to_the_planted_model(study):
    # the planted circuit never reads the relation word: corrupting it changes nothing
    _, _, result, _ = study
    assert abs(result.relation.numbers["total_effect"].value) < 1e-3


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
    mlp = result.entity.numbers["mlp_last_span"]
    assert mlp.percent() in page
    assert "95% CI" in page


def test_report_contains_every_figure_with_the_result_data(study):
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
    assert "layer-sweep" in dict(specs)
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
    assert torch.equal(trace.get("mlp").values, result.entity.example.get("mlp").values)


def test_load_study_reads_the_same_result_back(study):
    _, _, result, out = study
    back = load_study(out)
    assert back.summary() == json.loads(json.dumps(result.summary()))
    assert back.editing.evaluation.facts == result.editing.evaluation.facts
    assert [f[0] for f in report_figures(back)] == [f[0] for f in report_figures(result)]


def test_load_study_refuses_what_is_not_a_study(tmp_path):
    with pytest.raises(StudyError, match="no results.json"):
        load_study(tmp_path)
    (tmp_path / "results.json").write_text('{"format": "kloc_lens.study/1"}')
    with pytest.raises(StudyError, match="format 'kloc_lens.study/1'"):
        load_study(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(StudyError, match="is not JSON"):
        load_study(tmp_path)


def test_a_rerun_finds_every_unit_and_gives_the_same_numbers(study, planted):
    _, _, result, out = study
    again = _run(planted, out)
    assert again.run["units_computed"] == 0
    assert again.run["units_found"] == result.run["units_computed"] + result.run["units_found"]
    assert _numbers(again.summary()) == _numbers(result.summary())


def test_units_lost_are_recomputed_to_the_same_numbers(planted, tmp_path):
    first = _run(planted, tmp_path / "a")
    units = sorted((tmp_path / "a" / "units").rglob("*.*"))
    for path in units[::2]:  # as if the run had stopped before these
        path.unlink()
    again = _run(planted, tmp_path / "a")
    assert 0 < again.run["units_computed"] < first.run["units_computed"]
    assert _numbers(again.summary()) == _numbers(first.summary())


def test_another_study_in_the_same_directory_is_refused(study, planted):
    _, _, _, out = study
    other = StudyConfig(**{**CONFIG.as_dict(), "n_trace": 5, "edit_layers": (1,)})
    with pytest.raises(StudyError, match=r"settings \(n_trace=6 -> 5\)"):
        _run(planted, out, other)


def test_overwrite_starts_over(planted, tmp_path):
    out = tmp_path / "s"
    _run(planted, out)
    other = StudyConfig(**{**CONFIG.as_dict(), "n_edit": 0, "edit_layers": (1,)})
    result = _run(planted, out, other, overwrite=True)
    assert result.editing is None
    assert json.loads((out / "results.json").read_text())["editing"] is None
    assert not (out / "tensors" / "edit_scores.json").exists()  # nothing left from before


def test_output_that_cannot_hold_a_study_is_refused_before_any_work(planted, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(StudyError, match="is a file"):
        _run(planted, afile)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="not a kloc_lens study"):
        _run(planted, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_study_refuses_unknown_facts(planted):
    model, facts = planted
    wrong = kl.Fact(facts.subjects[0], "home", facts.objects[1], entity_template=facts.template)
    with pytest.raises(kl.KlocLensError, match="answers none of the 1 facts"):
        run_study(model, [wrong], StudyConfig(n_trace=1), progress=False)


def test_settings_are_checked_against_the_model_before_work(planted, tmp_path):
    with pytest.raises(StudyError, match="edit_layer=9 is outside the model's layers"):
        _run(planted, tmp_path / "x", StudyConfig(edit_layer=9))
    with pytest.raises(StudyError, match=r"edit_layers has \[7\]"):
        _run(planted, tmp_path / "x", StudyConfig(edit_layers=(1, 7)))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("n_trace", 0, "n_trace=0: use an integer >= 1"),
        ("n_edit", -1, "n_edit=-1: use an integer >= 0"),
        ("n_trace", 2.5, "n_trace=2.5"),
        ("window", 0, "window=0: use None or an integer >= 1"),
        ("noise_factor", float("inf"), "noise_factor=inf: use a finite number"),
        ("edit_layers", (), "edit_layers=()"),
        ("none_target", " ", "none_target is blank"),
        ("n_queries", -2, "n_queries=-2: use an integer >= 0"),
        ("neuron_steps", 0, "neuron_steps=0: use an integer >= 1"),
        ("neuron_threshold", 0.0, "neuron_threshold=0.0: use a number in (0, 1]"),
        ("neuron_threshold", float("nan"), "neuron_threshold=nan"),
        ("neuron_share", 1.0, "neuron_share=1.0: use a number in [0, 1)"),
        ("neuron_share", "half", "neuron_share='half'"),
    ],
)
def test_bad_settings_name_the_setting(field, value, phrase):
    with pytest.raises(StudyError, match=re.escape(phrase)):
        StudyConfig(**{field: value})


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
    assert browser, "Chromium is needed for this test (scripts/test installs it)"
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


def test_location_controls_equal_edits_made_there_by_hand(study):
    """The random-position control of every sweep fact, recomputed one edit at a time with the
    key token the study drew; the planted sweep has one layer, so a random layer and the best
    layer are the traced one."""
    from kloc_lens.edit import EditRequest, RomeEditor, evaluate_edit, second_moment
    from kloc_lens.edit.evaluate import HEADLINE
    from kloc_lens.study.edits import _other_key
    from kloc_lens.study.store import sample_items

    model, facts, result, _ = study
    editing = result.editing
    assert editing is not None and set(editing.controls) == {"entity", "relation"}
    checked = _facts(facts)
    known = [checked[i] for i in result.knowledge.known]
    candidates = [f for f in known if f.new_object]
    sweep = sample_items(candidates, CONFIG.n_edit, CONFIG.seed + 1)[: CONFIG.n_layer_sweep]
    stats = second_moment(model, facts.mlp_layer, planted_corpus(facts), progress=False)
    drawn: dict[str, int] = {}
    for perspective, by_location in editing.controls.items():
        metric = HEADLINE[kl.Perspective(perspective)]
        for field in ("post", "post_generated"):
            traced = by_location["traced"][field]
            assert traced.n == len(sweep)
            assert by_location["random_layer"][field].value == traced.value
            assert by_location["best_layer"][field].value == traced.value
        scores = []
        for fact in sweep:
            request = EditRequest(fact, perspective=perspective, none_target="a")
            token = _other_key(request, CONFIG.seed)
            assert token.value != "subject_last"
            drawn[token.value] = drawn.get(token.value, 0) + 1
            editor = RomeEditor(layer=editing.layer, stats=stats, key_token=token)
            edit = editor.compute(model, request)
            scores.append(evaluate_edit(model, edit, request).facts[0].score(metric))
        placed = by_location["random_position"]
        assert placed["post"].value == pytest.approx(np.mean([s.post for s in scores]))
        assert placed["post_generated"].value == pytest.approx(
            np.mean([s.post_generated for s in scores])
        )
    assert editing.control_keys == drawn
    text = " ".join(editing.sentences())
    assert "with the key at a random non-subject token" in text


def test_location_controls_on_a_constructed_table():
    """Three facts x three layers of known efficacies (one disabling edit): the traced column,
    the per-fact mean and max over layers, and the random-position edits, by hand."""
    from kloc_lens.edit.evaluate import EditMetric, FactEvaluation, MetricScore
    from kloc_lens.edit.guard import CollapseCheck
    from kloc_lens.study.editing import location_controls

    table = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    broken = {(2, 1)}  # fact 2's edit at layer 1 is disabling
    placed = [0.0, 1.0, 0.25]

    def evaluation(fact: int, post: float) -> FactEvaluation:
        score = MetricScore(EditMetric.EFFICACY, 1, 0.0, post, 0.0, post, 0.0, 1.0 - post)
        return FactEvaluation(f"s{fact}", "r", "o", "n", kl.Perspective.ENTITY, (score,))

    def check(bad: bool) -> CollapseCheck:
        return CollapseCheck(
            update_ratio=50.0 if bad else 1.0,
            loss_before=1.0,
            loss_after=1.0,
            entropy_before=2.0,
            entropy_after=2.0,
            reasons=("update ratio",) if bad else (),
        )

    sweep = {
        layer: [(evaluation(f, table[f, layer]), check((f, layer) in broken)) for f in range(3)]
        for layer in range(3)
    }
    other = [(evaluation(f, placed[f]), check(False)) for f in range(3)]
    out = location_controls(sweep, other, 1, n_bootstrap=100, seed=0)["entity"]
    masked = table.copy()
    masked[2, 1] = np.nan
    assert out["traced"]["post"].value == pytest.approx(np.nanmean(masked[:, 1]))
    assert out["traced"]["post"].n == 2
    assert out["random_layer"]["post"].value == pytest.approx(np.nanmean(masked, 1).mean())
    assert out["best_layer"]["post"].value == pytest.approx(np.nanmax(masked, 1).mean())
    assert out["random_position"]["post"].value == pytest.approx(np.mean(placed))
    generated = 1.0 - masked
    assert out["best_layer"]["post_generated"].value == pytest.approx(
        np.nanmax(generated, 1).mean()
    )


def _share(value, low, high, n=50):
    return {"value": value, "ci_low": low, "ci_high": high, "level": 0.95, "n": n}


def _side(mlp_share, last_token, drops=(0.3, 0.1)):
    numbers = {
        "mlp_share": _share(*mlp_share),
        "mlp_share_last_token": _share(*last_token),
        "severed_mlp_drop": _share(drops[0], drops[0] - 0.05, drops[0] + 0.05),
        "severed_attn_drop": _share(drops[1], drops[1] - 0.05, drops[1] + 0.05),
    }
    return {"numbers": numbers}


def test_the_second_claim_is_stated_from_the_intervals():
    """Constructed shares: the verdict follows the intervals, one comparison per reading."""
    from kloc_lens.study.report import _second_claim

    entity = _side((0.8, 0.75, 0.85), (0.6, 0.55, 0.65))
    lower = _side((0.4, 0.3, 0.5), (0.58, 0.5, 0.66))  # apart at the span, overlapping last
    text = " ".join(_second_claim({"entity": entity, "relation": lower}))
    assert "at the last relation token 0.40 (95% CI 0.30-0.50, n=50)" in text
    assert "(lower, intervals apart)" in text and "(intervals overlap)" in text
    assert "The claim holds on this model where" in text
    assert "severing attention removes 10% (95% CI 5-15, n=50)" in text

    same = _side((0.8, 0.7, 0.9), (0.6, 0.5, 0.7))
    text = " ".join(_second_claim({"entity": entity, "relation": same}))
    assert "The claim does not hold on this model at this resolution" in text

    # the relation-perspective prompts are a third and fourth reading, at the last token
    higher = _side((0.8, 0.7, 0.9), (0.95, 0.9, 1.0))
    text = " ".join(
        _second_claim(
            {
                "entity": entity,
                "relation": lower,
                "relation_prompt_subject": higher,
                "relation_prompt_object": same,
            }
        )
    )
    assert "relation-perspective prompts, subject corrupted, at the last token 0.95" in text
    assert "(higher, intervals apart)" in text
    assert "The evidence on this model is mixed" in text

    undefined = {"numbers": {k: _share(None, None, None) for k in entity["numbers"]}}
    text = " ".join(_second_claim({"entity": entity, "relation": undefined}))
    assert "this model cannot test the claim" in text
