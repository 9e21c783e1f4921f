"""benchmarks/gpu_suite.sh's plumbing in its dry mode (no GPU here), and what it relies on: every CUDA
test carries the ``cuda`` mark, and benchmarks/sanitize_small.py runs every op and Triton kernel."""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def _run_suite(tmp_path, **env):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, **env)
    env.pop("TRITON_INTERPRET", None)  # the suite's own pythons decide; sanitize_small needs triton.jit objects
    return subprocess.run(["bash", SUITE, str(tmp_path), "--dry"], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real suite runs on GPU machines")
def test_dry_run(tmp_path):
    proc = _run_suite(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "skipped (dry run)" in proc.stdout
    assert re.match(r"gpu_suite: PASS in \d+ s: sources_hash=ok coverage=ok bench_remask_lowest_confidence=ok$", lines[-1])
    assert sorted(os.listdir(tmp_path)) == ["RESULTS.md", "suite.log"]  # the device tool returns <= 8 files
    log = (tmp_path / "suite.log").read_text()
    assert log.strip().splitlines()[-1] == lines[-1]
    assert "| remask_lowest_confidence |" in log  # the step's output, teed as it ran
    results = (tmp_path / "RESULTS.md").read_text()
    assert results.startswith("## remask_lowest_confidence (CPU)") and "| eager Gumbel+sort |" in results


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real suite runs on GPU machines")
def test_timeout_keeps_the_log_and_goes_on(tmp_path):
    """A step past its limit is stopped, reported TIMEOUT in the summary, and the later steps still run."""
    proc = _run_suite(tmp_path, GPU_SUITE_PROBE_TIMEOUT="1", SUITE_BUDGET="470")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("gpu_suite: FAIL") and "timeout_probe=TIMEOUT" in summary
    assert "bench_remask_lowest_confidence=ok" in summary
    log = (tmp_path / "suite.log").read_text()
    assert "sanitize_small: covers" in log and "== timeout_probe: TIMEOUT" in log


def test_sanitize_small_covers_every_op_and_triton_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sanitize_small.py"), "--coverage"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _gpu_skipifs(path):
    """(test name, skip reason) of each skipif/skip in ``path`` whose condition needs a CUDA device."""
    found = []
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "skipif" and node.args:
            cond = ast.unparse(node.args[0])
            reason = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "reason"), "")
            if re.search(r"not .*cuda\.is_available\(\)", cond):
                found.append((cond, reason))
        elif node.func.attr == "skip" and node.args and isinstance(node.args[0], ast.Constant):
            if re.search(r"\b(no|needs?|requires?|without)( a)? (CUDA|GPU)\b", str(node.args[0].value)):
                found.append(("pytest.skip", str(node.args[0].value)))
    return found


def test_every_cuda_skip_gets_the_cuda_mark():
    """tests/conftest.py marks ``cuda`` the tests whose skipif reason says they need a GPU; a skip
    written another way would leave its test out of ``pytest -m cuda`` (gpu_suite.sh)."""
    import conftest

    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        for cond, reason in _gpu_skipifs(path):
            assert cond != "pytest.skip", f"{path}: pytest.skip({reason!r}) inside a test: use a skipif mark"
            assert conftest._GPU_SKIP_REASON.search(reason), (
                f"{path}: skipif({cond}, reason={reason!r}): say 'no CUDA device' so it is marked cuda")


def test_cuda_marker_selects_the_cuda_tests():
    env = dict(os.environ, PYTHONPATH=ROOT)
    files = [os.path.join(ROOT, "tests", f) for f in ("test_vq_lookup.py", "test_remask.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_cuda_large_matches_float64" in i for i in ids), proc.stdout  # skipif "needs a CUDA device"
    assert any("test_triton_rejects_long_rows" in i for i in ids), proc.stdout  # Triton on the GPU when there is one
    assert any("[cuda" in i or "-cuda" in i for i in ids), proc.stdout  # op_contract's cuda backend param
    assert not any("[cpp" in i or "[torch" in i or "triton-interpret" in i for i in ids), proc.stdout
