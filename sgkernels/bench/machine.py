"""What a benchmark ran on: the machine (:func:`machine_info`) and its measured roofline (:func:`roofline`).

The roofline is measured, not taken from a datasheet: peak FLOP/s is what a large fp32 matrix
product (``torch.mm``: MKL / OpenBLAS on CPU, cuBLAS on CUDA, TF32 off) reaches on this device, and
peak bandwidth what a large copy (``dst.copy_(src)``, counted as read + write) reaches. Both are
timed once per process and device (cached), at the start of a run. A table's peak is the larger of
these and the fastest row of the run, so a percentage of peak is at most 100 % (the table says when
a row set it).
"""
from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys

import torch

from .timing import autorange

# The environment variables that change a BLAS's or OpenMP's speed, printed in every header.
ENV_PREFIXES = ("OMP_", "OPENBLAS_", "MKL_", "GOMP_", "KMP_", "SGKERNELS_", "CUDA_VISIBLE_DEVICES")


def env_vars() -> dict:
    """The thread / BLAS environment variables that are set (``OMP_NUM_THREADS``, ``OPENBLAS_*``, ``MKL_*``...)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_isa() -> str:
    try:
        from ..info import cpu_isa

        return cpu_isa()
    except Exception:  # noqa: BLE001  (the compiled extension is missing)
        return "unknown (no compiled extension)"


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def faiss_threads() -> int | None:
    """faiss's OpenMP threads when a row of this process used faiss (None otherwise: faiss is not imported)."""
    faiss = sys.modules.get("faiss")
    return None if faiss is None else int(faiss.omp_get_max_threads())


def load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (None where the OS has none): other
    processes' load moves short ops' ratios, so every header states it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device) -> dict:
    """The machine a run is on: CPU (name, ISA of the C++ kernels, cores, torch threads), GPU (name,
    driver, CUDA), versions (python, torch, triton, sgkernels), the thread/BLAS env vars, the date and
    the load average when it is called (after a run: its 5 and 15 minute values cover the run)."""
    import sgkernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_isa": _cpu_isa(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads(),
        "gpu": None,
        "gpu_driver": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "sgkernels": sgkernels.__version__,
        "env": env_vars(),
        "load_average": load_average(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_driver"] = _gpu_driver()
    return info


def header_lines(info: dict) -> list[str]:
    """The machine as the lines printed above a table."""
    if info["gpu"]:
        dev = f"GPU {info['gpu']} (driver {info['gpu_driver'] or 'unknown'}, CUDA {info['cuda']})"
    else:
        dev = f"CPU {info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} threads, {info['cpu_isa']}"
    threads = f"threads: torch intra-op {info['torch_threads']}"
    if info.get("faiss_threads") is not None:
        threads += f", faiss OpenMP {info['faiss_threads']}"
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items()) or "none set"
    load = info.get("load_average")
    load = "/".join(f"{x:.2f}" for x in load) if load else "unknown"
    return [f"Device: {dev}; torch {info['torch']}, triton {info['triton'] or 'not installed'}, "
            f"sgkernels {info['sgkernels']}; {info['date']}",
            f"{threads}; environment: {env}; load average (1/5/15 min, at the end of the run): {load}"]


@functools.lru_cache(maxsize=None)
def roofline(device: str, quick: bool = False) -> dict:
    """Measured peaks of ``device`` (once per process): ``{"gflops": fp32 GEMM GFLOP/s, "gbs": copy GB/s,
    "gemm": "n=...", "copy_mb": ...}``."""
    cuda = device.startswith("cuda")
    n = (8192 if cuda else 2048) // (2 if quick else 1)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        st = autorange({"mm": lambda: torch.mm(a, b)}, device, warmup=2, min_repeats=5, max_repeats=5 if quick else 20,
                       max_time=5.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    gflops = 2 * n**3 / (st["mm"].min_ms * 1e-3) / 1e9
    del a, b
    mb = (1024 if cuda else 256) // (4 if quick else 1)
    src = torch.empty(mb * 2**20 // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    st = autorange({"copy": lambda: dst.copy_(src)}, device, warmup=2, min_repeats=5, max_repeats=5 if quick else 20,
                   max_time=5.0)
    gbs = 2 * src.numel() * 4 / (st["copy"].min_ms * 1e-3) / 1e9
    return {"gflops": gflops, "gbs": gbs, "gemm": f"{n}x{n}x{n} fp32 torch.mm", "copy_mb": mb}
