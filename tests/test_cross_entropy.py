"""fused_cross_entropy: the op contract (values and gradients against F.cross_entropy) on every
backend, half precision as float32 math rounded once, ignore_index, in-place gradients, the status
word, torch.compile, and the other C++ ISAs."""
from __future__ import annotations

import pytest
import torch
from helpers import has_cpu_kernel
from op_contract import (CPU_ISAS, DTYPE_IDS, Bad, Case, OpContract, assert_close, backend_params, bad_list,
                         run_under_isa, shrink_tiles, tolerance)

import sgkernels as sgk  # noqa: F401  (loads the schemas)
from sgkernels import _backend, use_backend
from sgkernels.ops import _status
from sgkernels.ops.cross_entropy import cross_entropy_reference, fused_cross_entropy

OP = "cross_entropy_fwd"
REDUCTIONS = ["mean", "sum", "none"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter


def _shrink_triton_tiles(monkeypatch):
    """The multi-tile loop of the Triton kernel on small V (no-op for the other backends)."""
    if _backend.triton_available():
        from sgkernels.kernels import cross_entropy as K

        shrink_tiles(monkeypatch, K, 8)


@pytest.fixture(params=[False, True], ids=["1tile", "tiles"])
def tiles(request, monkeypatch):
    if request.param:
        _shrink_triton_tiles(monkeypatch)
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


def _case(dtype, reduction, smoothing, vocab, tiled, rows=None):
    def make(backend, monkeypatch):
        if tiled:
            _shrink_triton_tiles(monkeypatch)
        n = rows or ((24 if backend.interpreter else 96) if dtype == torch.float32 else (24 if backend.interpreter else 128))
        logits, target = case(n, vocab, dtype=dtype, seed=vocab)
        g = grad_out_for((n,)) if reduction == "none" else torch.tensor(0.75)
        return (logits, target, g), dict(label_smoothing=smoothing, reduction=reduction)

    t = "tiles" if tiled else "1tile"
    return Case(f"{DTYPE_IDS[dtype]}-V{vocab}-{reduction}-ls{smoothing}-{t}", dtype, make)


class TestContract(OpContract):
    """Loss and gradient against F.cross_entropy in the same dtype (which rounds its log_softmax to
    the half dtype: see test_half_is_float32_math_rounded_once for the kernels' own precision)."""

    def call(self, logits, target, grad_out=None, **kw):
        if not logits.is_floating_point():  # a bad input: raises before any gradient
            return fused_cross_entropy(logits, target, **kw)
        x = logits.detach().requires_grad_()
        loss = fused_cross_entropy(x, target, **kw)
        (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
        return loss.detach(), grad

    def reference(self, logits, target, grad_out=None, **kw):
        return ref(logits, target, grad_out, **kw)

    def reference_cases(self):
        cases = [
            _case(torch.float32, r, ls, v, tiled)
            for v in (1, 13, 64, 100) for r in REDUCTIONS for ls in (0.0, 0.1) for tiled in (False, True)
        ]
        cases += [
            _case(dt, r, ls, 50, tiled)
            for dt in (torch.bfloat16, torch.float16) for r in REDUCTIONS for ls in (0.0, 0.1) for tiled in (False, True)
        ]
        cases.append(_case(torch.float32, "sum", 0.1, 1000, False, rows=40))  # V no multiple of a vector width
        return cases

    def check(self, out, ref_out, tol, args, kwargs):
        (loss, grad), (loss_r, grad_r) = out, ref_out
        logits = args[0]
        assert loss.dtype == logits.dtype and grad.dtype == logits.dtype  # as F.cross_entropy
        assert loss.shape == loss_r.shape and grad.shape == logits.shape
        assert_close(loss, loss_r, tol)
        assert_close(grad, grad_r, tol)

    def bad_inputs(self):
        logits, target = case(4, 5)
        return bad_list(
            Bad("target", TypeError, (logits, target.float())),
            Bad("target", TypeError, (logits, target > 0)),
            Bad("target", ValueError, (logits, target[:3])),
            Bad("target", ValueError, (logits, target[:, None])),
            Bad("logits", TypeError, (logits.double(), target)),
            Bad("logits", TypeError, (logits.long(), target)),
            *[Bad("label_smoothing", ValueError, (logits, target), dict(label_smoothing=ls)) for ls in (-0.1, 1.5, float("nan"))],
            Bad("label_smoothing", TypeError, (logits, target), dict(label_smoothing="0.1")),
            Bad("reduction", ValueError, (logits, target), dict(reduction="avg")),
            Bad("ignore_index", TypeError, (logits, target), dict(ignore_index=1.5)),
        )

    def opcheck_samples(self, device):
        logits, target = case(6, 11, seed=6)
        logits, target = logits.to(device), target.to(device)
        samples = [
            (OP, (logits.to(dtype).clone().requires_grad_(), target, -100, 0.1, reduction))
            for dtype in (torch.float32, torch.bfloat16) for reduction in REDUCTIONS
        ]
        if device == "cpu":
            # the in-place op runs under autograd.Function.forward: its logits never require grad there
            status = torch.zeros(1, dtype=torch.int32)
            samples += [
                ("cross_entropy_fwd_inplace", (logits.clone(), target, -100, 0.0, reduction, status))
                for reduction in REDUCTIONS
            ]
        return samples


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocab,reduction", [(50, r) for r in REDUCTIONS] + [(1000, "sum")])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_half_is_float32_math_rounded_once(backend, tiles, dtype, vocab, reduction, smoothing):
    """The kernels accumulate in float32 and round once: tight against float32 math on the same
    (rounded) logits. (F.cross_entropy itself, the torch backend, rounds log_softmax first.)"""
    if backend.name == "torch":
        pytest.skip("the torch backend is F.cross_entropy in the half dtype")
    rows = 24 if backend.interpreter else (128 if vocab == 50 else 40)
    logits, target = case(rows, vocab, dtype=dtype, seed=3)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    loss, grad = run(backend, logits, target, **kw)
    loss_f, grad_f = ref(logits, target, upcast=True, **kw)
    tol = tolerance(OP, dtype, "float32 math")
    assert_close(loss, loss_f, tol)
    assert_close(grad, grad_f, tol)


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
        assert_close(loss, loss_r, tolerance(OP, torch.float32))
        assert_close(grad, grad_r, tolerance(OP, torch.float32))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ignore_index_and_all_ignored(backend, reduction):
    logits, target = case(12, 9, seed=4, ignore_frac=0.5, ignore_index=3)  # an in-range ignore_index
    loss, grad = run(backend, logits, target, ignore_index=3, reduction=reduction, label_smoothing=0.1)
    loss_r, grad_r = ref(logits, target, ignore_index=3, reduction=reduction, label_smoothing=0.1)
    assert_close(loss, loss_r, tolerance(OP, torch.float32))
    assert_close(grad, grad_r, tolerance(OP, torch.float32))
    # every row ignored: "mean" is 0/0 = NaN as torch, the gradient is zero
    target = torch.full((12,), -100)
    loss, grad = run(backend, logits, target, reduction=reduction)
    loss_r, grad_r = ref(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, loss_r, equal_nan=True)
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(grad_r, torch.zeros_like(grad_r))


def test_scalar_row_and_empty(backend):
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for t in (torch.tensor(2), torch.tensor(-100)):
        loss, grad = run(backend, logits, t, reduction="none", label_smoothing=0.2)
        loss_r, grad_r = ref(logits, t, reduction="none", label_smoothing=0.2)
        assert loss.shape == ()
        assert_close(loss, loss_r, tolerance(OP, torch.float32))
        assert_close(grad, grad_r, tolerance(OP, torch.float32))
    loss, grad = run(backend, torch.randn(0, 5), torch.zeros(0, dtype=torch.int64), reduction="sum")
    assert loss.item() == 0.0 and grad.shape == (0, 5)


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
            assert_close(loss.detach().cpu(), loss_r, tolerance(OP, dtype))
            assert_close(w.grad.cpu(), grad_r, tolerance(OP, dtype))
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


def test_extreme_logits(backend):
    """Large offsets and -inf (masked vocabulary) entries, as torch."""
    logits = torch.tensor([[1000.0, 999.0, -1000.0, 0.0], [-float("inf"), 2.0, 1.0, -float("inf")]])
    target = torch.tensor([1, 2])
    loss, grad = run(backend, logits, target, reduction="none")
    loss_r, grad_r = ref(logits, target, reduction="none")
    assert_close(loss, loss_r, tolerance(OP, torch.float32))
    assert_close(grad, grad_r, tolerance(OP, torch.float32))


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


@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("vocab", [1000, 32000, 50257])
def test_cuda_large_vocab(vocab):
    logits, target = case(64, vocab, dtype=torch.bfloat16, seed=vocab)
    loss, grad = run(("auto", "cuda"), logits, target, label_smoothing=0.1)
    loss_f, grad_f = ref(logits, target, upcast=True, label_smoothing=0.1)
    tol = tolerance(OP, torch.bfloat16, "float32 math")
    assert_close(loss, loss_f, tol)
    assert_close(grad, grad_f, tol)


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


@pytest.mark.slow
@pytest.mark.skipif(not has_cpu_kernel(OP), reason="no C++ kernel")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpp_under_isa(isa):
    """Every cpp test of this file again, on the generic and AVX2 builds of the C++ kernel."""
    run_under_isa(__file__, isa)


# ------------------------------------------------------------------------------------------------
# Threads: every call gets its own error, never another thread's


@pytest.mark.parametrize("compiled_kernel", backend_params(OP, ("cpp", "cuda")))
def test_threads_mixing_bad_and_good_targets(compiled_kernel):
    """4 threads x 1000 calls, a third of them with a bad target: each bad call raises, each good
    call returns the reference loss (zero errors lost, zero misattributed)."""
    import threading

    name, device = compiled_kernel
    logits, target = case(4, 11, seed=3)
    logits, target = logits.to(device), target.to(device)
    expected = cross_entropy_reference(logits, target).cpu()
    bad_target = target.clone()
    bad_target[1] = 11
    n_threads, n_calls = 4, 1000
    barrier = threading.Barrier(n_threads)
    results = [None] * n_threads

    def worker(k):
        gen = torch.Generator().manual_seed(k)
        bad = (torch.rand(n_calls, generator=gen) < 1 / 3).tolist()
        lost = wrong = misattributed = 0
        barrier.wait()
        with use_backend(name):
            for is_bad in bad:
                try:
                    loss = fused_cross_entropy(logits, bad_target if is_bad else target)
                    if device == "cuda":
                        sgk.check_errors(device)
                except ValueError:
                    misattributed += not is_bad
                    continue
                lost += is_bad
                wrong += not torch.equal(loss.cpu(), expected)
        results[k] = (sum(bad), lost, misattributed, wrong)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results), results
    assert sum(r[0] for r in results) > 1000  # thousands of calls, over a thousand bad ones
    assert [r[1:] for r in results] == [(0, 0, 0)] * n_threads, results


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_with_retained_graph(backend, reduction):
    """The backward scales the stored gradient in place only when the graph is not retained: a
    retained graph gives the same gradient on every backward, and create_graph a double backward."""
    name, device = backend
    logits, target = case(5, 13, seed=4)
    x = logits.to(device).requires_grad_()
    with use_backend(name):
        loss = fused_cross_entropy(x, target.to(device), reduction=reduction)
    g_out = torch.full_like(loss, 3.0)
    first = torch.autograd.grad(loss, x, g_out, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x, g_out, retain_graph=True)[0]
    third = torch.autograd.grad(loss, x, g_out)[0]
    want = ref(logits, target, g_out.cpu(), reduction=reduction)[1]
    for g in (first, second, third):
        assert_close(g.cpu(), want, tolerance(OP, torch.float32))
    if device == "cuda":
        sgk.check_errors()
