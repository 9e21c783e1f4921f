"""vq_lookup: exact agreement with a float64 argmin (except float near-ties), distances, errors."""
from __future__ import annotations

import pytest
import torch

import sgkernels  # noqa: F401  (loads the extension)
from sgkernels._backend import use_backend
from sgkernels.ops.vq_lookup import vq_lookup, vq_lookup_reference

CPU_PATHS = [(isa, path) for isa in ("avx512", "avx2", "generic") for path in ("micro", "gemm")]
SHAPES = [  # (N, K, D): awkward sizes, small and large D, every unrolled D
    (1, 1, 1), (5, 1, 3), (7, 3, 1), (37, 129, 13), (64, 300, 8), (50, 70, 16), (33, 200, 32),
    (40, 100, 64), (20, 50, 256), (3, 1000, 4), (100, 17, 24), (9, 65, 100), (29, 31, 12), (300, 40, 8),
]


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


def check(z, cb, *, dist_tol=1e-4):
    idx, dist = vq_lookup(z, cb, return_distance=True)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == z.shape[:-1] and dist.shape == z.shape[:-1]
    assert torch.equal(vq_lookup(z, cb), idx)
    ridx, rbest, near, scale = ref64(z, cb)
    idx, dist = idx.reshape(-1).cpu(), dist.reshape(-1).cpu().double()
    assert near.float().mean() <= 0.05, "too many near ties: the test data is degenerate"
    bad = (idx != ridx) & ~near
    assert not bad.any(), f"{int(bad.sum())} rows differ from the float64 argmin"
    # a near tie may pick the other code, but its distance is then still (nearly) the best
    assert torch.all((dist - rbest).abs() <= dist_tol * (scale + 1)), (dist - rbest).abs().max()


@pytest.mark.parametrize("isa,path", CPU_PATHS)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_matches_float64(monkeypatch, isa, path, n, k, d):
    monkeypatch.setenv("SGK_VQ_ISA", isa)
    monkeypatch.setenv("SGK_VQ_PATH", path)
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + d)
    check(torch.randn(n, d, generator=g), torch.randn(k, d, generator=g))


@pytest.mark.parametrize("isa,path", CPU_PATHS)
def test_exact_ties_lowest_index(monkeypatch, isa, path):
    # small integers: fp32 arithmetic is exact, so exact ties must resolve like torch.argmin
    monkeypatch.setenv("SGK_VQ_ISA", isa)
    monkeypatch.setenv("SGK_VQ_PATH", path)
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


@pytest.mark.parametrize("isa,path", CPU_PATHS)
def test_batched_and_noncontiguous(monkeypatch, isa, path):
    monkeypatch.setenv("SGK_VQ_ISA", isa)
    monkeypatch.setenv("SGK_VQ_PATH", path)
    g = torch.Generator().manual_seed(2)
    for d in (8, 13, 64):
        cb = torch.randn(129, d, generator=g)
        check(torch.randn(2, 3, 5, d, generator=g), cb)
        check(torch.randn(2, 5, 3, d, generator=g).transpose(1, 2), cb)  # permuted leading dims
        check(torch.randn(2, 3, 5, 2 * d, generator=g)[..., ::2], cb)  # strided D
        check(torch.randn(4, d, 6, generator=g).permute(0, 2, 1), cb)  # channels-first -> [..., D] view
        check(torch.randn(2 * d, 129, generator=g)[::2].t(), torch.randn(2 * d, 7, generator=g)[::2].t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("isa,path", CPU_PATHS)
def test_half_inputs(monkeypatch, isa, path, dtype):
    monkeypatch.setenv("SGK_VQ_ISA", isa)
    monkeypatch.setenv("SGK_VQ_PATH", path)
    g = torch.Generator().manual_seed(3)
    for n, k, d in [(37, 129, 13), (64, 300, 8), (40, 100, 64), (20, 50, 256)]:
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


@pytest.mark.parametrize("return_distance", [False, True])
def test_opcheck(return_distance):
    g = torch.Generator().manual_seed(6)
    samples = [
        (torch.randn(37, 13, generator=g), torch.randn(129, 13, generator=g)),
        (torch.randn(2, 3, 5, 8, generator=g), torch.randn(16, 8, generator=g)),
        (torch.randn(4, 64, generator=g).to(torch.bfloat16), torch.randn(33, 64, generator=g)),
        (torch.randn(3, 6, 7, generator=g).transpose(0, 1), torch.randn(5, 7, generator=g).half()),
    ]
    for z, cb in samples:
        torch.library.opcheck(torch.ops.sgkernels.vq_lookup, (z, cb, return_distance))


def test_bad_inputs():
    z, cb = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="z: expected shape"):
        vq_lookup(torch.randn(4, 7), cb)
    with pytest.raises(ValueError, match="codebook: expected shape"):
        vq_lookup(z, torch.randn(16))
    with pytest.raises(ValueError, match="codebook: expected shape"):
        vq_lookup(z, torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="codebook: expected at least one code"):
        vq_lookup(z, torch.randn(0, 8))
    with pytest.raises(TypeError, match="z: expected a float32"):
        vq_lookup(torch.ones(4, 8, dtype=torch.int64), cb)
    with pytest.raises(TypeError, match="codebook: expected a float32"):
        vq_lookup(z, torch.ones(16, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="z: expected a float32"):
        vq_lookup(z.double(), cb)
    with pytest.raises(TypeError, match="z: expected a torch.Tensor"):
        vq_lookup([[0.0] * 8], cb)
    with pytest.raises(ValueError, match="codebook: expected device"):
        vq_lookup(z, cb.to("meta"))
    for bad in (float("nan"), float("inf"), -float("inf")):
        zb = z.clone()
        zb[2, 3] = bad
        with pytest.raises(ValueError, match="z: contains NaN or inf"):
            vq_lookup(zb, cb)
        cbb = cb.clone()
        cbb[7, 1] = bad
        with pytest.raises(ValueError, match="codebook: contains NaN or inf"):
            vq_lookup(z, cbb)
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
@pytest.mark.parametrize("n,k,d", SHAPES + [(4096, 1024, 256), (2000, 4096, 8), (1000, 500, 33)])
def test_cuda_matches_float64(n, k, d, dtype):
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
    for return_distance in (False, True):
        torch.library.opcheck(torch.ops.sgkernels.vq_lookup, (z, cbi, return_distance))
