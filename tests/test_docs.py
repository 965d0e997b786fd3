"""Every ```python block of README.md and docs/*.md runs, and the site builds with --strict.

Each block runs on its own, in a fresh namespace and an empty working directory, so it must
be self-contained (as a reader copying it would need). A block whose imports are missing
is skipped, naming them; a `<!-- requires: a, b -->` line right above a block names other
needs (`cuda` means `torch.cuda.is_available()`). A block that only includes a file
(`--8<-- "docs/examples/x.py"`) is run by tests/test_examples.py instead; here its file
must exist. A block the page says to "Run it twice" runs twice in its directory, as a
reader would; and each page's blocks also run one after another in one directory, as a
reader pasting them into one folder would.
"""

from __future__ import annotations

import ast
import doctest
import html
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import arrayckpt

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:^<!-- requires: (?P<needs>[^>]*?) -->\n)?^```python[^\n]*\n(?P<code>.*?)^```\n"
    r"(?P<after>\s*Run it twice)?",
    re.MULTILINE | re.DOTALL,
)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"\s*$')


def blocks() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            needs = [s.strip() for s in (m["needs"] or "").split(",") if s.strip()]
            runs = 2 if m["after"] else 1
            found.append(
                pytest.param(
                    page, line, m["code"], needs, runs, id=f"{page.relative_to(REPO)}:{line}"
                )
            )
    return found


def missing(code: str, needs: list[str]) -> list[str]:
    modules = set(needs) - {"cuda"}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    absent = sorted(m for m in modules if importlib.util.find_spec(m.partition(".")[0]) is None)
    if "cuda" in needs and not absent:
        import torch

        if not torch.cuda.is_available():
            absent.append("a CUDA GPU (torch.cuda.is_available() is False)")
    return absent


def test_the_pages_have_examples():
    assert len(blocks()) >= 20


def run_block(page: Path, line: int, code: str) -> None:
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs__"})


def test_a_page_can_ask_for_two_runs():
    assert any(p.values[4] == 2 for p in blocks()), "the docs home says 'Run it twice'"


@pytest.mark.parametrize(("page", "line", "code", "needs", "runs"), blocks())
def test_code_block_runs(page, line, code, needs, runs, tmp_path, monkeypatch):
    include = SNIPPET.match(code.strip())
    if include:
        assert (REPO / include["path"]).is_file(), include["path"]
        return
    absent = missing(code, needs)
    if absent:
        pytest.skip(f"needs {', '.join(absent)}, not available here")
    monkeypatch.chdir(tmp_path)
    for _ in range(runs):
        run_block(page, line, code)


def pages_with_several_blocks() -> list[Path]:
    counts: dict[Path, int] = {}
    for p in blocks():
        if not SNIPPET.match(p.values[2].strip()):
            counts[p.values[0]] = counts.get(p.values[0], 0) + 1
    return [page for page, n in counts.items() if n > 1]


@pytest.mark.parametrize(
    "page", pages_with_several_blocks(), ids=lambda p: str(p.relative_to(REPO))
)
def test_a_pages_blocks_run_in_one_folder(page, tmp_path, monkeypatch):
    """Pasted one after another into one folder, no block trips over an earlier one's files."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for p in blocks():
        _, line, code, needs, _ = p.values
        if p.values[0] != page or SNIPPET.match(code.strip()) or missing(code, needs):
            continue
        run_block(page, line, code)
        ran += 1
    if ran < 2:
        pytest.skip(f"fewer than two of {page.name}'s blocks can run here")


def test_install_instructions_need_no_release():
    """Until a release exists, `pip install arrayckpt` finds nothing: no page may say it."""
    bare = re.compile(r"pip install [\"']?arrayckpt(?:\[[^\]]*\])?[\"']?(?:\s|$)(?!\s*@)")
    said = [f"{page.name}: {m[0]!r}" for page in PAGES for m in bare.finditer(page.read_text())]
    assert not said


def public_modules() -> list:
    names = ["arrayckpt"] + [
        m.name for m in pkgutil.walk_packages(arrayckpt.__path__, "arrayckpt.")
    ]
    return sorted(n for n in names if not n.endswith("__main__"))


@pytest.mark.parametrize("name", public_modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    """The API reference shows the docstrings' examples: they must run too."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # a backend for a framework that is not installed
        pytest.skip(f"cannot import {name}: {exc}")
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, name, module=module):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed in {name}"


def test_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install '.[docs]')")
    mkdocs = shutil.which("mkdocs") or ""
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_api_page((tmp_path / "site" / "api" / "index.html").read_text())
    index = json.loads((tmp_path / "site" / "search" / "search_index.json").read_text())
    assert any("save_checkpoint" in doc["location"] for doc in index["docs"]), "search misses it"


def check_api_page(page: str) -> None:
    """Examples render as code, signatures are wrapped, every public name has a section."""
    sections = set(re.findall(r'id="arrayckpt\.([A-Za-z_]+)"', page))
    assert not set(arrayckpt.__all__) - sections, "public names without an API section"
    examples = re.findall(
        r"<pre[^>]*>(?:(?!</pre>).)*?<code[^>]*>(?:(?!</pre>).)*?&gt;&gt;&gt;", page, re.DOTALL
    )
    assert len(examples) >= 8, "docstring examples do not render as code blocks"
    assert "&gt;&gt;&gt;" not in re.sub(r"<pre.*?</pre>", "", page, flags=re.DOTALL)
    signatures = re.findall(
        r'<div class="doc-signature[^>]*>.*?<pre[^>]*>(.*?)</pre>', page, re.DOTALL
    )
    assert signatures, "no separate signatures"
    lines = [html.unescape(re.sub(r"<[^>]+>", "", sig)).splitlines() for sig in signatures]
    assert max(len(line) for sig in lines for line in sig) <= 100


def test_docstrings_use_the_examples_section_the_generator_renders():
    """mkdocstrings' Google style renders `Examples:` as code, `Example:` as quoted text."""
    bad = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "arrayckpt").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip() == "Example:"
    ]
    assert not bad


def test_readme_starts_with_the_demo_and_the_tests_and_links_every_page():
    text = (REPO / "README.md").read_text()
    commands = [line.strip() for line in text.splitlines() if line.startswith("    ")][:2]
    assert commands == [
        "pip install . && python -m arrayckpt demo",
        "pip install nox && nox -s tests",
    ]
    pages = sorted((REPO / "docs").glob("*.md"))
    missing = [p.name for p in pages if f"(docs/{p.name})" not in text]
    assert not missing, f"README.md does not link {missing}"


def example_commands() -> list[str]:
    text = (REPO / "docs" / "examples.md").read_text()
    return [
        line.split("#")[0].strip()
        for line in text.splitlines()
        if line.startswith("python docs/examples/")
    ]


def test_the_examples_page_shows_how_to_run_each_script():
    """Every included script that takes a root shows a command giving it one."""
    text = (REPO / "docs" / "examples.md").read_text()
    scripts = re.findall(r'--8<-- "(docs/examples/[^"]+)"', text)
    needs_root = [s for s in scripts if 'add_argument("root")' in (REPO / s).read_text()]
    assert needs_root
    shown = {c.split()[1] for c in example_commands() if len(c.split()) > 2}
    assert not set(needs_root) - shown, f"no run command with a root for {set(needs_root) - shown}"


def test_the_numpy_example_commands_run_as_written(tmp_path):
    """The page's commands for the NumPy script, run in order from a copy of the checkout."""
    shutil.copytree(REPO / "docs" / "examples", tmp_path / "docs" / "examples")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = [c for c in example_commands() if "numpy_train.py" in c]
    statuses = [
        subprocess.run(
            [sys.executable, *c.split()[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for c in commands
    ]
    assert [s.returncode for s in statuses] == [3, 0], [s.stderr[-500:] for s in statuses]
    # The save at step 40 may be cut short by the crash (os._exit): 20 or 40.
    assert re.search(r"resumed from step (20|40)\n", statuses[1].stdout), statuses[1].stdout
