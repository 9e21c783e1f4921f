"""Timing and memory measurement: one code path for ``sgkernels bench`` and ``python -m benchmarks``.

* :class:`Timer`: one timed block with the device synchronised (CUDA events on a GPU);
* :func:`autorange`: warm-up, then blocks of calls timed interleaved across implementations until
  the timings are stable (median and interquartile range, :class:`Stats`);
* :func:`peak_mb`: the extra peak memory of one call (CUDA allocator peak; CPU peak RSS growth).
"""
from __future__ import annotations

import ctypes
import dataclasses
import statistics
import time

import torch


def _mmap_threshold(nbytes: int) -> None:
    """Set glibc's M_MMAP_THRESHOLD (blocks above it are mmapped, and unmapped on free) and, as
    glibc's own dynamic rule does, M_TRIM_THRESHOLD to twice that.

    The peak-RSS measurement sets it low, so every big tensor shows up as fresh RSS (by default
    freed blocks stay resident and the CPU peak would read ~0); timing runs set it high, as glibc's
    own steady state, since mmapping every tensor would slow the eager baselines several-fold.
    Setting M_MMAP_THRESHOLD by hand freezes M_TRIM_THRESHOLD at its 128 KiB default, so a big
    block freed at the top of the heap would go back to the system and be faulted in again on the
    next call, in some processes and not others: faiss's 16 MB distance buffer took ~8,000 minor
    faults per search at D=64 in such a process (42-64 ms, against 31-33 ms with the trim threshold
    set too).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * nbytes)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _malloc_trim() -> None:
    """Return glibc's free heap memory to the system (so that RSS growth counts every new block)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_MMAP_FOR_PEAK, _MMAP_FOR_TIMING = 1 << 20, 32 << 20
_mmap_threshold(_MMAP_FOR_TIMING)


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Wall time of one call of ``fn`` in ms, with the device synchronised.

    CUDA: CUDA events recorded around the call, waited for; CPU: ``time.perf_counter``.
    ``number`` calls per measurement (a block) give the mean of the block.
    """

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def __call__(self, fn, number: int = 1) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / number
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) * 1e3 / number


@dataclasses.dataclass
class Stats:
    """Timings of one callable: median, quartiles, and how many blocks were timed (``n``) of how many calls each."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    n: int
    number: int = 1

    @classmethod
    def of(cls, times: list[float], number: int = 1) -> "Stats":
        t = sorted(times)
        if len(t) >= 2:
            q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
        else:
            q1 = q3 = t[0]
        return cls(statistics.median(t), q1, q3, t[0], len(t), number)

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median (0.05 = 5 %)."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return dict(median_ms=self.median_ms, q1_ms=self.q1_ms, q3_ms=self.q3_ms, min_ms=self.min_ms, n=self.n,
                    number=self.number, spread=self.spread)


def autorange(fns: dict, device, *, warmup: int = 1, min_repeats: int = 3, max_repeats: int = 100,
              min_time: float = 0.0, max_time: float = 60.0, block_ms: float = 10.0, rel_spread: float = 0.05,
              on_round=None, number: int | None = None) -> dict:
    """Time several callables (name -> fn) interleaved, in blocks, until the timings are stable.

    Blocked autorange, as ``torch.utils.benchmark.Timer.blocked_autorange``: after ``warmup`` calls
    of each fn, each fn's block size (calls per timing) is raised until a block takes at least
    ``block_ms`` (so a 10 us op is not timed one call at a time); then rounds, each timing one block of
    every fn in turn (load from other processes hits them alike), until at least ``min_repeats``
    rounds and ``min_time`` seconds have passed and every fn's interquartile range is within
    ``rel_spread`` of its median, or ``max_repeats`` rounds / ``max_time`` seconds are reached.
    ``on_round()`` is called after each round (a progress bar). ``number``: a fixed block size, without
    the calls that find it (calls of seconds: ``number=1``). Returns name -> :class:`Stats`.
    """
    timer = Timer(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    fixed, number = number, {}
    for name, fn in fns.items():
        if fixed is not None:
            number[name] = int(fixed)
            continue
        n = 1
        while True:
            ms = timer(fn, n)
            if ms * n >= block_ms or n >= 1 << 16:
                break
            n = min(1 << 16, max(2 * n, int(n * block_ms / max(ms * n, 1e-3)) + 1))
        number[name] = n
    times = {name: [] for name in fns}
    t_start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            times[name].append(timer(fn, number[name]))
        if on_round is not None:
            on_round()
        rounds, elapsed = len(next(iter(times.values()))), time.perf_counter() - t_start
        if rounds >= max_repeats or (rounds >= min_repeats and elapsed >= max_time):
            break
        if rounds >= min_repeats and elapsed >= min_time and all(
                Stats.of(t).spread <= rel_spread for t in times.values()):
            break
    return {name: Stats.of(t, number[name]) for name, t in times.items()}


def median_ms_interleaved(fns: dict, device: str, *, repeats: int = 10, warmup: int = 2) -> dict:
    """Median ms of each of several ``fns`` (name -> callable), interleaved in every round, so load
    from other processes on a shared machine hits them alike (:func:`autorange`)."""
    return {name: s.median_ms for name, s in stats_interleaved(fns, device, repeats=repeats, warmup=warmup).items()}


def stats_interleaved(fns: dict, device: str, *, repeats: int = 10, warmup: int = 2) -> dict:
    """:func:`autorange` with at least ``repeats`` rounds (at most 3x as many, 30 s): name -> :class:`Stats`."""
    return autorange(fns, device, warmup=warmup, min_repeats=repeats, max_repeats=3 * repeats, max_time=30.0)


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
    _malloc_trim()  # free heap left by earlier (timing-mode) calls would be reused unseen
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


def measure_interleaved(impls: list[tuple], device: str, quick: bool, **common) -> list[dict]:
    """Rows of several implementations of one op, timed interleaved (:func:`autorange`).

    ``impls``: ``(fn, row)`` pairs, ``row`` the keys of that implementation's row (``impl=...``);
    ``common``: the keys every row shares. Peak memory is measured after the timings, one call each.
    """
    fns = {i: fn for i, (fn, _) in enumerate(impls)}
    st = autorange(fns, device, warmup=1 if quick else 3, min_repeats=3 if quick else 10,
                   max_repeats=3 if quick else 30, max_time=30.0)
    return [dict(common, **row, ms=st[i].median_ms, spread=st[i].spread, peak_mb=peak_mb(fn, device))
            for i, (fn, row) in enumerate(impls)]
