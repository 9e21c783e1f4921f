"""Benchmark of ``vq_lookup`` (nearest codebook entry) against faiss and plain PyTorch.

``run(device="cpu", quick=False) -> list[dict]``, one dict per (shape, impl)::

    {"op": "vq_lookup", "shape": "N=4096 K=1024 D=256", "dtype": "float32", "impl": ...,
     "ms": median_ms, "peak_mb": extra_peak_mb_or_None, "gflops": achieved_or_None}

impls: ``sgkernels`` (the registered op), ``faiss IndexFlatL2`` (exact search, k=1; CPU only, when
faiss is importable; the index is built outside the timing), ``torch cdist+argmin`` and
``taming expanded+argmin`` (``||z||^2 + ||e||^2 - 2 z e^T`` then argmin, as in taming-transformers).
``gflops`` counts 2*N*K*D flops. ``peak_mb``: on CUDA the growth of max_memory_allocated; on CPU the
growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs), None if unavailable.

Run ``python benchmarks/bench_vq_lookup.py [--device cuda] [--quick]`` for a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = [(4096, 1024, 256), (4096, 16384, 8), (16384, 8192, 32), (8192, 4096, 64)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(fn, device: str) -> float | None:
    """Extra peak memory of one call of ``fn`` (MB)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _rss_kb("VmRSS")
    fn()
    peak = _rss_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


def _time_all(fns: dict, device: str, repeats: int, warmup: int) -> dict:
    """Median ms of each fn; the impls are interleaved in every round, so load from other processes
    on a shared machine hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _impls(z: torch.Tensor, cb: torch.Tensor, device: str):
    from sgkernels.ops.vq_lookup import vq_lookup

    impls = {"sgkernels": lambda: vq_lookup(z, cb)}
    if device == "cpu":
        try:
            import faiss  # noqa: F401
        except ImportError:
            faiss = None
        if faiss is not None:
            index = faiss.IndexFlatL2(cb.shape[1])
            index.add(cb.numpy())
            zn = z.numpy()
            impls["faiss IndexFlatL2"] = lambda: index.search(zn, 1)
    impls["torch cdist+argmin"] = lambda: torch.cdist(z, cb).argmin(dim=1)

    def taming():
        d = (z * z).sum(1, keepdim=True) + (cb * cb).sum(1) - 2 * (z @ cb.t())
        return d.argmin(dim=1)

    impls["taming expanded+argmin"] = taming
    return impls


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Time every impl on every shape of ``SHAPES``; returns one dict per (shape, impl)."""
    import sgkernels  # noqa: F401  (loads the extension)

    repeats, warmup = (3, 1) if quick else (11, 2)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k, d in SHAPES:
        z = torch.randn(n, d, generator=gen).to(device)
        cb = torch.randn(k, d, generator=gen).to(device)
        flops = 2.0 * n * k * d
        fns = _impls(z, cb, device)
        ms_all = _time_all(fns, device, repeats, warmup)
        for name, fn in fns.items():
            ms = ms_all[name]
            rows.append(
                {
                    "op": "vq_lookup",
                    "shape": f"N={n} K={k} D={d}",
                    "dtype": "float32",
                    "impl": name,
                    "ms": ms,
                    "peak_mb": _peak_mb(fn, device),
                    "gflops": flops / (ms * 1e-3) / 1e9,
                }
            )
    return rows


def _table(rows: list[dict]) -> str:
    base = {(r["shape"], r["impl"]): r["ms"] for r in rows}
    out = [f"{'shape':<22} {'impl':<24} {'ms':>9} {'GFLOP/s':>8} {'peak MB':>8} {'vs sgk':>7}"]
    for r in rows:
        sgk = base.get((r["shape"], "sgkernels"))
        ratio = f"{r['ms'] / sgk:6.2f}x" if sgk else ""
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        out.append(f"{r['shape']:<22} {r['impl']:<24} {r['ms']:9.2f} {r['gflops']:8.1f} {peak:>8} {ratio:>7}")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"SGK_VQ_PATH={os.environ.get('SGK_VQ_PATH', 'auto')}")
    print(_table(run(args.device, args.quick)))
