"""Runs every example of the documentation, so that the docs cannot rot.

In each of README.md and docs/*.md, fenced ```python blocks run in document order in one namespace, and ```bash
blocks run with `bash -e` in between, all in a fresh folder that has `recipes` (a link to the repository's) and the
shared data at `../shared`, with this interpreter's bin folder first on PATH (`python`, `hf-freezecache`,
`accelerate`). Blocks fenced ```sh are shown only: they need a GPU, the Hub, or hours. docs/api.md is generated
(`recipes/make_api_reference.py`) and must be up to date.
"""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks(path: Path) -> list[tuple[str, str, int]]:
    """The `(language, code, line)` of the python and bash blocks of a markdown file, in order."""
    text = path.read_text()
    return [
        (match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1)
        for match in _FENCE.finditer(text)
        if match.group(1) in ("python", "bash")
    ]


@contextlib.contextmanager
def _working_folder(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "shared").symlink_to(shared_path())
    previous = os.getcwd()
    os.chdir(work)
    try:
        yield work
    finally:
        os.chdir(previous)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_examples_run(doc, tmp_path):
    blocks = runnable_blocks(doc)
    if not blocks:
        assert doc.name in ("design.md", "results.md", "api.md"), f"{doc.name} has no runnable example"
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": f"docs_{doc.stem}"}
    with _working_folder(tmp_path) as work:
        for language, code, line in blocks:
            where = f"{doc.name}, block at line {line}"
            if language == "python":
                exec(compile(code, where, "exec"), namespace)
                continue
            result = subprocess.run(
                ["bash", "-e", "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, f"{where} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_api_reference_is_up_to_date():
    script = ROOT / "recipes" / "make_api_reference.py"
    generated = subprocess.run([sys.executable, str(script), "--stdout"], capture_output=True, text=True, check=True)
    assert (ROOT / "docs" / "api.md").read_text() == generated.stdout, "run python recipes/make_api_reference.py"
