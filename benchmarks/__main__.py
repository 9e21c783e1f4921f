"""``python -m benchmarks [--device cpu|cuda] [--quick] [--only OP ...] [--out FILE]``.

Runs every ``bench_<op>.py`` in this folder in one process, prints one table, and rewrites this
device's section of ``benchmarks/RESULTS.md`` (the other device's section is kept).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import pkgutil
import platform
import re
import sys

import torch

from ._timing import compute_peak_gflops, peak_bandwidth

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_modules(only: list[str] | None):
    names = sorted(m.name for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))
    if only:
        names = [n for n in names if n[len("bench_"):] in only]
    return [importlib.import_module(f"benchmarks.{n}") for n in names]


def device_line(device: str) -> str:
    import sgkernels

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    if device == "cpu":
        from sgkernels.info import cpu_isa

        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {cpu_isa()}"
    else:
        name = torch.cuda.get_device_name()
    return (f"{name}; torch {torch.__version__}, triton {tv}, sgkernels {sgkernels.__version__}; "
            f"{datetime.date.today().isoformat()}")


def table(rows: list[dict], device: str) -> str:
    peak = peak_bandwidth(device)
    gemm_peak = compute_peak_gflops(device) if any(r.get("gflops") for r in rows) else None
    out = ["| op | shape | dtype | impl | time ms | speed-up of sgkernels | GB/s or GFLOP/s (% of peak) | peak extra MB |",
           "|---|---|---|---|---:|---:|---:|---:|"]
    ours = {(r["op"], r["shape"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "sgkernels"}
    ratios: dict[str, list[float]] = {}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"])
        speedup, bw = "", ""
        if r.get("gflops"):
            bw = f"{r['gflops']:.0f} GFLOP/s ({100 * r['gflops'] / gemm_peak:.0f}%)"
        if r["impl"] == "sgkernels":
            if r.get("bytes") and device != "cpu":
                gbs = r["bytes"] / (r["ms"] * 1e-3) / 1e9
                bw = f"{gbs:.0f}" + (f" ({100 * gbs * 1e9 / peak:.0f}%)" if peak else "")
        elif key in ours:
            ratio = r["ms"] / ours[key]
            speedup = f"{ratio:.1f}x"
            ratios.setdefault(f"{r['op']} vs {r['impl']}", []).append(ratio)
        mem = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {speedup} | {bw} | {mem} |")
    out.append("")
    if gemm_peak:
        out.append(f"GFLOP/s peak reference: a 2048^3 fp32 torch.mm on this device, {gemm_peak:.0f} GFLOP/s.")
    if peak:
        out.append(f"Bandwidth peak reference: {peak / 1e12:.2f} TB/s (datasheet HBM bandwidth of this GPU).")
    out.append("Geometric-mean speed-up per anchor: " + "; ".join(
        f"{k}: {math.exp(sum(map(math.log, v)) / len(v)):.1f}x" for k, v in ratios.items()))
    return "\n".join(out)


def write_results(path: str, device: str, text: str) -> None:
    """Replace the CPU or GPU section of ``path``; every other ``## `` section is kept as it is."""
    title = "GPU" if device != "cpu" else "CPU"
    sections = {"CPU": "", "GPU": ""}
    if os.path.exists(path):
        old = open(path).read()
        for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", old, flags=re.S | re.M):
            sections[m.group(1).strip()] = m.group(2).strip()
    sections[title] = text
    body = ["# Benchmark results", "",
            "The CPU and GPU sections are written by `python -m benchmarks`; other sections are kept as they are.",
            "Times are medians after warm-up; speed-up = anchor time / sgkernels time, measured in the same process.", ""]
    for name, content in sections.items():
        body += [f"## {name}", "", content or "_not run yet on this kind of device_", ""]
    with open(path, "w") as f:
        f.write("\n".join(body))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke runs)")
    parser.add_argument("--only", nargs="*", help="op names, e.g. self_guided_step vq_lookup")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="markdown results file ('' to skip)")
    args = parser.parse_args(argv)
    rows = []
    for mod in bench_modules(args.only):
        print(f"running {mod.__name__} on {args.device} ...", file=sys.stderr, flush=True)
        rows += mod.run(args.device, args.quick)
    text = f"Device: {device_line(args.device)}\n\n" + table(rows, args.device)
    print(text)
    if args.out:
        write_results(args.out, args.device, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
