"""One op's rows in a fresh process: ``python -m sgkernels.bench.ops._worker NAME DEVICE QUICK THREADS OUT``.

Run by :func:`sgkernels.bench.ops.run_isolated`: sets torch's intra-op threads to ``THREADS`` (the
parent's), runs :mod:`sgkernels.bench.ops`'s module ``NAME`` and writes its rows to ``OUT`` as JSON.
"""
from __future__ import annotations

import importlib
import json
import sys

import torch


def main(argv: list[str]) -> int:
    name, device, quick, threads, out = argv
    torch.set_num_threads(int(threads))
    from sgkernels.bench.ops import with_threads

    rows = with_threads(importlib.import_module(f"sgkernels.bench.ops.{name}").run(device, bool(int(quick))))
    with open(out, "w") as f:
        json.dump(rows, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
