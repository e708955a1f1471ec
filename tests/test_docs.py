"""The documentation: every code block runs, and the site builds with warnings as errors."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# A page without code blocks is no test of code; it is checked by the strict site build below.
CODE_PAGES = [page for page in PAGES if BLOCK.search(page.read_text())]


def test_there_are_pages_with_code():
    assert sum(len(BLOCK.findall(p.read_text())) for p in CODE_PAGES) >= 15
    assert len(CODE_PAGES) >= 10


@pytest.mark.parametrize("page", CODE_PAGES, ids=[str(p.relative_to(DOCS)) for p in CODE_PAGES])
def test_code_blocks_run(page, monkeypatch):
    # the blocks of a page share one module, as cells of a notebook would
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for number, block in enumerate(BLOCK.findall(page.read_text()), start=1):
        exec(compile(block, f"{page.name} block {number}", "exec"), module.__dict__)


def test_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=DOCS.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("activation_patching", "causal_trace", "GaussianNoise", "register_site"):
        assert name in api


ROOT = DOCS.parent


def _readme_commands() -> list[str]:
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert block, "the README starts with a bash block of its two commands"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_main_job_and_the_test_command():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "kloc-lens study" in commands[0]
    assert commands[1] == "bash scripts/test"


def test_ci_runs_the_readme_test_command_not_a_copy():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _readme_commands()[1] in ci
    assert not any("pytest" in line and "-m substrate" not in line for line in ci), (
        "CI runs pytest only through scripts/test (and the TL 3.9 substrate run)"
    )
    script = (ROOT / "scripts" / "test").read_text()
    assert "apt-get install" in script and "chromium" in script
    assert "python -m pytest" in script


def test_the_support_table_is_built_from_the_architecture_tests():
    """docs/support.md has a row per feature the script maps and a column per architecture the
    tests build; every mapped test function exists, so the table cannot name a test that is gone."""
    import importlib.util

    from models import ARCHITECTURES

    root = DOCS.parent
    spec = importlib.util.spec_from_file_location(
        "support_table", root / "scripts" / "support_table.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert sorted(script.ARCHITECTURES) == sorted(ARCHITECTURES)
    sources = "".join((root / t).read_text() for t in script.TESTS)
    for function in script.FEATURES:
        assert f"def {function}(" in sources, function
    page = (DOCS / "support.md").read_text()
    for feature in script.FEATURES.values():
        assert page.count(f"| {feature} |") >= 1, feature
    for name in script.NAMES.values():
        assert name in page
