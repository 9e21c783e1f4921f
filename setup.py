"""Build sgkernels and its extension sgkernels._C.

* The op schemas and the C++ CPU kernels (csrc/*.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp) are always
  built, with OpenMP.
* The CUDA kernels (csrc/cuda/*.cu) are built whenever nvcc is found, with or without a GPU.
  ``SGKERNELS_CUDA=1`` requires them (error if nvcc is missing), ``SGKERNELS_CUDA=0`` skips them.
  ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0". A CUDA compile error fails the build: there is
  no silent CPU-only fallback.
* The CUDA library headers that torch's own headers include (cusparse.h, cublas_v2.h) are taken
  from torch's ``nvidia`` wheels when the toolkit lacks them.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already has
torch: the extension must be built against the torch it runs with. Metadata is in pyproject.toml.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_include_dirs() -> list[str]:
    """Include folders shipped by torch's nvidia-* wheels (cu13 layout and the older per-lib one)."""
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in list(nvidia.__path__):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _locate_cuda_home() -> None:
    """Set CUDA_HOME for torch.utils.cpp_extension when it is unset.

    torch guesses it as the parent of ``which nvcc``, which is wrong when nvcc on PATH is a wrapper
    (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no lib64/libcudart): take the first of the
    nvcc parent, its symlink target's parent and /usr/local/cuda that really holds the toolkit.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(nvcc)), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def _want_cuda(cuda_home: str | None) -> bool:
    flag = os.environ.get("SGKERNELS_CUDA", "").strip()
    nvcc = cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if flag == "0":
        return False
    if flag == "1":
        if not nvcc:
            sys.exit("SGKERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if not nvcc:
        import torch

        if torch.version.cuda is not None:
            print(
                "\n*** sgkernels: torch is a CUDA build but nvcc was not found: building WITHOUT the "
                "CUDA kernels (set CUDA_HOME, or SGKERNELS_CUDA=0 to silence this). ***\n",
                file=sys.stderr,
            )
        return False
    return True


def _extensions():
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "common", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = _want_cuda(CUDA_HOME) and bool(cu_sources)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    define_macros = [("SGK_WITH_CUDA", "1" if with_cuda else "0")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        define_macros.append(("SGK_CUDA_ARCHS", '""'))
        return [
            CppExtension(
                "sgkernels._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        ]
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    define_macros.append(("SGK_CUDA_ARCHS", '"' + archs + '"'))
    include_dirs += _nvidia_include_dirs()
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return [
        CUDAExtension(
            "sgkernels._C",
            sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


# Package metadata, dependencies, extras and the console script live in pyproject.toml.
setup(ext_modules=_extensions(), cmdclass=_cmdclass())
