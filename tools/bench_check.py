"""``make bench-check``: rerun the rows the README quotes and compare each ratio with the recorded one.

    python tools/bench_check.py [--device cpu] [--results benchmarks/RESULTS.md] [--tolerance 0.25] [--quick]
    python tools/bench_check.py --table      # the README's performance table, from RESULTS.md

:data:`QUOTED` lists the README's rows: (op, shape, anchor impl) of ``benchmarks/RESULTS.md``'s CPU
(or GPU) section, each quoted as the speed-up anchor time / sgkernels time. The check reruns those
ops (:mod:`sgkernels.bench.ops`, the rows ``python -m benchmarks`` writes) in this process, prints
every quoted row with the recorded ratio and today's, and exits 1 when a ratio moved by more than
``--tolerance`` (relative) or when a row or its anchor is missing, recorded or today. Run it on a
quiet machine: load from other processes moves the ratios of short ops. ``--table`` renders the
README's table from RESULTS.md, so that the README's numbers are RESULTS.md's, not typed by hand.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")

# The README's performance table: (op, shape, anchor impl), per section of RESULTS.md.
QUOTED = {
    "CPU": [
        ("self_guided_step", "B=8 N=256 V=1024", "open-muse eager step"),
        ("self_guided_step", "B=8 N=256 V=1024", "torch.compile(open-muse step)"),
        ("self_guided_step", "B=8 N=1024 V=1024", "open-muse eager step"),
        ("self_guided_step", "B=2 N=1024 V=8192", "open-muse eager step"),
        ("llada_step", "B=1 L=256 V=126464 cfg", "LLaDA step (float64 softmax, before 2025-06-02)"),
        ("AmusedScheduler.step", "B=4 16x16 codebook=8192 CFG", "diffusers blend + AmusedScheduler.step"),
        ("SelfGuidedSampler", "d=128 L=2 B=8 N=256 T=8 guided", "official-style loop (eager step)"),
    ],
    "GPU": [],
}
# The op module (sgkernels.bench.ops) that writes each op's rows.
MODULE = {"self_guided_step": "self_guided_step", "llada_step": "llada_step", "AmusedScheduler.step": "amused_step",
          "SelfGuidedSampler": "sampler", "vq_lookup": "vq_lookup", "guided_sample": "guided_sample",
          "remask_lowest_confidence": "remask_lowest_confidence", "cross_entropy fwd+bwd": "cross_entropy",
          "head_sample": "head_sample", "linear_cross_entropy fwd+bwd": "linear_cross_entropy",
          "confidence_aware_loss fwd+bwd": "linear_cross_entropy", "fast_dllm_threshold_step": "llada_step",
          "dream_step": "llada_step", "vqgan_quantize": "vqgan_encode", "vqgan_encode": "vqgan_encode"}


def parse_section(text: str, title: str) -> list[dict]:
    """The table rows of the ``## title`` section of a RESULTS.md: dicts with op, shape, dtype, impl, ms."""
    m = re.search(r"^## " + re.escape(title) + r"\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    rows = []
    for line in (m.group(1) if m else "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or cells[0] in ("op", "") or set(cells[0]) <= {"-"}:
            continue
        try:
            ms = float(cells[4])
        except ValueError:
            continue
        rows.append(dict(op=cells[0], shape=cells[1], dtype=cells[2], impl=cells[3], ms=ms))
    return rows


def ratio(rows: list[dict], op: str, shape: str, impl: str):
    """anchor ms / sgkernels ms of (op, shape), or None when either row is missing."""
    found = {r["impl"]: r["ms"] for r in rows if r["op"] == op and r["shape"] == shape}
    if impl not in found or "sgkernels" not in found or found["sgkernels"] <= 0:
        return None
    return found[impl] / found["sgkernels"]


def compare(recorded: list[dict], today: list[dict], quoted, tolerance: float) -> tuple[list[dict], bool]:
    """One result per quoted row: recorded and today's ratio, the relative change, and whether it passes."""
    out, ok = [], True
    for op, shape, impl in quoted:
        r0, r1 = ratio(recorded, op, shape, impl), ratio(today, op, shape, impl)
        if r0 is None or r1 is None:
            status = "missing " + " and ".join(w for w, r in (("recorded", r0), ("today", r1)) if r is None)
            change = None
        else:
            change = r1 / r0 - 1
            status = "ok" if abs(change) <= tolerance else f"moved more than {tolerance:.0%}"
        ok &= status == "ok"
        out.append(dict(op=op, shape=shape, anchor=impl, recorded=r0, today=r1, change=change, status=status))
    return out, ok


def render(results: list[dict]) -> str:
    lines = ["| op | shape | anchor | recorded | today | change | |", "|---|---|---|---:|---:|---:|---|"]
    for r in results:
        f = lambda v: "" if v is None else f"{v:.1f}x"  # noqa: E731
        ch = "" if r["change"] is None else f"{100 * r['change']:+.0f}%"
        lines.append(f"| {r['op']} | {r['shape']} | {r['anchor']} | {f(r['recorded'])} | {f(r['today'])} | {ch} | "
                     f"{r['status']} |")
    return "\n".join(lines)


def readme_table(rows: list[dict], quoted) -> str:
    """The README's performance table (op and shape, sgkernels ms, anchor ms, speed-up) from RESULTS.md rows."""
    lines = ["| op, shape | sgkernels | anchor | speed-up |", "|---|---:|---|---:|"]
    for op, shape, impl in quoted:
        found = {r["impl"]: r["ms"] for r in rows if r["op"] == op and r["shape"] == shape}
        if impl not in found or "sgkernels" not in found:
            raise SystemExit(f"bench_check: RESULTS.md has no row {op} {shape} {impl!r} (or its sgkernels row)")
        lines.append(f"| `{op}` {shape} | {found['sgkernels']:.3g} ms | {impl} {found[impl]:.3g} ms | "
                     f"{found[impl] / found['sgkernels']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--tolerance", type=float, default=0.25, help="relative change of a ratio that fails (0.25)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run; noisier)")
    p.add_argument("--table", action="store_true", help="print the README's performance table from RESULTS.md")
    a = p.parse_args(argv)
    title = "GPU" if a.device == "cuda" else "CPU"
    with open(a.results) as f:
        recorded = parse_section(f.read(), title)
    quoted = QUOTED[title]
    if a.table:
        print(readme_table(recorded, quoted))
        return 0
    sys.path.insert(0, ROOT)
    from sgkernels.bench import ops
    from sgkernels.bench.machine import header_lines, machine_info

    only = sorted({MODULE[op] for op, _, _ in quoted})
    print("\n".join(header_lines(machine_info(a.device))), flush=True)
    print(f"rerunning {', '.join(only)} on {a.device} ...", file=sys.stderr, flush=True)
    today = ops.run(a.device, a.quick, only)
    results, ok = compare(recorded, today, quoted, a.tolerance)
    print(render(results))
    print(f"bench-check: {'PASS' if ok else 'FAIL'} ({sum(r['status'] == 'ok' for r in results)}/{len(results)} "
          f"rows within {a.tolerance:.0%} of {os.path.relpath(a.results, ROOT)})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
