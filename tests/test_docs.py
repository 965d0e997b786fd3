"""Every ```python block of README.md and docs/*.md runs, and the site builds with --strict.

Each block runs on its own, in a fresh namespace and an empty working directory, so it must
be self-contained (as a reader copying it would need). A block whose imports are missing
is skipped, naming them; a `<!-- requires: a, b -->` line right above a block names other
needs (`cuda` means `torch.cuda.is_available()`). A block that only includes a file
(`--8<-- "docs/examples/x.py"`) is run by tests/test_examples.py instead; here its file
must exist.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
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
    r"(?:^<!-- requires: (?P<needs>[^>]*?) -->\n)?^```python[^\n]*\n(?P<code>.*?)^```",
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
            found.append(pytest.param(page, line, m["code"], needs,
                                      id=f"{page.relative_to(REPO)}:{line}"))
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


@pytest.mark.parametrize(("page", "line", "code", "needs"), blocks())
def test_code_block_runs(page, line, code, needs, tmp_path, monkeypatch):
    include = SNIPPET.match(code.strip())
    if include:
        assert (REPO / include["path"]).is_file(), include["path"]
        return
    absent = missing(code, needs)
    if absent:
        pytest.skip(f"needs {', '.join(absent)}, not available here")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs__"})


def public_modules() -> list:
    names = ["arrayckpt"] + [m.name for m in pkgutil.walk_packages(arrayckpt.__path__,
                                                                    "arrayckpt.")]
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
    proc = subprocess.run([*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_readme_starts_with_the_demo_and_the_tests_and_links_every_page():
    text = (REPO / "README.md").read_text()
    commands = [line.strip() for line in text.splitlines() if line.startswith("    ")][:2]
    assert commands == ["pip install . && python -m arrayckpt demo",
                        "pip install nox && nox -s tests"]
    pages = sorted((REPO / "docs").glob("*.md"))
    missing = [p.name for p in pages if f"(docs/{p.name})" not in text]
    assert not missing, f"README.md does not link {missing}"
