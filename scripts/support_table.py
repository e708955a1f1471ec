"""Write docs/support.md: which feature works on which architecture and TransformerLens version,
from what the tests ran.

The architecture-parametrised tests (``tests/test_engine.py``: sweeps and traces against the
slow reference loops; ``tests/test_architectures.py``: ROME, MEMIT, evaluation, the study) are
run once per substrate with the given interpreters, and each cell of the table says how many of
that feature's tests passed on that architecture::

    python scripts/support_table.py \\
        --python bridge=.venv/bin/python --python hooked_transformer=.venv-tl39/bin/python

A substrate is the hooked model the tests build: ``bridge`` (TransformerBridge, the
TransformerLens of ``constraints.txt``) or ``hooked_transformer`` (a HookedTransformer, the
TransformerLens of ``constraints-tl39.txt``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ("tests/test_engine.py", "tests/test_architectures.py")
FEATURES = {
    "test_patching_matches_reference": "activation patching (every site, sweep, direction)",
    "test_causal_trace_matches_rome_loop": "causal trace, windows, severed",
    "test_shortcuts_equal_plain_path_on_all_kinds": "fast path equals the plain path",
    "test_rome_edit_writes_its_closed_form_and_restores_the_weights": "ROME edit, closed form",
    "test_memit_edits_two_facts_as_hooks_and_as_weights": "MEMIT edit, hooks and committed",
    "test_edits_are_scored_from_both_perspectives": "evaluation, both perspectives, generated",
    "test_the_study_runs_end_to_end": "the study end to end",
}
"""Test function -> the feature it checks, in table order."""
ARCHITECTURES = ("gpt2", "gptj", "neox", "llama", "qwen2")
NAMES = {
    "gpt2": "GPT-2",
    "gptj": "GPT-J",
    "neox": "GPT-NeoX (Pythia)",
    "llama": "Llama (gated MLP, RMSNorm, GQA)",
    "qwen2": "Qwen2 (gated MLP, GQA, qkv biases)",
}
OUT = ROOT / "docs" / "support.md"


def _arch_of(case: str) -> str | None:
    params = case[case.index("[") + 1 : -1].split("-") if "[" in case else []
    found = [a for a in ARCHITECTURES if a in params]
    return found[0] if found else None


def _run(python: str, substrate: str) -> tuple[str, dict[tuple[str, str], Counter[str]]]:
    """Run the tests with ``python`` on ``substrate``: the TL version and outcome counts by
    (feature test, architecture)."""
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('transformer_lens'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = {**os.environ, "KLOC_SUBSTRATE": substrate}
        subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k",
             " or ".join(FEATURES), f"--junitxml={report}"],
            cwd=ROOT,
            env=env,
            check=False,
        )  # fmt: skip
        tree = ET.parse(report)
    outcomes: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        function = name.split("[")[0]
        arch = _arch_of(name)
        if function not in FEATURES or arch is None:
            continue
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        outcomes[(function, arch)][outcome] += 1
    return version, outcomes


def _cell(counts: Counter[str]) -> str:
    total = sum(counts.values())
    if total == 0:
        return "not run"
    if counts["passed"] == total:
        return f"yes ({total})"
    return f"{counts['passed']} of {total} pass"


def table(runs: dict[str, tuple[str, dict[tuple[str, str], Counter[str]]]]) -> str:
    """The markdown page for the runs (``substrate -> (TL version, outcomes)``)."""
    lines = [
        "# Support",
        "",
        "Which feature runs on which architecture, on each substrate, as the tests found it: "
        "tiny random models built from each architecture's transformers config (3 layers, "
        "width 32), checked against the slow reference loops (sweeps, traces) or against what "
        "the feature must do (an edit flips the fact it edits and restores the weights bit for "
        "bit; the study writes its report). A cell counts the passing tests of that feature; "
        "*not run* means the feature has no test on that substrate. Qwen2 is not run on "
        "TransformerLens 3.9's HookedTransformer: its Qwen2 settings turn the tests' word-level "
        "tokenizer's text into an empty token row (``tests/models.py``, ``UNTESTED``).",
        "",
        f"Generated by `python scripts/support_table.py` on {datetime.date.today()} "
        f"({platform.machine()}, Python {platform.python_version()}).",
        "",
    ]
    for substrate, (version, outcomes) in runs.items():
        lines += [
            f"## {substrate} (TransformerLens {version})",
            "",
            "| feature | " + " | ".join(NAMES[a] for a in ARCHITECTURES) + " |",
            "|---|" + "---|" * len(ARCHITECTURES),
        ]
        for function, feature in FEATURES.items():
            cells = [_cell(outcomes.get((function, a), Counter())) for a in ARCHITECTURES]
            lines.append(f"| {feature} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python",
        action="append",
        default=None,
        metavar="SUBSTRATE=PYTHON",
        help="a substrate and the interpreter whose TransformerLens runs it (repeatable; "
        "default: bridge with this interpreter)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    pairs = [p.split("=", 1) for p in (args.python or [f"bridge={sys.executable}"])]
    runs = {substrate: _run(python, substrate) for substrate, python in pairs}
    args.out.write_text(table(runs) + "\n", encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
