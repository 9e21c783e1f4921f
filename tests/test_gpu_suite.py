"""benchmarks/gpu_suite.sh runs end to end in its dry mode (no GPU here)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real suite runs on GPU machines")
def test_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), str(tmp_path), "--dry"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped (dry run)" in proc.stdout
    results = (tmp_path / "RESULTS.md").read_text()
    assert "remask_lowest_confidence" in results and "## CPU" in results
    assert (tmp_path / "bench.log").exists()
