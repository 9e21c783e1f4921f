"""head_sample: the op contract on every backend, distribution against the exact categorical
(chi-square), agreement with guided_sample on the materialised logits, greedy equality, ``rows``
(bool mask and index), rows outside never projected, bad rows, and the Triton multi-tile path."""
from __future__ import annotations

import sys

import pytest
import torch
from helpers import chi_square_pvalue, has_cpu_kernel
from op_contract import (CPU_ISAS, DTYPE_IDS, FLOAT_DTYPES, Backend, Bad, Case, OpContract, assert_agree,
                         assert_sampled, bad_list, run_on, run_under_isa, tolerance)

import sgkernels as sgk
from sgkernels import _backend
from sgkernels.ops.filters import keep_mask_reference

OP = "head_sample"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _head(d, vocab, dtype=torch.float32, gen=None, bias=True, scale=1.0):
    w = (scale * torch.randn(vocab, d, generator=gen) / d**0.5).to(dtype)
    b = (0.5 * torch.randn(vocab, generator=gen)).to(dtype) if bias else None
    return w, b


def _case(dtype, guided, temperature, vocab=37, d=24, bias=True, seed=123, offset=7, **filt):
    def make(backend, monkeypatch):
        gen = torch.Generator().manual_seed(vocab + d + int(10 * temperature))
        rows = 40 if backend.interpreter else 300
        hidden = (2.0 * torch.randn(rows, d, generator=gen)).to(dtype)
        guide = (2.0 * torch.randn(rows, d, generator=gen)).to(dtype) if guided else None
        w, b = _head(d, vocab, dtype, gen, bias, scale=2.0)
        kw = dict(guidance_scale=1.5 if guided else 0.0, temperature=temperature, seed=seed, offset=offset, **filt)
        return (hidden, w, b, guide), kw

    g = "guided" if guided else "plain"
    f = "".join(f"-{k}{v}" for k, v in filt.items())
    return Case(f"{DTYPE_IDS[dtype]}-{g}-V{vocab}-d{d}-t{temperature}-bias{bias}{f}", dtype, make)


FILTER_KWS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.05), dict(top_k=7, top_p=0.9, min_p=0.01)]
CONF_KWS = [dict(confidence="prob", top_p=0.9), dict(confidence="margin"), dict(confidence="entropy", top_k=6),
            dict(confidence="logp", top_k=4)]


class TestContract(OpContract):
    def call(self, hidden, weight, bias=None, guide=None, **kw):
        return sgk.head_sample(hidden, weight, bias, guide, **kw)

    def reference(self, hidden, weight, bias=None, guide=None, **kw):
        return sgk.head_sample_reference(hidden, weight, bias, guide, **kw)

    def reference_cases(self):
        cases = [_case(dt, g, t) for dt in FLOAT_DTYPES for g in (False, True) for t in (0.0, 0.7, 1.0)]
        # several vocabulary tiles (C++: 512, Triton: 128), no bias, d not a multiple of the K block
        cases += [_case(dt, True, 1.3, vocab=1100, d=40, bias=False, seed=2**62 + 17, offset=2**40 + 1)
                  for dt in FLOAT_DTYPES]
        cases += [_case(torch.float32, False, 0.0, vocab=1100, d=40)]
        # filters and confidences (the row-chunk path; T = 0 with a filter alone: the fused kernels)
        cases += [_case(dt, True, 0.9, **f) for dt in FLOAT_DTYPES for f in FILTER_KWS]
        cases += [_case(torch.float32, False, t, vocab=1100, d=40, **f) for t in (0.0, 1.0) for f in CONF_KWS]
        cases += [_case(torch.float32, True, 0.0, top_k=3, top_p=0.5)]
        return cases

    def check(self, out, ref, tol, args, kwargs):
        assert len(out) == len(ref) == (2 if kwargs.get("confidence") is None else 3)
        assert_sampled(out[:2], ref[:2], tol, args)
        if len(out) == 3:
            same = out[0] == ref[0]
            assert out[2].dtype == torch.float32 and out[2].shape == ref[2].shape
            torch.testing.assert_close(out[2][same], ref[2][same], rtol=tol.rtol, atol=tol.atol)

    def bad_inputs(self):
        h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
        return bad_list(
            Bad("hidden", TypeError, (h.long(), w)),
            Bad("weight", ValueError, (h, torch.randn(11, 7))),
            Bad("weight", TypeError, (h, w.long())),
            Bad("weight", TypeError, (h, "w")),
            Bad("bias", ValueError, (h, w, torch.randn(10))),
            Bad("bias", TypeError, (h, w, torch.ones(11, dtype=torch.int64))),
            Bad("guide_hidden", ValueError, (h, w, None, torch.randn(2, 3, 7))),
            Bad("temperature", ValueError, (h, w), dict(temperature=-1.0)),
            Bad("seed", ValueError, (h, w), dict(seed=-1)),
            Bad("offset", ValueError, (h, w), dict(offset=-3)),
            Bad("guidance_scale", ValueError, (h, w, None, h), dict(guidance_scale=float("nan"))),
            Bad("rows", ValueError, (h, w), dict(rows=torch.ones(3, 2, dtype=torch.bool))),
            Bad("rows", ValueError, (h, w), dict(rows=torch.tensor([0, 6]))),
            Bad("rows", ValueError, (h, w), dict(rows=torch.tensor([[0]]))),
            Bad("rows", TypeError, (h, w), dict(rows=torch.tensor([0.0]))),
            Bad("rows", TypeError, (h, w), dict(rows=[0, 1])),
            Bad("top_k", ValueError, (h, w), dict(top_k=-1)),
            Bad("top_k", TypeError, (h, w), dict(top_k=2.5)),
            Bad("top_p", ValueError, (h, w), dict(top_p=0.0)),
            Bad("top_p", ValueError, (h, w), dict(top_p=1.5)),
            Bad("min_p", ValueError, (h, w), dict(min_p=-0.1)),
            Bad("min_p", TypeError, (h, w), dict(min_p="0.1")),
            Bad("confidence", ValueError, (h, w), dict(confidence="negentropy")),
        )

    def opcheck_samples(self, device):
        gen = torch.Generator().manual_seed(0)
        h, g = torch.randn(5, 16, generator=gen), torch.randn(5, 16, generator=gen)
        w, b = torch.randn(40, 16, generator=gen), torch.randn(40, generator=gen)
        if device == "cuda":
            h, g, w, b = (x.to(device, torch.bfloat16) for x in (h, g, w, b))
        status = torch.zeros(1, dtype=torch.int32, device=device)
        ids = torch.tensor([3, 0, 9, 9, 2], device=device)
        return [
            (OP, (h, w, b, g, ids, 1.0, 0.7, 3, 1, status)),
            (OP, (h, w, None, None, None, 0.0, 0.0, 3, 0, status)),
            (OP, (h, w, b, None, None, 0.0, 1.0, 5, 0, status)),
        ]


def run(backend, *args, **kwargs):
    return run_on(backend, sgk.head_sample, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Distribution: exact categorical, and guided_sample on the materialised logits


def test_distribution_is_exact(backend):
    """One row replicated: token frequencies against the float64 categorical of the blended head's
    logits, chi-square p > 1e-4; logp the untempered log-softmax."""
    gen = torch.Generator().manual_seed(9)
    w, b = _head(6, 10, gen=gen, scale=3.0)
    hc, hg = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    s = 0.5
    rows = 500 if backend.interpreter else 40000  # the interpreter runs one program per row
    exact = ((hg + (1 + s) * (hc - hg)).double() @ w.double().T + b.double())
    for temperature in (1.0, 0.6, 2.5):
        tokens, logp = run(backend, hc.expand(rows, -1), w, b, hg.expand(rows, -1), guidance_scale=s,
                           temperature=temperature, seed=2024)
        probs = torch.softmax(exact / temperature, -1)
        counts = torch.bincount(tokens, minlength=10)
        assert chi_square_pvalue(counts, probs) > 1e-4, (temperature, counts, probs * rows)
        torch.testing.assert_close(logp, torch.log_softmax(exact, -1)[tokens].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.0])
def test_same_tokens_as_guided_sample(backend, temperature):
    """Same seed/offset: the tokens of guided_sample(hidden @ W.T + b, guide @ W.T + b) on >= 99% of the
    rows (all of them at T = 0: random data has no near-ties), logp to float32 GEMM rounding."""
    gen = torch.Generator().manual_seed(31)
    rows, d, vocab = (48 if backend.interpreter else 400), 32, 700
    hidden, guide = torch.randn(2, rows // 2, d, generator=gen), torch.randn(2, rows // 2, d, generator=gen)
    w, b = _head(d, vocab, gen=gen, scale=4.0)
    kw = dict(guidance_scale=0.8, temperature=temperature, seed=77, offset=3)
    tokens, logp = run(backend, hidden, w, b, guide, **kw)
    ref_tokens, ref_logp = sgk.guided_sample_reference(hidden @ w.T + b, guide @ w.T + b, **kw)
    assert tokens.shape == (2, rows // 2)
    if temperature == 0.0:
        assert torch.equal(tokens, ref_tokens)
    same = assert_agree(tokens, ref_tokens, tolerance(OP, torch.float32))
    torch.testing.assert_close(logp[same], ref_logp[same], atol=1e-4, rtol=1e-4)


def test_greedy_near_ties(backend):
    """T = 0 is the first argmax of the logits; two logits apart by >= 1e-4 are always ordered right
    (the documented tolerance: the GEMM's rounding is ~1e-6 here)."""
    d, vocab = 4, 600
    w = torch.zeros(vocab, d)
    w[:, 0] = torch.linspace(-1, 1, vocab)
    b = torch.zeros(vocab)
    b[123], b[555] = 5.0, 5.0 - 1e-4  # argmax 123 (logit 5 - 0.59), then 555 (5 - 1e-4 + 0.85)
    h = torch.tensor([[1.0, 0.3, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    tokens, _ = run(backend, h, w, b, temperature=0.0, seed=0)
    ref = (h @ w.T + b).argmax(-1)
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("temperature", [1e-8, 1e-50])
def test_tiny_temperature_is_argmax(backend, temperature):
    """1/T >= 1e8 (issue 22): the argmax on every row, and guided_sample's tokens on the materialised
    logits (several vocabulary tiles: the recomputed tile must not underflow to its first token)."""
    gen = torch.Generator().manual_seed(22)
    rows, vocab = (8, 600) if backend.interpreter else (64, 1500)  # C++ tiles of 512, Triton of 128
    h = torch.randn(rows, 32, generator=gen)
    w, b = torch.randn(vocab, 32, generator=gen), torch.randn(vocab, generator=gen)
    tokens, logp = run(backend, h, w, b, temperature=temperature, seed=3)
    logits = h @ w.T + b
    assert torch.equal(tokens, logits.argmax(-1))
    ref_tokens, _ = run_on(backend, sgk.guided_sample, logits, temperature=temperature, seed=3)
    assert torch.equal(tokens, ref_tokens)
    assert bool(torch.isfinite(logp).all())


def test_huge_temperature_matches_guided_sample(backend):
    """1/T below FLT_MIN: uniform over the finite entries, as guided_sample (no 0 * -inf NaN)."""
    gen = torch.Generator().manual_seed(23)
    h, (w, b) = torch.randn(12, 8, generator=gen), _head(8, 700, gen=gen)
    b[::3] = float("-inf")
    tokens, logp = run(backend, h, w, b, temperature=1e50, seed=4)
    ref, _ = run_on(backend, sgk.guided_sample, h @ w.T + b, temperature=1e50, seed=4)
    assert torch.equal(tokens, ref) and bool((tokens % 3 != 0).all()) and bool(torch.isfinite(logp).all())


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_zero_coefficient_drops_its_term(backend, temperature):
    """guided_sample's blend rule on hidden states (issue 22): s = 0 ignores the guide (NaN, inf, or
    distant, u = h + 3e3, whose cancellation would round h), s = -1 ignores hidden."""
    gen = torch.Generator().manual_seed(24)
    h, (w, b) = torch.randn(4 if backend.interpreter else 10, 16, generator=gen), _head(16, 300, gen=gen, scale=4.0)
    kw = dict(temperature=temperature, seed=5)
    plain = run(backend, h, w, b, **kw)
    bad = torch.full_like(h, float("nan"))
    bad[::2] = float("inf")
    for guide in (bad, h + 3e3):
        out = run(backend, h, w, b, guide, guidance_scale=0.0, **kw)
        assert torch.equal(out[0], plain[0])
        torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)
    out = run(backend, bad, w, b, h, guidance_scale=-1.0, **kw)
    assert torch.equal(out[0], plain[0])
    ref = sgk.head_sample_reference(h, w, b, bad, guidance_scale=0.0, **kw)
    assert torch.equal(ref[0], plain[0])


# ------------------------------------------------------------------------------------------------
# Filters and confidences: the row-chunk path


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("filt", FILTER_KWS + CONF_KWS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_filtered_same_tokens_as_guided_sample(backend, temperature, filt):
    """Same seed/offset and filters: the tokens of guided_sample(hidden @ W.T + b, guide @ W.T + b) on the
    same backend, row for row (rows selected by a mask and by an index keep their row keys); logp and conf
    to float32 GEMM rounding."""
    gen = torch.Generator().manual_seed(41)
    rows, d, vocab = (24 if backend.interpreter else 200), 32, 500
    hidden, guide = torch.randn(2, rows // 2, d, generator=gen), torch.randn(2, rows // 2, d, generator=gen)
    w, b = _head(d, vocab, gen=gen, scale=4.0)
    kw = dict(guidance_scale=0.8, temperature=temperature, seed=78, offset=5, **filt)
    out = run(backend, hidden, w, b, guide, **kw)
    ref = run_on(backend, sgk.guided_sample, hidden @ w.T + b, guide @ w.T + b, **kw)
    assert len(out) == len(ref) == (3 if "confidence" in filt else 2)
    assert torch.equal(out[0], ref[0])
    for o, r in zip(out[1:], ref[1:]):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    mask = torch.rand(2, rows // 2, generator=gen) < 0.5
    sel = run(backend, hidden, w, b, guide, rows=mask, **kw)
    assert torch.equal(sel[0][mask], ref[0][mask]) and bool((sel[0][~mask] == -1).all())
    assert all(bool((o[~mask] == 0).all()) for o in sel[1:])
    idx = torch.tensor([rows - 1, 3, 3, 0])
    sel = run(backend, hidden, w, b, guide, rows=idx, **kw)
    assert torch.equal(sel[0], ref[0].reshape(-1)[idx])


def test_filtered_distribution_is_exact(backend):
    """One row replicated, top-k / top-p / min-p at T = 0.8: token frequencies against the float64
    categorical restricted to the kept tokens, chi-square p > 1e-4; no dropped token is ever drawn."""
    gen = torch.Generator().manual_seed(12)
    w, b = _head(6, 12, gen=gen, scale=3.0)
    h = torch.randn(6, generator=gen)
    rows = 4000 if backend.interpreter else 20000  # the chunk path has no Triton kernel: cheap anywhere
    x = (h.double() @ w.double().T + b.double()) / 0.8
    for filt in (dict(top_k=4), dict(top_p=0.7), dict(min_p=0.1)):
        keep = keep_mask_reference(x, **filt)
        tokens, _ = run(backend, h.expand(rows, -1), w, b, temperature=0.8, seed=2025, **filt)
        probs = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
        counts = torch.bincount(tokens, minlength=12)
        assert bool((counts[~keep] == 0).all()), filt
        assert chi_square_pvalue(counts, probs) > 1e-4, (filt, counts, probs * rows)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_chunks_and_weight_tiles(backend, monkeypatch, wdtype):
    """Tiny chunk and weight-tile budgets (many chunks and 16-bit weight tiles):
    the same outputs as the reference in one piece."""
    if backend.name == "torch":
        pytest.skip("the reference projects all rows at once")
    H = sys.modules["sgkernels.ops.head_sample"]
    monkeypatch.setattr(H, "_CHUNK_BYTES", 3 * 4 * 50)  # 3 rows of V = 50
    monkeypatch.setattr(H, "_W_TILE_BYTES", 7 * 4 * 16)  # 7 weight rows of d = 16
    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(3, 5, 16, generator=gen)
    w, b = _head(16, 50, wdtype, gen, scale=3.0)
    kw = dict(temperature=0.9, top_p=0.85, confidence="entropy", seed=3, offset=1)
    out = run(backend, hidden, w, b, **kw)
    ref = sgk.head_sample_reference(hidden, w, b, **kw)
    assert torch.equal(out[0], ref[0])
    for o, r in zip(out[1:], ref[1:]):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# rows


def test_rows_mask_and_index(backend):
    """A bool mask: the full call's outputs on the selected rows (same row ids, same uniforms), token -1
    and logp 0 elsewhere; an index tensor: outputs [K] in its order, duplicates allowed. Rows outside
    are never projected: NaN there raises nothing."""
    gen = torch.Generator().manual_seed(5)
    d, vocab = 16, 300
    hidden, guide = torch.randn(3, 8, d, generator=gen), torch.randn(3, 8, d, generator=gen)
    w, b = _head(d, vocab, gen=gen, scale=3.0)
    kw = dict(guidance_scale=1.0, temperature=0.9, seed=4, offset=2)
    full_t, full_l = sgk.head_sample_reference(hidden, w, b, guide, **kw)
    mask = torch.rand(3, 8, generator=gen) < 0.4
    bad = hidden.clone()
    bad[~mask] = float("nan")
    t, lp = run(backend, bad, w, b, guide, rows=mask, **kw)
    assert t.shape == (3, 8) and lp.shape == (3, 8)
    assert bool((t[~mask] == -1).all()) and bool((lp[~mask] == 0).all())
    same = assert_agree(t[mask], full_t[mask], tolerance(OP, torch.float32))
    torch.testing.assert_close(lp[mask][same], full_l[mask][same], atol=1e-4, rtol=1e-4)
    idx = torch.tensor([23, 0, 5, 5, 17])
    t, lp = run(backend, hidden, w, b, guide, rows=idx, **kw)
    assert t.shape == (5,) and t[2] == t[3]
    assert_agree(t, full_t.reshape(-1)[idx], tolerance(OP, torch.float32))
    t, lp = run(backend, hidden, w, b, guide, rows=torch.zeros(3, 8, dtype=torch.bool), **kw)
    assert bool((t == -1).all())
    t, lp = run(backend, hidden, w, b, guide, rows=torch.tensor([], dtype=torch.int64), **kw)
    assert t.shape == (0,)


def test_minus_inf_bias_never_sampled(backend):
    gen = torch.Generator().manual_seed(6)
    w, b = _head(8, 40, gen=gen)
    b[::2] = float("-inf")
    tokens, logp = run(backend, torch.randn(64, 8, generator=gen), w, b, temperature=1.0, seed=3)
    assert bool((tokens % 2 == 1).all()) and bool(torch.isfinite(logp).all())


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.9}], ids=["fused", "row-chunks"])
def test_nan_row_raises(backend, filters):
    if backend.device == "cuda":
        pytest.skip("CUDA defers the check to sgk.check_errors()")
    gen = torch.Generator().manual_seed(7)
    w, b = _head(8, 40, gen=gen)
    h = torch.randn(4, 8, generator=gen)
    h[2, 1] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        run(backend, h, w, b, seed=0, **filters)
    run(backend, h, w, b, seed=0, rows=torch.tensor([0, 1, 3]), **filters)  # the NaN row is not selected
    run(backend, torch.randn(4, 8), w, b, seed=0, **filters)  # the flag was reset


def test_seeds(backend):
    gen = torch.Generator().manual_seed(8)
    w, b = _head(8, 40, gen=gen, scale=0.5)
    h = torch.randn(32, 8, generator=gen)
    a, b1, c = (run(backend, h, w, b, seed=11, offset=o)[0] for o in (0, 0, 1))
    assert torch.equal(a, b1) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# The Triton kernels on many small tiles

needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or (not torch.cuda.is_available() and not _backend.triton_interpret()),
    reason="needs triton, and TRITON_INTERPRET=1 without a GPU",
)
TRITON = Backend("triton", "cuda" if torch.cuda.is_available() else "cpu")


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_triton_many_tiles(monkeypatch, temperature):
    from sgkernels.kernels import head_sample as H

    monkeypatch.setattr(H, "_TILE_V", 16)
    gen = torch.Generator().manual_seed(10)
    hidden, guide = torch.randn(20, 24, generator=gen), torch.randn(20, 24, generator=gen)
    w, b = _head(24, 90, gen=gen, scale=3.0)
    b[:16] = float("-inf")  # a whole tile -inf
    kw = dict(guidance_scale=0.5, temperature=temperature, seed=5, offset=9)
    out = run(TRITON, hidden, w, b, guide, **kw)
    TestContract().check(out, sgk.head_sample_reference(hidden, w, b, guide, **kw),
                         tolerance(OP, torch.float32), (hidden,), kw)


@pytest.mark.slow
@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_under_isa(isa):
    """Every cpp test of this file again, on the generic and AVX2 paths of the C++ kernel."""
    run_under_isa(__file__, isa)
