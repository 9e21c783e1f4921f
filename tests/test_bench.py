"""``sgkernels bench`` (sampler, dllm, ops) on tiny local folders, and the measurement code it shares with
``python -m benchmarks`` (sgkernels/bench/). Timings are not checked, only that each subcommand runs, its
JSON has the documented fields, the parts of a step are counted, the greedy agreement is 100 %, a
percentage of peak cannot exceed 100 % and bad input is one error line."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lm_folders import BLOCK_MASK, DREAM_MASK, MLM_MASK, save_tiny_block_lm, save_tiny_dream, save_tiny_mlm
from sgkernels import cli
from sgkernels.bench import dllm, ops, timing
from sgkernels.bench.parts import PartTimer
from test_pipeline import make_folders

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--repeats", "1", "--max-time", "0", "--no-progress"]
MACHINE_KEYS = {"date", "device", "cpu", "cpu_isa", "cpu_cores", "torch_threads", "faiss_threads", "gpu", "gpu_driver",
                "cuda", "python", "torch", "triton", "sgkernels", "env", "load_average"}
ROW_KEYS = {"impl", "batch_size", "median_ms", "q1_ms", "q3_ms", "min_ms", "n", "number", "spread", "peak_mb", "parts",
            "speedup"}


def run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_error(status, err, *needles):
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("sgkernels: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    # transformers caches a folder's modeling code by the folder's name: one name per process (xdist workers)
    return save_tiny_mlm(root / "mlm"), save_tiny_dream(root / f"dream_{os.getpid()}")


@pytest.fixture(scope="module")
def block_lm_dir(tmp_path_factory):
    """The tests' tiny block-causal LM (attention blocks of 8) as a remote-code transformers folder."""
    return save_tiny_block_lm(tmp_path_factory.mktemp("lms") / f"llada2_{os.getpid()}", block_length=8)


# --- measurement --------------------------------------------------------------------------------

def test_autorange_blocks_fast_calls_and_reports_spread():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        torch.ones(1)
        import time
        time.sleep(0.003)

    st = timing.autorange({"fast": fast, "slow": slow}, "cpu", warmup=1, min_repeats=3, max_repeats=3, block_ms=2.0)
    assert st["fast"].number > 1 and st["slow"].number == 1  # a block of fast calls lasts >= block_ms
    assert st["fast"].n == st["slow"].n == 3
    assert st["slow"].median_ms >= 3.0 and st["slow"].q1_ms <= st["slow"].median_ms <= st["slow"].q3_ms
    assert st["slow"].spread >= 0 and st["fast"].median_ms < st["slow"].median_ms


def test_part_timer_counts_outermost_forwards_once():
    inner = torch.nn.Linear(4, 4)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(self.inner(x))

    outer = Outer()
    with PartTimer("cpu") as pt:
        pt.attach(outer, "outer").attach(inner, "inner")
        outer(torch.ones(2, 4))
        inner(torch.ones(2, 4))
        with pt.section("other"):
            pass
    assert dict(pt.calls) == {"outer": 1, "inner": 1, "other": 1}
    outer(torch.ones(2, 4))  # detached on exit
    assert pt.calls["outer"] == 1


def test_percent_of_peak_never_exceeds_100(monkeypatch):
    """A row faster than the measured sgemm / copy raises the peak, and the table says which row did."""
    monkeypatch.setattr(ops, "roofline", lambda device, quick=False: {"gflops": 10.0, "gbs": 5.0, "gemm": "n",
                                                                       "copy_mb": 1})
    rows = [dict(op="x", shape="s", dtype="float32", impl="sgkernels", ms=1.0, peak_mb=0, gflops=40.0),
            dict(op="x", shape="s", dtype="float32", impl="anchor", ms=2.0, peak_mb=0, gflops=20.0),
            dict(op="y", shape="s", dtype="float32", impl="sgkernels", ms=1.0, peak_mb=0, bytes=8e6),
            dict(op="y", shape="s", dtype="float32", impl="anchor", ms=3.0, peak_mb=0)]
    peak = ops.peaks(rows, "cpu")
    assert peak["gflops"] == 40.0 and peak["gbs"] == 8.0 and peak["gflops_measured"] == 10.0
    text = ops.table(rows, peak)
    pcts = [int(p) for p in __import__("re").findall(r"\((\d+)%\)", text)]
    assert pcts == [100, 50, 100]
    assert "The GFLOP/s peak is the faster row x s sgkernels" in text and "| 2.0x |" in text and "| 3.0x |" in text


def test_machine_names_the_gpu_and_driver(monkeypatch):
    """On a CUDA device the JSON and the header carry the GPU's name and the driver (nvidia-smi)."""
    import subprocess
    from types import SimpleNamespace

    from sgkernels.bench import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H100 80GB HBM3")
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return SimpleNamespace(returncode=0, stdout="550.54.15\n550.54.15\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    info = machine.machine_info("cuda:0")
    assert (info["gpu"], info["gpu_driver"], info["device"]) == ("NVIDIA H100 80GB HBM3", "550.54.15", "cuda:0")
    assert seen and seen[0][0] == "nvidia-smi"
    head = machine.header_lines(info)[0]
    assert head.startswith("Device: GPU NVIDIA H100 80GB HBM3 (driver 550.54.15, CUDA ") and "sgkernels " in head
    cpu = machine.machine_info("cpu")
    assert cpu["gpu"] is None and cpu["gpu_driver"] is None and cpu["cpu_isa"] and cpu["torch_threads"] >= 1


def test_op_rows_live_in_the_package():
    """One code path: python -m benchmarks runs sgkernels.bench.ops; a bench_<op>.py left in benchmarks/
    (e.g. from a merge) would not be run by either."""
    assert not [f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.startswith("bench_")]
    here = os.path.dirname(ops.__file__)
    mods = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))
    assert mods == sorted(ops.OPS)


# --- sampler ------------------------------------------------------------------------------------

def test_bench_sampler_official_folders(tmp_path, capsys):
    model, vae = make_folders(tmp_path)
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    status, out, err = run(["bench", "sampler", "--model", model, "--vae", vae, "--batch-sizes", "1,2", "--steps", "2",
                            "--json", js, "--plot", png, *QUICK], capsys)
    assert status == 0, err
    assert out.startswith("Device: CPU") and "| official loop (eager step) | 2 |" in out and "| sgkernels | 2 |" in out
    data = json.loads(js.read_text())
    assert data["command"] == "sampler" and MACHINE_KEYS <= set(data["machine"])
    assert data["settings"]["steps"] == 2 and data["settings"]["batch_sizes"] == [1, 2]
    assert [(r["impl"], r["batch_size"]) for r in data["rows"]] == [
        ("official loop (eager step)", 1), ("sgkernels", 1), ("official loop (eager step)", 2), ("sgkernels", 2)]
    for r in data["rows"]:
        assert ROW_KEYS | {"images_per_s", "steps"} <= set(r)
        assert set(r["parts"]) >= {"backbone", "guide", "sampling", "decode"}
        assert r["parts"]["backbone_calls"] == 2 and r["parts"]["guide_calls"] == 2  # one pass of each per step
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["median_ms"] / 1e3))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_sampler_embedded_digits_model(capsys):
    status, out, err = run(["bench", "sampler", "--batch-sizes", "1", "--steps", "1", "--guidance-scale", "0", *QUICK],
                           capsys)
    assert status == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| sgkernels | 1 |")).split(" | ")
    assert row[6] == "0.00" and float(row[5]) > 0  # no guide pass at guidance 0; backbone ms/step


@pytest.mark.parametrize("argv,needles", [
    (["--batch-sizes", "0"], ["--batch-sizes", "batch sizes >= 1"]),
    (["--batch-sizes", "1,x"], ["--batch-sizes"]),
    (["--model", "/nonexistent/sgk"], ["--model", "is not a folder"]),
    (["--steps", "0"], ["--steps"]),
    (["--plot", "/tmp/x.jpg"], ["--plot", ".png"]),
    (["--json", "/nonexistent/dir/x.json"], ["cannot write"]),
])
def test_bench_sampler_bad_input(argv, needles, capsys):
    status, _, err = run(["bench", "sampler", *argv, *QUICK], capsys)
    one_line_error(status, err, *needles)


def test_bench_sampler_vae_without_codebook_match(tmp_path, capsys):
    model, _ = make_folders(tmp_path)
    _, vae = make_folders(tmp_path / "other", vq_codes=8)
    status, _, err = run(["bench", "sampler", "--model", model, "--vae", vae, *QUICK], capsys)
    one_line_error(status, err, "cannot load")


# --- dllm ---------------------------------------------------------------------------------------

DLLM_FAST = ["--prompt-length", "4", "--gen-length", "8", "--block-length", "4", "--steps", "4", *QUICK]


@pytest.mark.parametrize("pipeline", ["llada", "fast-dllm"])
def test_bench_dllm_llada(lm_dirs, pipeline, tmp_path, capsys):
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    status, out, err = run(["bench", "dllm", "--model", lm_dirs[0], "--pipeline", pipeline, "--mask-id", MLM_MASK,
                            "--batch-sizes", "2", "--json", js, "--plot", png, *DLLM_FAST], capsys)
    assert status == 0, err
    data = json.loads(js.read_text())
    assert data["command"] == "dllm" and MACHINE_KEYS <= set(data["machine"])
    assert data["settings"]["pipeline"] == pipeline and data["settings"]["mask_id"] == MLM_MASK
    assert [r["impl"] for r in data["rows"]] == [
        "LLaDA generate()" if pipeline == "llada" else "Fast-dLLM threshold (no cache)", "sgkernels"]
    for r in data["rows"]:
        assert ROW_KEYS | {"tokens_per_s", "nfe", "greedy_agreement"} <= set(r) and set(r["parts"]) == {"forward",
                                                                                                      "sampling"}
        assert r["greedy_agreement"] == 1.0
        if pipeline == "llada":
            assert r["nfe"] == 4  # one model call per step
        assert r["tokens_per_s"] == pytest.approx(2 * 8 / (r["median_ms"] / 1e3))
    assert "| 100.0% |" in out and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_dllm_progress_bar_on_stderr(lm_dirs, capsys):
    """Without --no-progress: a bar on stderr over the phases (agreement, timing, parts, memory per impl)."""
    argv = [a for a in DLLM_FAST if a != "--no-progress"]
    status, out, err = run(["bench", "dllm", "--model", lm_dirs[0], "--mask-id", MLM_MASK, *argv], capsys)
    assert status == 0, err
    last = err.replace("\r", "\n").strip().splitlines()
    bar = [line for line in last if line.startswith("bench dllm (llada):")]
    assert bar and "5/5" in bar[-1] and "100%" in bar[-1], err
    assert "| sgkernels | 1 |" in out and "bench dllm" not in out  # the table alone on stdout


def test_bench_dllm_dream_remote_code(lm_dirs, capsys):
    status, out, err = run(["bench", "dllm", "--model", lm_dirs[1], "--pipeline", "dream", "--trust-remote-code",
                            *DLLM_FAST], capsys)
    assert status == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| Dream _sample") or line.startswith("| sgkernels")]
    assert len(rows) == 2 and all(r.rstrip().endswith("| 100.0% |") for r in rows)
    assert all("| 4 |" in r for r in rows)  # NFE = steps, mask id from the config


def test_bench_dllm_llada2_stock_pipeline_against_fused(block_lm_dir, tmp_path, capsys):
    """diffusers' LLaDA2Pipeline against FusedLLaDA2Pipeline, with and without the prefix cache, on a
    block-causal transformers folder (remote code; its auto_map's AutoModel is the base model without a
    head, so the LM class must be the one loaded): greedy agreement 100 % for all three."""
    js, png = tmp_path / "l2.json", tmp_path / "l2.png"
    status, out, err = run(["bench", "dllm", "--model", block_lm_dir, "--pipeline", "llada2", "--trust-remote-code",
                            "--prefix-cache", "--prompt-length", "4", "--gen-length", "16", "--block-length", "8",
                            "--steps", "4", "--batch-sizes", "2", "--json", js, "--plot", png, *QUICK], capsys)
    assert status == 0, err
    data = json.loads(js.read_text())
    st = data["settings"]
    assert (st["pipeline"], st["mask_id"], st["steps"], st["block_length"]) == ("llada2", BLOCK_MASK, 4, 8)
    assert (st["threshold"], st["editing_threshold"], st["prefix_cache"]) == (0.7, 0.5, True)  # the pipeline's
    assert [r["impl"] for r in data["rows"]] == ["diffusers LLaDA2Pipeline", "sgkernels", "sgkernels + prefix cache"]
    for r in data["rows"]:
        assert ROW_KEYS | {"tokens_per_s", "nfe", "greedy_agreement"} <= set(r)
        assert r["greedy_agreement"] == 1.0 and r["nfe"] >= 4 and set(r["parts"]) == {"forward", "sampling"}
        assert r["parts"]["forward"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] / 1e3))
    stock, fused, cached = data["rows"]
    assert stock["speedup"] == 1.0 and fused["nfe"] == stock["nfe"]  # same steps
    assert cached["nfe"] > stock["nfe"]  # + one encoding of each finished block
    assert out.count("| 100.0% |") == 3 and png.read_bytes()[:4] == b"\x89PNG"


def _remote_code_folder(path, model_type, source):
    """A BertForMaskedLM folder whose config also has an auto_map to ``source`` (written beside it)."""
    save_tiny_mlm(path)
    (path / "modeling_custom.py").write_text(source)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                "AutoModelForMaskedLM": "modeling_custom.CustomMLM"})
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


CUSTOM_MLM = """
from transformers import BertConfig, BertForMaskedLM


class CustomConfig(BertConfig):
    model_type = "sgk_custom_bert"


class CustomMLM(BertForMaskedLM):
    config_class = CustomConfig
"""


def test_bench_dllm_trust_remote_code_as_from_pretrained(tmp_path, capsys):
    """As AutoModel.from_pretrained(folder): an auto_map for a model_type transformers has runs transformers'
    class without the flag (its code only with it); for one it has not, transformers would ask or refuse: one
    error line naming --trust-remote-code; a folder without auto_map needs no flag."""
    known = _remote_code_folder(tmp_path / f"known_{os.getpid()}", "bert", CUSTOM_MLM)
    assert type(dllm.load_lm(known, device="cpu")).__name__ == "BertForMaskedLM"
    assert type(dllm.load_lm(known, device="cpu", trust_remote_code=True)).__name__ == "CustomMLM"
    plain = save_tiny_mlm(tmp_path / "plain")
    assert type(dllm.load_lm(plain, device="cpu")).__name__ == "BertForMaskedLM"
    unknown = _remote_code_folder(tmp_path / f"unknown_{os.getpid()}", "sgk_custom_bert", CUSTOM_MLM)
    capsys.readouterr()  # transformers' bars and warnings of the loads above
    status, _, err = run(["bench", "dllm", "--model", unknown, "--mask-id", MLM_MASK, *DLLM_FAST], capsys)
    one_line_error(status, err, "pass --trust-remote-code", "sgk_custom_bert")
    broken = _remote_code_folder(tmp_path / f"broken_{os.getpid()}", "sgk_custom_bert",
                                 "import sgk_no_such_package\n" + CUSTOM_MLM)
    capsys.readouterr()
    status, _, err = run(["bench", "dllm", "--model", broken, "--mask-id", MLM_MASK, "--trust-remote-code",
                          *DLLM_FAST], capsys)
    ours = "\n".join(line for line in err.splitlines() if not line.startswith("[transformers]"))  # its own log line
    one_line_error(status, ours, "cannot load", "sgk_no_such_package")


@pytest.mark.parametrize("argv,needles", [
    (["--model", "/nonexistent/sgk", "--mask-id", "1"], ["--model", "not a folder"]),
    (["--model", "{mlm}", "--mask-id", str(MLM_MASK), "--prefix-cache"], ["--prefix-cache", "llada2"]),
    (["--model", "{mlm}", "--mask-id", str(MLM_MASK), "--threshold", "0.5"], ["--threshold", "fast-dllm"]),
    (["--model", "{mlm}", "--mask-id", str(MLM_MASK), "--pipeline", "llada2", "--prefix-cache"],
     ["does not fit --pipeline llada2", "past_key_values"]),
    (["--model", "{block}", "--pipeline", "llada2"], ["--trust-remote-code"]),
    (["--model", "{mlm}", "--mask-id", str(MLM_MASK), "--batch-sizes", "0"], ["--batch-sizes"]),
    (["--model", "{mlm}"], ["--mask-id", "no mask_token_id"]),
    (["--model", "{mlm}", "--mask-id", "64"], ["--mask-id", "outside the model's vocabulary"]),
    (["--model", "{dream}"], ["--trust-remote-code"]),
    (["--model", "{mlm}", "--mask-id", str(MLM_MASK), "--pipeline", "dream"], ["does not fit --pipeline dream"]),
    (["--model", "{mlm}", "--mask-id", str(MLM_MASK), "--block-length", "3"], ["does not fit", "block_length"]),
    (["--model", "{root}", "--mask-id", "1"], ["no config.json"]),
])
def test_bench_dllm_bad_input(lm_dirs, block_lm_dir, argv, needles, capsys):
    names = dict(mlm=lm_dirs[0], dream=lm_dirs[1], root=os.path.dirname(lm_dirs[0]), block=block_lm_dir)
    argv = [a.format(**names) for a in argv]
    status, _, err = run(["bench", "dllm", *DLLM_FAST, *argv], capsys)
    one_line_error(status, err, *needles)
    assert DREAM_MASK  # the Dream folder's mask id comes from its config (test_bench_dllm_dream_remote_code)


# --- ops ----------------------------------------------------------------------------------------

def test_bench_ops_smoke(tmp_path, capsys):
    """The installed command's op rows (one small op, quick) with the roofline in the JSON."""
    js, png = tmp_path / "o.json", tmp_path / "o.png"
    status, out, err = run(["bench", "ops", "--device", "cpu", "--quick", "--only", "remask_lowest_confidence",
                            "--json", js, "--plot", png, "--no-progress"], capsys)
    assert status == 0, err
    assert "| remask_lowest_confidence | B=8 N=256 | float32 | eager Gumbel+sort |" in out
    assert "Peaks measured on this device at the start of the run" in out and "environment:" in out
    data = json.loads(js.read_text())
    assert data["command"] == "ops" and {"gflops", "gbs", "gflops_measured", "gbs_measured"} <= set(data["roofline"])
    assert {r["impl"] for r in data["rows"]} == {"sgkernels", "eager Gumbel+sort"}
    assert all({"op", "shape", "dtype", "impl", "ms", "spread", "peak_mb"} <= set(r) for r in data["rows"])
    # the threads each op ran with, stated below the table
    assert {r["torch_threads"] for r in data["rows"]} == {torch.get_num_threads()}
    assert f"Threads per op: remask_lowest_confidence: torch {torch.get_num_threads()}." in out
    assert png.read_bytes()[:4] == b"\x89PNG"


# --- make bench-check ---------------------------------------------------------------------------

def _bench_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_check", os.path.join(ROOT, "tools", "bench_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RESULTS_MD = """# Benchmark results

## CPU

Device: ...

| op | shape | dtype | impl | time ms | speed-up of sgkernels | GB/s or GFLOP/s (% of peak) | peak extra MB |
|---|---|---|---|---:|---:|---:|---:|
| a | s1 | float32 | sgkernels | 1.000 |  |  | 0 |
| a | s1 | float32 | eager | 10.000 | 10.0x |  | 0 |
| b | s2 | float32 | sgkernels | 2.000 |  |  | 0 |
| b | s2 | float32 | old anchor name | 8.000 | 4.0x |  | 0 |

## GPU

| a | s1 | float32 | sgkernels | 9.000 |  |  | 0 |
"""


def test_bench_check_compares_quoted_ratios():
    bc = _bench_check()
    recorded = bc.parse_section(RESULTS_MD, "CPU")
    assert [(r["op"], r["impl"], r["ms"]) for r in recorded][:2] == [("a", "sgkernels", 1.0), ("a", "eager", 10.0)]
    today = [dict(op="a", shape="s1", impl="sgkernels", ms=1.0), dict(op="a", shape="s1", impl="eager", ms=12.4),
             dict(op="b", shape="s2", impl="sgkernels", ms=1.0), dict(op="b", shape="s2", impl="new anchor", ms=5.0)]
    quoted = [("a", "s1", "eager"), ("b", "s2", "old anchor name")]
    results, ok = bc.compare(recorded, today, quoted, 0.25)
    assert ok is False and results[0]["status"] == "ok" and results[0]["change"] == pytest.approx(0.24)
    assert results[1]["status"] == "missing today"  # the anchor was renamed: the README quotes a row that is gone
    today[1]["ms"] = 13.0
    results, ok = bc.compare(recorded, today, quoted[:1], 0.25)
    assert not ok and results[0]["status"] == "moved more than 25%"
    assert "| a | s1 | eager | 10.0x | 13.0x | +30% | moved more than 25% | 1 / 10 | 1 / 13 |" in bc.render(results)
    assert bc.readme_table(recorded, quoted).splitlines()[2] == "| `a` s1 | 1 ms | eager 10 ms | 10.0x |"


def test_bench_check_quoted_rows_name_known_ops():
    bc = _bench_check()
    assert all(op in bc.MODULE and bc.MODULE[op] in ops.OPS for rows in bc.QUOTED.values() for op, _, _ in rows)


def test_ops_run_each_op_in_its_own_process(monkeypatch):
    """Several ops: each in a fresh process with this process's threads; one op: in this process."""
    calls = []
    monkeypatch.setattr(ops, "run_isolated", lambda name, device, quick: calls.append(name) or [dict(op=name)])
    monkeypatch.setattr(ops.modules(["remask_lowest_confidence"])[0], "run", lambda device, quick: [dict(op="here")])
    assert ops.run("cpu", True, ["remask_lowest_confidence", "guided_sample"]) == [dict(op="guided_sample"),
                                                                                 dict(op="remask_lowest_confidence")]
    assert calls == ["guided_sample", "remask_lowest_confidence"]
    assert [r["op"] for r in ops.run("cpu", True, ["remask_lowest_confidence"])] == ["here"] and len(calls) == 2


def test_op_with_processes_takes_each_shape_from_the_anchors_fastest_process(monkeypatch):
    """vq_lookup on CPU: PROCESSES fresh processes; per shape, every row of the process where faiss ran
    fastest (so a ratio never mixes processes), each row stating all the processes' times."""
    vq = ops.modules(["vq_lookup"])[0]
    monkeypatch.setattr(vq, "PROCESSES", 3)
    faiss_ms = iter([(20.0, 50.0), (12.0, 70.0), (13.0, 52.0)])  # per process: shape s1, shape s2

    def fake(name, device, quick):
        a, b = next(faiss_ms)
        return [dict(op=name, shape=s, dtype="float32", impl=i, ms=ms) for s, f in (("s1", a), ("s2", b))
                for i, ms in (("sgkernels", 10.0 + f / 100), (vq.BEST_OF, f))]

    monkeypatch.setattr(ops, "run_isolated", fake)
    rows = {(r["shape"], r["impl"]): r for r in ops.run("cpu", False, ["vq_lookup"])}
    assert rows[("s1", vq.BEST_OF)]["ms"] == 12.0 and rows[("s1", "sgkernels")]["ms"] == 10.12
    assert rows[("s2", vq.BEST_OF)]["ms"] == 50.0 and rows[("s2", "sgkernels")]["ms"] == 10.5
    assert rows[("s1", vq.BEST_OF)]["ms_per_process"] == [20.0, 12.0, 13.0] and rows[("s2", "sgkernels")]["processes"] == 3
    assert ops.processes_of(vq, "cpu", quick=True) == 1 and ops.processes_of(vq, "cuda", quick=False) == 1
    with pytest.raises(ValueError, match="some processes and not others"):
        ops.fastest_process([[dict(shape="s", dtype="f", impl="a", ms=1.0)],
                             [dict(shape="s", dtype="f", impl="b", ms=1.0)]], "b")


def test_readme_performance_table_is_generated_from_results():
    """README's and docs/performance.md's numbers are RESULTS.md's: the block under the marker is what
    --write-readme writes."""
    bc = _bench_check()
    with open(bc.RESULTS) as f:
        results = f.read()
    for path, rows in bc.pages("CPU"):
        with open(path) as f:
            page = f.read()
        block = bc.readme_block(results, "CPU", rows)
        assert bc.readme_with_block(page, block) == page, f"{path}: run python tools/bench_check.py --write-readme"


def test_readme_block_replaces_only_the_generated_lines():
    bc = _bench_check()
    text = RESULTS_MD.replace("Device: ...", "Device: CPU X, 2 cores, 2 threads, avx2; torch 2.1, triton 3, sgkernels 0.1; "
                              "2026-01-02\nthreads: torch intra-op 2; environment: none set; load average (1/5/15 min, "
                              "at the end of the run): 0.10/0.20/0.30")
    block = bc.readme_block(text, "CPU", [("a", "s1", "eager")])
    assert block.splitlines()[0].startswith("Measured by `python -m benchmarks` on 2026-01-02: CPU X, 2 cores")
    assert "load average 0.10/0.20/0.30 (1/5/15 min, at the end of the run)" in block.splitlines()[0]
    readme = "\n".join(["# t", bc.MARKER, "old caption", "", "| old |", "|---|", "", "## Next", "text"])
    new = bc.readme_with_block(readme, block)
    assert new.split("\n")[:2] == ["# t", bc.MARKER] and new.endswith("\n\n## Next\ntext")
    assert "old" not in new and "| `a` s1 | 1 ms | eager 10 ms | 10.0x |" in new
    assert bc.readme_with_block(new, block) == new
    with pytest.raises(SystemExit, match="marker"):
        bc.readme_with_block("# no marker\n", block)


# The ops whose rows this test builds with real inputs (paper_realsize writes 270 M parameters of folders:
# its own tests use a small config; head_sample and vqgan_encode build models of seconds).
INTERLEAVE_CHECKED = ("amused_step", "cross_entropy", "guided_sample", "llada_step", "remask_lowest_confidence",
                      "sampler", "self_guided_step", "vq_lookup")


@pytest.mark.parametrize("name", INTERLEAVE_CHECKED)
def test_op_rows_time_their_implementations_interleaved(name, monkeypatch):
    """Every (op, shape, dtype) row group comes from one autorange over all its implementations (rounds
    interleaved: load hits them alike), never from a separate timing of each."""
    calls = []

    def fake_autorange(fns, device, **kw):
        calls.append(len(fns))
        return {k: timing.Stats(1.0, 1.0, 1.0, 1.0, 1) for k in fns}

    monkeypatch.setattr(timing, "autorange", fake_autorange)
    monkeypatch.setattr(timing, "peak_mb", lambda fn, device: None)
    (mod,) = ops.modules([name])
    rows = mod.run("cpu", True)
    if not rows:
        pytest.skip(f"{name}: nothing to time here (an optional package is missing)")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), set()).add(r["impl"])
    assert all("sgkernels" in impls and len(impls) >= 2 for impls in groups.values()), groups
    assert sorted(calls) == sorted(len(impls) for impls in groups.values())


def test_benchmarks_only_writes_results_md_only_when_asked(tmp_path, monkeypatch, capsys):
    """``python -m benchmarks --only OP`` prints its rows and leaves RESULTS.md alone (a section is one
    full run); with ``--out FILE`` it writes FILE."""
    import importlib

    monkeypatch.syspath_prepend(ROOT)
    main = importlib.import_module("benchmarks.__main__")
    rows = [dict(op="remask_lowest_confidence", shape="s", dtype="float32", impl=i, ms=m, peak_mb=0)
            for i, m in (("sgkernels", 1.0), ("eager Gumbel+sort", 2.0))]
    monkeypatch.setattr(ops, "run", lambda *a, **k: rows)
    monkeypatch.setattr(ops, "peaks", lambda rows, device, quick=False: dict(
        gflops=100.0, gbs=10.0, gflops_measured=100.0, gbs_measured=10.0, gemm="x", copy_mb=1, gflops_row=None,
        gbs_row=None))
    written = []
    monkeypatch.setattr(main, "write_results", lambda path, device, text: written.append(path))
    assert main.main(["--device", "cpu", "--only", "remask_lowest_confidence"]) == 0
    out = capsys.readouterr()
    assert written == [] and "| remask_lowest_confidence | s | float32 | eager Gumbel+sort | 2.000 | 2.0x |" in out.out
    assert "not writing benchmarks/RESULTS.md" in out.err
    assert main.main(["--device", "cpu", "--only", "remask_lowest_confidence", "--out", str(tmp_path / "r.md")]) == 0
    assert written == [str(tmp_path / "r.md")]
    assert main.main(["--device", "cpu"]) == 0 and written[-1] == os.path.join(ROOT, "benchmarks", "RESULTS.md")
