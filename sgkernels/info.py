"""``python -m sgkernels.info``: versions, available backends, compiled CUDA archs, the CPU ISA in use."""
from __future__ import annotations

import os
import platform


def cpu_isa() -> str:
    """The ISA the C++ CPU kernels run with: avx512, avx2 or generic, as the C++ dispatcher picks it
    (the widest this CPU supports, capped by SGKERNELS_CPU_ISA)."""
    import torch  # noqa: F401  (loads libc10/libtorch before the extension)

    from . import _C

    return _C.cpu_isa()


def collect() -> dict:
    import torch

    from . import _C
    from ._backend import get_backend, triton_available, triton_interpret

    info = {
        "sgkernels": __import__("sgkernels").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none",
        "triton": "not installed",
        "backend": get_backend() + (" (SGKERNELS_BACKEND)" if "SGKERNELS_BACKEND" in os.environ else ""),
        "C++ CPU kernels": "yes" + (" (OpenMP, %d threads)" % torch.get_num_threads() if _C.WITH_OPENMP else " (no OpenMP)"),
        "CUDA kernels compiled": "yes, archs " + _C.CUDA_ARCHS if _C.WITH_CUDA else "no",
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "Triton": "no",
        "CPU ISA": cpu_isa() + " (C++ kernels)",
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
        if torch.cuda.is_available():
            info["Triton"] = "yes (CUDA)"
        else:
            info["Triton"] = "interpreter on CPU tensors" if triton_interpret() else "set TRITON_INTERPRET=1 to run on CPU"
    from .nn.attention import attention_backend

    names = {"xformers": "xformers memory_efficient_attention", "sdpa": "torch scaled_dot_product_attention"}
    info["attention"] = ", ".join(f"{dev}: {names[attention_backend(dev)]}" for dev in ("cuda", "cpu"))
    return info


def main() -> None:
    for key, value in collect().items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
