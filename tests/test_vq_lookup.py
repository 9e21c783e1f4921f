"""vq_lookup: the op contract (exact agreement with a float64 argmin, except float near-ties) on
every backend, both C++ code paths, ties, strides, half inputs, errors, and the other C++ ISAs."""
from __future__ import annotations

import pytest
import torch
from helpers import has_cpu_kernel
from op_contract import CPU_ISAS, DTYPE_IDS, Bad, Case, OpContract, bad_list, run_under_isa, tolerance

import sgkernels  # noqa: F401  (loads the extension)
from sgkernels._backend import use_backend
from sgkernels.ops.vq_lookup import vq_lookup, vq_lookup_reference

OP = "vq_lookup"
CPU_PATHS = ("micro", "gemm")  # SGK_VQ_PATH: the C++ kernel's register-tile loop, or MKL sgemm tiles
SHAPES = [  # (N, K, D): awkward sizes, small and large D, every unrolled D
    (1, 1, 1), (5, 1, 3), (7, 3, 1), (37, 129, 13), (64, 300, 8), (50, 70, 16), (33, 200, 32),
    (40, 100, 64), (20, 50, 256), (3, 1000, 4), (100, 17, 24), (9, 65, 100), (29, 31, 12), (300, 40, 8),
]
HALF_SHAPES = [(37, 129, 13), (64, 300, 8), (40, 100, 64), (20, 50, 256)]


def ref64(z: torch.Tensor, cb: torch.Tensor):
    """float64 (best index, best distance, near-tie mask) of every row of z."""
    z = z.reshape(-1, cb.shape[1]).double().cpu()
    cb = cb.double().cpu()
    zz = (z * z).sum(1)
    e2 = (cb * cb).sum(1)
    d = (zz[:, None] - 2 * z @ cb.t() + e2[None, :]).clamp_min(0)
    vals, order = d.sort(dim=1, stable=True)
    best, idx = vals[:, 0], order[:, 0]
    if cb.shape[0] > 1:
        gap = vals[:, 1] - vals[:, 0]
        near = gap <= 1e-5 * (best + zz + e2.max())
    else:
        near = torch.zeros_like(best, dtype=torch.bool)
    return idx, best, near, zz + e2[idx]


def check(z, cb, out=None):
    """vq_lookup(z, cb) (or its ``out``) against the float64 argmin: equal except near ties, the
    distances (nearly) the best."""
    dist_tol = tolerance(OP, z.dtype).rtol
    if out is None:
        out = vq_lookup(z, cb, return_distance=True)
        assert torch.equal(vq_lookup(z, cb), out[0])
    idx, dist = out
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == z.shape[:-1] and dist.shape == z.shape[:-1]
    ridx, rbest, near, scale = ref64(z, cb)
    idx, dist = idx.reshape(-1).cpu(), dist.reshape(-1).cpu().double()
    assert near.float().mean() <= 0.05, "too many near ties: the test data is degenerate"
    bad = (idx != ridx) & ~near
    assert not bad.any(), f"{int(bad.sum())} rows differ from the float64 argmin"
    # a near tie may pick the other code, but its distance is then still (nearly) the best
    assert torch.all((dist - rbest).abs() <= dist_tol * (scale + 1)), (dist - rbest).abs().max()


def _case(n, k, d, dtype=torch.float32, cb_dtype=torch.float32):
    def make(backend, monkeypatch):
        g = torch.Generator().manual_seed(n * 1000 + k * 10 + d)
        return (torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(cb_dtype)), {}

    return Case(f"{DTYPE_IDS[dtype]}-cb{DTYPE_IDS[cb_dtype]}-{n}x{k}x{d}", dtype, make)


class TestContract(OpContract):
    def call(self, z, codebook):
        return vq_lookup(z, codebook, return_distance=True)

    def reference(self, z, codebook):
        return None  # check() compares with the float64 argmin (ref64)

    def reference_cases(self):
        cases = [_case(*shape) for shape in SHAPES]
        for dt in (torch.float16, torch.bfloat16):
            cases += [_case(*shape, dtype=dt) for shape in HALF_SHAPES]  # half z, fp32 codebook
            cases += [_case(*shape, dtype=dt, cb_dtype=dt) for shape in HALF_SHAPES]  # both half
        return cases

    def check(self, out, ref, tol, args, kwargs):
        check(*args, out=out)

    def bad_inputs(self):
        z, cb = torch.randn(4, 8), torch.randn(16, 8)
        bads = [
            Bad("z", ValueError, (torch.randn(4, 7), cb), match="z: expected shape"),
            Bad("codebook", ValueError, (z, torch.randn(16)), match="codebook: expected shape"),
            Bad("codebook", ValueError, (z, torch.randn(2, 16, 8)), match="codebook: expected shape"),
            Bad("codebook", ValueError, (z, torch.randn(0, 8)), match="codebook: expected at least one code"),
            Bad("z", TypeError, (torch.ones(4, 8, dtype=torch.int64), cb), match="z: expected a float32"),
            Bad("codebook", TypeError, (z, torch.ones(16, 8, dtype=torch.int32)), match="codebook: expected a float32"),
            Bad("z", TypeError, (z.double(), cb), match="z: expected a float32"),
            Bad("z", TypeError, ([[0.0] * 8], cb), match="z: expected a torch.Tensor"),
            Bad("codebook", ValueError, (z, cb.to("meta")), match="codebook: expected device"),
        ]
        for bad in (float("nan"), float("inf"), -float("inf")):
            zb, cbb = z.clone(), cb.clone()
            zb[2, 3] = bad
            cbb[7, 1] = bad
            bads.append(Bad("z", ValueError, (zb, cb), match="z: contains NaN or inf"))
            bads.append(Bad("codebook", ValueError, (z, cbb), match="codebook: contains NaN or inf"))
        return bad_list(*bads)

    def opcheck_samples(self, device):
        g = torch.Generator().manual_seed(6)
        samples = [
            (torch.randn(37, 13, generator=g), torch.randn(129, 13, generator=g)),
            (torch.randn(2, 3, 5, 8, generator=g), torch.randn(16, 8, generator=g)),
            (torch.randn(4, 64, generator=g).to(torch.bfloat16), torch.randn(33, 64, generator=g)),
            (torch.randn(3, 6, 7, generator=g).transpose(0, 1), torch.randn(5, 7, generator=g).half()),
        ]
        return [(OP, (z.to(device), cb.to(device), rd)) for z, cb in samples for rd in (False, True)]


# ------------------------------------------------------------------------------------------------
# Both code paths of the C++ kernel (SGK_VQ_PATH)


@pytest.fixture(params=CPU_PATHS)
def cpp_path(request, monkeypatch):
    if not has_cpu_kernel(OP):
        pytest.skip("no C++ kernel")
    monkeypatch.setenv("SGK_VQ_PATH", request.param)
    return request.param


@pytest.mark.parametrize("n,k,d", SHAPES)
def test_cpp_path_matches_float64(cpp_path, n, k, d):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + d)
    check(torch.randn(n, d, generator=g), torch.randn(k, d, generator=g))


def test_cpp_path_exact_ties_lowest_index(cpp_path):
    # small integers: fp32 arithmetic is exact, so exact ties must resolve like torch.argmin
    g = torch.Generator().manual_seed(1)
    for d in (3, 8, 64):
        z = torch.randint(-2, 3, (257, d), generator=g).float()
        cb = torch.randint(-2, 3, (150, d), generator=g).float()
        cb = torch.cat([cb, cb])  # exact duplicates: the first copy must win
        d64 = torch.cdist(z.double(), cb.double()) ** 2
        idx, dist = vq_lookup(z, cb, return_distance=True)
        assert torch.equal(idx, d64.argmin(1))
        assert torch.equal(dist.double(), d64.min(1).values.round())


def test_duplicate_codes_and_k1():
    cb = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0]])
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 3.0]])
    assert vq_lookup(z, cb).tolist() == [0, 1, 0]
    assert vq_lookup(z, cb[:1]).tolist() == [0, 0, 0]


def test_cpp_path_batched_and_noncontiguous(cpp_path):
    g = torch.Generator().manual_seed(2)
    for d in (8, 13, 64):
        cb = torch.randn(129, d, generator=g)
        check(torch.randn(2, 3, 5, d, generator=g), cb)
        check(torch.randn(2, 5, 3, d, generator=g).transpose(1, 2), cb)  # permuted leading dims
        check(torch.randn(2, 3, 5, 2 * d, generator=g)[..., ::2], cb)  # strided D
        check(torch.randn(4, d, 6, generator=g).permute(0, 2, 1), cb)  # channels-first -> [..., D] view
        check(torch.randn(2 * d, 129, generator=g)[::2].t(), torch.randn(2 * d, 7, generator=g)[::2].t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_cpp_path_half_inputs(cpp_path, dtype):
    g = torch.Generator().manual_seed(3)
    for n, k, d in HALF_SHAPES:
        z = torch.randn(n, d, generator=g).to(dtype)
        cb = torch.randn(k, d, generator=g)
        check(z, cb)  # half z, fp32 codebook
        check(z, cb.to(dtype))  # both half (the kernel accumulates in fp32)


def test_many_rows_threads():
    g = torch.Generator().manual_seed(4)
    check(torch.randn(5000, 8, generator=g), torch.randn(333, 8, generator=g))
    check(torch.randn(3001, 32, generator=g), torch.randn(77, 32, generator=g))


def test_empty_z():
    idx, dist = vq_lookup(torch.empty(0, 3, 4), torch.randn(5, 4), return_distance=True)
    assert idx.shape == (0, 3) and dist.shape == (0, 3)


def test_reference_and_torch_backend():
    g = torch.Generator().manual_seed(5)
    z, cb = torch.randn(2, 37, 13, generator=g), torch.randn(129, 13, generator=g)
    ridx, rbest, near, _ = ref64(z, cb)
    idx = vq_lookup_reference(z, cb)
    assert torch.equal(idx.reshape(-1)[~near], ridx[~near])
    with use_backend("torch"):
        assert torch.equal(vq_lookup(z, cb), idx)
    assert torch.equal(vq_lookup(z, cb).reshape(-1)[~near], ridx[~near])


@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
def test_cpp_op_checks_its_arguments():
    z, cb = torch.randn(4, 8), torch.randn(16, 8)
    # the op itself (no wrapper) raises the same Python exception types
    op = torch.ops.sgkernels.vq_lookup
    zb = z.clone()
    zb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z: contains NaN or inf"):
        op(zb, cb, False)
    with pytest.raises(ValueError, match="z: expected shape"):
        op(torch.randn(4, 7), cb, False)
    with pytest.raises(TypeError, match="codebook"):
        op(z, cb.int(), False)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(4096, 1024, 256), (2000, 4096, 8), (1000, 500, 33)])
def test_cuda_large_matches_float64(n, k, d, dtype):
    g = torch.Generator().manual_seed(n + k + d)
    z = torch.randn(n, d, generator=g).to(dtype).cuda()
    cb = torch.randn(k, d, generator=g).cuda()
    check(z, cb)
    check(z, cb.to(dtype))


@needs_cuda
def test_cuda_noncontiguous_ties_and_errors():
    g = torch.Generator().manual_seed(7)
    cb = torch.randn(129, 13, generator=g).cuda()
    check(torch.randn(2, 5, 3, 13, generator=g).cuda().transpose(1, 2), cb)
    z = torch.randint(-2, 3, (257, 5), generator=g).float().cuda()
    cbi = torch.randint(-2, 3, (150, 5), generator=g).float().cuda()
    cbi = torch.cat([cbi, cbi])
    d64 = torch.cdist(z.double(), cbi.double()) ** 2
    assert torch.equal(vq_lookup(z, cbi), d64.argmin(1))
    with pytest.raises(ValueError, match="codebook: expected device"):
        vq_lookup(z, cbi.cpu())
    zb = z.clone()
    zb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z: contains NaN or inf"):
        vq_lookup(zb, cbi)


@pytest.mark.slow
@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_under_isa(isa):
    """Every cpp test of this file again (both paths), on the generic and AVX2 builds of the kernel."""
    run_under_isa(__file__, isa)
