"""fused_cross_entropy: values and gradients of every backend against F.cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params, has_cpu_kernel, is_interpreter

import sgkernels as sgk  # noqa: F401  (loads the schemas)
from sgkernels import _backend, use_backend
from sgkernels.ops import _status
from sgkernels.ops.cross_entropy import cross_entropy_reference, fused_cross_entropy

BACKENDS = backend_params("cross_entropy_fwd")
REDUCTIONS = ["mean", "sum", "none"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter


@pytest.fixture(params=[False, True], ids=["1tile", "tiles"])
def tiles(request, monkeypatch):
    """Single-tile kernel, or the multi-tile loop forced on small V (Triton only; no-op elsewhere)."""
    if request.param and _backend.triton_available():
        from sgkernels.kernels import cross_entropy as K

        monkeypatch.setattr(K, "_MAX_SINGLE_TILE_V", 8)
        monkeypatch.setattr(K, "_TILE_V", 8)
    return request.param


def run(backend, logits, target, grad_out=None, **kw):
    """(loss, d loss / d logits) from the backend, inputs moved to its device; results on CPU."""
    name, device = backend
    x = logits.detach().to(device).requires_grad_()
    with use_backend(name):
        loss = fused_cross_entropy(x, target.to(device), **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(device)
    (grad,) = torch.autograd.grad(loss, x, g)
    if device == "cuda":
        sgk.check_errors()
    return loss.detach().cpu(), grad.cpu()


def ref(logits, target, grad_out=None, *, upcast=False, **kw):
    x = logits.detach().clone()
    x = (x.float() if upcast else x).requires_grad_()
    loss = cross_entropy_reference(x, target, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss.detach(), grad


def case(rows, vocab, *, dtype=torch.float32, seed=0, ignore_frac=0.2, ignore_index=-100, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(rows, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[torch.rand(rows, generator=gen) < ignore_frac] = ignore_index
    return logits, target


def grad_out_for(loss_shape, seed=5):
    return torch.randn(loss_shape, generator=torch.Generator().manual_seed(seed)) + 1.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("vocab", [1, 13, 64, 100])
def test_fp32_matches_torch(backend, tiles, reduction, smoothing, vocab):
    rows = 24 if is_interpreter(backend) else 96
    logits, target = case(rows, vocab, seed=vocab)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    g = grad_out_for((rows,)) if reduction == "none" else torch.tensor(0.75)
    loss, grad = run(backend, logits, target, g, **kw)
    loss_r, grad_r = ref(logits, target, g, **kw)
    assert loss.dtype == torch.float32 and loss.shape == loss_r.shape
    assert grad.shape == logits.shape and grad.dtype == torch.float32
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_half_matches_torch(backend, tiles, dtype, reduction, smoothing):
    rows = 24 if is_interpreter(backend) else 128
    logits, target = case(rows, 50, dtype=dtype, seed=3)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    loss, grad = run(backend, logits, target, **kw)
    loss_r, grad_r = ref(logits, target, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype  # as F.cross_entropy
    # F.cross_entropy in bf16/fp16 rounds log_softmax to the half dtype; the kernels accumulate in
    # float32 and round once: compare loosely with torch in the half dtype ...
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(loss.float(), loss_r.float(), **tol)
    torch.testing.assert_close(grad.float(), grad_r.float(), **tol)
    # ... and tightly with torch in float32 on the same (rounded) logits (the kernels, not torch itself)
    if backend[0] == "torch":
        return
    loss_f, grad_f = ref(logits, target, upcast=True, **kw)
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    torch.testing.assert_close(loss.float(), loss_f, rtol=eps, atol=1e-5)
    torch.testing.assert_close(grad.float(), grad_f, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_noncontiguous_int32_target(backend, tiles):
    gen = torch.Generator().manual_seed(7)
    big = 2 * torch.randn(3, 20, 2 * 37, generator=gen)
    logits = big[:, 1::2, ::2]  # [3, 10, 37], strided rows and columns
    assert not logits.is_contiguous()
    target = torch.randint(0, 37, (3, 10), generator=gen, dtype=torch.int32)
    target[1, 3] = -100
    for reduction in REDUCTIONS:
        loss, grad = run(backend, logits, target, reduction=reduction, label_smoothing=0.05)
        loss_r, grad_r = ref(logits, target, reduction=reduction, label_smoothing=0.05)
        assert loss.shape == loss_r.shape
        torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ignore_index_and_all_ignored(backend, reduction):
    logits, target = case(12, 9, seed=4, ignore_frac=0.5, ignore_index=3)  # an in-range ignore_index
    loss, grad = run(backend, logits, target, ignore_index=3, reduction=reduction, label_smoothing=0.1)
    loss_r, grad_r = ref(logits, target, ignore_index=3, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)
    # every row ignored: "mean" is 0/0 = NaN as torch, the gradient is zero
    target = torch.full((12,), -100)
    loss, grad = run(backend, logits, target, reduction=reduction)
    loss_r, grad_r = ref(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, loss_r, equal_nan=True)
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(grad_r, torch.zeros_like(grad_r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_row_and_empty(backend):
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for t in (torch.tensor(2), torch.tensor(-100)):
        loss, grad = run(backend, logits, t, reduction="none", label_smoothing=0.2)
        loss_r, grad_r = ref(logits, t, reduction="none", label_smoothing=0.2)
        assert loss.shape == ()
        torch.testing.assert_close(loss, loss_r)
        torch.testing.assert_close(grad, grad_r)
    loss, grad = run(backend, torch.randn(0, 5), torch.zeros(0, dtype=torch.int64), reduction="sum")
    assert loss.item() == 0.0 and grad.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad(backend, tiles):
    """inplace_grad=True: same loss and gradient; the gradient lives in the logits' storage."""
    name, device = backend
    logits, target = case(16, 37, seed=9)
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in REDUCTIONS:
            lg = logits.to(dtype)
            w = lg.clone().to(device).requires_grad_()
            x = w * 1  # non-leaf, like a head's output; mul does not save it
            seen = []
            x.register_hook(lambda g, seen=seen: seen.append(g.untyped_storage().data_ptr()))
            ptr = x.untyped_storage().data_ptr()
            with use_backend(name):
                loss = fused_cross_entropy(x, target.to(device), reduction=reduction, label_smoothing=0.1,
                                           inplace_grad=True)
            g = grad_out_for(loss.shape).to(device=device, dtype=dtype)
            loss.backward(g)
            loss_r, grad_r = ref(lg, target, g, reduction=reduction, label_smoothing=0.1)
            tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(loss.detach().cpu().float(), loss_r.float(), **tol)
            torch.testing.assert_close(w.grad.cpu().float(), grad_r.float(), **tol)
            if name != "torch":  # the gradient handed upstream is the logits' own storage
                assert seen == [ptr]


def test_inplace_grad_protects_saved_logits():
    """An upstream op that saved the logits (tanh saves its output) now fails loudly, not silently."""
    w = torch.randn(4, 10, requires_grad=True)
    x = torch.tanh(w)
    loss = fused_cross_entropy(x, torch.tensor([1, 2, 3, 4]), inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_needs_flattenable_logits():
    x = torch.randn(5, 3, 7).transpose(0, 1).requires_grad_()
    with pytest.raises(ValueError, match="inplace_grad"):
        fused_cross_entropy(x, torch.zeros(3, 5, dtype=torch.int64), inplace_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """Large offsets and -inf (masked vocabulary) entries, as torch."""
    logits = torch.tensor([[1000.0, 999.0, -1000.0, 0.0], [-float("inf"), 2.0, 1.0, -float("inf")]])
    target = torch.tensor([1, 2])
    loss, grad = run(backend, logits, target, reduction="none")
    loss_r, grad_r = ref(logits, target, reduction="none")
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(grad, grad_r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_target_is_reported(backend):
    name, device = backend
    logits, target = case(6, 11, seed=1)
    for bad in (11, -1, 1000):
        t = target.clone()
        t[2] = bad
        if name == "torch":
            with pytest.raises((IndexError, RuntimeError)):
                run(backend, logits, t)
            continue
        with pytest.raises(ValueError, match="target"):
            run(backend, logits, t)
        _status.check_errors()  # nothing left behind


def test_bad_arguments():
    logits, target = case(4, 5)
    with pytest.raises(TypeError, match="target"):
        fused_cross_entropy(logits, target.float())
    with pytest.raises(TypeError, match="target"):
        fused_cross_entropy(logits, target > 0)
    with pytest.raises(ValueError, match="target"):
        fused_cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="target"):
        fused_cross_entropy(logits, target[:, None])
    with pytest.raises(TypeError, match="logits"):
        fused_cross_entropy(logits.double(), target)
    with pytest.raises(TypeError, match="logits"):
        fused_cross_entropy(logits.long(), target)
    for ls in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            fused_cross_entropy(logits, target, label_smoothing=ls)
    with pytest.raises(TypeError, match="label_smoothing"):
        fused_cross_entropy(logits, target, label_smoothing="0.1")
    with pytest.raises(ValueError, match="reduction"):
        fused_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        fused_cross_entropy(logits, target, ignore_index=1.5)


@pytest.mark.skipif(not has_cpu_kernel("cross_entropy_fwd"), reason="no C++ kernel")
def test_cpp_kernel_checks_its_arguments():
    logits, target = case(4, 5)
    op = torch.ops.sgkernels.cross_entropy_fwd
    with pytest.raises(ValueError, match="label_smoothing"):
        op(logits, target, -100, 2.0, "mean")
    with pytest.raises(ValueError, match="reduction"):
        op(logits, target, -100, 0.0, "avg")
    with pytest.raises(ValueError, match="target"):
        op(logits, target[:2], -100, 0.0, "mean")
    with pytest.raises(TypeError, match="target"):
        op(logits, target.float(), -100, 0.0, "mean")


@pytest.mark.skipif(not has_cpu_kernel("cross_entropy_fwd"), reason="no C++ kernel")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_every_isa(monkeypatch, isa, dtype):
    """Each vectorised build of the C++ kernel (where the CPU has it; else the next one down)."""
    monkeypatch.setenv("SGK_XENT_ISA", isa)
    logits, target = case(40, 1000, dtype=dtype, seed=11)  # V not a multiple of any vector width
    kw = dict(label_smoothing=0.1, reduction="sum")
    with use_backend("cpp"):
        loss, grad = run(("cpp", "cpu"), logits, target, **kw)
    loss_f, grad_f = ref(logits, target, upcast=True, **kw)
    rtol = 1e-5 if dtype == torch.float32 else (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11)
    torch.testing.assert_close(loss.float(), loss_f.to(loss.dtype).float(), rtol=rtol, atol=1e-3)
    torch.testing.assert_close(grad.float(), grad_f, rtol=rtol, atol=1e-6)


def test_compile_sees_one_op():
    """torch.compile (aot_eager) of loss + backward: the op in the graph, values as eager."""
    logits, target = case(8, 17, seed=2)

    def f(x, t):
        return fused_cross_entropy(x, t, label_smoothing=0.1)

    x1 = logits.clone().requires_grad_()
    f(x1, target).backward()
    x2 = logits.clone().requires_grad_()
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x2, target)
    loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.skipif(not has_cpu_kernel("cross_entropy_fwd"), reason="no C++ kernel")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_cpu(reduction):
    logits, target = case(6, 11, seed=6)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype).clone().requires_grad_()
        torch.library.opcheck(torch.ops.sgkernels.cross_entropy_fwd, (x, target, -100, 0.1, reduction))
    # the in-place op runs under autograd.Function.forward: its logits never require grad there
    status = torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.sgkernels.cross_entropy_fwd_inplace, (logits.clone(), target, -100, 0.0, reduction, status)
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_opcheck_cuda():
    logits, target = case(6, 11, seed=6)
    x = logits.cuda().requires_grad_()
    torch.library.opcheck(torch.ops.sgkernels.cross_entropy_fwd, (x, target.cuda(), -100, 0.1, "mean"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("vocab", [1000, 32000, 50257])
def test_cuda_large_vocab(vocab):
    logits, target = case(64, vocab, dtype=torch.bfloat16, seed=vocab)
    loss, grad = run(("auto", "cuda"), logits, target, label_smoothing=0.1)
    loss_f, grad_f = ref(logits, target, upcast=True, label_smoothing=0.1)
    torch.testing.assert_close(loss.float(), loss_f, rtol=2 ** -8, atol=1e-5)
    torch.testing.assert_close(grad.float(), grad_f, rtol=2 ** -8, atol=1e-7)



@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_second_backward(backend):
    """The default path scales out of place: a retained second backward gives the same gradient."""
    name, device = backend
    logits, target = case(4, 7, seed=8)
    x = logits.to(device).requires_grad_()
    with use_backend(name):
        loss = fused_cross_entropy(x, target.to(device), reduction="sum")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(2.0, device=device))
    torch.testing.assert_close(g2, 2 * g1)
