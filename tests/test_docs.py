"""Every command and snippet in README.md and docs/*.md runs, so the docs cannot rot.

A fenced ``python`` / ``bash`` block carries a marker on the line directly above its fence:

* ``<!-- run -->``: run it;
* ``<!-- run with: NAME -->``: first call ``docs_fixtures.NAME(tmp_path, ns)``, which makes the tiny
  stand-ins the block names (folders written into the temporary directory, objects put into the
  namespace ``ns``); if it returns a path, the block runs there instead of in the temporary directory;
* ``<!-- skip: reason -->``: not run here (it needs a GPU, or it is the test command itself).

Python blocks of one page run in order in one namespace, like a notebook; bash blocks run with
``bash -eo pipefail`` and the virtual environment's ``bin`` first on PATH. Both run in a fresh
temporary directory per page. The lint test (fast tier) checks that every block is marked; running
the pages is the slow tier (``make test-all``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import docs_fixtures

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_LANGUAGES = {"python", "py", "bash", "sh", "shell"}
MARKER = re.compile(r"^<!--\s*(run|run with:\s*(?P<fixture>\w+)|skip:\s*(?P<reason>.+?))\s*-->$")
FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str | None  # "run", "skip" or None
    fixture: str | None = None
    reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` with their markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language = m.group(1), m.group(2).lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        prev = lines[start - 1].strip() if start > 0 else ""
        mm = MARKER.match(prev)
        block = Block(page, start + 1, language, "\n".join(body) + "\n", None)
        if mm:
            block.marker = "skip" if mm.group("reason") else "run"
            block.fixture, block.reason = mm.group("fixture"), mm.group("reason")
        found.append(block)
    return found


def code_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in CODE_LANGUAGES]


def test_every_code_block_is_marked():
    """Each python / bash block says whether the test runs it (and a skip says why)."""
    unmarked = [b.where for page in PAGES for b in code_blocks(page) if b.marker is None]
    assert not unmarked, f"fenced code blocks without <!-- run --> / <!-- skip: why -->: {unmarked}"
    missing = [f"{b.where} ({b.fixture})" for page in PAGES for b in code_blocks(page)
               if b.fixture and not hasattr(docs_fixtures, b.fixture)]
    assert not missing, f"unknown fixtures: {missing}"
    assert sum(b.marker == "run" for page in PAGES for b in code_blocks(page)) > 0


def test_block_parser_reads_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n<!-- run -->\n```python\nx = 1\n```\n<!-- skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n"
                    "<!-- run with: tiny -->\n```python\ny = 2\n```\n```text\nout\n```\n```python\nz\n```\n")
    got = [(b.language, b.marker, b.fixture, b.reason, b.code) for b in blocks(page)]
    assert got == [("python", "run", None, None, "x = 1\n"), ("bash", "skip", None, "needs a GPU", "nvidia-smi\n"),
                   ("python", "run", "tiny", None, "y = 2\n"), ("text", None, None, None, "out\n"),
                   ("python", None, None, None, "z\n")]


def _run_bash(block: Block, cwd: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("SGKERNELS_DOCS_TEST", "1")
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (f"{block.where}: exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr\n{proc.stderr[-4000:]}")


def _run_python(block: Block, ns: dict) -> None:
    try:
        exec(compile(block.code, block.where, "exec"), ns)  # noqa: S102  (the docs' own snippets)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{block.where}: {type(e).__name__}: {e}") from e


@pytest.mark.slow  # runs every documented command: minutes
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch):
    runnable = [b for b in code_blocks(page) if b.marker == "run"]
    if not runnable:
        pytest.skip(f"{page.name} has no runnable block")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    for block in runnable:
        cwd = tmp_path
        if block.fixture:
            where = getattr(docs_fixtures, block.fixture)(tmp_path, ns)
            cwd = Path(where) if where is not None else tmp_path
        monkeypatch.chdir(cwd)
        if block.language in ("python", "py"):
            _run_python(block, ns)
        else:
            _run_bash(block, cwd)
