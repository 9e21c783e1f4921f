"""The contract every op's test file instantiates, like diffusers' shared scheduler tests.

Each ``tests/test_<op>.py`` sets ``OP`` (its name under ``torch.ops.sgkernels``) and subclasses
:class:`OpContract`, which brings four checks: the op against its reference on every backend,
bad inputs raise naming the argument, ``torch.library.opcheck``, and the fake kernel's shapes.
The rest of the file holds the tests only that op needs.

Backends (the ``backend`` argument of any test in those files, see :func:`parametrize`):

* ``torch``: the plain-PyTorch reference, through the public wrapper;
* ``cpp``: the C++ CPU kernels (the best ISA here; :func:`run_under_isa` runs the others);
* ``triton-interpret``: the Triton kernels on CPU tensors, when ``TRITON_INTERPRET=1`` was set
  before sgkernels was imported (tests/conftest.py sets it when there is no GPU);
* ``cuda``: the registered op on CUDA tensors (Triton, or the CUDA kernel for vq_lookup).

How close a backend must come to the reference is the :data:`TOLERANCES` table, one entry per
(op, dtype), for every backend alike.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any, NamedTuple

import pytest
import torch
from helpers import has_cpu_kernel

import sgkernels as sgk
from sgkernels._backend import triton_available, triton_interpret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ------------------------------------------------------------------------------------------------
# Backends


class Backend(NamedTuple):
    name: str  # the use_backend() name
    device: str

    @property
    def interpreter(self) -> bool:
        """The Triton interpreter: slow, so tests shrink their shapes."""
        return self.name == "triton" and self.device == "cpu"


# The implementations each op has besides the reference (vq_lookup has no Triton kernel: under
# use_backend("triton") it runs the registered op, the C++ kernel again).
KERNELS = {
    "guided_sample": ("cpp", "triton", "cuda"),
    "remask_lowest_confidence": ("cpp", "triton", "cuda"),
    "self_guided_step": ("cpp", "triton", "cuda"),
    "cross_entropy_fwd": ("cpp", "triton", "cuda"),
    "vq_lookup": ("cpp", "cuda"),
    "head_sample": ("cpp", "triton", "cuda"),
    "linear_cross_entropy_fwd": ("cpp", "triton", "cuda"),
    "block_refine_step": ("cpp", "triton", "cuda"),
    "entropy_bound_step": ("cpp", "triton", "cuda"),
}
_CUDA = torch.cuda.is_available()
_CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not _CUDA, reason="no CUDA device")]


def backend_params(op: str, kinds=("torch",) + ("cpp", "triton", "cuda")):
    """pytest params of the backends of ``op`` among ``kinds``; those that cannot run here skip."""
    kinds = [k for k in kinds if k == "torch" or k in KERNELS[op]]
    params = {
        "torch": pytest.param(Backend("torch", "cpu"), id="torch"),
        "cpp": pytest.param(
            Backend("cpp", "cpu"), id="cpp", marks=pytest.mark.skipif(not has_cpu_kernel(op), reason="no C++ kernel")
        ),
        "triton": pytest.param(
            Backend("triton", "cpu"),
            id="triton-interpret",
            marks=pytest.mark.skipif(not (triton_interpret() and triton_available()), reason="needs TRITON_INTERPRET=1"),
        ),
        "cuda": pytest.param(Backend("auto", "cuda"), id="cuda", marks=_CUDA_MARKS),
    }
    return [params[k] for k in kinds]


def parametrize(metafunc) -> None:
    """pytest_generate_tests (tests/conftest.py): the arguments of the op test files.

    ``backend``: every backend of the module's ``OP``; ``kernel``: its kernels, called directly
    (:func:`raw_kernel`); ``registered``: the kernels registered with torch.ops (opcheck);
    ``case`` / ``bad``: the contract class's reference cases and bad inputs.
    """
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        return
    names = metafunc.fixturenames
    if "backend" in names:
        metafunc.parametrize("backend", backend_params(op))
    if "kernel" in names:
        metafunc.parametrize("kernel", backend_params(op, ("cpp", "triton", "cuda")))
    if "registered" in names:
        metafunc.parametrize("registered", backend_params(op, ("cpp", "cuda")))
    cls = metafunc.cls
    if cls is not None and issubclass(cls, OpContract):
        if "case" in names:
            metafunc.parametrize("case", [pytest.param(c, id=c.id) for c in cls().reference_cases()])
        if "bad" in names:
            metafunc.parametrize("bad", [pytest.param(b, id=b.id) for b in cls().bad_inputs()])


# The Triton entry point of each sampling op (sgkernels/kernels/sampling.py).
_TRITON_ENTRY = {
    "guided_sample": "guided_sample_triton",
    "remask_lowest_confidence": "remask_triton",
    "self_guided_step": "self_guided_step_triton",
}


def raw_kernel(backend: Backend, op: str):
    """The kernel itself, without the wrapper: same arguments as ``torch.ops.sgkernels.<op>``."""
    if backend.name == "triton":
        from sgkernels.kernels import sampling

        return getattr(sampling, _TRITON_ENTRY[op])
    return getattr(torch.ops.sgkernels, op)


def status_word(backend: Backend) -> torch.Tensor:
    """A fresh int32 [1] status word (sgkernels/_status_bits.py) on the backend's device."""
    return torch.zeros(1, dtype=torch.int32, device=backend.device)


def kernel_status(backend: Backend, op: str, *args):
    """``(flags, out)`` of one raw kernel call (``args`` without the status word).

    Triton / CUDA: the bits the kernel ORed into a fresh status word, and its outputs. The C++ CPU
    kernels raise ``ValueError`` per call instead and never write the word: the bits their message
    names (``_status``'s messages), and ``out`` None when it raised.
    """
    from sgkernels._status_bits import NEGATIVE_NUM_TO_MASK, NONFINITE_LOGITS

    status = status_word(backend)
    if backend.name != "cpp":
        out = raw_kernel(backend, op)(*args, status)
        return int(status.item()), out
    try:
        out = raw_kernel(backend, op)(*args, status)
    except ValueError as err:
        assert int(status.item()) == 0, "the C++ CPU kernels must not write the shared status word"
        msg = str(err)
        assert msg.startswith("sgkernels (cpu): "), msg
        return (NONFINITE_LOGITS if "logits: " in msg else 0) | (NEGATIVE_NUM_TO_MASK if "num_to_mask: " in msg else 0), None
    assert int(status.item()) == 0
    return 0, out


def shrink_tiles(monkeypatch, module, tile: int) -> None:
    """Force a Triton kernel module's multi-tile path on small vocabularies (tiles of ``tile``)."""
    monkeypatch.setattr(module, "_MAX_SINGLE_TILE_V", tile)
    monkeypatch.setattr(module, "_TILE_V", tile)


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def run_on(backend: Backend, fn, *args, **kwargs):
    """``fn`` under ``backend`` with its tensor arguments on the backend's device; outputs on CPU."""
    args, kwargs = to_device(args, backend.device), to_device(kwargs, backend.device)
    with sgk.use_backend(backend.name):
        out = fn(*args, **kwargs)
    if backend.device == "cuda":
        sgk.check_errors()
    return to_device(out, "cpu")


# ------------------------------------------------------------------------------------------------
# Tolerances


@dataclasses.dataclass(frozen=True)
class Tol:
    """How close a backend's output must be to the reference's.

    ``agree``: the fraction of sampled tokens (integer outputs) equal to the reference's. A token
    can differ only where the row's uniform falls within float32 rounding of a CDF step.
    ``rtol`` / ``atol``: float outputs (on the rows whose token agrees, for the samplers).
    """

    rtol: float = 0.0
    atol: float = 0.0
    agree: float = 1.0


_F32, _BF16, _F16 = FLOAT_DTYPES
TOLERANCES = {
    # logp is log_softmax in float64, rounded once to float32: every backend agrees to float32 rounding.
    **{("guided_sample", dt): Tol(rtol=1e-5, atol=1e-5, agree=0.995) for dt in FLOAT_DTYPES},
    # A selection of positions, and the step (its tokens are drawn from rows of a few hundred
    # tokens, where a token on a CDF step's rounding edge has not come up): exact.
    **{("remask_lowest_confidence", dt): Tol() for dt in FLOAT_DTYPES},
    **{("self_guided_step", dt): Tol() for dt in FLOAT_DTYPES},
    # Loss and gradient against F.cross_entropy in the same dtype, which rounds its log_softmax to
    # the half dtype before the kernels' single rounding ...
    ("cross_entropy_fwd", _F32): Tol(rtol=1e-5, atol=1e-6),
    ("cross_entropy_fwd", _BF16): Tol(rtol=2e-2, atol=2e-2),
    ("cross_entropy_fwd", _F16): Tol(rtol=5e-3, atol=5e-3),
    # ... and the kernels against float32 math on the same (rounded) logits: one rounding.
    ("cross_entropy_fwd", _BF16, "float32 math"): Tol(rtol=2**-8, atol=1e-7),
    ("cross_entropy_fwd", _F16, "float32 math"): Tol(rtol=2**-11, atol=1e-7),
    # Squared distance, relative to ||z||^2 + ||e||^2 (the terms the float32 sum cancels).
    **{("vq_lookup", dt): Tol(rtol=1e-4) for dt in FLOAT_DTYPES},
    # head_sample against float32 ``h @ W.T + b`` then the float64 sampler: the GEMM's summation order
    # differs (a float32 ulp or so in a logit); on CUDA bf16/fp16 weights also round the blended
    # hidden to the weight dtype for the tensor cores (the model's own head does the same).
    # linear_cross_entropy against float32 F.cross_entropy(F.linear(...)) on the same (rounded) inputs:
    # float32, the GEMMs' summation order; 16-bit, the gradients rounded once to the half dtype (on
    # CUDA the gradient GEMMs also round the logits' gradient to it, as the unfused loss does).
    ("linear_cross_entropy_fwd", _F32): Tol(rtol=1e-4, atol=1e-5),
    **{("linear_cross_entropy_fwd", dt): Tol(rtol=2e-2, atol=2e-3) for dt in (_BF16, _F16)},
    ("head_sample", _F32): Tol(rtol=1e-4, atol=1e-4, agree=0.99),
    **{("head_sample", dt): Tol(rtol=3e-2, atol=3e-2, agree=0.97) for dt in (_BF16, _F16)},
    # block_refine_step: tokens and the commit exact (rows of a few dozen tokens, no token on a CDF
    # step's rounding edge), probabilities to float32 rounding.
    **{("block_refine_step", dt): Tol(rtol=1e-5, atol=1e-6) for dt in FLOAT_DTYPES},
    **{("entropy_bound_step", dt): Tol(rtol=1e-5, atol=1e-6) for dt in FLOAT_DTYPES},
}


def tolerance(op: str, dtype: torch.dtype, *kind: str) -> Tol:
    """``TOLERANCES[(op, dtype)]``; an op-specific comparison adds its ``kind``."""
    return TOLERANCES[(op, dtype, *kind)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, **kw) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol.rtol, atol=tol.atol, **kw)


def assert_agree(actual: torch.Tensor, expected: torch.Tensor, tol: Tol) -> torch.Tensor:
    """Integer outputs: equal on at least ``tol.agree`` of the entries; returns where they are."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    same = actual == expected
    agree = same.double().mean().item() if same.numel() else 1.0
    assert agree >= tol.agree, f"agree on {agree:.4f} of the entries, want >= {tol.agree}"
    return same


def assert_sampled(out, ref, tol: Tol, args) -> None:
    """``check`` of the sampling ops: (int64 tokens over ``args[0]``'s leading dims, float32 log-probs);
    tokens agree on at least ``tol.agree`` of the rows, and log-probs are close where they do."""
    (tokens, logp), (ref_tokens, ref_logp) = out, ref
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32
    assert tokens.shape == args[0].shape[:-1] and logp.shape == ref_logp.shape
    same = assert_agree(tokens, ref_tokens, tol)
    assert_close(logp[same], ref_logp[same], tol)


# ------------------------------------------------------------------------------------------------
# The contract


@dataclasses.dataclass
class Case:
    """One reference comparison: ``make(backend, monkeypatch)`` gives (args, kwargs) on CPU for ``call``.

    (``monkeypatch``: for cases that set the backend up, e.g. :func:`shrink_tiles`.)
    """

    id: str
    dtype: torch.dtype
    make: Any


@dataclasses.dataclass
class Bad:
    """A bad call: ``call(*args, **kwargs)`` must raise ``error`` naming ``argument``."""

    argument: str
    error: type
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    match: str | None = None  # a longer message, where the test pins it
    n: int = 0

    @property
    def id(self) -> str:
        return f"{self.argument}-{self.n}"


def bad_list(*bads: Bad) -> list[Bad]:
    """Number the bad inputs of each argument (for the test ids)."""
    seen: dict[str, int] = {}
    for b in bads:
        b.n = seen.get(b.argument, 0)
        seen[b.argument] = b.n + 1
    return list(bads)


class OpContract:
    """The shared checks. A subclass (class name ``Test...``) in each op's test file defines:

    * ``call(*args, **kwargs)``: the public op (outputs: a tensor or a tuple of tensors);
    * ``reference(*args, **kwargs)``: its plain-PyTorch spec, on CPU;
    * ``reference_cases()``: :class:`Case` list; ``check(out, ref, tol, args, kwargs)``: the comparison;
    * ``bad_inputs()``: :class:`Bad` list;
    * ``opcheck_samples(device)``: ``(op name, args)`` of ``torch.ops.sgkernels`` calls.
    """

    @property
    def op(self) -> str:
        """The ``OP`` of the test module that defines the subclass."""
        return sys.modules[type(self).__module__].OP

    def call(self, *args, **kwargs):
        raise NotImplementedError

    def reference(self, *args, **kwargs):
        raise NotImplementedError

    def reference_cases(self) -> list[Case]:
        raise NotImplementedError

    def check(self, out, ref, tol: Tol, args, kwargs) -> None:
        raise NotImplementedError

    def bad_inputs(self) -> list[Bad]:
        raise NotImplementedError

    def opcheck_samples(self, device: str) -> list[tuple[str, tuple]]:
        raise NotImplementedError

    # -- the checks --------------------------------------------------------------------------------

    def test_matches_reference(self, backend, case, monkeypatch):
        args, kwargs = case.make(backend, monkeypatch)
        out = run_on(backend, self.call, *args, **kwargs)
        ref = self.reference(*args, **kwargs)
        self.check(out, ref, tolerance(self.op, case.dtype), args, kwargs)

    def test_bad_input(self, bad):
        with pytest.raises(bad.error) as info:
            self.call(*bad.args, **bad.kwargs)
        assert bad.argument in str(info.value), f"the message does not name {bad.argument!r}: {info.value}"
        if bad.match is not None:
            info.match(bad.match)

    def test_opcheck(self, registered):
        for name, args in self.opcheck_samples(registered.device):
            torch.library.opcheck(getattr(torch.ops.sgkernels, name), args)

    def test_fake_kernel(self, registered):
        """The fake kernel (torch.compile, meta) gives the real outputs' shapes, dtypes and devices."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        for name, args in self.opcheck_samples(registered.device):
            op = getattr(torch.ops.sgkernels, name)
            real = op(*args)
            with FakeTensorMode(allow_non_fake_inputs=False) as mode:
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                fake = op(*fake_args)
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            assert len(real) == len(fake)
            for r, f in zip(real, fake):
                assert (tuple(f.shape), f.dtype, f.device) == (tuple(r.shape), r.dtype, r.device), name


# ------------------------------------------------------------------------------------------------
# The other ISAs of the C++ kernels


CPU_ISAS = ("generic", "avx2")  # below the best one, which every other test runs


def run_under_isa(test_file: str, isa: str) -> None:
    """Rerun the ``cpp`` tests of ``test_file`` in a fresh process with ``SGKERNELS_CPU_ISA=isa``.

    A subprocess, because a kernel may pick its ISA once per process.
    """
    env = dict(os.environ, SGKERNELS_CPU_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "cpp and not under_isa"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout, tail
