"""linear_cross_entropy: the op contract (values and gradients of input, linear_weight and linear_bias
against float32 F.cross_entropy(F.linear(...))) on every backend, class / token weights, suppressed ids,
many chunks, ignored rows never projected (NaN there reaches nothing), half precision, the "rows"
gradients (reduction="none"), torch.compile, and the other C++ ISAs."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import has_cpu_kernel
from op_contract import (CPU_ISAS, DTYPE_IDS, Bad, Case, OpContract, assert_close, bad_list, run_on, run_under_isa,
                         tolerance)

import sgkernels as sgk  # noqa: F401  (loads the schemas)
from sgkernels import _backend, use_backend
from sgkernels.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

M = importlib.import_module("sgkernels.ops.linear_cross_entropy")  # the module (the package exports the function)
OP = "linear_cross_entropy_fwd"
REDUCTIONS = ["mean", "sum", "none"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter


def small_chunks(monkeypatch, rows=5, tile=16):
    """Many chunks (and several vocabulary tiles in the Triton rows kernel) on small shapes."""
    monkeypatch.setattr(M, "_CHUNK_ROWS", rows)
    if _backend.triton_available():
        from sgkernels.kernels import linear_cross_entropy as K

        monkeypatch.setattr(K, "_TILE_V", tile)


def make(n=24, d=16, vocab=40, *, dtype=torch.float32, seed=0, ignore_frac=0.3, bias=True, lead=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) / d**0.5 * 2
    b = torch.randn(vocab, generator=gen) if bias else None
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignore_frac] = -100
    if lead is not None:
        x, t = x.reshape(*lead, d), t.reshape(lead)
    cast = (lambda v: None if v is None else v.to(dtype))
    return cast(x), cast(w), cast(b), t


def grads(fn, x, w, b, t, grad_out=None, **kw):
    """(loss, d input, d linear_weight, d linear_bias) of ``fn`` (detached, on the inputs' devices)."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.device, loss.dtype)
    out = torch.autograd.grad(loss, leaves, g)
    return (loss.detach(),) + tuple(out) + ((None,) if b is None else ())


def unfused(x, w, t, *, linear_bias=None, **kw):
    """What both recipes run today: F.cross_entropy(F.linear(...)) in the inputs' dtype (float32 here)."""
    return F.cross_entropy(F.linear(x, w, linear_bias).reshape(-1, w.shape[0]), t.reshape(-1), **kw)


def _case(cid, dtype=torch.float32, *, reduction="mean", eps=0.0, bias=True, cls=False, tok=False, sup=None,
          chunks=False, n=None, vocab=40, lead=None):
    def mk(backend, monkeypatch):
        if chunks:
            small_chunks(monkeypatch)
        rows = n or (12 if backend.interpreter else 24)
        x, w, b, t = make(rows, 16, vocab, dtype=dtype, seed=vocab + rows, bias=bias, lead=lead)
        gen = torch.Generator().manual_seed(3)
        kw = dict(reduction=reduction, label_smoothing=eps)
        if cls:
            kw["weight"] = torch.rand(vocab, generator=gen) + 0.5
        if tok:
            kw["token_weight"] = torch.rand(t.shape, generator=gen) * 3
        if sup is not None:
            kw["suppress_ids"] = sup
            t[torch.isin(t, torch.tensor(sup))] = vocab - 1  # a suppressed target's loss is ~FLT_MAX
        g = torch.randn(t.shape, generator=gen) + 1.5 if reduction == "none" else torch.tensor(0.75)
        return (x, w, b, t, g), kw

    return Case(f"{DTYPE_IDS[dtype]}-{cid}", dtype, mk)


class TestContract(OpContract):
    """Loss and gradients against the float32 reference on the same (rounded) inputs."""

    def call(self, x, w, b, t, grad_out=None, **kw):
        if not x.is_floating_point() or not isinstance(t, torch.Tensor) or t.is_floating_point():
            return linear_cross_entropy(x, w, t, linear_bias=b, **kw)
        return grads(linear_cross_entropy, x, w, b, t, grad_out, **kw)

    def reference(self, x, w, b, t, grad_out=None, **kw):
        loss, gx, gw, gb = grads(linear_cross_entropy_reference, x.float(), w.float(),
                                 None if b is None else b.float(), t, grad_out, **kw)
        return loss, gx, gw, gb

    def reference_cases(self):
        # every option at least once, several per case (the fast tier runs each case on every backend)
        return [
            _case("mean", eps=0.0),
            _case("sum-ls", reduction="sum", eps=0.1),
            _case("none-ls-chunks", reduction="none", eps=0.1, chunks=True),
            _case("nobias-class-weight-tok-ls", bias=False, cls=True, tok=True, eps=0.05),
            _case("class-weight-sum-suppress", cls=True, reduction="sum", sup=[3, 7]),
            _case("tok-none-suppress", tok=True, reduction="none", sup=5),
            _case("chunks-tok-suppress", chunks=True, tok=True, sup=[0]),
            _case("batched-V1000", lead=(2, 5), n=10, vocab=1000, eps=0.1),
            _case("mean-tok-chunks", torch.bfloat16, tok=True, chunks=True),
            _case("none", torch.float16, reduction="none"),
        ]

    def check(self, out, ref, tol, args, kwargs):
        x, w, b = args[:3]
        assert out[0].dtype == x.dtype and out[0].shape == ref[0].shape
        for o, r, inp in zip(out, ref, (None, x, w, b)):
            if r is None:
                assert o is None
                continue
            if inp is not None:
                assert o.dtype == inp.dtype and o.shape == inp.shape
            assert_close(o, r, tol)

    def bad_inputs(self):
        x, w, b, t = make(6, 4, 5)
        return bad_list(
            Bad("target", TypeError, (x, w, b, t.float())),
            Bad("target", ValueError, (x, w, b, t[:3])),
            Bad("target", ValueError, (x, w, b, torch.tensor([0, 1, 5, 2, 3, 4])), match=r"\[0, 5\)"),
            Bad("target", ValueError, (x, w, b, torch.tensor([0, 1, -1, 2, 3, 4]))),
            Bad("linear_weight", ValueError, (x, w[:, :3], b, t)),
            Bad("linear_weight", TypeError, (x, w.double(), b, t)),
            Bad("input", TypeError, (x.long(), w, b, t)),
            Bad("linear_bias", ValueError, (x, w, b[:4], t)),
            Bad("reduction", ValueError, (x, w, b, t), dict(reduction="avg")),
            Bad("token_weight", ValueError, (x, w, b, t), dict(token_weight=torch.ones(5))),
            Bad("token_weight", ValueError, (x, w, b, t), dict(token_weight=-torch.ones(6))),
            Bad("token_weight", ValueError, (x, w, b, t), dict(token_weight=torch.full((6,), float("nan")))),
            Bad("suppress_ids", ValueError, (x, w, b, t), dict(suppress_ids=[5])),
            Bad("suppress_ids", ValueError, (x, w, b, t), dict(suppress_ids=torch.tensor([-1]))),
            Bad("suppress_ids", TypeError, (x, w, b, t), dict(suppress_ids=[1.5])),
            Bad("weight", ValueError, (x, w, b, t), dict(weight=torch.ones(4))),
            Bad("label_smoothing", ValueError, (x, w, b, t), dict(label_smoothing=1.5)),
            Bad("ignore_index", TypeError, (x, w, b, t), dict(ignore_index=1.5)),
        )

    def opcheck_samples(self, device):
        x, w, b, t = make(7, 5, 11, seed=6)
        x, w, b, t = (v.to(device) for v in (x, w, b, t))
        tw = torch.rand(7, device=device)
        sup = torch.tensor([2], device=device)
        fwd = [
            (OP, (x.clone().requires_grad_(), w.clone().requires_grad_(), b, t, None, tw, sup, -100, 0.1, 1.0, red, 0.0,
                  conf, grad, 0))
            for red, conf, grad in (("mean", False, 7), ("sum", True, 0), ("mean", True, 7))
        ]
        fwd.append((OP, (x.bfloat16(), w.bfloat16(), None, t, torch.rand(11, device=device), None, None, -100, 0.0, 0.5,
                         "mean", 1.0, True, 7, 3)))
        fwd.append((OP, (x, w.clone().requires_grad_(), b, t, None, None, None, -100, 0.0, 1.0, "sum", 0.0, False, 2,
                         0)))
        bwd = [("linear_cross_entropy_bwd", (x, w, b, t, None, torch.randn(7, device=device), ent, sup, -100, 0.1, 2.0,
                                             needs, 2))
               for ent, needs in ((None, 7), (torch.randn(7, device=device), 1))]
        return fwd + bwd


def test_matches_unfused_float32_with_everything(backend, monkeypatch):
    """Same value and gradients as F.cross_entropy(F.linear(...)) itself (float32, torch's own weights)."""
    small_chunks(monkeypatch)
    x, w, b, t = make(12 if backend.interpreter else 30, 8, 33, seed=11, lead=(3, -1))
    cw = torch.rand(33, generator=torch.Generator().manual_seed(1)) + 0.5
    for red in REDUCTIONS:
        kw = dict(weight=cw, label_smoothing=0.1, reduction=red)
        g = torch.randn(t.shape) if red == "none" else None
        out = run_on(backend, grads, linear_cross_entropy, x, w, b, t, g, **kw)
        ref = grads(unfused, x, w, b, t, None if g is None else g.reshape(-1), **kw)
        tol = tolerance(OP, torch.float32)
        assert_close(out[0].reshape(ref[0].shape), ref[0], tol)
        for o, r in zip(out[1:], ref[1:]):
            assert_close(o, r, tol)


def test_ignored_rows_are_never_projected(backend):
    """NaN/inf in ignored rows reach no output or gradient; every row ignored: mean NaN, zero grads."""
    x, w, b, t = make(16, 8, 20, seed=2, ignore_frac=0.5)
    x[t == -100] = float("nan")
    x[(t == -100).nonzero()[0]] = float("inf")
    for red in REDUCTIONS:
        loss, gx, gw, gb = run_on(backend, grads, linear_cross_entropy, x, w, b, t, reduction=red, label_smoothing=0.1)
        assert torch.isfinite(loss).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
        assert torch.equal(gx[t == -100], torch.zeros_like(gx[t == -100])) and torch.isfinite(gx).all()
        keep = t != -100
        ref = grads(linear_cross_entropy_reference, x[keep], w, b, t[keep], reduction=red, label_smoothing=0.1)
        tol = tolerance(OP, torch.float32)
        assert_close(loss[keep] if red == "none" else loss, ref[0], tol)
        assert_close(gw, ref[2], tol)
    t_all = torch.full_like(t, -100)
    loss, gx, gw, gb = run_on(backend, grads, linear_cross_entropy, x, w, b, t_all)
    assert torch.isnan(loss) and not gw.any() and not gb.any() and not gx.any()


def test_backward_projects_only_rows_with_gradient():
    """The counting stand-in for "never projected": the C++ op's GEMM rows equal the kept rows.

    (With reduction="none" and a zero grad_output on a row, the backward skips that row as well.)"""
    x, w, b, t = make(20, 8, 30, seed=4, ignore_frac=0.5)
    x[t == -100] = float("nan")
    g = torch.randn(20)
    g[:5] = 0.0
    out = grads(linear_cross_entropy, x, w, b, t, g, reduction="none")
    x2 = x.clone()
    x2[:5] = float("nan")  # the backward never reads rows whose grad_output is 0
    out2 = grads(linear_cross_entropy, x2, w, b, t, g, reduction="none")
    assert torch.isfinite(out2[2]).all()
    torch.testing.assert_close(out2[2], out[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_half_against_unfused_half(dtype):
    """16-bit: close to the unfused loss run in that dtype (which rounds its logits and log-softmax)."""
    x, w, b, t = make(32, 16, 64, dtype=dtype, seed=8)
    out = grads(linear_cross_entropy, x, w, b, t, label_smoothing=0.1)
    ref = grads(unfused, x, w, b, t, label_smoothing=0.1)
    for o, r in zip(out, ref):
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), r.float(), rtol=5e-2, atol=5e-3)


def test_compile_fullgraph():
    x, w, b, t = make(10, 8, 12, seed=9)
    tw = torch.rand(10)

    def step(x, w, b):
        return linear_cross_entropy(x, w, t, linear_bias=b, token_weight=tw, suppress_ids=[1], label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = grads(lambda x, w, t, linear_bias: compiled(x, w, linear_bias), x, w, b, t)
    ref = grads(lambda x, w, t, linear_bias: step(x, w, linear_bias), x, w, b, t)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)


def test_frozen_head_gets_no_gradient(backend):
    """Only the inputs that require grad get one (a frozen head: no d W GEMM), each as with all three."""
    x, w, b, t = make(12, 8, 20, seed=14)
    xr = x.clone().requires_grad_()
    loss = run_on(backend, lambda x, w, b, t: torch.autograd.grad(
        linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1), x)[0], xr, w, b, t)
    ref = grads(linear_cross_entropy_reference, x, w, b, t, label_smoothing=0.1)[1]
    assert_close(loss, ref, tolerance(OP, torch.float32))


def test_retain_graph_backward_twice():
    x, w, b, t = make(10, 8, 12, seed=10)
    xr = x.clone().requires_grad_()
    loss = linear_cross_entropy(xr, w, t, linear_bias=b)
    (g1,) = torch.autograd.grad(loss, xr, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xr)
    torch.testing.assert_close(g1, g2)


def test_no_grad_forward_makes_no_gradients():
    x, w, b, t = make(10, 8, 12, seed=12)
    with torch.no_grad():
        out = torch.ops.sgkernels.linear_cross_entropy_fwd(x, w, b, t, None, None, None, -100, 0.0, 1.0, "mean", 0.0,
                                                           False, 0, 0)
        loss = linear_cross_entropy(x, w, t, linear_bias=b)
    assert out[3].numel() == 0 and out[4].numel() == 0
    torch.testing.assert_close(loss, linear_cross_entropy_reference(x, w, t, linear_bias=b))


@pytest.mark.slow  # a subprocess per ISA that reruns every cpp test of this file
@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_under_isa(isa):
    """Every cpp test of this file again, on the generic and AVX2 builds of the C++ kernel."""
    run_under_isa(__file__, isa)


def test_use_backend_torch_is_reference():
    x, w, b, t = make(10, 8, 12, seed=13)
    with use_backend("torch"):
        loss = linear_cross_entropy(x, w, t, linear_bias=b)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(x, w, t, linear_bias=b))
