"""The ``sgkernels`` command line on bad input, its image files, and ``generate --vae`` on official folders.

Digits commands use the shipped model with few images and steps; ``generate --vae`` uses tiny
random-weight folders in the official layout (tests/official_folders.py).
"""
import errno
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sgkernels import _rng, cli
from sgkernels.digits.pipeline import DEFAULT_MODEL_DIR
from sgkernels.generate_sharded import batch_seed, generate_to_npz, image_name
from sgkernels.ops import _validate
from sgkernels.pipeline import SelfGuidedPipeline
from test_pipeline import make_folders

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

FAST = ["--num", "2", "--steps", "2", "--no-progress"]


def run(argv, capsys):
    """``(status, stdout, stderr)`` of ``sgkernels argv``."""
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(status, err, *needles):
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("sgkernels: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", ["-1", str(2**63), "1e3", "x"])
def test_seed_out_of_range_is_one_line(tmp_path, capsys, seed):
    status, _, err = run(["generate", "--out", tmp_path / "g.png", "--seed", seed, *FAST], capsys)
    line = one_line_error(status, err, "--seed")
    assert line.count("--seed") == 1
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("seed", [10_000_000_000_000, 2**63 - 1])
def test_large_seeds_generate(tmp_path, capsys, seed):
    status, out, _ = run(["generate", "--out", tmp_path / "g.png", "--seed", seed, *FAST], capsys)
    assert status == 0 and "wrote" in out
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_derived_seeds_stay_in_range_and_distinct():
    for seed in (0, 1, 2**40, 2**63 // _rng.SEED_STRIDE, 2**63 - 1):
        for i in (0, 1, 17):
            assert 0 <= _rng.derived_seed(seed, i) < 2**63
    assert _rng.derived_seed(3, 5) == 3 * _rng.SEED_STRIDE + 5  # unchanged for the seeds that fit
    # odd stride: seed -> derived seed is one-to-one mod 2**63 (here on seeds far above 2**63 / stride)
    seeds = [2**62 + k for k in range(1000)] + [2**63 - 1 - k for k in range(1000)]
    assert len({_rng.derived_seed(s, 0) for s in seeds}) == len(seeds)


def test_numpy_scalars_are_accepted():
    assert _validate.check_seed("seed", np.int64(7)) == 7 and type(_validate.check_seed("seed", np.uint32(7))) is int
    assert _validate.check_float("temperature", np.float32(0.5)) == 0.5
    assert _validate.check_positive_int("steps", np.int32(3)) == 3
    assert _rng.resolve_seed(np.int64(5)) == 5 and _rng.resolve_seed(np.uint8(5)) == 5
    with pytest.raises(TypeError, match="seed"):
        _validate.check_seed("seed", np.float64(1.0))
    with pytest.raises(TypeError):
        _rng.resolve_seed(np.bool_(True))
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*63\), got -1"):
        _validate.check_seed("seed", np.int64(-1))

    from sgkernels.ops import guided_sample

    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    ref = guided_sample(logits, None, guidance_scale=0.0, temperature=0.5, seed=11)
    got = guided_sample(logits, None, guidance_scale=np.float32(0.0), temperature=np.float32(0.5), seed=np.int64(11))
    assert torch.equal(ref[0], got[0])


# ------------------------------------------------------------------------------------ other options
def test_evaluate_needs_more_images_than_neighbours(capsys):
    status, _, err = run(["evaluate", "--num", "2", "--steps", "1", "--no-progress"], capsys)
    one_line_error(status, err, "--num", "at least 4")
    status, _, err = run(["demo", "--num-eval", "3"], capsys)
    one_line_error(status, err, "--num-eval")


@pytest.mark.parametrize("argv, option", [
    (["generate", "--out", "{tmp}/g.png", "--num", "0"], "--num"),
    (["generate", "--out", "{tmp}/g.png", "--count", "-3"], "--count"),
    (["generate", "--out", "{tmp}/g.png", "--steps", "0"], "--steps"),
    (["generate", "--out", "{tmp}/g.png", "--guidance-scale", "nan"], "--guidance-scale"),
    (["generate", "--out", "{tmp}/g.png", "--choice-temperature", "-1"], "--choice-temperature"),
    (["generate", "--out", "{tmp}/g.png", "--temperature", "inf"], "--temperature"),
    (["generate", "--out", "{tmp}/g.png", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--num", "x"], "--num"),
    (["demo", "--num-eval", "0"], "--num-eval"),
    (["train", "tokenizer", "--out", "{tmp}/m", "--threads", "0"], "--threads"),
])
def test_messages_name_the_option_once(tmp_path, capsys, argv, option):
    status, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    line = one_line_error(status, err, option)
    assert line.count(option) == 1, line


# ------------------------------------------------------------------------------------------ images
def test_out_jpg_writes_a_jpeg(tmp_path, capsys):
    pytest.importorskip("PIL")
    from PIL import Image

    status, _, _ = run(["generate", "--out", tmp_path / "grid.jpg", *FAST], capsys)
    assert status == 0
    data = (tmp_path / "grid.jpg").read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(tmp_path / "grid.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB"


@pytest.mark.parametrize("name", ["grid.gif", "grid"])
def test_out_unsupported_extension(tmp_path, capsys, name):
    status, _, err = run(["generate", "--out", tmp_path / name, *FAST], capsys)
    one_line_error(status, err, "unsupported image extension", ".png, .jpg, .jpeg")
    assert not os.listdir(tmp_path)


def test_out_is_atomic(tmp_path, capsys, monkeypatch):
    """Out of space at the final rename: the existing file is kept whole and no temporary is left."""
    out = tmp_path / "grid.png"
    out.write_bytes(b"previous image")
    real = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    status, _, err = run(["generate", "--out", out, *FAST], capsys)
    one_line_error(status, err, "cannot write", "No space left")
    assert out.read_bytes() == b"previous image" and os.listdir(tmp_path) == ["grid.png"]
    monkeypatch.setattr(os, "replace", real)
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    status, _, err = run(["generate", "--out", tmp_path / "g.png", "--num", "2", "--steps", "1"], capsys)
    assert status == 0 and "sampling" in err and "2/2" in err
    status, _, err = run(["generate", "--out", tmp_path / "g.png", "--num", "2", "--steps", "1", "--no-progress"],
                         capsys)
    assert status == 0 and err == ""


# --------------------------------------------------------------------------------- corrupt weights
def _corrupt(src_dir, dst_dir, rel, key, value=float("nan")):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, rel)
    state = load_file(path)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    save_file(state, path)
    return dst_dir


@pytest.mark.parametrize("rel, key, value", [
    ("generator/model.safetensors", "blocks.0.attention.key.weight", float("nan")),
    ("generator/guide.safetensors", None, float("inf")),
    ("tokenizer/weights.safetensors", "quantizer.embedding.weight", float("nan")),
])
def test_corrupt_weights_are_refused_at_load(tmp_path, capsys, rel, key, value):
    if key is None:
        from safetensors.torch import load_file

        key = sorted(k for k, v in load_file(os.path.join(DEFAULT_MODEL_DIR, rel)).items() if v.is_floating_point())[0]
    bad = _corrupt(DEFAULT_MODEL_DIR, tmp_path / "bad", rel, key, value)
    status, _, err = run(["generate", "--out", tmp_path / "g.png", "--model", bad, *FAST], capsys)
    one_line_error(status, err, "cannot load", "non-finite", key, rel.split("/")[0])
    assert not (tmp_path / "g.png").exists()


def test_shape_mismatch_message_is_short(tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_MODEL_DIR, bad)
    config = json.loads((bad / "generator" / "config.json").read_text())
    config["model"]["width"] = 64
    (bad / "generator" / "config.json").write_text(json.dumps(config))
    status, _, err = run(["generate", "--out", tmp_path / "g.png", "--model", bad, *FAST], capsys)
    line = one_line_error(status, err, "shape mismatch", "more)")
    assert len(line) < 600


# ---------------------------------------------------------------------- generate --vae (official)
OFFICIAL = ["--steps", "3", "--choice-temperature", "2", "--batch-size", "3", "--no-progress"]
SAMPLING = dict(steps=3, guidance_scale=1.0, choice_temperature=2.0, temperature=1.0)


@pytest.fixture
def folders(tmp_path):
    return make_folders(tmp_path / "ckpt")


def test_generate_vae_grid_npz_and_dir_agree(folders, tmp_path, capsys):
    model, vae = folders
    base = ["generate", "--model", model, "--vae", vae, "--count", "7", "--seed", "4", *OFFICIAL]
    status, out, _ = run(base + ["--out", tmp_path / "grid.png"], capsys)
    assert status == 0 and "wrote" in out and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert run(base + ["--out-npz", tmp_path / "s.npz"], capsys)[0] == 0
    pipe = SelfGuidedPipeline.from_pretrained(model, vae, device="cpu")
    ref = generate_to_npz(pipe, str(tmp_path / "ref.npz"), num_images=7, batch_size=3, seed=4, progress=False,
                          **SAMPLING)
    with np.load(tmp_path / "s.npz") as a, np.load(ref) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        images, labels = a["arr_0"], a["arr_1"]
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1]

    pytest.importorskip("PIL")
    from PIL import Image

    d = tmp_path / "dir"
    assert run(base + ["--out-dir", d], capsys)[0] == 0
    for i in range(7):
        with Image.open(d / image_name(i)) as im:
            assert np.array_equal(np.asarray(im), images[i])
    assert (d / "labels.txt").read_text().split() == [str(c) for c in labels.tolist()]

    # resumable: a missing image is redrawn (its batch only), the others are kept
    os.remove(d / image_name(4))
    before = {n: os.stat(d / n).st_mtime_ns for n in os.listdir(d) if n.endswith(".png")}
    assert run(base + ["--out-dir", d], capsys)[0] == 0
    with Image.open(d / image_name(4)) as im:
        assert np.array_equal(np.asarray(im), images[4])
    for n, t in before.items():
        if n not in (image_name(3), image_name(5)):  # batch 1 = images 3, 4, 5
            assert os.stat(d / n).st_mtime_ns == t, n
    # another seed for the same folder: refused, naming run.json
    status, _, err = run(base[:-len(OFFICIAL)] + ["--seed", "5", *OFFICIAL, "--out-dir", d], capsys)
    one_line_error(status, err, "run.json", "seed")


def test_generate_vae_classes(folders, tmp_path, capsys):
    model, vae = folders
    argv = ["generate", "--model", model, "--vae", vae, "--count", "4", "--classes", "3,1", *OFFICIAL,
            "--out-npz", tmp_path / "s.npz"]
    assert run(argv, capsys)[0] == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_1"].tolist() == [3, 1, 3, 1]
    status, _, err = run(argv[:-1] + [tmp_path / "t.npz", "--classes", "9"], capsys)
    one_line_error(status, err, "--classes", "unknown class 9")


def test_generate_vae_bad_input(folders, tmp_path, capsys):
    model, vae = folders
    out = ["--out", tmp_path / "g.png", *OFFICIAL]
    cases = []
    cases.append((["--model", tmp_path / "nowhere", "--vae", vae], [str(tmp_path / "nowhere"), "not a folder"]))
    cases.append((["--model", tmp_path, "--vae", vae], [os.path.join(str(tmp_path), "config.json"), "missing"]))
    no_weights = shutil.copytree(model, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "pytorch_model.bin"))
    cases.append((["--model", no_weights, "--vae", vae], [str(no_weights), "no weights"]))
    wider = shutil.copytree(model, tmp_path / "wider")
    config = json.loads(open(os.path.join(wider, "config.json")).read())
    config["hidden_size"] *= 2
    config["intermediate_size"] *= 2
    open(os.path.join(wider, "config.json"), "w").write(json.dumps(config))
    cases.append((["--model", wider, "--vae", vae], [os.path.join(str(wider), "pytorch_model.bin"), "shape mismatch"]))
    _, vae32 = make_folders(tmp_path / "other", vq_codes=32)
    cases.append((["--model", model, "--vae", vae32],
                  [os.path.join(vae32, "config.json"), "num_embeddings = 32", "codebook_size = 16"]))
    nan_vae = shutil.copytree(vae, tmp_path / "nan_vae")
    state = torch.load(os.path.join(nan_vae, "pytorch_model.bin"), weights_only=True)
    state["quantize.embedding.weight"][0, 0] = float("nan")
    torch.save(state, os.path.join(nan_vae, "pytorch_model.bin"))
    cases.append((["--model", model, "--vae", nan_vae], ["non-finite", "quantize.embedding.weight"]))
    cases.append((["--model", model, "--vae", vae, "--device", "nonsense"], ["--device"]))
    for argv, needles in cases:
        status, _, err = run(["generate", *argv, *out], capsys)
        one_line_error(status, err, *needles)
    assert not (tmp_path / "g.png").exists()
    status, _, err = run(["generate", "--out-npz", tmp_path / "s.npz"], capsys)
    one_line_error(status, err, "--out-npz", "needs --vae")
    status, _, err = run(["generate", "--vae", vae, "--out", tmp_path / "g.png"], capsys)
    one_line_error(status, err, "needs --model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_rank(rank, world, port, argv):
    """One process of ``torchrun -m sgkernels generate ..``: the environment torchrun sets, then the CLI."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    status = cli.main(argv)
    if status != 0:
        raise SystemExit(status)


@pytest.mark.parametrize("kind", ["npz", "dir"])
def test_generate_vae_two_processes_give_the_images_of_one(folders, tmp_path, kind):
    model, vae = folders
    base = ["generate", "--model", model, "--vae", vae, "--count", "8", "--seed", "2", *OFFICIAL]
    flag = "--out-npz" if kind == "npz" else "--out-dir"
    two, one = str(tmp_path / f"two.{kind}"), str(tmp_path / f"one.{kind}")
    mp.start_processes(_cli_rank, args=(2, _free_port(), base + [flag, two]), nprocs=2, join=True,
                       start_method="fork")
    assert cli.main(base + [flag, one]) == 0
    if kind == "npz":
        with np.load(one) as a, np.load(two) as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    else:
        names = sorted(os.listdir(one))
        assert names == sorted(os.listdir(two)) and len(names) == 8 + 2  # images, labels.txt, run.json
        for n in names:
            assert open(os.path.join(one, n), "rb").read() == open(os.path.join(two, n), "rb").read(), n


def test_batch_seed_and_grid_agree(folders, tmp_path, capsys):
    """``--out`` samples batch j with batch_seed(seed, j), as the sample sets do."""
    model, vae = folders
    pipe = SelfGuidedPipeline.from_pretrained(model, vae, device="cpu")
    first = pipe(torch.tensor([0, 1, 2]), seed=batch_seed(4, 0), output="uint8", **SAMPLING)
    assert run(["generate", "--model", model, "--vae", vae, "--count", "3", "--seed", "4", *OFFICIAL,
                "--out-npz", tmp_path / "s.npz"], capsys)[0] == 0
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], first.numpy())


def test_demo_png_is_labelled_and_its_grids_unchanged(tmp_path, capsys):
    """The demo's picture explains itself (a caption band over each grid), and the grids' pixels are
    the unlabelled grids of the same seed."""
    pytest.importorskip("matplotlib")
    from sgkernels.digits.cli import _grid
    from sgkernels.digits.pipeline import DEFAULTS, DigitsModel, class_balanced_labels
    from sgkernels.digits.plot import captioned

    out = tmp_path / "demo.png"
    status, text, _ = run(["demo", "--out", out, "--num-eval", "4"], capsys)
    assert status == 0 and "wrote" in text
    import matplotlib.image

    png = (matplotlib.image.imread(out)[..., :3] * 255).round().astype(np.uint8)
    dm = DigitsModel.load(None)
    labels = class_balanced_labels(20, dm.num_classes)
    left = _grid(dm.generate(labels, seed=0, steps=DEFAULTS.steps, guidance_scale=DEFAULTS.guidance_scale,
                             choice_temperature=DEFAULTS.choice_temperature), 10)
    band = png.shape[0] - left.shape[0]
    assert band > 0
    assert np.array_equal(png[band:, :left.shape[1]], left)
    assert (png[:band] < 128).any()  # text in the band
    labelled = captioned(left, ["x"])
    assert np.array_equal(labelled[-left.shape[0]:], left)
