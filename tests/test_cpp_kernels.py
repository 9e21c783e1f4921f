"""The C++ CPU kernels (csrc/sampling.cpp) against the plain-PyTorch references."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sgkernels as sgk
from sgkernels.ops.guided_sample import guided_sample_reference
from sgkernels.ops.remask import remask_reference
from sgkernels.ops.self_guided_step import self_guided_step_reference

OPS = torch.ops.sgkernels
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _status():
    return torch.zeros(1, dtype=torch.int32)


def _logits(shape, dtype, gen, scale=3.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _op_sample(logits, guide, s, t, seed, offset):
    st = _status()
    tokens, logp = OPS.guided_sample(logits, guide, s, t, seed, offset, st)
    assert int(st) == 0
    return tokens, logp


# ------------------------------------------------------------------------------------------------
# guided_sample


def test_guided_sample_matches_reference():
    gen = torch.Generator().manual_seed(0)
    total = same = 0
    worst_logp = 0.0
    configs = [(v, r) for v, r in ((1, 60), (7, 200), (1024, 200))]
    for dtype in DTYPES:
        for with_guide in (False, True):
            for t in (0.0, 0.5, 1.0, 2.0):
                for vocab, rows in configs:
                    logits = _logits((rows, vocab), dtype, gen)
                    guide = _logits((rows, vocab), dtype, gen) if with_guide else None
                    seed = int(torch.randint(0, 2**62, (), generator=gen))
                    offset = int(torch.randint(0, 2**40, (), generator=gen))
                    tok, lp = _op_sample(logits, guide, 1.5, t, seed, offset)
                    rtok, rlp = guided_sample_reference(
                        logits, guide, guidance_scale=1.5, temperature=t, seed=seed, offset=offset
                    )
                    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
                    assert tok.shape == rtok.shape and lp.shape == rlp.shape
                    eq = tok == rtok
                    assert eq.float().mean() >= 0.99, (dtype, with_guide, t, vocab)
                    total += eq.numel()
                    same += int(eq.sum())
                    worst_logp = max(worst_logp, float((lp[eq] - rlp[eq]).abs().max()))
                    if t == 0.0:
                        assert torch.equal(tok, rtok)
    assert total >= 5000
    assert same / total >= 0.999, (same, total)
    assert worst_logp <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_guided_sample_large_vocab(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = _logits((3, 126464), dtype, gen, scale=2.0)
    guide = _logits((3, 126464), dtype, gen, scale=2.0)
    for g, t in ((None, 1.0), (guide, 0.5), (guide, 2.0), (None, 0.0)):
        tok, lp = _op_sample(logits, g, 0.75, t, 7, 3)
        rtok, rlp = guided_sample_reference(logits, g, guidance_scale=0.75, temperature=t, seed=7, offset=3)
        assert torch.equal(tok, rtok)
        torch.testing.assert_close(lp, rlp, atol=1e-4, rtol=0)


def test_guided_sample_mixed_dtypes_and_lead_dims():
    gen = torch.Generator().manual_seed(2)
    logits = _logits((2, 3, 5, 300), torch.float32, gen)
    guide = _logits((2, 3, 5, 300), torch.bfloat16, gen)
    tok, lp = _op_sample(logits, guide, -0.5, 1.0, 11, 0)
    rtok, rlp = guided_sample_reference(logits, guide, guidance_scale=-0.5, temperature=1.0, seed=11, offset=0)
    assert tok.shape == (2, 3, 5)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp, atol=1e-4, rtol=0)


def test_guided_sample_extreme_temperatures():
    gen = torch.Generator().manual_seed(3)
    logits = _logits((200, 64), torch.float32, gen)
    argmax, _ = _op_sample(logits, None, 0.0, 0.0, 5, 0)
    tiny, _ = _op_sample(logits, None, 0.0, 1e-30, 5, 0)
    assert torch.equal(tiny, argmax)
    huge, lp = _op_sample(logits, None, 0.0, 1e30, 5, 0)
    rtok, rlp = guided_sample_reference(logits, None, temperature=1e30, seed=5, offset=0)
    assert (huge == rtok).float().mean() >= 0.99
    # -inf entries are never sampled
    masked = logits.clone()
    masked[:, ::2] = float("-inf")
    tok, lp = _op_sample(masked, None, 0.0, 1.0, 9, 1)
    assert bool((tok % 2 == 1).all()) and bool(torch.isfinite(lp).all())


def test_guided_sample_strided_inputs_equal_contiguous():
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        big = _logits((4, 6, 1500), dtype, gen)
        gbig = _logits((4, 6, 1500), dtype, gen)
        sl, gsl = big[..., :1024], gbig[..., :1024]
        ref = _op_sample(sl.contiguous(), gsl.contiguous(), 1.0, 0.8, 21, 2)
        out = _op_sample(sl, gsl, 1.0, 0.8, 21, 2)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        # transposed rows: [6, 4, V] view of [4, 6, V] storage
        tr = big.transpose(0, 1)
        ref = _op_sample(tr.contiguous(), None, 0.0, 1.0, 21, 2)
        out = _op_sample(tr, None, 0.0, 1.0, 21, 2)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        # non-unit last-dim stride (rows gathered)
        cols = _logits((333, 24), dtype, gen).t()  # [24, 333], stride (1, 24)
        ref = _op_sample(cols.contiguous(), None, 0.0, 1.0, 3, 0)
        out = _op_sample(cols, None, 0.0, 1.0, 3, 0)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_guided_sample_bad_rows_set_flag():
    gen = torch.Generator().manual_seed(5)
    for bad in (float("nan"), float("inf")):
        logits = _logits((6, 50), torch.float32, gen)
        logits[2, 17] = bad
        st = _status()
        tok, lp = OPS.guided_sample(logits, None, 0.0, 1.0, 1, 0, st)
        assert int(st) == 1
        assert int(tok[2]) == 0 and bool(torch.isnan(lp[2]))
        good = torch.tensor([0, 1, 3, 4, 5])
        rtok, rlp = guided_sample_reference(logits[good], None, seed=1, offset=0)
        assert bool(torch.isfinite(lp[good]).all())
    logits = _logits((3, 50), torch.float32, gen)
    logits[1] = float("-inf")
    st = _status()
    tok, lp = OPS.guided_sample(logits, None, 0.0, 0.0, 1, 0, st)
    assert int(st) == 1 and int(tok[1]) == 0 and bool(torch.isnan(lp[1]))
    # the guide can create NaN too: inf - inf
    logits = _logits((2, 8), torch.float32, gen)
    guide = logits.clone()
    logits[0, 0] = guide[0, 0] = float("inf")
    st = _status()
    OPS.guided_sample(logits, guide, 1.0, 1.0, 1, 0, st)
    assert int(st) == 1
    # through the wrapper: an error at once on CPU, and the flag is reset
    with sgk.use_backend("cpp"), pytest.raises(ValueError):
        sgk.guided_sample(logits, guide, guidance_scale=1.0, seed=1)
    sgk.check_errors("cpu")


# ------------------------------------------------------------------------------------------------
# remask_lowest_confidence


@pytest.mark.parametrize("tau", [0.0, 2.5])
def test_remask_matches_reference(tau):
    gen = torch.Generator().manual_seed(6)
    batch, n_tok = 5, 300
    for trial in range(4):
        logp = -torch.rand(batch, n_tok, generator=gen) * 8
        is_masked = torch.rand(batch, n_tok, generator=gen) < 0.6
        counts = is_masked.sum(-1)
        n_tensor = torch.stack([torch.tensor(0), counts[1] // 2, counts[2], counts[3] + 40, torch.tensor(1)])
        for num in (n_tensor, 37, 0, 10**6):
            with sgk.use_backend("cpp"):
                out = sgk.remask_lowest_confidence(logp, is_masked, num, choice_temperature=tau, seed=trial, offset=4)
            ref = remask_reference(logp, is_masked, num, choice_temperature=tau, seed=trial, offset=4)
            assert out.dtype == torch.bool
            assert torch.equal(out, ref), (trial, num)
            assert not bool((out & ~is_masked).any())
            nb = torch.as_tensor(num).expand(batch) if not isinstance(num, torch.Tensor) else num
            assert torch.equal(out.sum(-1), torch.minimum(nb, counts))


def test_remask_ties_and_nan_go_like_reference():
    logp = torch.tensor([[-1.0, -2.0, -1.0, float("nan"), -2.0, -0.0, 0.0, -3.0]])
    is_masked = torch.ones_like(logp, dtype=torch.bool)
    for k in range(9):
        out = OPS.remask_lowest_confidence(logp, is_masked, torch.tensor([k]), 0.0, 1, 0, _status())
        ref = remask_reference(logp, is_masked, torch.tensor([k]), choice_temperature=0.0, seed=1)
        assert torch.equal(out, ref), k


def test_remask_negative_num_to_mask_sets_flag():
    logp = -torch.rand(3, 10)
    is_masked = torch.ones(3, 10, dtype=torch.bool)
    st = _status()
    out = OPS.remask_lowest_confidence(logp, is_masked, torch.tensor([2, -1, 3]), 1.0, 0, 0, st)
    assert int(st) == 2
    assert out.sum(-1).tolist() == [2, 0, 3]
    st = _status()
    tokens = torch.zeros(3, 10, dtype=torch.int64)
    OPS.self_guided_step(tokens, is_masked, torch.randn(3, 10, 5), None, torch.tensor([1, 1, -4]), 0.0, 1.0, 1.0, 0, 0, st)
    assert int(st) == 2


# ------------------------------------------------------------------------------------------------
# self_guided_step


def _step_case(gen, batch, n_tok, vocab, dtype, with_guide, frac=0.7):
    logits = _logits((batch, n_tok, vocab), dtype, gen)
    guide = _logits((batch, n_tok, vocab), dtype, gen) if with_guide else None
    is_masked = torch.rand(batch, n_tok, generator=gen) < frac
    tokens = torch.randint(0, vocab, (batch, n_tok), generator=gen)
    tokens[is_masked] = vocab  # the mask id
    return tokens, is_masked, logits, guide


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_guide", [False, True])
def test_self_guided_step_matches_reference(dtype, with_guide):
    gen = torch.Generator().manual_seed(7)
    batch, n_tok, vocab = 4, 96, 257
    tokens, is_masked, logits, guide = _step_case(gen, batch, n_tok, vocab, dtype, with_guide)
    n = is_masked.sum(-1) // 3
    n[0] = 0
    for t, tau in ((1.0, 3.0), (0.0, 0.0), (0.7, 1.0)):
        kw = dict(guidance_scale=2.0, temperature=t, choice_temperature=tau, seed=99, offset=5)
        with sgk.use_backend("cpp"):
            new_tok, new_mask = sgk.self_guided_step(tokens, is_masked, logits, guide, n, **kw)
        ref_tok, ref_mask = self_guided_step_reference(tokens, is_masked, logits, guide, n, **kw)
        assert new_tok.dtype == torch.int64 and new_mask.dtype == torch.bool
        assert torch.equal(new_mask, ref_mask)
        assert torch.equal(new_tok, ref_tok)
        assert torch.equal(new_tok[~is_masked], tokens[~is_masked])
        assert torch.equal(new_mask.sum(-1), n)


def test_self_guided_step_is_sample_then_remask():
    gen = torch.Generator().manual_seed(8)
    tokens, is_masked, logits, guide = _step_case(gen, 3, 64, 100, torch.float32, True)
    n = torch.tensor([5, 0, 100])
    args = (1.0, 0.9, 4.0, 1234, 17)
    new_tok, new_mask = OPS.self_guided_step(tokens, is_masked, logits, guide, n, *args, _status())
    sampled, logp = OPS.guided_sample(logits, guide, args[0], args[1], args[3], args[4], _status())
    remask = OPS.remask_lowest_confidence(logp, is_masked, n, args[2], args[3], args[4], _status())
    assert torch.equal(new_mask, remask)
    assert torch.equal(new_tok, torch.where(is_masked & ~remask, sampled, tokens))


def test_self_guided_step_strided_equals_contiguous():
    gen = torch.Generator().manual_seed(9)
    batch, n_tok, vocab = 3, 40, 200
    big = _logits((n_tok, batch, vocab + 56), torch.bfloat16, gen)
    logits = big.transpose(0, 1)[..., :vocab]  # transposed rows and a row-stride slice
    guide = _logits((batch, n_tok, vocab), torch.bfloat16, gen)
    is_masked = torch.rand(batch, n_tok, generator=gen) < 0.5
    tokens = torch.where(is_masked, vocab, torch.randint(0, vocab, (batch, n_tok), generator=gen))
    n = torch.tensor([3, 4, 5])
    args = (0.5, 1.0, 2.0, 5, 6)
    out = OPS.self_guided_step(tokens.t().contiguous().t(), is_masked.t().contiguous().t(), logits, guide, n, *args, _status())
    ref = OPS.self_guided_step(tokens, is_masked, logits.contiguous(), guide, n, *args, _status())
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_self_guided_step_known_rows_never_read():
    gen = torch.Generator().manual_seed(10)
    tokens, is_masked, logits, guide = _step_case(gen, 2, 30, 50, torch.float32, True)
    logits = logits.clone()
    logits[~is_masked] = float("nan")  # known rows hold garbage
    guide[~is_masked] = float("inf")
    n = torch.tensor([2, 3])
    st = _status()
    new_tok, new_mask = OPS.self_guided_step(tokens, is_masked, logits, guide, n, 1.0, 1.0, 1.0, 3, 0, st)
    assert int(st) == 0
    assert torch.equal(new_tok[~is_masked], tokens[~is_masked])
    # but a NaN in a masked row does set the flag
    logits[is_masked.nonzero()[0].tolist()] = float("nan")
    st = _status()
    OPS.self_guided_step(tokens, is_masked, logits, guide, n, 1.0, 1.0, 1.0, 3, 0, st)
    assert int(st) == 1


def test_empty_inputs():
    st = _status()
    tok, lp = OPS.guided_sample(torch.randn(0, 5), None, 0.0, 1.0, 0, 0, st)
    assert tok.shape == (0,) and lp.shape == (0,)
    out = OPS.self_guided_step(
        torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.bool), torch.randn(2, 0, 5), None,
        torch.tensor([1, 1]), 0.0, 1.0, 1.0, 0, 0, st,
    )
    assert out[0].shape == (2, 0) and int(st) == 0


# ------------------------------------------------------------------------------------------------
# the portable and AVX2 code paths (this machine would otherwise run only the best one)

_ISA_CHECK = textwrap.dedent(
    """
    import torch, sgkernels as sgk
    from sgkernels.ops.guided_sample import guided_sample_reference
    from sgkernels.ops.self_guided_step import self_guided_step_reference
    g = torch.Generator().manual_seed(0)
    same = total = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for vocab in (1, 7, 77, 1024):
            for t in (0.0, 0.5, 1.0):
                l = (torch.randn(150, vocab, generator=g) * 3).to(dtype)
                u = (torch.randn(150, vocab, generator=g) * 3).to(dtype)
                st = torch.zeros(1, dtype=torch.int32)
                tok, lp = torch.ops.sgkernels.guided_sample(l, u, 1.0, t, 3, 1, st)
                rtok, rlp = guided_sample_reference(l, u, guidance_scale=1.0, temperature=t, seed=3, offset=1)
                eq = tok == rtok
                same += int(eq.sum()); total += eq.numel()
                assert float((lp[eq] - rlp[eq]).abs().max()) <= 1e-4
                assert int(st) == 0
    assert same / total >= 0.999, (same, total)
    l = torch.randn(2, 50, 300, generator=g)
    m = torch.rand(2, 50, generator=g) < 0.5
    tokens = torch.where(m, 300, 0)
    kw = dict(guidance_scale=0.0, temperature=1.0, choice_temperature=2.0, seed=4, offset=2)
    with sgk.use_backend("cpp"):
        out = sgk.self_guided_step(tokens, m, l, None, 5, **kw)
    ref = self_guided_step_reference(tokens, m, l, None, 5, **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    print("ok")
    """
)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_isa_paths(isa):
    env = dict(os.environ, SGKERNELS_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
