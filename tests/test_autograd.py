"""Autograd tells the truth: guided_sample's logp and vq_lookup's sq_distance differentiate (with
respect to logits/guide and z/codebook) on every backend, and no op returns an output that requires
grad while its backward would leave the inputs' grad None."""
from __future__ import annotations

import sys

import pytest
import torch
from op_contract import backend_params, to_device

import sgkernels as sgk
from sgkernels.ops import (
    fused_cross_entropy,
    guided_sample,
    remask_lowest_confidence,
    self_guided_step,
    vq_lookup,
)
from sgkernels.ops.guided_sample import _LogpGrad
from sgkernels.ops.head_sample import _HeadLogpGrad, blend_hidden, head_sample

SAMPLING = backend_params("guided_sample")
HEAD = backend_params("head_sample")
VQ = backend_params("vq_lookup")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _logp64(logits, guide, s, tokens):
    """log_softmax(g)[token] in float64, g = (1 + s) logits - s guide (logits alone without guide)."""
    g = logits.double() if guide is None else (1.0 + s) * logits.double() - s * guide.double()
    return torch.log_softmax(g, -1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("backend", SAMPLING)
@pytest.mark.parametrize("s, with_guide", [(0.0, True), (0.7, True), (-1.0, True), (2.5, True), (0.0, False)])
def test_logp_gradient_matches_float64(backend, s, with_guide):
    gen = torch.Generator().manual_seed(1)
    logits, guide = torch.randn(2, 3, 11, generator=gen) * 2, torch.randn(2, 3, 11, generator=gen) * 2
    weight = torch.randn(2, 3, generator=gen)
    l = to_device(logits, backend.device).requires_grad_()
    u = to_device(guide, backend.device).requires_grad_() if with_guide else None
    with sgk.use_backend(backend.name):
        tokens, logp = guided_sample(l, u, guidance_scale=s, temperature=0.9, seed=4)
    assert logp.requires_grad and not tokens.requires_grad
    inputs = (l, u) if with_guide else (l,)
    got = torch.autograd.grad((logp * weight.to(logp.device)).sum(), inputs)
    l64 = logits.double().requires_grad_()
    u64 = guide.double().requires_grad_() if with_guide else None
    ref = _logp64(l64, u64, s, tokens.cpu())
    want = torch.autograd.grad((ref * weight.double()).sum(), (l64, u64) if with_guide else (l64,))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [p for p in SAMPLING if p.id in ("torch", "cpp")])
def test_logp_gradcheck(backend):
    """gradcheck through the op (float32 inputs, as the op takes: finite differences at 1e-3)."""
    gen = torch.Generator().manual_seed(2)
    l = torch.randn(2, 3, 6, generator=gen).requires_grad_()
    u = torch.randn(2, 3, 6, generator=gen).requires_grad_()
    with sgk.use_backend(backend.name):
        fn = lambda a, b: guided_sample(a, b, guidance_scale=0.8, seed=7)[1]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (l, u), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_logp_formula_gradcheck_float64():
    """The registered formula in float64: logp computed by torch ops (its own gradient cut off),
    the gradient coming from _LogpGrad's backward alone."""
    gen = torch.Generator().manual_seed(3)
    l = torch.randn(3, 7, generator=gen, dtype=torch.float64).requires_grad_()
    u = torch.randn(3, 7, generator=gen, dtype=torch.float64).requires_grad_()
    tokens = torch.tensor([0, 3, 6])
    for s in (0.0, 1.3, -1.0):
        fn = lambda a, b: _LogpGrad.apply(_logp64(a, b, s, tokens).detach(), tokens, s, a, b)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (l, u))


def test_logp_gradient_ignores_excluded_tokens():
    """-inf entries (banned tokens) get a zero gradient, never NaN."""
    l = torch.randn(2, 9)
    l[:, 5:] = float("-inf")
    l.requires_grad_()
    for name in ("torch", "cpp"):
        with sgk.use_backend(name):
            tokens, logp = guided_sample(l, seed=1)
        (grad,) = torch.autograd.grad(logp.sum(), l)
        assert bool((tokens < 5).all()) and bool(torch.isfinite(grad).all())
        assert bool((grad[:, 5:] == 0).all())


def _head_logp64(h, u, w, b, s, tokens, sel):
    """log_softmax(blend(h, u) @ w.T + b)[token] of the rows ``sel`` of h's flattened leading dims."""
    d = h.shape[-1]
    x = blend_hidden(h.reshape(-1, d)[sel], None if u is None else u.reshape(-1, d)[sel], s)
    logits = x @ w.T + (0.0 if b is None else b)
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]


@pytest.mark.parametrize("backend", HEAD)
@pytest.mark.parametrize("rows", ["all", "index", "mask"])
def test_head_sample_logp_gradient(backend, monkeypatch, rows):
    """head_sample's logp differentiates w.r.t. hidden, guide, weight and bias (issue 22: it used to
    return a graph whose backward left them None): against float64 autograd of log_softmax of the
    materialised logits, with a row-chunk budget of 2 rows (the backward never holds all logits)."""
    monkeypatch.setattr(sys.modules["sgkernels.ops.head_sample"], "_CHUNK_BYTES", 2 * 4 * 300)
    gen = torch.Generator().manual_seed(6)
    h, u = 2 * torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    w, b = torch.randn(300, 5, generator=gen), torch.randn(300, generator=gen)
    sel = {"all": None, "index": torch.tensor([4, 1, 1]),
           "mask": torch.tensor([[True, False, True], [False, True, True]])}[rows]
    xs = [to_device(t, backend.device).requires_grad_() for t in (h, u, w, b)]
    with sgk.use_backend(backend.name):
        tokens, logp = head_sample(xs[0], xs[2], xs[3], xs[1], guidance_scale=0.7, temperature=0.9, seed=2,
                                   rows=None if sel is None else to_device(sel, backend.device))
    assert logp.requires_grad and not tokens.requires_grad
    weight = torch.randn(logp.shape, generator=gen)
    got = torch.autograd.grad((logp * weight.to(logp.device)).sum(), xs)
    ys = [t.double().requires_grad_() for t in (h, u, w, b)]
    ids = torch.arange(6) if sel is None or sel.dtype == torch.bool else sel
    tok = tokens.cpu().reshape(-1)
    keep = tok >= 0
    ref = _head_logp64(ys[0], ys[1], ys[2], ys[3], 0.7, tok[keep], ids[keep])
    want = torch.autograd.grad((ref * weight.reshape(-1)[keep].double()).sum(), ys)
    for a, b_ in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.cpu().double(), b_, rtol=1e-4, atol=1e-5)


def test_head_logp_formula_gradcheck_float64():
    """_HeadLogpGrad's backward in float64 (logp computed by torch ops, its own gradient cut off),
    for s = 0 (guide dropped), s = 1.3 and s = -1 (hidden dropped), with repeated rows."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
          for shape in ((2, 3, 4), (2, 3, 4), (9, 4), (9,))]
    tokens, sel = torch.tensor([0, 3, 8, 3]), torch.tensor([5, 0, 2, 2])
    for s in (0.0, 1.3, -1.0):
        fn = lambda h, u, w, b: _HeadLogpGrad.apply(  # noqa: E731
            _head_logp64(h, u, w, b, s, tokens, sel).detach(), tokens, sel, s, h, u, w, b)
        assert torch.autograd.gradcheck(fn, xs)


@pytest.mark.parametrize("backend", VQ)
def test_sq_distance_gradient(backend):
    gen = torch.Generator().manual_seed(4)
    z, cb = torch.randn(2, 5, 3, generator=gen), torch.randn(6, 3, generator=gen)
    zz, cc = (to_device(t, backend.device).requires_grad_() for t in (z, cb))
    with sgk.use_backend(backend.name):
        idx, dist = vq_lookup(zz, cc, return_distance=True)
        assert dist.requires_grad and not idx.requires_grad
        w = torch.randn(2, 5, generator=gen)
        gz, gc = torch.autograd.grad((dist * w.to(dist.device)).sum(), (zz, cc))
        # gradcheck through the op (float32, finite differences at 1e-3)
        assert torch.autograd.gradcheck(lambda a, b: vq_lookup(a, b, return_distance=True)[1], (zz, cc),
                                        eps=1e-3, atol=2e-3, rtol=1e-2)
    z64, c64 = z.double().requires_grad_(), cb.double().requires_grad_()
    ref = ((z64 - c64[idx.cpu()]) ** 2).sum(-1)
    rz, rc = torch.autograd.grad((ref * w.double()).sum(), (z64, c64))
    torch.testing.assert_close(gz.cpu().double(), rz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc.cpu().double(), rc, rtol=1e-5, atol=1e-5)


def test_no_output_requires_grad_without_a_gradient():
    """Every floating output that requires grad gives a gradient to the inputs that require it."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 9, generator=gen).requires_grad_()
    guide = torch.randn(2, 4, 9, generator=gen).requires_grad_()
    logp_in = torch.randn(2, 4, generator=gen).requires_grad_()
    is_masked = torch.rand(2, 4, generator=gen) < 0.5
    z, cb = torch.randn(5, 3, generator=gen).requires_grad_(), torch.randn(4, 3, generator=gen).requires_grad_()
    target = torch.randint(0, 9, (2, 4), generator=gen)
    for name in ("torch", "cpp"):
        with sgk.use_backend(name):
            outs = {
                "guided_sample": (guided_sample(logits, guide, guidance_scale=1.0, seed=1), (logits, guide)),
                "remask": ((remask_lowest_confidence(logp_in, is_masked, 1, seed=1),), (logp_in,)),
                "step": (self_guided_step(torch.zeros(2, 4, dtype=torch.long), is_masked, logits, guide, 1, seed=1),
                         (logits, guide)),
                "vq_lookup": (vq_lookup(z, cb, return_distance=True), (z, cb)),
                "cross_entropy": ((fused_cross_entropy(logits, target),), (logits,)),
                "head_sample": (head_sample(z, cb, None, z * 2, guidance_scale=0.5, seed=1), (z, cb)),
            }
        for op, (outputs, inputs) in outs.items():
            for out in outputs:
                if not out.requires_grad:
                    continue
                grads = torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)
                assert all(g is not None for g in grads), (name, op)
