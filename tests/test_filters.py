"""Token filters (top_k / top_p / min_p), confidences (logp / prob / margin / entropy) and tensor
seeds of the sampling ops, on every backend: which tokens survive (ties), chi-square against the
filtered float64 categorical, confidences against Dream's definitions, tensor seeds = int seeds,
torch.compile with a tensor offset compiles once."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import chi_square_pvalue, has_cpu_kernel
from op_contract import run_on, shrink_tiles

import sgkernels as sgk
from sgkernels.ops import _validate
from sgkernels.ops.filters import confidence_reference, filter_logits_reference, keep_mask_reference

OP = "guided_sample"  # the three sampling ops have the same backends
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _tiles(backend, monkeypatch, multi_tile: bool) -> None:
    if multi_tile:
        if backend.name != "triton":
            pytest.skip("the multi-tile path is Triton's")
        from sgkernels.kernels import sampling

        shrink_tiles(monkeypatch, sampling, 16)


# ------------------------------------------------------------------------------------------------
# The reference's rules


def test_reference_keep_rules_and_ties():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits.double(), -1)[0]
    assert keep_mask_reference(logits, top_k=2).tolist() == [[True, True, True, False, False]]  # ties kept
    assert keep_mask_reference(logits, top_k=5).all() and keep_mask_reference(logits, top_k=9).all()
    # kept while the mass before is <= top_p; the tie with the last one kept is kept too
    assert keep_mask_reference(logits, top_p=float(p[0]) * (1 - 1e-6)).tolist() == [[True, False, False, False, False]]
    assert keep_mask_reference(logits, top_p=float(p[0]) + 1e-6).tolist() == [[True, True, True, False, False]]
    assert keep_mask_reference(logits, top_p=1.0).all()
    assert keep_mask_reference(logits, min_p=float(p[1] / p[0]) * (1 - 1e-9)).tolist() == [[True, True, True, False, False]]
    assert keep_mask_reference(logits, min_p=1.0).tolist() == [[True, False, False, False, False]]
    # intersected on one distribution
    assert keep_mask_reference(logits, top_k=4, top_p=0.99, min_p=0.01).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize(
    "kwargs, name, error",
    [
        (dict(top_k=-1), "top_k", ValueError), (dict(top_k=1.5), "top_k", TypeError), (dict(top_k=True), "top_k", TypeError),
        (dict(top_p=0.0), "top_p", ValueError), (dict(top_p=1.5), "top_p", ValueError),
        (dict(top_p=math.nan), "top_p", ValueError), (dict(min_p=-0.1), "min_p", ValueError),
        (dict(min_p=2.0), "min_p", ValueError), (dict(confidence="margins"), "confidence", ValueError),
        (dict(seed=torch.tensor([1])), "seed", TypeError), (dict(seed=torch.tensor(1.0)), "seed", TypeError),
        (dict(offset=torch.tensor(1, dtype=torch.int32)), "offset", TypeError), (dict(seed=-1), "seed", ValueError),
    ],
)
def test_bad_filter_confidence_seed_arguments(kwargs, name, error):
    x = torch.randn(3, 4, 8)
    kw = dict(seed=0, **kwargs) if "seed" not in kwargs else kwargs
    with pytest.raises(error, match=name):
        sgk.guided_sample(x, **kw)
    with pytest.raises(error, match=name):
        sgk.self_guided_step(torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.bool), x, None, 1, **kw)


# ------------------------------------------------------------------------------------------------
# The top-p boundary: a prefix mass equal to top_p exactly (Dream's and diffusers' "<=" rule)

# exp(x - max) is exact in float32 for these logits: 1, 1/2, 1/4, 1/4 and sixteen 1/8 (sum 4): the
# prefix masses 1, 1.5, 2 hit top_p * 4 exactly for top_p = 0.25, 0.375, 0.5 (and the top-4 set, sum 2,
# hits top_p * 2 for top_p = 0.5, 0.75)
_LN2 = math.log(2.0)
_BOUNDARY = torch.tensor([0.0, -_LN2, -2 * _LN2, -2 * _LN2] + [-3 * _LN2] * 16, dtype=torch.float32)
_BOUNDARY_CASES = [  # (filters, kept tokens)
    (dict(top_p=0.25), {0, 1}),
    (dict(top_p=0.375), {0, 1, 2, 3}),  # 2 and 3 tie: both kept
    (dict(top_k=4, top_p=0.5, filter_order="hf"), {0, 1}),
    (dict(top_k=4, top_p=0.5, filter_order="dream"), {0, 1, 2, 3}),
    (dict(top_k=4, top_p=0.75, filter_order="hf"), {0, 1, 2, 3}),
    (dict(top_k=4, top_p=0.25, filter_order="dream"), {0, 1}),
]


def _dream_top_p_keep(logits, top_p):
    """Dream's / diffusers' rule, written out: sort descending, drop where the previous cumulative
    float32 mass > top_p (the oracle the "<=" rule is checked against)."""
    srt, idx = torch.sort(logits, descending=True)
    cum = torch.softmax(srt, -1).cumsum(-1)
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[1:] = cum[:-1] > top_p
    return set(idx[~drop].tolist())


def test_top_p_boundary_reference_matches_dream():
    e = torch.exp(_BOUNDARY - _BOUNDARY.max())
    assert e.tolist() == [1.0, 0.5, 0.25, 0.25] + [0.125] * 16  # the premise: exact in float32
    for filt, want in _BOUNDARY_CASES:
        assert set(torch.nonzero(keep_mask_reference(_BOUNDARY, **filt)).reshape(-1).tolist()) == want, filt
    # no tie straddles this boundary: Dream's sort-based rule agrees token for token (diffusers' and
    # transformers' own filters: tests/test_integrations_llada2.py)
    assert _dream_top_p_keep(_BOUNDARY, 0.25) == {0, 1}
    assert _dream_top_p_keep(_BOUNDARY, 0.25 * (1 - 1e-6)) == {0}


@pytest.mark.parametrize("multi_tile", [False, True], ids=["one-tile", "multi-tile"])
def test_top_p_boundary_kernels(backend, multi_tile, monkeypatch):
    """The kernels draw exactly the reference's kept set when a prefix mass equals top_p exactly."""
    _tiles(backend, monkeypatch, multi_tile)
    rows = 64 if backend.interpreter else 400  # deterministic draws (fixed seed); every kept token shows up
    logits = _BOUNDARY.repeat(rows, 1)
    for filt, want in _BOUNDARY_CASES:
        tokens, _ = run_on(backend, sgk.guided_sample, logits, temperature=1.0, seed=5, offset=2, **filt)
        assert set(tokens.tolist()) == want, filt


# ------------------------------------------------------------------------------------------------
# Which tokens survive, exactly (ties included)

_TIES = torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0, 0.0, -0.5, -0.5, -3.0, -30.0, 0.5, 1.0])


@pytest.mark.parametrize("multi_tile", [False, True], ids=["one-tile", "multi-tile"])
@pytest.mark.parametrize(
    "filt",
    [dict(top_k=1), dict(top_k=2), dict(top_k=3), dict(top_k=6), dict(top_p=0.3), dict(top_p=0.7), dict(top_p=0.95),
     dict(min_p=0.3), dict(min_p=0.99), dict(top_k=8, top_p=0.9, min_p=0.05)],
    ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()),
)
def test_surviving_tokens_with_ties(backend, filt, multi_tile, monkeypatch):
    """Rows of tied logits, T = 1.5: the tokens drawn are exactly the reference's kept set."""
    _tiles(backend, monkeypatch, multi_tile)
    rows, temperature = 600, 1.5
    logits = _TIES.repeat(rows, 1)
    keep = keep_mask_reference(_TIES.double() / temperature, **filt)
    tokens, logp = run_on(backend, sgk.guided_sample, logits, temperature=temperature, seed=11, offset=3, **filt)
    assert set(tokens.tolist()) == set(torch.nonzero(keep).reshape(-1).tolist())
    torch.testing.assert_close(logp, torch.log_softmax(_TIES.double(), -1)[tokens].float())  # unfiltered, untempered


@pytest.mark.parametrize("multi_tile", [False, True], ids=["one-tile", "multi-tile"])
def test_greedy_with_filters_and_ties(backend, multi_tile, monkeypatch):
    """T = 0: the first argmax whatever the filters; confidences on softmax(filtered g)."""
    _tiles(backend, monkeypatch, multi_tile)
    logits = torch.stack([_TIES, _TIES.flip(0), torch.full((12,), 0.25)])
    for filt in (dict(), dict(top_k=1), dict(top_p=0.2, min_p=0.5), dict(top_k=3, top_p=0.6)):
        for kind in ("prob", "margin", "entropy"):
            tokens, _, conf = run_on(backend, sgk.guided_sample, logits, temperature=0.0, confidence=kind, seed=1, **filt)
            assert tokens.tolist() == [0, 10, 0]
            want = confidence_reference(filter_logits_reference(logits, **filt), kind, tokens)
            torch.testing.assert_close(conf, want, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Distributions: chi-square against the filtered float64 categorical


@pytest.mark.parametrize("multi_tile", [False, True], ids=["one-tile", "multi-tile"])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.5])
@pytest.mark.parametrize(
    "filt", [dict(top_k=7), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=20, top_p=0.9, min_p=0.02)],
    ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()),
)
def test_filtered_chi_square(backend, filt, temperature, multi_tile, monkeypatch):
    _tiles(backend, monkeypatch, multi_tile)
    gen = torch.Generator().manual_seed(5)
    vocab = 45
    row = 1.5 * torch.randn(vocab, generator=gen)
    guide = torch.randn(vocab, generator=gen)
    g = guide + 2.0 * (row - guide)
    if backend.interpreter and multi_tile:
        # ~0.7 s per row in the interpreter: too slow for a chi-square. The kernels draw the
        # reference's Philox numbers, so the same seed must give the reference's tokens.
        if temperature != 1.0:
            pytest.skip("interpreter multi-tile: one temperature (token equality with the reference)")
        rows = 16
        args = (row.repeat(rows, 1), guide.repeat(rows, 1))
        kw = dict(guidance_scale=1.0, temperature=temperature, seed=77, offset=1, **filt)
        tokens, _ = run_on(backend, sgk.guided_sample, *args, **kw)
        want, _ = sgk.guided_sample_reference(*args, **kw)
        assert int((tokens == want).sum()) >= rows - 1, (tokens, want)
        return
    rows = 3000 if backend.interpreter else 20000
    tokens, _ = run_on(backend, sgk.guided_sample, row.repeat(rows, 1), guide.repeat(rows, 1), guidance_scale=1.0,
                       temperature=temperature, seed=77, offset=1, **filt)
    x = g.double() / temperature
    probs = torch.softmax(x.masked_fill(~keep_mask_reference(x, **filt), -math.inf), -1)
    counts = torch.bincount(tokens, minlength=vocab)
    assert bool((counts[probs == 0] == 0).all())
    assert chi_square_pvalue(counts, probs) > 1e-4, (counts, probs * rows)


# ------------------------------------------------------------------------------------------------
# Confidences


@pytest.mark.parametrize("multi_tile", [False, True], ids=["one-tile", "multi-tile"])
@pytest.mark.parametrize("kind", ["logp", "prob", "margin", "entropy"])
def test_confidence_matches_reference_and_dream(backend, kind, multi_tile, monkeypatch):
    _tiles(backend, monkeypatch, multi_tile)
    gen = torch.Generator().manual_seed(9)
    logits = 2.0 * torch.randn(24, 40, generator=gen)
    for temperature, filt in ((1.0, dict()), (0.7, dict(top_p=0.9)), (1.3, dict(top_k=5, min_p=0.05))):
        kw = dict(temperature=temperature, confidence=kind, seed=3, offset=2, **filt)
        tokens, logp, conf = run_on(backend, sgk.guided_sample, logits, **kw)
        rt, rl, rc = sgk.guided_sample_reference(logits, **kw)
        same = tokens == rt
        assert same.float().mean() >= 0.95
        torch.testing.assert_close(conf[same], rc[same], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(logp[same], rl[same], atol=1e-5, rtol=1e-5)
        if kind != "logp":  # Dream's float32 definitions on the tempered, filtered logits
            dream = confidence_reference(filter_logits_reference(logits / temperature, **filt), kind, tokens)
            torch.testing.assert_close(conf[same], dream[same], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["logp", "prob", "margin", "entropy"])
def test_step_with_filters_and_confidence(backend, kind):
    gen = torch.Generator().manual_seed(4)
    batch, n_tok, vocab = 3, 10, 33
    logits, guide = torch.randn(batch, n_tok, vocab, generator=gen), torch.randn(batch, n_tok, vocab, generator=gen)
    tokens = torch.randint(0, vocab, (batch, n_tok), generator=gen)
    is_masked = torch.rand(batch, n_tok, generator=gen) < 0.7
    tokens[is_masked] = vocab
    for temperature, tau, filt in ((0.0, 0.0, dict(top_k=4)), (0.8, 0.0, dict(top_p=0.85, min_p=0.05)), (1.0, 0.5, dict())):
        kw = dict(guidance_scale=0.5, temperature=temperature, choice_temperature=tau, confidence=kind, seed=5,
                  offset=9, **filt)
        got = run_on(backend, sgk.self_guided_step, tokens, is_masked, logits, guide, 4, **kw)
        want = sgk.self_guided_step_reference(tokens, is_masked, logits, guide, 4, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (temperature, filt)


# ------------------------------------------------------------------------------------------------
# Tensor seeds and offsets


def test_tensor_seed_same_tokens_guided_sample(backend):
    logits = torch.randn(6, 5, 30)
    for seed, offset in ((7, 0), (2**40 + 3, 2**33 + 5)):
        want = run_on(backend, sgk.guided_sample, logits, temperature=0.9, top_p=0.9, seed=seed, offset=offset)
        got = run_on(backend, sgk.guided_sample, logits, temperature=0.9, top_p=0.9, seed=torch.tensor(seed),
                     offset=torch.tensor(offset))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_tensor_seed_same_mask_remask(backend):
    logp = -torch.rand(3, 20)
    mask = torch.rand(3, 20) < 0.8
    want = run_on(backend, sgk.remask_lowest_confidence, logp, mask, 4, choice_temperature=1.0, seed=3, offset=8)
    got = run_on(backend, sgk.remask_lowest_confidence, logp, mask, 4, choice_temperature=1.0, seed=torch.tensor(3),
                 offset=torch.tensor(8))
    assert torch.equal(got, want)


def test_tensor_seed_same_tokens_step(backend):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 12, 20, generator=gen)
    tokens = torch.full((2, 12), 20)
    mask = torch.ones(2, 12, dtype=torch.bool)
    kw = dict(temperature=1.0, choice_temperature=2.0, confidence="margin", top_k=6)
    want = run_on(backend, sgk.self_guided_step, tokens, mask, logits, None, 5, seed=123, offset=4, **kw)
    got = run_on(backend, sgk.self_guided_step, tokens, mask, logits, None, 5, seed=torch.tensor(123),
                 offset=torch.tensor(4), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_check_rng_device():
    with pytest.raises(ValueError, match="offset"):
        _validate.check_rng(1, torch.tensor(0, device="meta"), torch.device("cpu"))


@pytest.mark.skipif(not has_cpu_kernel("self_guided_step"), reason="no C++ kernel")
def test_compile_with_tensor_offset_compiles_once():
    """A step whose offset is a tensor: three steps, three offsets, one compiled graph (fullgraph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    ops = torch.ops.sgkernels

    def step(tokens, mask, logits, n, seed, offset, status):
        return ops.self_guided_step(tokens, mask, logits * 1.0, None, n, 0.0, 1.0, 0.5, 0, 0, status, None, False,
                                    None, 3, 0.9, 0.0, "entropy", seed, offset)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    logits = torch.randn(2, 6, 16)
    tokens, mask = torch.full((2, 6), 16), torch.ones(2, 6, dtype=torch.bool)
    n, status, seed = torch.tensor([2, 3]), torch.zeros(1, dtype=torch.int32), torch.tensor(5)
    offset = torch.tensor(0)
    for i in range(3):
        offset.fill_(i)
        got = compiled(tokens, mask, logits, n, seed, offset, status)
        want = sgk.self_guided_step_reference(tokens, mask, logits, None, n, guidance_scale=0.0, temperature=1.0,
                                              choice_temperature=0.5, top_k=3, top_p=0.9, confidence="entropy",
                                              seed=5, offset=i)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert counter.frame_count == 1


def test_numpy_scalar_filters():
    """numpy integers and floats as top_k / top_p / min_p (issue 22), on every sampling op wrapper
    that takes them: the same tokens as the Python numbers."""
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=gen)
    h, w = torch.randn(6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    py = dict(top_k=5, top_p=0.9, min_p=0.01, temperature=0.8, seed=4)
    np_kw = dict(top_k=np.int64(5), top_p=np.float32(0.9), min_p=np.float64(0.01), temperature=0.8, seed=4)
    assert _validate.check_filters(np.int32(5), np.float32(0.5), np.float64(0.1)) == (5, 0.5, 0.1)
    assert type(_validate.check_filters(np.int32(5))[0]) is int
    for fn, args in ((sgk.guided_sample, (logits,)), (sgk.head_sample, (h, w))):
        assert torch.equal(fn(*args, **np_kw)[0], fn(*args, **dict(py, top_p=float(np.float32(0.9))))[0])
