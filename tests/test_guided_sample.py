"""guided_sample: the op contract on every backend, the reference against exact probabilities,
edge cases, the status word, the Philox stream of the Triton kernel, and the other C++ ISAs."""
from __future__ import annotations

import pytest
import torch
from helpers import chi_square_pvalue, has_cpu_kernel
from op_contract import (CPU_ISAS, DTYPE_IDS, FLOAT_DTYPES, Backend, Bad, Case, OpContract, assert_agree, assert_close,
                         assert_sampled, bad_list, kernel_status, raw_kernel, run_on, run_under_isa, shrink_tiles,
                         status_word, tolerance)

import sgkernels as sgk
from sgkernels import _backend, _rng
from sgkernels.ops import _status

OP = "guided_sample"
# numpy's warnings inside the interpreter (log(0), inf - inf on masked lanes and bad rows)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _logits(shape, dtype=torch.float32, gen=None, scale=2.0):
    return (scale * torch.randn(shape, generator=gen)).to(dtype)


def _case(dtype, guided, temperature, vocab=37, seed=123, offset=7):
    def make(backend, monkeypatch):
        gen = torch.Generator().manual_seed(vocab + int(10 * temperature))
        rows = 64 if backend.interpreter else 512
        logits = _logits((rows, vocab), dtype, gen)
        guide = _logits((rows, vocab), dtype, gen) if guided else None
        kw = dict(guidance_scale=1.5 if guided else 0.0, temperature=temperature, seed=seed, offset=offset)
        return (logits, guide), kw

    g = "guided" if guided else "plain"
    return Case(f"{DTYPE_IDS[dtype]}-{g}-V{vocab}-t{temperature}", dtype, make)


class TestContract(OpContract):
    def call(self, logits, guide=None, **kw):
        return sgk.guided_sample(logits, guide, **kw)

    def reference(self, logits, guide=None, **kw):
        return sgk.guided_sample_reference(logits, guide, **kw)

    def reference_cases(self):
        cases = [_case(dt, g, t) for dt in FLOAT_DTYPES for g in (False, True) for t in (0.0, 0.7, 1.0, 2.0)]
        # one-token and wide vocabularies, seeds and offsets past 32 bits
        big = dict(seed=2**62 + 17, offset=2**40 + 1)
        cases += [_case(dt, True, 0.7, vocab=1, **big) for dt in FLOAT_DTYPES]
        cases += [_case(dt, True, 1.0, vocab=1000, **big) for dt in FLOAT_DTYPES]
        return cases

    def check(self, out, ref, tol, args, kwargs):
        assert_sampled(out, ref, tol, args)

    def bad_inputs(self):
        x = torch.randn(2, 3, 5)
        return bad_list(
            Bad("guide_logits", ValueError, (x, torch.randn(2, 3, 4))),
            Bad("logits", TypeError, (torch.ones(2, 5, dtype=torch.int64),)),
            Bad("guide_logits", TypeError, (x, x.to(torch.int32))),
            Bad("logits", ValueError, (torch.randn(3, 0),), match="V >= 1"),
            Bad("temperature", ValueError, (x,), dict(temperature=-1.0)),
            Bad("temperature", ValueError, (x,), dict(temperature=float("nan"))),
            Bad("seed", ValueError, (x,), dict(seed=-1)),
            Bad("seed", TypeError, (x,), dict(seed=1.5)),
            Bad("offset", ValueError, (x,), dict(offset=-3)),
            Bad("guidance_scale", ValueError, (x, x), dict(guidance_scale=float("inf"))),
        )

    def opcheck_samples(self, device):
        if device == "cuda":
            logits = torch.randn(3, 4, 33, device=device, dtype=torch.bfloat16)
            st = torch.zeros(1, dtype=torch.int32, device=device)
            seed_t = torch.tensor(3, device=device)
            return [(OP, (logits, logits.flip(-1), 1.0, 1.0, 3, 0, st)),
                    (OP, (logits, None, 0.0, 0.7, 0, 0, st, 5, 0.9, 0.05, "entropy", seed_t, seed_t))]
        logits, guide = torch.randn(3, 4, 33), torch.randn(3, 4, 33)
        status = torch.zeros(1, dtype=torch.int32)
        return [(OP, (logits, guide, 1.0, 1.0, 3, 0, status)),
                (OP, (logits, None, 0.0, 0.0, 3, 0, status)),
                (OP, (logits, guide, 1.0, 0.7, 0, 0, status, 5, 0.9, 0.05, "margin", torch.tensor(3), torch.tensor(4)))]


def run(backend, *args, **kwargs):
    return run_on(backend, sgk.guided_sample, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# The reference (and every backend) against exact probabilities


def test_distribution_is_exact(backend):
    """One row replicated: token frequencies against the float64 categorical, chi-square p > 1e-4."""
    for temperature in (1.0, 0.5, 3.0):
        rows = 3000 if backend.interpreter else 40000
        base = torch.tensor([2.0, 0.5, -1.0, 3.0, 0.0, -4.0, 1.0, -9.0])
        guide = torch.tensor([1.0, 1.0, 0.0, 2.0, -1.0, -2.0, 0.5, -6.0])
        s = 1.0
        logits, g = base.expand(rows, -1), guide.expand(rows, -1)
        tokens, logp = run(backend, logits, g, guidance_scale=s, temperature=temperature, seed=2024)
        guided = (guide + (1 + s) * (base - guide)).double()
        probs = torch.softmax(guided / temperature, -1)
        counts = torch.bincount(tokens, minlength=8)
        assert chi_square_pvalue(counts, probs) > 1e-4, (temperature, counts, probs * rows)
        # logp is the untempered guided log-probability of the token.
        expected = torch.log_softmax(guided, -1)[tokens].float()
        torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)


def test_reference_tail_is_kept():
    """A token with probability ~1e-6 appears at its rate: the sampler does not truncate the tail."""
    rows = 2_000_000
    logits = torch.tensor([0.0, -13.8155])  # p1 = 1.0e-6 / (1 + 1e-6)
    tokens, _ = sgk.guided_sample_reference(logits.expand(rows, -1), seed=5, temperature=1.0)
    p1 = torch.softmax(logits.double(), -1)[1].item()
    hits = int(tokens.sum())
    # Poisson(2.0): P(hits == 0) = 0.135, P(hits >= 10) < 5e-5.
    assert hits <= 10
    assert chi_square_pvalue(torch.tensor([rows - hits, hits]), torch.tensor([1 - p1, p1]), min_expected=0.0) > 1e-4


def test_token_uniform(kernel):
    """V = 2, equal logits: token = (u >= 0.5) with u the row's uniform from _rng words w0, w1."""
    rows = 512
    status = status_word(kernel)
    tokens, logp = raw_kernel(kernel, OP)(torch.zeros(rows, 2, device=kernel.device), None, 0.0, 1.0, 1234, 5, status)[:2]
    w0, w1, _, _ = _rng.row_words(1234, 5, torch.arange(rows))
    assert torch.equal(tokens.cpu(), (_rng.token_uniform(w0, w1) >= 0.5).to(torch.int64))
    torch.testing.assert_close(logp.cpu(), torch.full((rows,), -0.6931472))
    assert int(status.item()) == 0


# ------------------------------------------------------------------------------------------------
# Shapes, strides, dtypes, special values


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_large_vocab(backend, dtype):
    """LLaDA's vocabulary: tokens equal to the reference's."""
    if backend.interpreter:
        pytest.skip("too slow in the interpreter: the multi-tile path is tested with small tiles")
    gen = torch.Generator().manual_seed(1)
    logits = _logits((3, 126464), dtype, gen)
    guide = _logits((3, 126464), dtype, gen)
    for g, t in ((None, 1.0), (guide, 0.5), (guide, 2.0), (None, 0.0)):
        kw = dict(guidance_scale=0.75, temperature=t, seed=7, offset=3)
        tokens, logp = run(backend, logits, g, **kw)
        ref_tokens, ref_logp = sgk.guided_sample_reference(logits, g, **kw)
        assert torch.equal(tokens, ref_tokens)
        assert_close(logp, ref_logp, tolerance(OP, dtype))


def test_mixed_dtypes_and_lead_dims(backend):
    gen = torch.Generator().manual_seed(2)
    logits = _logits((2, 3, 5, 300), torch.float32, gen, scale=3.0)
    guide = _logits((2, 3, 5, 300), torch.bfloat16, gen, scale=3.0)
    kw = dict(guidance_scale=-0.5, temperature=1.0, seed=11, offset=0)
    tokens, logp = run(backend, logits, guide, **kw)
    ref_tokens, ref_logp = sgk.guided_sample_reference(logits, guide, **kw)
    assert tokens.shape == (2, 3, 5)
    same = assert_agree(tokens, ref_tokens, tolerance(OP, torch.bfloat16))
    assert_close(logp[same], ref_logp[same], tolerance(OP, torch.bfloat16))


def test_greedy_is_first_argmax(backend):
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, 7.0]])
    tokens, logp = run(backend, logits, temperature=0.0, seed=0)
    assert tokens.tolist() == [1, 0, 3]
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=DTYPE_IDS.get)
def test_greedy_max_across_chunks(backend, dtype):
    """Greedy rows whose max moves along the row (the C++ kernel keeps the sum of exps against a running
    max over 1024-element chunks): the first argmax and the reference's logp, with and without a guide."""
    v = 3000
    ar = torch.arange(v, dtype=torch.float32)
    rows = torch.stack([
        ar / 100,                                    # the max grows in every chunk
        -ar / 100,                                   # the max is the first entry
        torch.where((ar == 1500) | (ar == 2500), 1.0, 0.0),  # tied maxima in two chunks: the first wins
        torch.where(ar < 2100, float("-inf"), ar / 1000),  # two chunks of -inf, then the max in the tail
        torch.where(ar == 2999, 1e3, 0.0),           # the max at the last entry, far above the rest
        200 * torch.randn(v, generator=torch.Generator().manual_seed(4)),  # wide range: exps underflow
    ]).to(dtype)
    guide = _logits(rows.shape, dtype, torch.Generator().manual_seed(5), scale=0.01)
    for g in (None, guide):
        kw = dict(guidance_scale=0.5 if g is not None else 0.0, temperature=0.0, seed=1)
        tokens, logp = run(backend, rows, g, **kw)
        ref_tokens, ref_logp = sgk.guided_sample_reference(rows, g, **kw)
        assert torch.equal(tokens, ref_tokens)
        if g is None and dtype == torch.float32:  # (bfloat16 rounds rows 0 and 3 into ties at their top)
            assert tokens.tolist()[:5] == [2999, 0, 1500, 2999, 2999]
        assert_close(logp, ref_logp, tolerance(OP, dtype))


def test_extreme_temperatures(backend):
    logits = _logits((200, 64), torch.float32, torch.Generator().manual_seed(3), scale=3.0)
    argmax, _ = run(backend, logits, temperature=0.0, seed=5)
    tiny, _ = run(backend, logits, temperature=1e-30, seed=5)
    assert torch.equal(tiny, argmax)
    huge, _ = run(backend, logits, temperature=1e30, seed=5)
    ref, _ = sgk.guided_sample_reference(logits, temperature=1e30, seed=5)
    assert_agree(huge, ref, tolerance(OP, torch.float32))


def test_extreme_temperatures_uniform_and_argmax(backend):
    """T below 1/FLT_MAX is argmax; T above 1/FLT_MIN is uniform over the finite entries (-inf never)."""
    rows = 3000
    x = torch.tensor([0.0, 5.0, float("-inf"), -3.0, 2.0, float("-inf")])
    tokens, logp = run(backend, x.expand(rows, -1), temperature=1e-40, seed=1)
    assert tokens.tolist() == [1] * rows
    torch.testing.assert_close(logp, torch.log_softmax(x, -1)[1].expand(rows))
    for t in (1e300, 1e39):
        tokens, _ = run(backend, x.expand(rows, -1), temperature=t, seed=2)
        counts = torch.bincount(tokens, minlength=6)
        assert counts[2] == 0 and counts[5] == 0, counts
        probs = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.float64) / 4
        assert chi_square_pvalue(counts, probs) > 1e-4, (t, counts)


def test_tied_maxima_at_1e30(backend):
    """Two maxima at 1e30: logp = log(1/2) at T = 0 and sampled, each drawn about half the time."""
    x = torch.tensor([1e30, 1e30, 0.0, -1e30])
    for t in (0.0, 1.0):
        tokens, logp = run(backend, x.expand(2000, -1), temperature=t, seed=3)
        torch.testing.assert_close(logp, torch.full((2000,), -0.6931471805599453))
        if t == 0.0:
            assert tokens.tolist() == [0] * 2000
        else:
            counts = torch.bincount(tokens, minlength=4)
            assert chi_square_pvalue(counts, torch.tensor([0.5, 0.5, 0.0, 0.0])) > 1e-4, counts


# ------------------------------------------------------------------------------------------------
# -inf in the blend: a term of coefficient 0 is dropped, -inf in a term excludes the token


_NINF, _PINF, _NAN = float("-inf"), float("inf"), float("nan")


def test_blend_rule_reference_values():
    """The rule elementwise (guided_logits, the spec): s = 0 and s = -1 drop a term, -inf excludes."""
    from sgkernels.ops.guided_sample import guided_logits

    base = torch.tensor([1.0, _NINF, 2.0, _NINF, _NAN, _PINF, 3.0, _NINF])
    guide = torch.tensor([0.5, 1.0, _NINF, _NINF, 1.0, 1.0, _NAN, _PINF])
    # s = 0: exactly the base; s = -1: exactly the guide (whatever the other term holds)
    torch.testing.assert_close(guided_logits(base, guide, 0.0), base, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(guided_logits(base, guide, -1.0), guide, equal_nan=True, rtol=0, atol=0)
    for s in (1.0, 2.5, -0.5, -3.0):  # both coefficient signs of each term
        g = guided_logits(base, guide, s)
        assert g[0].item() == 0.5 + (1 + s) * 0.5
        assert torch.isneginf(g[1:4]).all(), (s, g)
        assert torch.isnan(g[4:]).all(), (s, g)


@pytest.mark.parametrize("s", [1.0, 0.0, -1.0, 2.0, -3.0])
def test_blend_minus_inf(backend, s):
    """-inf in the logits and/or the guide: never sampled where its coefficient is nonzero, no error;
    the result equals the reference's, and at s = 0 (s = -1) exactly the logits' (guide's) alone."""
    gen = torch.Generator().manual_seed(int(10 * s) + 50)
    logits, guide = _logits((16, 80), gen=gen), _logits((16, 80), gen=gen)
    logits[:, 50:] = float("-inf")  # banned in the base
    guide[:, 40:60] = float("-inf")  # and in the guide (overlapping)
    if s == 0.0:
        guide[:, 5] = float("nan")  # a dropped term: no effect
    if s == -1.0:
        logits[:, 6] = float("inf")
    kw = dict(guidance_scale=s, temperature=1.0, seed=7, offset=1)
    tokens, logp = run(backend, logits, guide, **kw)
    ref_tokens, ref_logp = sgk.guided_sample_reference(logits, guide, **kw)
    assert torch.equal(tokens, ref_tokens)
    assert_close(logp, ref_logp, tolerance(OP, torch.float32))
    if s == 0.0:
        alone = run(backend, logits, **kw)
    elif s == -1.0:
        alone = run(backend, guide, **kw)
    else:
        assert bool((tokens < 40).all())
        g = guide + (1 + s) * (logits - guide)
        g[:, 40:] = float("-inf")
        torch.testing.assert_close(logp, torch.log_softmax(g, -1).gather(-1, tokens[:, None])[:, 0])
        return
    assert torch.equal(tokens, alone[0]) and torch.equal(logp, alone[1])


@pytest.mark.parametrize("s", [1.0, -3.0])
def test_blend_inf_and_nan_terms_raise(backend, s):
    """NaN or +inf in a term of nonzero coefficient: the row is bad, even where the other is -inf."""
    if backend.device == "cuda":
        pytest.skip("deferred on CUDA")
    for a, b in ((_PINF, 0.0), (0.0, _NAN), (_NINF, _PINF), (_NAN, _NINF)):
        logits, guide = torch.zeros(3, 9), torch.zeros(3, 9)
        logits[1, 4], guide[1, 4] = a, b
        with pytest.raises(ValueError, match="logits"):
            run(backend, logits, guide, guidance_scale=s, seed=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_strided_equals_contiguous(backend, dtype):
    """Any strides give the contiguous result: a [..., :V] slice of a wider head output (read in
    place), permuted leading dims, transposed rows, a non-unit last-dim stride."""
    gen = torch.Generator().manual_seed(4)
    wide = _logits((3, 5, 50), dtype, gen)
    kw = dict(guidance_scale=1.0, temperature=0.8, seed=9, offset=3)
    views = [
        (wide[..., :40], _logits((5, 3, 40), dtype, gen).transpose(0, 1)),  # row stride 50; permuted guide
        (wide.transpose(0, 1), None),  # transposed rows
        (_logits((33, 24), dtype, gen).t(), None),  # [24, 33], stride (1, 24)
    ]
    for logits, guide in views:
        tokens, logp = run(backend, logits, guide, **kw)
        tokens_c, logp_c = run(backend, logits.contiguous(), None if guide is None else guide.contiguous(), **kw)
        assert tokens.shape == logits.shape[:-1]
        assert torch.equal(tokens, tokens_c)
        assert torch.equal(logp, logp_c)


def test_vocab_of_one(backend):
    tokens, logp = run(backend, torch.randn(6, 1), temperature=1.0, seed=1)
    assert tokens.tolist() == [0] * 6
    torch.testing.assert_close(logp, torch.zeros(6))


def test_empty_rows(backend):
    tokens, logp = run(backend, torch.randn(0, 7), seed=0)
    assert tokens.shape == (0,) and logp.shape == (0,)
    tokens, logp = run(backend, torch.randn(2, 0, 7), seed=0)
    assert tokens.shape == (2, 0) and logp.shape == (2, 0)


def test_minus_inf_entries_never_sampled(backend):
    logits = torch.zeros(200, 6)
    logits[:, ::2] = float("-inf")
    tokens, logp = run(backend, logits, temperature=1.0, seed=4)
    assert set(tokens.tolist()) <= {1, 3, 5}
    torch.testing.assert_close(logp, torch.full((200,), -torch.log(torch.tensor(3.0)).item()))


def test_seeds(backend):
    logits = torch.randn(32, 20, generator=torch.Generator().manual_seed(0))
    a = run(backend, logits, seed=11, offset=0)[0]
    b = run(backend, logits, seed=11, offset=0)[0]
    c = run(backend, logits, seed=11, offset=1)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = run(backend, logits)[0]
    torch.manual_seed(5)
    e = run(backend, logits)[0]
    assert torch.equal(d, e)


# ------------------------------------------------------------------------------------------------
# Rows that cannot be sampled: the status word, and the error


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf", "guide_inf_minus_inf"])
def test_bad_row_sets_status(kernel, bad):
    """Bit 1 (NONFINITE_LOGITS): the C++ kernel raises it; Triton sets it in the status word, gives
    the row token 0 and logp NaN, the other rows are fine."""
    x = torch.randn(4, 9)
    guide = None
    if bad == "nan":
        x[2, 4] = float("nan")
    elif bad == "posinf":
        x[2, 0] = float("inf")
    elif bad == "all_neginf":
        x[2] = float("-inf")
    else:
        guide = x.clone()
        x[2, 1] = guide[2, 1] = float("inf")
    to = kernel.device
    flags, out = kernel_status(kernel, OP, x.to(to), None if guide is None else guide.to(to), 1.0, 0.8, 3, 0)
    assert flags == 1
    if kernel.name == "cpp":
        return  # raised, per call
    tokens, logp = out[:2]
    assert int(tokens[2]) == 0 and bool(torch.isnan(logp[2]))
    assert bool(torch.isfinite(logp[[0, 1, 3]]).all())


def test_status_untouched_by_good_calls(kernel):
    assert _status.NONFINITE_LOGITS == 1 and _status.NEGATIVE_NUM_TO_MASK == 2
    status = status_word(kernel)
    x = torch.randn(8, 12, device=kernel.device)
    raw_kernel(kernel, OP)(x, x.flip(-1), 1.0, 0.5, 1, 2, status)
    assert int(status.item()) == 0


def test_nan_row_raises(backend):
    if backend.device == "cuda":
        pytest.skip("CUDA defers the check: see test_nan_row_deferred_on_cuda")
    logits = torch.randn(4, 10)
    logits[2, 3] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        run(backend, logits, seed=0)
    inf = torch.randn(4, 10)
    inf[1, 0] = float("inf")
    with pytest.raises(ValueError, match="logits"):
        run(backend, inf, seed=0)
    # The flag was reset: a good call works afterwards.
    run(backend, torch.randn(4, 10), seed=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_nan_row_deferred_on_cuda():
    logits = torch.randn(4, 10, device="cuda")
    logits[2, 3] = float("nan")
    sgk.guided_sample(logits, seed=0)  # no sync, no raise here
    with pytest.raises(ValueError, match="logits"):
        sgk.check_errors()
    sgk.check_errors()  # reset


# ------------------------------------------------------------------------------------------------
# The Triton kernel: its Philox stream bit for bit, and the multi-tile path on small vocabularies

needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or (not torch.cuda.is_available() and not _backend.triton_interpret()),
    reason="needs triton, and TRITON_INTERPRET=1 without a GPU",
)
TRITON = Backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
TRITON_DEVICE = TRITON.device


@needs_triton
@pytest.mark.parametrize(
    "seed,offset", [(0, 0), (1, 1), (2**31 + 5, 3), (3_000_000_000, 2**40 + 1), (2**62 + 17, 2**63 - 1)]
)
def test_triton_philox_words_bitwise(seed, offset):
    """tl.philox in the kernels gives the words of sgkernels._rng, bit for bit."""
    from sgkernels.kernels import sampling as S

    rows = torch.tensor([0, 1, 2, 77, 2**32 - 1, 2**32, 2**33 + 7, 2**40 + 12345], dtype=torch.int64)
    out = torch.empty(4, rows.numel(), dtype=torch.int64, device=TRITON_DEVICE)
    S._launch(S._philox_words_kernel)[(1,)](rows.to(TRITON_DEVICE), out, rows.numel(), seed, offset, BLOCK=8)
    assert torch.equal(out.cpu(), torch.stack(_rng.row_words(seed, offset, rows)))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("vocab", [48, 40])
def test_triton_multi_tile(monkeypatch, dtype, temperature, vocab):
    from sgkernels.kernels import sampling as S

    shrink_tiles(monkeypatch, S, 16)
    gen = torch.Generator().manual_seed(vocab + int(temperature * 10))
    logits = _logits((2, 6, vocab), dtype, gen)
    logits[0, 0, 3] = 20.0  # one dominant token in the first tile
    logits[1, 2, :17] = float("-inf")  # whole first tile -inf
    guide = _logits((2, 6, vocab), dtype, gen, scale=1.0) if temperature != 1.0 else None
    assert S._sampler_config(12, vocab)[2] > 1
    kw = dict(guidance_scale=0.5, temperature=temperature, seed=5, offset=9)
    tokens, logp = run(TRITON, logits, guide, **kw)
    TestContract().check((tokens, logp), sgk.guided_sample_reference(logits, guide, **kw), tolerance(OP, dtype),
                         (logits,), kw)


@needs_triton
def test_triton_bad_row_multi_tile(monkeypatch):
    from sgkernels.kernels import sampling as S

    shrink_tiles(monkeypatch, S, 16)
    x = torch.randn(3, 40, device=TRITON_DEVICE)
    x[1, 35] = float("nan")
    status = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    tokens, logp, _ = S.guided_sample_triton(x, None, 0.0, 1.0, 3, 0, status)
    assert int(status.item()) == 1 and int(tokens[1]) == 0 and bool(torch.isnan(logp[1]))
    assert bool(torch.isfinite(logp[[0, 2]]).all())


# ------------------------------------------------------------------------------------------------
# torch.compile, and the C++ kernels' other ISAs


@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
def test_cpp_torch_compile_sees_one_op():
    def step(logits, guide, status):
        return torch.ops.sgkernels.guided_sample(logits * 1.0, guide, 1.0, 1.0, 5, 0, status)

    logits, guide = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    status = torch.zeros(1, dtype=torch.int32)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(logits, guide, status)
    want = step(logits, guide, status)
    assert torch.equal(got[0], want[0])


@pytest.mark.slow
@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_under_isa(isa):
    """Every cpp test of this file again, on the generic and AVX2 paths of the C++ kernel."""
    run_under_isa(__file__, isa)
