"""Triton kernels vs the PyTorch references (sgkernels/ops/*_reference).

Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py); with
one they run on CUDA. Sizes stay small: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

import sgkernels as sgk
from sgkernels import _backend, _rng
from sgkernels.ops import _status

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(
        not _backend.triton_available() or (DEVICE == "cpu" and not _backend.triton_interpret()),
        reason="needs triton, and TRITON_INTERPRET=1 without a GPU",
    ),
    # numpy's warnings inside the interpreter (log(0), inf - inf on masked lanes and bad rows)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
if _backend.triton_available():
    from sgkernels.kernels import sampling as S

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _status_word():
    return torch.zeros(1, dtype=torch.int32, device=DEVICE)


def _both(fn, *args, **kwargs):
    with sgk.use_backend("triton"):
        out_t = fn(*args, **kwargs)
    with sgk.use_backend("torch"):
        out_r = fn(*args, **kwargs)
    if DEVICE == "cuda":
        sgk.check_errors()
    return out_t, out_r


def _assert_samples_close(tok, lp, tok_r, lp_r):
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert tok.shape == tok_r.shape and lp.shape == lp_r.shape
    agree = (tok == tok_r).float().mean().item() if tok.numel() else 1.0
    assert agree >= 0.995, f"tokens agree on {agree:.4f} of rows"
    same = tok == tok_r
    torch.testing.assert_close(lp[same], lp_r[same], rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force the multi-tile path on small vocabularies (tiles of 16)."""
    monkeypatch.setattr(S, "_MAX_SINGLE_TILE_V", 16)
    monkeypatch.setattr(S, "_TILE_V", 16)


# ------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 1), (2**31 + 5, 3), (3_000_000_000, 2**40 + 1), (2**62 + 17, 2**63 - 1)])
def test_philox_words_bitwise(seed, offset):
    rows = torch.tensor([0, 1, 2, 77, 2**32 - 1, 2**32, 2**33 + 7, 2**40 + 12345], dtype=torch.int64, device=DEVICE)
    out = torch.empty(4, rows.numel(), dtype=torch.int64, device=DEVICE)
    S._launch(S._philox_words_kernel)[(1,)](rows, out, rows.numel(), seed, offset, BLOCK=8)
    ref = torch.stack(_rng.row_words(seed, offset, rows.cpu())).to(DEVICE)
    assert torch.equal(out, ref)


def test_token_uniform_in_sampler():
    """V = 2, equal logits: token = (u >= 0.5) with u from words w0, w1 of each row."""
    rows = 512
    x = torch.zeros(rows, 2, device=DEVICE)
    status = _status_word()
    tok, lp = S.guided_sample_triton(x, None, 0.0, 1.0, 1234, 5, status)
    w0, w1, _, _ = _rng.row_words(1234, 5, torch.arange(rows))
    u = _rng.token_uniform(w0, w1)
    assert torch.equal(tok.cpu(), (u >= 0.5).to(torch.int64))
    torch.testing.assert_close(lp.cpu(), torch.full((rows,), -0.6931472))
    assert int(status.item()) == 0


# ------------------------------------------------------------------------------------------------
# guided_sample
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("vocab", [1, 5, 1000])
def test_guided_sample_matches_reference(dtype, temperature, vocab):
    gen = torch.Generator().manual_seed(vocab * 10 + int(temperature * 10))
    rows = 48 if vocab == 1000 else 96
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    guide = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(DEVICE) if vocab != 5 or dtype != torch.float16 else None
    (tok, lp), (tok_r, lp_r) = _both(
        sgk.guided_sample, logits, guide, guidance_scale=1.5, temperature=temperature, seed=11, offset=3
    )
    _assert_samples_close(tok, lp, tok_r, lp_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("vocab", [48, 40])
def test_guided_sample_multi_tile(small_tiles, dtype, temperature, vocab):
    gen = torch.Generator().manual_seed(vocab + int(temperature * 10))
    logits = (torch.randn(2, 6, vocab, generator=gen) * 2).to(dtype).to(DEVICE)
    logits[0, 0, 3] = 20.0  # one dominant token in the first tile
    logits[1, 2, :17] = float("-inf")  # whole first tile -inf
    guide = (torch.randn(2, 6, vocab, generator=gen)).to(dtype).to(DEVICE) if temperature != 1.0 else None
    assert S._sampler_config(12, vocab)[2] > 1
    (tok, lp), (tok_r, lp_r) = _both(
        sgk.guided_sample, logits, guide, guidance_scale=0.5, temperature=temperature, seed=5, offset=9
    )
    _assert_samples_close(tok, lp, tok_r, lp_r)


def test_guided_sample_strided_slice():
    """``[..., :V]`` slice of a wider head output (read in place) and a transposed guide."""
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(3, 8, 37, generator=gen).to(DEVICE)
    logits = head[..., :30]
    guide = torch.randn(30, 24, generator=gen).to(DEVICE).t().reshape(3, 8, 30)
    assert not logits.is_contiguous()
    x = logits.reshape(-1, 30)
    assert x.data_ptr() == head.data_ptr() and x.stride() == (37, 1)  # a view: no copy
    (tok, lp), (tok_r, lp_r) = _both(sgk.guided_sample, logits, guide, guidance_scale=2.0, temperature=0.9, seed=1)
    _assert_samples_close(tok, lp, tok_r, lp_r)


def test_guided_sample_empty_rows():
    logits = torch.randn(0, 7, device=DEVICE)
    with sgk.use_backend("triton"):
        tok, lp = sgk.guided_sample(logits, seed=0)
    assert tok.shape == (0,) and lp.shape == (0,)


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_guided_sample_bad_row_sets_status(bad):
    x = torch.randn(4, 9, device=DEVICE)
    if bad == "nan":
        x[2, 4] = float("nan")
    elif bad == "posinf":
        x[2, 0] = float("inf")
    else:
        x[2] = float("-inf")
    status = _status_word()
    tok, lp = S.guided_sample_triton(x, None, 0.0, 0.8, 3, 0, status)
    assert int(status.item()) == 1
    assert int(tok[2]) == 0 and torch.isnan(lp[2])
    assert torch.isfinite(lp[[0, 1, 3]]).all()
    if DEVICE == "cpu":
        with sgk.use_backend("triton"), pytest.raises(ValueError, match="NaN"):
            sgk.guided_sample(x, seed=3)


def test_guided_sample_bad_row_multi_tile(small_tiles):
    x = torch.randn(3, 40, device=DEVICE)
    x[1, 35] = float("nan")
    status = _status_word()
    tok, lp = S.guided_sample_triton(x, None, 0.0, 1.0, 3, 0, status)
    assert int(status.item()) == 1 and int(tok[1]) == 0 and torch.isnan(lp[1])
    assert torch.isfinite(lp[[0, 2]]).all()


# ------------------------------------------------------------------------------------------------
# remask_lowest_confidence
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.0, 2.5])
@pytest.mark.parametrize("num", ["int", "tensor", "over", "zero"])
def test_remask_matches_reference(tau, num):
    gen = torch.Generator().manual_seed(7)
    batch, n_pos = 4, 37
    logp = (-torch.rand(batch, n_pos, generator=gen) * 5).to(DEVICE)
    is_masked = (torch.rand(batch, n_pos, generator=gen) < 0.6).to(DEVICE)
    if num == "int":
        n = 6
    elif num == "tensor":
        n = torch.tensor([0, 3, 10, 37], dtype=torch.int64, device=DEVICE)
    elif num == "over":
        n = n_pos  # more than the candidates of every row
    else:
        n = 0
    out, ref = _both(sgk.remask_lowest_confidence, logp, is_masked, n, choice_temperature=tau, seed=21, offset=4)
    assert out.dtype == torch.bool and torch.equal(out, ref)
    assert not (out & ~is_masked).any()


def test_remask_ties_and_special_values():
    """Ties go to the lower index; -0.0 == +0.0; -inf first; bf16 logp upcast."""
    logp = torch.tensor(
        [[-1.0, -2.0, -2.0, -1.0, -2.0, 0.0, -0.0, -2.0],
         [0.0, -0.0, 0.0, -0.0, float("-inf"), -1.0, float("-inf"), 0.0]],
        device=DEVICE,
    )
    is_masked = torch.ones_like(logp, dtype=torch.bool)
    is_masked[0, 2] = False
    n = torch.tensor([3, 5], dtype=torch.int64, device=DEVICE)
    out, ref = _both(sgk.remask_lowest_confidence, logp, is_masked, n, choice_temperature=0.0, seed=0)
    assert torch.equal(out, ref)
    assert out[0].tolist() == [False, True, False, False, True, False, False, True]
    out_bf, ref_bf = _both(sgk.remask_lowest_confidence, logp.bfloat16(), is_masked, n, choice_temperature=1.0, seed=2)
    assert torch.equal(out_bf, ref_bf)


def test_remask_tiny_rows():
    """N = 1, and rows without candidates."""
    logp = torch.tensor([[-0.5], [-1.0], [0.0]], device=DEVICE)
    is_masked = torch.tensor([[True], [False], [True]], device=DEVICE)
    n = torch.tensor([1, 1, 0], dtype=torch.int64, device=DEVICE)
    out, ref = _both(sgk.remask_lowest_confidence, logp, is_masked, n, choice_temperature=1.0, seed=4)
    assert torch.equal(out, ref) and out[:, 0].tolist() == [True, False, False]
    logp = torch.randn(3, 9, device=DEVICE)
    none = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    out, ref = _both(sgk.remask_lowest_confidence, logp, none, 4, choice_temperature=1.0, seed=4)
    assert torch.equal(out, ref) and not out.any()


def test_remask_long_row():
    gen = torch.Generator().manual_seed(3)
    logp = (-torch.rand(2, 1500, generator=gen) * 3).to(DEVICE)
    logp[:, ::7] = -1.0  # many exact ties
    is_masked = (torch.rand(2, 1500, generator=gen) < 0.9).to(DEVICE)
    n = torch.tensor([700, 1400], dtype=torch.int64, device=DEVICE)
    for tau in (0.0, 0.3):
        out, ref = _both(sgk.remask_lowest_confidence, logp, is_masked, n, choice_temperature=tau, seed=8, offset=1)
        assert torch.equal(out, ref)


def test_remask_gumbel_matches_rng():
    """tau large, logp 0: the order is the Gumbel noise of _rng (w2, w3), bit for bit in effect."""
    batch, n_pos = 3, 64
    logp = torch.zeros(batch, n_pos, device=DEVICE)
    is_masked = torch.ones(batch, n_pos, dtype=torch.bool, device=DEVICE)
    status = _status_word()
    nums = torch.full((batch,), 17, dtype=torch.int64, device=DEVICE)
    out = S.remask_triton(logp, is_masked, nums, 1.0, 99, 6, status)
    _, _, w2, w3 = _rng.row_words(99, 6, torch.arange(batch * n_pos))
    g = _rng.gumbel(w2, w3).reshape(batch, n_pos)
    idx = torch.argsort(g, dim=-1, stable=True)[:, :17]
    ref = torch.zeros(batch, n_pos, dtype=torch.bool).scatter(-1, idx, True)
    assert torch.equal(out.cpu(), ref)


def test_remask_negative_num_sets_status():
    logp = torch.randn(2, 5, device=DEVICE)
    is_masked = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    status = _status_word()
    out = S.remask_triton(logp, is_masked, torch.tensor([-1, 2], device=DEVICE), 0.0, 0, 0, status)
    assert int(status.item()) == 2
    assert out[0].sum() == 0 and out[1].sum() == 2
    if DEVICE == "cpu":
        with sgk.use_backend("triton"), pytest.raises(ValueError, match="num_to_mask"):
            sgk.remask_lowest_confidence(logp, is_masked, torch.tensor([-1, 2]), seed=0)


def test_remask_rejects_long_rows():
    logp = torch.zeros(1, S.MAX_REMASK_N + 1, device=DEVICE)
    with pytest.raises(ValueError, match="N <= 4096"):
        S.remask_triton(logp, logp < 0, torch.zeros(1, dtype=torch.int64, device=DEVICE), 0.0, 0, 0, _status_word())


# ------------------------------------------------------------------------------------------------
# self_guided_step
# ------------------------------------------------------------------------------------------------
def _step_inputs(batch, n_pos, vocab, dtype, seed, guide=True):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, n_pos, vocab, generator=gen) * 2).to(dtype).to(DEVICE)
    g = (torch.randn(batch, n_pos, vocab, generator=gen) * 2).to(dtype).to(DEVICE) if guide else None
    is_masked = (torch.rand(batch, n_pos, generator=gen) < 0.5).to(DEVICE)
    tokens = torch.randint(0, vocab, (batch, n_pos), generator=gen).to(DEVICE)
    tokens[is_masked] = vocab  # the mask id
    return tokens, is_masked, logits, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_self_guided_step_matches_reference(dtype, temperature):
    tokens, is_masked, logits, guide = _step_inputs(3, 24, 50, dtype, seed=int(temperature * 10), guide=dtype != torch.float16)
    n = torch.tensor([2, 0, 9], dtype=torch.int64, device=DEVICE)
    (tk, mk), (tk_r, mk_r) = _both(
        sgk.self_guided_step, tokens, is_masked, logits, guide, n,
        guidance_scale=1.0, temperature=temperature, choice_temperature=3.0, seed=17, offset=2,
    )
    assert tk.dtype == torch.int64 and mk.dtype == torch.bool
    assert torch.equal(tk, tk_r) and torch.equal(mk, mk_r)
    assert not (mk & ~is_masked).any()


def test_self_guided_step_multi_tile(small_tiles):
    tokens, is_masked, logits, guide = _step_inputs(2, 6, 40, torch.float32, seed=4)
    (tk, mk), (tk_r, mk_r) = _both(
        sgk.self_guided_step, tokens, is_masked, logits, guide, 2,
        guidance_scale=0.5, temperature=0.8, choice_temperature=1.0, seed=3, offset=1,
    )
    assert torch.equal(tk, tk_r) and torch.equal(mk, mk_r)


@pytest.mark.parametrize("multi_tile", [False, True])
def test_self_guided_step_known_rows_not_read(monkeypatch, multi_tile):
    """NaN logits at known positions are never read (no flag); a masked NaN row sets bit 1."""
    if multi_tile:
        monkeypatch.setattr(S, "_MAX_SINGLE_TILE_V", 8)
        monkeypatch.setattr(S, "_TILE_V", 8)
    tokens, is_masked, logits, guide = _step_inputs(2, 8, 20, torch.float32, seed=9)
    logits[~is_masked] = float("nan")
    n = torch.tensor([1, 2], dtype=torch.int64, device=DEVICE)
    status = _status_word()
    tk, mk = S.self_guided_step_triton(tokens, is_masked, logits, guide, n, 1.0, 1.0, 2.0, 5, 0, status)
    assert int(status.item()) == 0
    with sgk.use_backend("torch"):
        tk_r, mk_r = sgk.self_guided_step(
            tokens, is_masked, logits, guide, n, guidance_scale=1.0, temperature=1.0, choice_temperature=2.0, seed=5
        )
    assert torch.equal(tk, tk_r) and torch.equal(mk, mk_r)
    pos = int(torch.nonzero(is_masked.reshape(-1))[0])
    logits.reshape(-1, 20)[pos, 3] = float("nan")
    S.self_guided_step_triton(tokens, is_masked, logits, guide, n, 1.0, 1.0, 2.0, 5, 0, status)
    assert int(status.item()) == 1


def test_self_guided_step_strided_logits():
    tokens, is_masked, _, _ = _step_inputs(2, 10, 30, torch.float32, seed=1)
    head = torch.randn(2, 10, 41, device=DEVICE)
    logits = head[..., :30]
    (tk, mk), (tk_r, mk_r) = _both(
        sgk.self_guided_step, tokens, is_masked, logits, None, 3,
        guidance_scale=0.0, temperature=1.0, choice_temperature=0.5, seed=2, offset=7,
    )
    assert torch.equal(tk, tk_r) and torch.equal(mk, mk_r)


def test_status_buffer_untouched_by_good_calls():
    assert _status.NONFINITE_LOGITS == 1 and _status.NEGATIVE_NUM_TO_MASK == 2
    status = _status_word()
    x = torch.randn(8, 12, device=DEVICE)
    S.guided_sample_triton(x, x.flip(-1), 1.0, 0.5, 1, 2, status)
    S.remask_triton(x, x > 0, torch.full((8,), 3, device=DEVICE), 1.0, 1, 2, status)
    assert int(status.item()) == 0
