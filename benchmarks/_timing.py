"""Timing and memory measurement shared by the benchmarks."""
from __future__ import annotations

import ctypes
import statistics
import time

import torch


def _mmap_threshold(nbytes: int) -> None:
    """Set glibc's M_MMAP_THRESHOLD: blocks above it are mmapped, and unmapped on free.

    The peak-RSS measurement sets it low, so every big tensor shows up as fresh RSS (by default
    freed blocks stay resident and the CPU peak would read ~0); timing runs set it high, as glibc's
    own steady state, since mmapping every tensor would slow the eager baselines several-fold.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except (OSError, AttributeError):
        pass


_MMAP_FOR_PEAK, _MMAP_FOR_TIMING = 1 << 20, 32 << 20
_mmap_threshold(_MMAP_FOR_TIMING)

# HBM bandwidth of the devices we are lent, bytes/s (vendor datasheets).
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, *, repeats: int = 10, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` runs.

    CUDA runs are timed with CUDA events around each call.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def median_ms_interleaved(fns: dict, device: str, *, repeats: int = 10, warmup: int = 2) -> dict:
    """Median ms of each of several ``fns`` (name -> callable), interleaved in every round, so load
    from other processes on a shared machine hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_mb(fn, device: str) -> float | None:
    """Extra peak memory of one ``fn()`` call, in MB (CUDA: allocator peak; CPU: peak RSS growth)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _mmap_threshold(_MMAP_FOR_PEAK)
    try:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (Linux)
        except OSError:
            return None
        base = _rss_kb("VmRSS:")
        fn()
        return max(0, _rss_kb("VmHWM:") - base) / 1024
    finally:
        _mmap_threshold(_MMAP_FOR_TIMING)


def peak_bandwidth(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value
    return None


def compute_peak_gflops(device: str) -> float:
    """fp32 FLOP/s reference point: a measured 2048^3 sgemm (torch.mm, MKL/cuBLAS), in GFLOP/s.

    Used as the "peak" of compute-bound rows. It is what BLAS reaches on this device, not the
    datasheet FMA peak, so a kernel can exceed 100% only by beating BLAS's own efficiency.
    """
    n = 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    ms = median_ms(lambda: torch.mm(a, b), device, repeats=5, warmup=2)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def measure(fn, device: str, quick: bool, **row) -> dict:
    """One result row: median ms and peak extra memory of ``fn``."""
    repeats = 3 if quick else 10
    row["ms"] = median_ms(fn, device, repeats=repeats, warmup=1 if quick else 3)
    row["peak_mb"] = peak_mb(fn, device)
    return row


def measure_interleaved(impls: list[tuple], device: str, quick: bool, **common) -> list[dict]:
    """Rows of several implementations of one op, timed interleaved (:func:`median_ms_interleaved`).

    ``impls``: ``(fn, row)`` pairs, ``row`` the keys of that implementation's row (``impl=...``);
    ``common``: the keys every row shares. Peak memory is measured after the timings, one call each.
    """
    fns = {i: fn for i, (fn, _) in enumerate(impls)}
    ms = median_ms_interleaved(fns, device, repeats=3 if quick else 10, warmup=1 if quick else 3)
    return [dict(common, **row, ms=ms[i], peak_mb=peak_mb(fn, device)) for i, (fn, row) in enumerate(impls)]
