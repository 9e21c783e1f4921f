"""torch.compile(fullgraph=True) on CPU: every op on the C++ and the torch (reference) backends,
seed=None included, and SelfGuidedSampler.step; the compiled results equal the eager ones.

Most tests compile with ``backend="aot_eager"`` (dynamo + AOTAutograd, the part that must trace
without a graph break; no C++ code generation, so they stay quick on a small CPU). Two compile
with inductor, the default: the C++ op with seed=None, and the reference guided_sample on a
[4, 8, 50] input, whose Philox rounds used to make inductor's compile run for many minutes.
(The Triton kernels under the CPU interpreter are not compiled: on CUDA they run as the ops'
registered kernels, opaque to the compiler.)

Seeds and offsets as 0-dim int64 tensors: ``mode="reduce-overhead"`` (inductor; cudagraphs on CUDA,
the ``cuda`` test) of a sampling step compiles once for every step and seed, and the sampler's step
compiles once per step index, not again for a new seed.
"""
from __future__ import annotations

import pytest
import torch
from helpers import has_cpu_kernel

import sgkernels as sgk
from sgkernels.models import TOAST, MaskTransformer, MaskTransformerConfig
from sgkernels.ops import (
    fused_cross_entropy,
    guided_sample,
    remask_lowest_confidence,
    self_guided_step,
    vq_lookup,
)
from sgkernels.sampler import SelfGuidedSampler

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not has_cpu_kernel("guided_sample"), reason="no C++ kernel")),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 8, 50, generator=gen) * 3
    guide = torch.randn(4, 8, 50, generator=gen) * 3
    is_masked = torch.rand(4, 8, generator=gen) < 0.6
    return logits, guide, is_masked


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _check(backend, fn, *args, compiler="aot_eager"):
    with sgk.use_backend(backend):
        eager = fn(*args)
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)(*args)
    _same(compiled, eager)
    return compiled


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_ops(backend):
    logits, guide, is_masked = _inputs()
    logp = torch.randn(4, 8)
    tokens = torch.full((4, 8), 50, dtype=torch.int64)
    n = torch.tensor([0, 1, 2, 3])
    _check(backend, lambda l, u: guided_sample(l, u, guidance_scale=1.5, temperature=0.7, seed=3, offset=2), logits, guide)
    _check(backend, lambda l: guided_sample(l, temperature=0.0, seed=3), logits)
    _check(backend, lambda p, m, k: remask_lowest_confidence(p, m, k, choice_temperature=2.0, seed=5), logp, is_masked, n)
    _check(
        backend,
        lambda t, m, l, u, k: self_guided_step(t, m, l, u, k, guidance_scale=1.0, choice_temperature=3.0, seed=9, offset=4),
        tokens, is_masked, logits, guide, n,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_none_draws_from_torch_generator(backend):
    """seed=None inside the graph: a fresh seed per call from torch's generator, as in eager."""
    logits, guide, is_masked = _inputs(1)
    tokens = torch.full((4, 8), 50, dtype=torch.int64)

    def f(l, u, t, m):
        tok, logp = guided_sample(l, u, guidance_scale=1.0)
        step = self_guided_step(t, m, l, u, 2, choice_temperature=1.0)
        return tok, logp, step, remask_lowest_confidence(logp, m, 3, choice_temperature=1.0)

    with sgk.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.manual_seed(11)
        first = compiled(logits, guide, tokens, is_masked)
        second = compiled(logits, guide, tokens, is_masked)
        torch.manual_seed(11)
        eager = f(logits, guide, tokens, is_masked)
    _same(first, eager)  # aot_eager draws with torch's own randint: the eager draws exactly
    assert not torch.equal(first[0], second[0])  # 32 tokens of 50: equal only by chance


@pytest.mark.parametrize("backend", BACKENDS)
def test_vq_lookup_and_cross_entropy(backend):
    gen = torch.Generator().manual_seed(2)
    z, codebook = torch.randn(4, 8, 6, generator=gen), torch.randn(32, 6, generator=gen)
    _check(backend, lambda a, b: vq_lookup(a, b, return_distance=True), z, codebook)
    _check(backend, lambda a, b: vq_lookup(a, b), z, codebook)
    logits, target = torch.randn(4, 8, 50, generator=gen), torch.randint(0, 50, (4, 8), generator=gen)
    target[0, :3] = -100
    _check(backend, lambda a, t: fused_cross_entropy(a, t, label_smoothing=0.1), logits, target)
    _check(backend, lambda a, t: fused_cross_entropy(a, t, reduction="none"), logits, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_through_compiled_ops(backend):
    """logp, sq_distance and the loss differentiate inside a compiled graph, as in eager."""
    logits, guide, _ = _inputs(4)
    z, codebook = torch.randn(5, 3), torch.randn(7, 3)
    target = torch.randint(0, 50, (4, 8))

    def f(l, u, z, cb):
        _, logp = guided_sample(l, u, guidance_scale=0.5, seed=1)
        _, dist = vq_lookup(z, cb, return_distance=True)
        return (logp * torch.arange(8.0)).sum() + dist.sum() + fused_cross_entropy(l, target)

    args = [t.clone().requires_grad_() for t in (logits, guide, z, codebook)]
    with sgk.use_backend(backend):
        eager = torch.autograd.grad(f(*args), args)
        compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sampler_step():
    torch.manual_seed(0)
    cfg = MaskTransformerConfig(codebook_size=16, num_classes=5, grid_size=4, width=32, depth=2, heads=4, mlp_dim=48)
    model, guide = MaskTransformer(cfg).eval(), TOAST(cfg, num_factors=4).eval()
    sampler = SelfGuidedSampler(model, guide, steps=4)
    labels = torch.tensor([0, 3])
    tokens = torch.full((2, cfg.num_tokens), cfg.mask_token_id, dtype=torch.int64)
    is_masked = torch.ones_like(tokens, dtype=torch.bool)
    compiled = torch.compile(sampler.step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for step in range(2):
            eager = sampler.step(tokens, is_masked, labels, step, 123)
            got = compiled(tokens, is_masked, labels, step, 123)
            _same(got, eager)
            tokens, is_masked = eager


@pytest.mark.skipif(not has_cpu_kernel("guided_sample"), reason="no C++ kernel")
def test_inductor_cpp_seed_none():
    logits, guide, _ = _inputs(5)
    with sgk.use_backend("cpp"):
        f = torch.compile(lambda l, u: guided_sample(l, u, guidance_scale=1.0), fullgraph=True)
        tokens, logp = f(logits, guide)
        again, _ = f(logits, guide)
        ref_tokens, ref_logp = guided_sample(logits, guide, guidance_scale=1.0, temperature=0.0, seed=0)
    assert tokens.shape == (4, 8) and tokens.dtype == torch.int64 and bool(((tokens >= 0) & (tokens < 50)).all())
    assert not torch.equal(tokens, again)
    # logp is log_softmax(g)[token], whatever the seed: check it against the tokens drawn
    g = logits + 1.0 * (logits - guide)
    torch.testing.assert_close(logp, torch.log_softmax(g.double(), -1).gather(-1, tokens[..., None])[..., 0].float())


def test_inductor_reference_guided_sample():
    """The reference's Philox rounds, behind an opaque op under compile, no longer blow up inductor."""
    logits, guide, _ = _inputs(6)
    _check("torch", lambda l, u: guided_sample(l, u, guidance_scale=1.0, seed=3), logits, guide, compiler="inductor")


def _step_fn(tokens, is_masked, logits, guide, num_to_mask, seed, offset):
    return self_guided_step(tokens, is_masked, logits, guide, num_to_mask, guidance_scale=1.0, choice_temperature=2.0,
                            seed=seed, offset=offset)


def _reduce_overhead_steps(device):
    """mode="reduce-overhead" (cudagraphs on CUDA; on CPU plain inductor) of a sampling step whose
    seed and offset are 0-dim int64 tensors: 4 steps for each of 2 seeds, one compile in all, the
    tokens of the eager step with int seed and offset."""
    logits, guide, _ = _inputs(7)
    logits, guide = logits.to(device), guide.to(device)
    tokens0 = torch.full((4, 8), 50, dtype=torch.int64, device=device)
    compiled = torch.compile(_step_fn, fullgraph=True, mode="reduce-overhead")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (3, 4):
            tokens, is_masked = tokens0, torch.ones(4, 8, dtype=torch.bool, device=device)
            seed_t = torch.tensor(seed, device=device)
            for k in range(4):
                n = sgk.mask_len(k, 4, 8, is_masked.sum(1))
                eager = _step_fn(tokens, is_masked, logits, guide, n, seed, k)
                got = compiled(tokens, is_masked, logits, guide, n, seed_t, torch.tensor(k, device=device))
                _same(got, eager)  # before the next call: cudagraph outputs are overwritten by it
                tokens, is_masked = eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert bool(is_masked.logical_not().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_overhead_tensor_seed_offset_no_recompile(backend):
    with sgk.use_backend(backend):
        _reduce_overhead_steps("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_tensor_seed_offset_no_recompile_cuda():
    """On CUDA reduce-overhead records a CUDA graph: the op's kernels read the seed / offset tensors
    (copied into the graph's static inputs each call), and inductor must not skip the graph."""
    torch._dynamo.utils.counters.clear()
    _reduce_overhead_steps("cuda")
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0


def test_sampler_step_tensor_seed_compiles_once_per_step():
    """SelfGuidedSampler.step with a tensor seed: one compile per step index (the step's choice
    temperature is a Python float the kernels take), none for a new seed; the eager tokens."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    cfg = MaskTransformerConfig(codebook_size=16, num_classes=5, grid_size=4, width=32, depth=2, heads=4, mlp_dim=48)
    model, guide = MaskTransformer(cfg).eval(), TOAST(cfg, num_factors=4).eval()
    sampler = SelfGuidedSampler(model, guide, steps=3, cfg_scale=1.0, fused_head=False)
    labels = torch.tensor([0, 3])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(sampler.step, fullgraph=True, backend=counter, dynamic=False)
    with torch.no_grad():
        for seed in (1, 2):
            tokens = torch.full((2, cfg.num_tokens), cfg.mask_token_id, dtype=torch.int64)
            is_masked = torch.ones_like(tokens, dtype=torch.bool)
            seed_t = torch.tensor(seed)
            for step in range(3):
                eager = sampler.step(tokens, is_masked, labels, step, seed)
                _same(compiled(tokens, is_masked, labels, step, seed_t), eager)
                tokens, is_masked = eager
            assert counter.frame_count == 3


@pytest.mark.skipif(not has_cpu_kernel("self_guided_step"), reason="no C++ kernel")
def test_status_word_is_a_static_input_under_compile():
    """The status word the op mutates is a static graph input, or reduce-overhead skips its CUDA graph."""
    seen = {}

    def backend(gm, inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            if "_status" in node.name:
                seen[node.name] = node.meta["tensor_dict"].get("_dynamo_static_input_type")
        return gm

    logits, _, is_masked = _inputs()
    tokens = torch.full((4, 8), 50, dtype=torch.int64)

    def f(t, m, l):
        return self_guided_step(t, m, l, None, 1, choice_temperature=1.0, seed=1)

    with sgk.use_backend("cpp"):
        f(tokens, is_masked, logits)  # the word exists before the trace
        torch.compile(f, fullgraph=True, backend=backend)(tokens, is_masked, logits)
    assert seen and all(v is not None for v in seen.values()), seen
