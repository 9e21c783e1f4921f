"""``python -m benchmarks [--device cpu|cuda] [--quick] [--only OP ...] [--out FILE]``.

Runs every op of :mod:`sgkernels.bench.ops` (the rows ``sgkernels bench ops`` prints: one code path;
each op in a fresh process), prints one table, and rewrites this device's section of
``benchmarks/RESULTS.md`` (the other device's section is kept). With ``--only`` nothing is written
unless ``--out`` names a file: a section of RESULTS.md is one full run, from one day and one machine.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from sgkernels.bench import ops
from sgkernels.bench.machine import header_lines, machine_info

HERE = os.path.dirname(os.path.abspath(__file__))


def report(rows: list[dict], device: str, quick: bool = False) -> str:
    """The header (machine, threads, env vars) and the table, as ``sgkernels bench ops`` prints them."""
    return "\n".join(header_lines(machine_info(device))) + "\n\n" + ops.table(rows, ops.peaks(rows, device, quick))


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
            "Times are medians after warm-up (spread: interquartile range / median); speed-up = anchor time / "
            "sgkernels time, measured in the same process.", ""]
    for name, content in sections.items():
        body += [f"## {name}", "", content or "_not run yet on this kind of device_", ""]
    with open(path, "w") as f:
        f.write("\n".join(body))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke runs)")
    parser.add_argument("--only", nargs="*", choices=ops.OPS, metavar="OP", help="op names: " + ", ".join(ops.OPS))
    parser.add_argument("--out", default=None, help="markdown results file ('' to skip; default: benchmarks/RESULTS.md "
                        "for a full run, nothing with --only: a partial run would replace the whole section)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = "" if args.only else os.path.join(HERE, "RESULTS.md")
        if args.only:
            print("not writing benchmarks/RESULTS.md: its section is one full run (pass --out FILE to write this one)",
                  file=sys.stderr)
    ops.peaks([], args.device, args.quick)  # the roofline, measured before the rows
    rows = ops.run(args.device, args.quick, args.only,
                   progress=lambda op: print(f"running {op} on {args.device} ...", file=sys.stderr, flush=True))
    text = report(rows, args.device, args.quick)
    print(text)
    if args.out:
        write_results(args.out, args.device, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
