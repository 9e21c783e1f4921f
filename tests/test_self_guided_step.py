"""self_guided_step: the fused MaskGIT step against the reference and against its composition."""
from __future__ import annotations

import pytest
import torch
from helpers import backend_params, has_cpu_kernel, is_interpreter

import sgkernels as sgk
from sgkernels import use_backend

BACKENDS = backend_params("self_guided_step")
MASK_ID = 1000


def case(batch, n_tok, vocab, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(batch, n_tok, vocab, generator=gen)).to(dtype)
    guide = (2 * torch.randn(batch, n_tok, vocab, generator=gen)).to(dtype)
    is_masked = torch.rand(batch, n_tok, generator=gen) < 0.7
    tokens = torch.where(is_masked, MASK_ID, torch.randint(0, vocab, (batch, n_tok), generator=gen))
    return tokens, is_masked, logits, guide


def run(backend, *args, **kw):
    name, device = backend
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with use_backend(name):
        out = sgk.self_guided_step(*args, **kw)
    return tuple(o.cpu() for o in out)


KW = dict(guidance_scale=1.0, temperature=1.0, choice_temperature=4.0, seed=21, offset=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [True, False])
def test_matches_reference(backend, dtype, guided):
    batch, n_tok = (2, 16) if is_interpreter(backend) else (4, 64)
    tokens, is_masked, logits, guide = case(batch, n_tok, 50, seed=1, dtype=dtype)
    guide = guide if guided else None
    n = torch.tensor([0, 3, 100, 5][:batch])
    new_tokens, new_mask = run(backend, tokens, is_masked, logits, guide, n, **KW)
    ref_tokens, ref_mask = sgk.self_guided_step_reference(tokens, is_masked, logits, guide, n, **KW)
    assert new_tokens.dtype == torch.int64 and new_mask.dtype == torch.bool
    assert (new_mask == ref_mask).double().mean() >= 0.99
    assert (new_tokens == ref_tokens).double().mean() >= 0.99


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_composition(backend):
    """step == guided_sample then remask, with the same seed and offset."""
    tokens, is_masked, logits, guide = case(2, 24, 30, seed=6)
    n = torch.tensor([3, 7])
    new_tokens, new_mask = run(backend, tokens, is_masked, logits, guide, n, **KW)
    name, device = backend
    with use_backend(name):
        tok, logp = sgk.guided_sample(logits.to(device), guide.to(device), guidance_scale=1.0, temperature=1.0, seed=21, offset=3)
        remask = sgk.remask_lowest_confidence(
            torch.where(is_masked.to(device), logp, 0.0), is_masked.to(device), n.to(device), choice_temperature=4.0, seed=21, offset=3
        )
    assert torch.equal(new_mask, remask.cpu())
    want = torch.where(is_masked & ~remask.cpu(), tok.cpu(), tokens)
    assert torch.equal(new_tokens, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_rows_are_not_read(backend):
    """NaN logits at known positions are never looked at: no error, same result."""
    tokens, is_masked, logits, guide = case(2, 16, 12, seed=8)
    poisoned = logits.clone()
    poisoned[~is_masked] = float("nan")
    a = run(backend, tokens, is_masked, logits, guide, 2, **KW)
    b = run(backend, tokens, is_masked, poisoned, guide, 2, **KW)
    if backend[1] == "cuda":
        sgk.check_errors()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_masked_row_raises(backend):
    if backend[1] == "cuda":
        pytest.skip("deferred on CUDA")
    tokens, is_masked, logits, guide = case(2, 16, 12, seed=8)
    r = is_masked.nonzero()[0]
    logits[r[0], r[1], 5] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        run(backend, tokens, is_masked, logits, guide, 2, **KW)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits(backend):
    tokens, is_masked, logits, guide = case(2, 8, 40, seed=9)
    wide = torch.randn(2, 8, 64)
    wide[..., :40] = logits
    a = run(backend, tokens, is_masked, wide[..., :40], guide, 3, **KW)
    b = run(backend, tokens, is_masked, logits, guide, 3, **KW)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments():
    tokens, is_masked, logits, guide = case(2, 8, 10, seed=0)
    with pytest.raises(ValueError, match="logits"):
        sgk.self_guided_step(tokens, is_masked, logits[0], None, 1)
    with pytest.raises(ValueError, match="tokens"):
        sgk.self_guided_step(tokens[:, :4], is_masked, logits, None, 1)
    with pytest.raises(TypeError, match="tokens"):
        sgk.self_guided_step(tokens.float(), is_masked, logits, None, 1)
    with pytest.raises(TypeError, match="is_masked"):
        sgk.self_guided_step(tokens, is_masked.long(), logits, None, 1)
    with pytest.raises(ValueError, match="num_to_mask"):
        sgk.self_guided_step(tokens, is_masked, logits, None, -1)
    with pytest.raises(ValueError, match="guide_logits"):
        sgk.self_guided_step(tokens, is_masked, logits, guide[:, :, :5], 1)
    with pytest.raises(ValueError, match="temperature"):
        sgk.self_guided_step(tokens, is_masked, logits, None, 1, temperature=-0.1)


@pytest.mark.skipif(not has_cpu_kernel("self_guided_step"), reason="no C++ kernel")
def test_opcheck_cpu():
    tokens, is_masked, logits, guide = case(2, 12, 17, seed=3)
    status = torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.sgkernels.self_guided_step,
        (tokens, is_masked, logits, guide, torch.tensor([2, 3]), 1.0, 1.0, 3.0, 5, 2, status),
    )
