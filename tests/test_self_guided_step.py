"""self_guided_step: the op contract on every backend, the step's semantics and its composition
(guided_sample then remask), known rows never read, the status word, and the other C++ ISAs."""
from __future__ import annotations

import pytest
import torch
from helpers import has_cpu_kernel
from op_contract import (CPU_ISAS, DTYPE_IDS, FLOAT_DTYPES, Backend, Bad, Case, OpContract, assert_agree, bad_list,
                         kernel_status, raw_kernel, run_on, run_under_isa, shrink_tiles)

import sgkernels as sgk
from sgkernels import _backend, use_backend

OP = "self_guided_step"
MASK_ID = 1000
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter


def case(batch, n_tok, vocab, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(batch, n_tok, vocab, generator=gen)).to(dtype)
    guide = (2 * torch.randn(batch, n_tok, vocab, generator=gen)).to(dtype)
    is_masked = torch.rand(batch, n_tok, generator=gen) < 0.7
    tokens = torch.where(is_masked, MASK_ID, torch.randint(0, vocab, (batch, n_tok), generator=gen))
    return tokens, is_masked, logits, guide


KW = dict(guidance_scale=1.0, temperature=1.0, choice_temperature=4.0, seed=21, offset=3)


def _case(dtype, guided, temperature, tau):
    def make(backend, monkeypatch):
        batch, n_tok, vocab = (2, 16, 50) if backend.interpreter else (4, 96, 257)
        tokens, is_masked, logits, guide = case(batch, n_tok, vocab, seed=1, dtype=dtype)
        n = torch.tensor([0, 3, 100, 5][:batch])
        kw = dict(guidance_scale=2.0, temperature=temperature, choice_temperature=tau, seed=99, offset=5)
        return (tokens, is_masked, logits, guide if guided else None, n), kw

    g = "guided" if guided else "plain"
    return Case(f"{DTYPE_IDS[dtype]}-{g}-t{temperature}-tau{tau}", dtype, make)


class TestContract(OpContract):
    def call(self, *args, **kw):
        return sgk.self_guided_step(*args, **kw)

    def reference(self, *args, **kw):
        return sgk.self_guided_step_reference(*args, **kw)

    def reference_cases(self):
        temps = ((1.0, 3.0), (0.0, 0.0), (0.7, 1.0))
        return [_case(dt, g, t, tau) for dt in FLOAT_DTYPES for g in (False, True) for t, tau in temps]

    def check(self, out, ref, tol, args, kwargs):
        (new_tokens, new_mask), (ref_tokens, ref_mask) = out, ref
        tokens, is_masked, _, _, n = args
        assert new_tokens.dtype == torch.int64 and new_mask.dtype == torch.bool
        assert_agree(new_mask, ref_mask, tol)
        assert_agree(new_tokens, ref_tokens, tol)
        assert torch.equal(new_tokens[~is_masked], tokens[~is_masked])
        assert torch.equal(new_mask.sum(-1), torch.minimum(n, is_masked.sum(-1)))

    def bad_inputs(self):
        tokens, is_masked, logits, guide = case(2, 8, 10, seed=0)
        return bad_list(
            Bad("logits", ValueError, (tokens, is_masked, logits[0], None, 1)),
            Bad("tokens", ValueError, (tokens[:, :4], is_masked, logits, None, 1)),
            Bad("tokens", TypeError, (tokens.float(), is_masked, logits, None, 1)),
            Bad("is_masked", TypeError, (tokens, is_masked.long(), logits, None, 1)),
            Bad("num_to_mask", ValueError, (tokens, is_masked, logits, None, -1)),
            Bad("guide_logits", ValueError, (tokens, is_masked, logits, guide[:, :, :5], 1)),
            Bad("temperature", ValueError, (tokens, is_masked, logits, None, 1), dict(temperature=-0.1)),
            Bad("tie_rule", ValueError, (tokens, is_masked, logits, None, 1), dict(tie_rule="lowest")),
            Bad("mask_token_id", ValueError, (tokens, is_masked, logits, None, 1), dict(decoded_confidence=88.7)),
            Bad("mask_token_id", TypeError, (tokens, is_masked, logits, None, 1), dict(mask_token_id=1.5)),
        )

    def opcheck_samples(self, device):
        tokens, is_masked, logits, guide = (t.to(device) for t in case(2, 12, 17, seed=3))
        status = torch.zeros(1, dtype=torch.int32, device=device)
        n = torch.tensor([2, 3], device=device)
        args = (tokens, is_masked, logits, guide, n, 1.0, 1.0, 3.0, 5, 2, status)
        return [(OP, args), (OP, args + (88.7, True, MASK_ID)),
                (OP, (tokens, is_masked, logits, guide, n, 1.0, 0.8, 3.0, 0, 0, status, None, False, None, 4, 0.9,
                      0.1, "prob", torch.tensor(5, device=device), torch.tensor(2, device=device)))]


def run(backend, *args, **kw):
    return run_on(backend, sgk.self_guided_step, *args, **kw)


def test_step_semantics(backend):
    tokens, is_masked, logits, guide = case(3, 32, 20, seed=4)
    n = torch.tensor([4, 0, 50])
    new_tokens, new_mask = run(backend, tokens, is_masked, logits, guide, n, **KW)
    assert not (new_mask & ~is_masked).any(), "a known position was re-masked"
    assert torch.equal(new_tokens[~is_masked], tokens[~is_masked]), "a known token changed"
    assert (new_tokens[new_mask] == MASK_ID).all(), "re-masked tokens must get the mask id back"
    sampled = is_masked & ~new_mask
    assert ((new_tokens[sampled] >= 0) & (new_tokens[sampled] < 20)).all()
    assert torch.equal(new_mask.sum(-1), torch.minimum(n, is_masked.sum(-1)))


def test_equals_composition(backend):
    """step == guided_sample then remask, with the same seed and offset."""
    tokens, is_masked, logits, guide = case(2, 24, 30, seed=6)
    n = torch.tensor([3, 7])
    new_tokens, new_mask = run(backend, tokens, is_masked, logits, guide, n, **KW)
    device = backend.device
    with use_backend(backend.name):
        tok, logp = sgk.guided_sample(logits.to(device), guide.to(device), guidance_scale=1.0, temperature=1.0, seed=21, offset=3)
        remask = sgk.remask_lowest_confidence(
            torch.where(is_masked.to(device), logp, 0.0), is_masked.to(device), n.to(device), choice_temperature=4.0, seed=21, offset=3
        )
    assert torch.equal(new_mask, remask.cpu())
    want = torch.where(is_masked & ~remask.cpu(), tok.cpu(), tokens)
    assert torch.equal(new_tokens, want)


def test_strided_equals_contiguous(backend):
    """bf16 logits as transposed rows and a [..., :V] slice, tokens / is_masked with odd strides."""
    gen = torch.Generator().manual_seed(9)
    batch, n_tok, vocab = 3, 20, 40
    wide = (2 * torch.randn(n_tok, batch, vocab + 24, generator=gen)).bfloat16()
    logits = wide.transpose(0, 1)[..., :vocab]
    guide = (2 * torch.randn(batch, n_tok, vocab, generator=gen)).bfloat16()
    is_masked = torch.rand(batch, n_tok, generator=gen) < 0.5
    tokens = torch.where(is_masked, vocab, torch.randint(0, vocab, (batch, n_tok), generator=gen))
    n = torch.tensor([3, 4, 5])
    kw = dict(KW, choice_temperature=2.0)
    a = run(backend, tokens.t().contiguous().t(), is_masked.t().contiguous().t(), logits, guide, n, **kw)
    b = run(backend, tokens, is_masked, logits.contiguous(), guide, n, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty(backend):
    tokens = torch.zeros(2, 0, dtype=torch.int64)
    out = run(backend, tokens, tokens.bool(), torch.randn(2, 0, 5), None, torch.tensor([1, 1]), **KW)
    assert out[0].shape == (2, 0) and out[1].shape == (2, 0)


# ------------------------------------------------------------------------------------------------
# Known rows are never read; bad rows and negative num_to_mask set the status word


def test_known_rows_are_not_read(backend):
    """NaN logits at known positions are never looked at: no error, same result."""
    tokens, is_masked, logits, guide = case(2, 16, 12, seed=8)
    poisoned = logits.clone()
    poisoned[~is_masked] = float("nan")
    guide_poisoned = guide.clone()
    guide_poisoned[~is_masked] = float("inf")
    a = run(backend, tokens, is_masked, logits, guide, 2, **KW)
    b = run(backend, tokens, is_masked, poisoned, guide_poisoned, 2, **KW)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("tie_rule", ["exact_k", "strict_below"])
def test_unlockmgm_options(backend, tie_rule):
    """decoded_confidence + mask_token_id (+ either tie rule): decoded positions compete, re-masked
    ones get the mask id, on every backend against the reference; ties at tau 0 come from
    repeated rows."""
    tokens, is_masked, logits, guide = case(3, 24, 16, seed=13)
    logits[:, 12:] = logits[:, :12]  # equal rows: equal logp, ties in confidence at tau 0
    guide[:, 12:] = guide[:, :12]
    is_masked[:, 12:] = is_masked[:, :12]
    tokens[:, 12:] = tokens[:, :12]
    n = torch.tensor([2, 9, 23])
    for tau, dec in ((0.0, -1.0), (30.0, 88.72283935546875), (2.0, -2.5)):
        kw = dict(KW, choice_temperature=tau, decoded_confidence=dec, tie_rule=tie_rule, mask_token_id=MASK_ID)
        new_tokens, new_mask = run(backend, tokens, is_masked, logits, guide, n, **kw)
        ref_tokens, ref_mask = sgk.self_guided_step_reference(tokens, is_masked, logits, guide, n, **kw)
        assert torch.equal(new_tokens, ref_tokens) and torch.equal(new_mask, ref_mask), (tau, dec)
        assert bool((new_tokens[new_mask] == MASK_ID).all())
        assert bool((new_tokens[~new_mask] != MASK_ID).all())
        if tau == 0.0:
            assert bool((new_mask & ~is_masked).any()), "decoded positions were re-masked"
    with pytest.raises(ValueError, match="mask_token_id"):
        run(backend, tokens, is_masked, logits, guide, n, **dict(KW, decoded_confidence=1.0))


@pytest.mark.parametrize("s", [0.0, -1.0, 1.5])
def test_blend_minus_inf(backend, s):
    """guided_sample's blend rule in the step: s = 0 (s = -1) is the logits (guide) alone, NaN in the
    dropped term included; -inf in either term of nonzero coefficient is never sampled."""
    tokens, is_masked, logits, guide = case(2, 16, 30, seed=12)
    logits[..., 20:] = float("-inf")
    guide[..., 15:25] = float("-inf")
    if s == 0.0:
        guide[..., 2] = float("nan")
    if s == -1.0:
        logits[..., 2] = float("nan")
    kw = dict(KW, guidance_scale=s)
    new_tokens, new_mask = run(backend, tokens, is_masked, logits, guide, 3, **kw)
    ref = sgk.self_guided_step_reference(tokens, is_masked, logits, guide, 3, **kw)
    assert torch.equal(new_tokens, ref[0]) and torch.equal(new_mask, ref[1])
    if s in (0.0, -1.0):
        alone = run(backend, tokens, is_masked, logits if s == 0.0 else guide, None, 3, **kw)
        assert torch.equal(new_tokens, alone[0]) and torch.equal(new_mask, alone[1])
    else:
        sampled = new_tokens[is_masked & ~new_mask]
        assert bool((sampled < 15).all())


def _status_after_step(kernel, logits, tokens, is_masked, guide, n):
    d = kernel.device
    return kernel_status(kernel, OP, tokens.to(d), is_masked.to(d), logits.to(d), guide.to(d), n.to(d), 1.0, 1.0, 2.0, 5, 0)


@pytest.mark.parametrize("tiles", ["1tile", "tiles"])
def test_known_rows_status(kernel, tiles, monkeypatch):
    """Known rows with NaN: no flag. A NaN in a masked row: bit 1 (NONFINITE_LOGITS)."""
    if tiles == "tiles":
        if kernel.name != "triton":
            pytest.skip("the multi-tile path on small vocabularies is the Triton kernel's")
        from sgkernels.kernels import sampling as S

        shrink_tiles(monkeypatch, S, 8)
    tokens, is_masked, logits, guide = case(2, 8, 20, seed=9)
    logits[~is_masked] = float("nan")
    n = torch.tensor([1, 2])
    flag, (new_tokens, new_mask) = _status_after_step(kernel, logits, tokens, is_masked, guide, n)
    assert flag == 0
    kw = dict(guidance_scale=1.0, temperature=1.0, choice_temperature=2.0, seed=5)
    ref_tokens, ref_mask = sgk.self_guided_step_reference(tokens, is_masked, logits, guide, n, **kw)
    assert torch.equal(new_tokens.cpu(), ref_tokens) and torch.equal(new_mask.cpu(), ref_mask)
    pos = int(torch.nonzero(is_masked.reshape(-1))[0])
    logits.reshape(-1, 20)[pos, 3] = float("nan")
    assert _status_after_step(kernel, logits, tokens, is_masked, guide, n)[0] == 1


def test_negative_num_sets_status(kernel):
    tokens, is_masked, logits, guide = case(3, 10, 5, seed=2)
    assert _status_after_step(kernel, logits, tokens, is_masked, guide, torch.tensor([1, 1, -4]))[0] == 2


def test_nan_in_masked_row_raises(backend):
    if backend.device == "cuda":
        pytest.skip("deferred on CUDA")
    tokens, is_masked, logits, guide = case(2, 16, 12, seed=8)
    r = is_masked.nonzero()[0]
    logits[r[0], r[1], 5] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        run(backend, tokens, is_masked, logits, guide, 2, **KW)


# ------------------------------------------------------------------------------------------------
# The Triton kernel's multi-tile path, and the C++ kernels' other ISAs


@pytest.mark.skipif(
    not _backend.triton_available() or (not torch.cuda.is_available() and not _backend.triton_interpret()),
    reason="needs triton, and TRITON_INTERPRET=1 without a GPU",
)
def test_triton_multi_tile(monkeypatch):
    from sgkernels.kernels import sampling as S

    shrink_tiles(monkeypatch, S, 16)
    tokens, is_masked, logits, guide = case(2, 6, 40, seed=4)
    kw = dict(guidance_scale=0.5, temperature=0.8, choice_temperature=1.0, seed=3, offset=1)
    triton = Backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
    new_tokens, new_mask = run(triton, tokens, is_masked, logits, guide, 2, **kw)
    ref_tokens, ref_mask = sgk.self_guided_step_reference(tokens, is_masked, logits, guide, 2, **kw)
    assert torch.equal(new_tokens, ref_tokens) and torch.equal(new_mask, ref_mask)


@pytest.mark.slow
@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_under_isa(isa):
    """Every cpp test of this file again, on the generic and AVX2 builds of the C++ kernels."""
    run_under_isa(__file__, isa)
