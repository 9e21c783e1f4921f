"""``sgkernels bench ops`` / ``python -m benchmarks``: every op against the code users run today.

Each module here exposes ``run(device, quick) -> list[dict]``: rows with keys ``op, shape, dtype,
impl, ms, peak_mb`` and optionally ``spread`` (interquartile range / median), ``bytes`` (for
bandwidth) or ``gflops``; the row whose impl is ``"sgkernels"`` is the one the ratios are taken
against. The baselines ("anchors") are in :mod:`sgkernels.bench.anchors`.

:func:`run` runs each op in a fresh Python process (:mod:`sgkernels.bench.ops._worker`; when it runs
more than one), with this process's torch thread count, so an op's numbers do not depend on which ops ran before it. (When
they shared one process, ``self_guided_step`` B=8 N=256 measured 74x in ``make bench-check``, after
3 ops, and 43x in ``python -m benchmarks``, after 8, on the same quiet machine the same day.)
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

from ..machine import roofline

# Module names = op names (``--only``); the order of the table.
OPS = ("amused_step", "cross_entropy", "guided_sample", "head_sample", "linear_cross_entropy", "llada_step",
       "paper_realsize", "remask_lowest_confidence", "sampler", "self_guided_step", "vq_lookup", "vqgan_encode")


def modules(only=None) -> list:
    """The op modules to run (``only``: op names; unknown names raise ValueError)."""
    if only:
        unknown = sorted(set(only) - set(OPS))
        if unknown:
            raise ValueError(f"unknown op {', '.join(unknown)}; expected some of {', '.join(OPS)}")
    return [importlib.import_module(f"{__name__}.{n}") for n in OPS if not only or n in only]


def run(device: str, quick: bool, only=None, progress=None, isolate: bool = True) -> list[dict]:
    """Every selected op's rows; ``progress(name)`` is called before each op. ``isolate``: each op in
    a fresh process (see the module docstring) when more than one is selected (one op runs in this
    process, which no other op has used: ``gpu_suite.sh`` runs one op per process); False runs them
    all in this one. Every row states the thread counts it ran with."""
    rows, mods = [], modules(only)
    for mod in mods:
        name = mod.__name__.rsplit(".", 1)[1]
        if progress is not None:
            progress(name)
        processes = processes_of(mod, device, quick)
        if isolate and (len(mods) > 1 or processes > 1):
            rows += fastest_process([run_isolated(name, device, quick) for _ in range(processes)], mod.BEST_OF) \
                if processes > 1 else run_isolated(name, device, quick)
        else:
            rows += with_threads(mod.run(device, quick))
    return rows


def processes_of(mod, device: str, quick: bool) -> int:
    """How many fresh processes an op's rows are taken from: the module's ``PROCESSES`` on CPU (1 when
    ``quick`` or on CUDA, or when the module sets none)."""
    return 1 if quick or device != "cpu" else int(getattr(mod, "PROCESSES", 1))


def fastest_process(runs: list[list[dict]], impl: str) -> list[dict]:
    """One op's rows from several processes (``runs``, one row list each): for each (shape, dtype), every
    row of the process in which ``impl`` ran fastest, so the ratios still come from one process.
    Each row gains ``processes`` (how many ran) and ``ms_per_process`` (its time in each)."""
    key = lambda r: (r["shape"], r["dtype"])  # noqa: E731
    out = []
    for group in dict.fromkeys(key(r) for r in runs[0]):
        per_run = [{r["impl"]: r for r in rows if key(r) == group} for rows in runs]
        has = [impl in p for p in per_run]
        if any(has) and not all(has):
            raise ValueError(f"{impl!r} ran in some processes and not others for {group}")
        best = min(per_run, key=lambda p: p[impl]["ms"]) if all(has) else per_run[0]
        for name, row in best.items():
            out.append(dict(row, processes=len(runs), ms_per_process=[p[name]["ms"] for p in per_run if name in p]))
    return out


def with_threads(rows: list[dict]) -> list[dict]:
    """``rows`` with the thread counts this process ran them with (vq_lookup sets faiss's equal to torch's)."""
    from ..machine import faiss_threads

    for r in rows:
        r.update(torch_threads=torch.get_num_threads(), faiss_threads=faiss_threads())
    return rows


def run_isolated(name: str, device: str, quick: bool) -> list[dict]:
    """One op's rows from a fresh ``python -m sgkernels.bench.ops._worker`` with this process's
    torch intra-op thread count (its stderr passes through; a failure raises RuntimeError)."""
    fd, out = tempfile.mkstemp(suffix=".json", prefix=f"sgk-bench-{name}-")
    os.close(fd)
    try:
        cmd = [sys.executable, "-m", f"{__name__}._worker", name, device, str(int(quick)),
               str(torch.get_num_threads()), out]
        status = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        if status != 0:
            raise RuntimeError(f"bench op {name} failed in its process (exit status {status}); see the lines above")
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def peaks(rows: list[dict], device: str, quick: bool = False) -> dict:
    """The table's peaks: the measured roofline (:func:`sgkernels.bench.machine.roofline`), each raised
    to the fastest row of ``rows`` if one beat it (``gflops_row`` / ``gbs_row`` name that row)."""
    roof = dict(roofline(device, quick))
    out = dict(roof, gflops_measured=roof["gflops"], gbs_measured=roof["gbs"], gflops_row=None, gbs_row=None)
    for r in rows:
        if r.get("gflops") and r["gflops"] > out["gflops"]:
            out["gflops"], out["gflops_row"] = r["gflops"], f"{r['op']} {r['shape']} {r['impl']}"
        gbs = bandwidth(r)
        if gbs and gbs > out["gbs"]:
            out["gbs"], out["gbs_row"] = gbs, f"{r['op']} {r['shape']} {r['impl']}"
    return out


def bandwidth(row: dict) -> float | None:
    """GB/s of a row that states its ``bytes`` (the sgkernels rows of memory-bound ops)."""
    if row.get("bytes") and row["impl"] == "sgkernels" and row["ms"] > 0:
        return row["bytes"] / (row["ms"] * 1e-3) / 1e9
    return None


def ratios(rows: list[dict]) -> dict:
    """Geometric-mean speed-up of sgkernels per anchor: ``"op vs impl" -> ratio``."""
    ours = {(r["op"], r["shape"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "sgkernels"}
    out: dict[str, list[float]] = {}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"])
        if r["impl"] != "sgkernels" and key in ours:
            out.setdefault(f"{r['op']} vs {r['impl']}", []).append(r["ms"] / ours[key])
    return {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in out.items()}


def table(rows: list[dict], peak: dict) -> str:
    """The markdown table of ``rows`` with speed-ups and % of the (measured) peak, and its footnotes."""
    out = ["| op | shape | dtype | impl | time ms | speed-up of sgkernels | GB/s or GFLOP/s (% of peak) | "
           "peak extra MB | spread |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    ours = {(r["op"], r["shape"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "sgkernels"}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"])
        speedup, rate = "", ""
        if r.get("gflops"):
            rate = f"{r['gflops']:.0f} GFLOP/s ({100 * r['gflops'] / peak['gflops']:.0f}%)"
        gbs = bandwidth(r)
        if gbs:
            rate = f"{gbs:.0f} GB/s ({100 * gbs / peak['gbs']:.0f}%)"
        if r["impl"] != "sgkernels" and key in ours:
            speedup = f"{r['ms'] / ours[key]:.1f}x"
        mem = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        spread = "" if r.get("spread") is None else f"{100 * r['spread']:.0f}%"
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {speedup} | {rate} | "
                   f"{mem} | {spread} |")
    out.append("")
    out.append(f"Peaks measured on this device at the start of the run: {peak['gflops_measured']:.0f} GFLOP/s "
               f"({peak['gemm']}), {peak['gbs_measured']:.0f} GB/s (a {peak['copy_mb']} MB copy, read + write).")
    for kind, unit in (("gflops", "GFLOP/s"), ("gbs", "GB/s")):
        if peak[f"{kind}_row"]:
            out.append(f"The {unit} peak is the faster row {peak[f'{kind}_row']}: {peak[kind]:.0f} {unit}.")
    threads = sorted({(r["op"], r.get("torch_threads"), r.get("faiss_threads")) for r in rows
                      if r.get("torch_threads") is not None})
    if threads:
        out.append("Threads per op: " + "; ".join(
            f"{op}: torch {t}" + (f", faiss OpenMP {f}" if f is not None else "") for op, t, f in threads) + ".")
    out.append("Spread: interquartile range / median of the timed blocks. Geometric-mean speed-up per anchor: "
               + "; ".join(f"{k}: {v:.1f}x" for k, v in ratios(rows).items()))
    return "\n".join(out)
