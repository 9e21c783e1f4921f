"""The embedded digits model: data, training-stage smoke runs, metrics, the CLI and its errors.

CI never retrains the shipped weights: each stage runs a few iterations into a temporary directory.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sgkernels import cli  # noqa: E402
from sgkernels.digits import data, metrics  # noqa: E402
from sgkernels.digits.pipeline import DEFAULT_MODEL_DIR, DigitsModel  # noqa: E402
from sgkernels.digits.stages import run_stage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    results = {s: run_stage(s, out, steps=3, seed=0, progress=False)
               for s in ("tokenizer", "classifier", "generator", "guide")}
    return out, results


def test_split_is_fixed_and_disjoint():
    xt, yt = data.load_split("train")
    xh, yh = data.load_split("heldout")
    assert xt.shape == (1500, 1, 32, 32) and xh.shape == (297, 1, 32, 32)
    assert xt.dtype == torch.float32 and 0 <= float(xt.min()) and float(xt.max()) <= 1
    assert set(yt.tolist()) == set(range(10))
    xt2, _ = data.load_split("train")
    assert torch.equal(xt, xt2)
    # no held-out image is a training image
    d = torch.cdist(xh.reshape(len(xh), -1), xt.reshape(len(xt), -1))
    assert float(d.min()) > 0


def test_stages_smoke(tiny_model):
    out, results = tiny_model
    for sub in ("tokenizer", "generator", "classifier"):
        assert os.path.exists(os.path.join(out, sub, "config.json"))
    assert all(np.isfinite(v) for r in results.values() for v in r.values() if isinstance(v, float))
    dm = DigitsModel.load(out, need_classifier=True)
    assert dm.guide is not None
    images = dm.generate([0, 1, 2], seed=0, steps=3)
    assert images.shape == (3, 1, 32, 32)
    # seeded: the same seed gives the same images
    assert torch.equal(images, dm.generate([0, 1, 2], seed=0, steps=3))


def test_fid_of_a_set_to_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)  # mean shift of 1 in 8 dims


def test_inception_score_bounds():
    assert metrics.inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)
    assert metrics.inception_score(np.eye(10)[np.arange(100) % 10]) == pytest.approx(10.0, rel=1e-6)
    p = np.random.default_rng(0).dirichlet(np.ones(10), size=200)
    assert 1.0 <= metrics.inception_score(p) <= 10.0


def test_precision_recall():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)
    far = x + 100.0
    assert metrics.precision_recall(x, far, k=3) == (0.0, 0.0)
    # a fake set collapsed on one real point (mode collapse): full precision, low recall
    p, r = metrics.precision_recall(x, x[0] + 0.001 * rng.normal(size=(50, 4)), k=3)
    assert p == 1.0 and r < 0.5


def test_shipped_weights_load():
    dm = DigitsModel.load(need_classifier=True)
    assert dm.guide is not None and dm.model.config.num_tokens == 64
    assert dm.tokenizer.config.codebook_size == dm.model.config.codebook_size
    xh, yh = data.load_split("heldout")
    with torch.no_grad():
        acc = (dm.classifier(xh).argmax(1) == yh).float().mean().item()
    assert acc > 0.9


def test_generate_cli(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["generate", "--out", str(out), "--num", "4", "--classes", "3,7", "--steps", "4"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_evaluate_cli_json(tiny_model, capsys):
    out, _ = tiny_model
    assert cli.main(["evaluate", "--model", out, "--num", "20", "--steps", "2", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads(last)
    assert set(r) >= {"fid", "inception_score", "precision", "recall", "images_per_second", "config"}
    assert 1.0 <= r["inception_score"] <= 10.0 + 1e-6


@pytest.mark.parametrize("argv, message", [
    (["generate", "--out", "{tmp}/g.png", "--classes", "3,12"], "unknown class 12"),
    (["generate", "--out", "{tmp}/g.png", "--classes", "x"], "--classes"),
    (["generate", "--out", "{tmp}/g.png", "--num", "0"], "--num"),
    (["evaluate", "--num", "0"], "--num"),
    (["generate", "--out", "{tmp}/g.png", "--model", "{tmp}/missing"], "not found"),
    (["generate", "--out", "{tmp}/g.png", "--model", "{corrupt}"], "cannot load"),
    (["generate", "--out", "{tmp}/no/such/dir/g.png"], "cannot write"),
    (["generate", "--out", "{tmp}"], "cannot write"),
    (["train", "guide", "--out", "{tmp}/empty"], "needs"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    corrupt = tmp_path / "corrupt"
    (corrupt / "tokenizer").mkdir(parents=True)
    (corrupt / "tokenizer" / "config.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path, corrupt=corrupt) for a in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sgkernels: error:") and message in err[0], captured.err
    assert "Traceback" not in captured.err


def test_cli_corrupt_weights(tmp_path, capsys, tiny_model):
    import shutil

    out, _ = tiny_model
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "generator" / "model.safetensors").write_bytes(b"garbage")
    assert cli.main(["generate", "--out", str(tmp_path / "g.png"), "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load" in err[0]


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sgkernels", "generate", "--out", str(tmp_path / "g.png"),
                        "--num", "0"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--num" in r.stderr


def test_shipped_assets_are_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEFAULT_MODEL_DIR) for f in fs)
    assert total < 8 * 2**20
