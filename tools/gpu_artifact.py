"""The prebuilt extension for the GPU machine (``make gpu-artifact``) and its use there (gpu_suite.sh).

The GPU machine has Python 3.12, torch 2.11.0+cu130 and triton 3.6, and no pip index: compiling the
extension there costs minutes of a 15-minute lease. So ``make gpu-artifact`` builds, on a machine with
nvcc but no GPU, a wheel for exactly that target (sm_90 SASS + compute_90 PTX) into ``dist/gpu/``, and
``benchmarks/gpu_suite.sh`` installs it there with ``pip install --no-deps --no-index``.

    python tools/gpu_artifact.py check DIST          # after the build: size, archs, import, BUILD_INFO.json
    python tools/gpu_artifact.py install WHEEL       # on the GPU machine: pip-install it, put _C into the tree
    python tools/gpu_artifact.py sources-hash        # the hash of the C++/CUDA sources and build files

``check`` fails when the wheel is over :data:`MAX_BYTES`, lacks sm_90 code or PTX, or does not import.
``install`` installs the wheel with ``pip install --no-deps --no-index --target`` and copies its
``sgkernels/_C*.so`` into this source tree's ``sgkernels/`` (as ``build_ext --inplace`` would), so the
tests and benchmarks of the tree run with it; it says whether the sources changed since the build
(stale artifact) and whether torch/Python match the build's.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BYTES = 64 * 1024 * 1024  # what the device tool carries, all paths together
BUILD_FILES = ("setup.py", "pyproject.toml")


def sources_hash() -> str:
    """sha256 over the C++/CUDA sources and build files (path and content, in path order)."""
    paths = sorted(
        p for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
        if os.path.isfile(p) and p.endswith((".cpp", ".h", ".cu", ".cuh"))
    ) + [os.path.join(ROOT, f) for f in BUILD_FILES]
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, ROOT).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "csrc", *BUILD_FILES],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty csrc" if dirty else "")
    except OSError:
        return "unknown"


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one triton's package ships."""
    found = shutil.which("cuobjdump")
    for home in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"]):
        found = found or (os.path.join(home, "bin", "cuobjdump") if os.path.exists(os.path.join(home, "bin", "cuobjdump")) else None)
    if found is None:
        try:
            import triton

            cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            found = cand if os.path.exists(cand) else None
        except ImportError:
            pass
    return found


def _embedded_archs(so_path: str) -> tuple[list[str], list[str]]:
    """(SASS archs, PTX archs) embedded in ``so_path``, e.g. (['sm_90'], ['sm_90'])."""
    tool = _cuobjdump()
    if tool is None:
        raise SystemExit("gpu_artifact: cuobjdump not found (CUDA toolkit or triton's copy)")

    def listing(flag):
        out = subprocess.run([tool, flag, so_path], capture_output=True, text=True)
        return sorted({part.split(".")[-2] for line in out.stdout.splitlines() for part in line.split()
                       if part.endswith((".cubin", ".ptx"))})

    return listing("--list-elf"), listing("--list-ptx")


def check(dist: str) -> int:
    """Verify the wheel in ``dist`` and write ``dist/BUILD_INFO.json`` next to it."""
    import torch

    wheels = sorted(glob.glob(os.path.join(dist, "sgkernels-*.whl")))
    if len(wheels) != 1:
        raise SystemExit(f"gpu_artifact: expected one sgkernels wheel in {dist}, found {wheels}")
    wheel = wheels[0]
    size = os.path.getsize(wheel)
    print(f"wheel: {wheel} ({size / 2**20:.1f} MiB)")
    if size > MAX_BYTES:
        raise SystemExit(f"gpu_artifact: {wheel} is {size / 2**20:.1f} MiB, over the {MAX_BYTES >> 20} MiB the device tool carries")
    with zipfile.ZipFile(wheel) as z:
        sos = [n for n in z.namelist() if n.startswith("sgkernels/_C") and n.endswith(".so")]
        if len(sos) != 1:
            raise SystemExit(f"gpu_artifact: the wheel should hold one sgkernels/_C*.so, holds {sos}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                        "--target", tmp, wheel], check=True)
        so = glob.glob(os.path.join(tmp, "sgkernels", "_C*.so"))[0]
        sass, ptx = _embedded_archs(so)
        print(f"SASS: {sass}; PTX: {ptx}")
        if "sm_90" not in sass or not ptx:
            raise SystemExit("gpu_artifact: the extension should hold sm_90 code and PTX (TORCH_CUDA_ARCH_LIST=9.0+PTX)")
        # Import it from outside the tree (no GPU here: the CUDA kernels register, they do not run).
        probe = ("import sgkernels, torch; from sgkernels import _C; assert _C.WITH_CUDA, 'built without CUDA'; "
                 "assert torch._C._dispatch_has_kernel_for_dispatch_key('sgkernels::vq_lookup', 'CUDA'); "
                 "print('import OK: sgkernels', sgkernels.__version__, 'torch', torch.__version__, 'archs', _C.CUDA_ARCHS)")
        env = dict(os.environ, PYTHONPATH=tmp)
        subprocess.run([sys.executable, "-P", "-c", probe], check=True, cwd=tmp, env=env)
    info = {
        "wheel": os.path.basename(wheel),
        "bytes": size,
        "python": ".".join(platform.python_version_tuple()[:2]),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        "sass": sass,
        "ptx": ptx,
        "sources_hash": sources_hash(),
        "git": _git_commit(),
    }
    with open(os.path.join(dist, "BUILD_INFO.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))
    return 0


def install(wheel: str) -> int:
    """On the GPU machine: install ``wheel`` (no deps, no index) and put its _C*.so into this tree."""
    import torch

    wheel = os.path.abspath(wheel)
    info_path = os.path.join(os.path.dirname(wheel), "BUILD_INFO.json")
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    target = os.path.join(tempfile.gettempdir(), "sgkernels-artifact")
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                    "--target", target, wheel], check=True)
    for old in glob.glob(os.path.join(ROOT, "sgkernels", "_C*.so")):
        os.remove(old)
    so = glob.glob(os.path.join(target, "sgkernels", "_C*.so"))[0]
    shutil.copy2(so, os.path.join(ROOT, "sgkernels", os.path.basename(so)))
    print(f"installed {os.path.basename(wheel)}; {os.path.basename(so)} -> sgkernels/")
    problems = []
    if info.get("sources_hash") and info["sources_hash"] != sources_hash():
        problems.append(f"STALE: csrc/ or the build files changed since the build ({info.get('git')}); "
                        "rerun `make gpu-artifact`")
    if info.get("torch") and info["torch"] != torch.__version__:
        problems.append(f"torch here is {torch.__version__}, the artifact was built against {info['torch']}")
    print("\n".join(problems) if problems else f"artifact matches this tree and torch {torch.__version__}")
    return 3 if problems else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) == 2:
        return check(argv[1])
    if argv[:1] == ["install"] and len(argv) == 2:
        return install(argv[1])
    if argv == ["sources-hash"]:
        print(sources_hash())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
