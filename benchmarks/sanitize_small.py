"""Small CUDA runs of every op's CUDA and Triton kernels, for ``compute-sanitizer --tool memcheck``.

    python benchmarks/sanitize_small.py              # on a GPU (benchmarks/gpu_suite.sh runs it under memcheck)
    python benchmarks/sanitize_small.py --coverage   # anywhere: every op and kernel has a run here

Odd sizes on purpose, so out-of-bounds tile accesses would show; each op also runs on a vocabulary
above the Triton kernels' single-tile limit (their multi-tile path). Exits non-zero if a result is
wrong or if some Triton kernel never launched, so a clean sanitizer run also means every kernel ran.
Run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (gpu_suite.sh does) so that memcheck sees each tensor's
own allocation rather than the caching allocator's blocks.

Coverage: :data:`RUNS` has one entry per op in the ``torch.ops.sgkernels`` namespace and
:data:`KERNELS` names, for each Triton kernel (a ``triton.jit`` function named ``*_kernel`` in
``sgkernels.kernels``), the run that launches it. ``--coverage`` (tests/test_gpu_suite.py) fails
when a new op or kernel is missing from them.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Callable

import torch

import sgkernels as sgk

# (batch, n_tok, vocab, dtype): odd shapes; 70001 > the sampling kernels' single-tile limit (8192).
SAMPLING_CASES = [(2, 37, 1000, torch.float32), (3, 5, 3, torch.bfloat16), (1, 3, 70001, torch.float16)]


def _sampling_inputs(batch, n_tok, vocab, dtype, dev, gen):
    # A non-contiguous slice of a wider tensor: the kernels' row stride differs from the vocabulary.
    logits = torch.randn(batch, n_tok, vocab + 3, generator=gen, device=dev).to(dtype)[..., :vocab]
    guide = torch.randn(batch, n_tok, vocab, generator=gen, device=dev).to(dtype)
    is_masked = torch.rand(batch, n_tok, generator=gen, device=dev) < 0.7
    return logits, guide, is_masked


def run_guided_sample(dev: str, gen: torch.Generator) -> None:
    for batch, n_tok, vocab, dtype in SAMPLING_CASES:
        logits, guide, _ = _sampling_inputs(batch, n_tok, vocab, dtype, dev, gen)
        tokens, logp = sgk.guided_sample(logits, guide, guidance_scale=1.0, seed=1)
        assert int(tokens.max()) < vocab and torch.isfinite(logp).all()
        greedy, _ = sgk.guided_sample(logits, None, temperature=0.0, seed=1)
        assert torch.equal(greedy, logits.float().argmax(-1))


def run_remask(dev: str, gen: torch.Generator) -> None:
    for batch, n_tok in [(2, 37), (3, 5), (1, 4096), (5, 1000)]:
        logp = -torch.rand(batch, n_tok, generator=gen, device=dev)
        is_masked = torch.rand(batch, n_tok, generator=gen, device=dev) < 0.7
        n = torch.full((batch,), 2, device=dev)
        remask = sgk.remask_lowest_confidence(logp, is_masked, n, choice_temperature=2.0, seed=2)
        assert torch.equal(remask.sum(-1), torch.minimum(n, is_masked.sum(-1)))


def run_self_guided_step(dev: str, gen: torch.Generator) -> None:
    for batch, n_tok, vocab, dtype in SAMPLING_CASES:
        logits, guide, is_masked = _sampling_inputs(batch, n_tok, vocab, dtype, dev, gen)
        toks = torch.where(is_masked, vocab, 0)
        n = torch.full((batch,), 2, device=dev)
        new_tokens, new_mask = sgk.self_guided_step(toks, is_masked, logits, guide, n, guidance_scale=1.0,
                                                    temperature=1.0, choice_temperature=3.0, seed=3)
        assert not (new_mask & ~is_masked).any() and int(new_tokens.max()) <= vocab


def run_cross_entropy(dev: str, gen: torch.Generator) -> None:
    """Both registered ops (plain and inplace_grad), one tile and several (vocab > 8192)."""
    for n_rows, vocab, dtype in [(37, 1000, torch.float32), (5, 3, torch.bfloat16), (3, 20001, torch.float16)]:
        for inplace in (False, True):
            logits = torch.randn(n_rows, vocab, generator=gen, device=dev).to(dtype).requires_grad_(not inplace)
            target = torch.randint(0, vocab, (n_rows,), generator=gen, device=dev)
            target[0] = -100
            ref = sgk.cross_entropy_reference(logits.detach().float(), target, label_smoothing=0.1)
            loss = sgk.fused_cross_entropy(logits, target, label_smoothing=0.1, inplace_grad=inplace)
            if not inplace:
                loss.backward()
                assert torch.isfinite(logits.grad).all()
            assert torch.allclose(loss.float(), ref, rtol=2e-2, atol=2e-2), (loss, ref)


def run_vq_lookup(dev: str, gen: torch.Generator) -> None:
    for n_rows, k, d in [(37, 129, 13), (1000, 1024, 64), (5, 1, 1)]:
        z = torch.randn(n_rows, d, generator=gen, device=dev)
        cb = torch.randn(k, d, generator=gen, device=dev)
        idx = sgk.vq_lookup(z, cb)
        dist = torch.cdist(z.double(), cb.double())
        got = dist.gather(1, idx[:, None])[:, 0]
        assert torch.allclose(got, dist.min(-1).values, rtol=1e-4, atol=1e-4)


def run_philox_words(dev: str, gen: torch.Generator) -> None:
    """The tests' probe kernel (tests/test_guided_sample.py): the kernels' Philox words, bit for bit."""
    from sgkernels import _rng
    from sgkernels.kernels import sampling as S

    rows = torch.tensor([0, 1, 77, 2**32 + 5], dtype=torch.int64)
    out = torch.empty(4, rows.numel(), dtype=torch.int64, device=dev)
    S._launch(S._philox_words_kernel)[(1,)](rows.to(dev), out, rows.numel(), 5, 3, BLOCK=8)
    assert torch.equal(out.cpu(), torch.stack(_rng.row_words(5, 3, rows)))


def run_head_sample(dev: str, gen: torch.Generator) -> None:
    """Both Triton kernels (stats + pick), a bool rows mask and an index tensor, V above one tile."""
    for n_rows, d, vocab, dtype in [(37, 24, 1000, torch.float32), (5, 16, 3, torch.bfloat16), (3, 32, 20001, torch.float16)]:
        hidden = torch.randn(n_rows, d, generator=gen, device=dev).to(dtype)
        guide = torch.randn(n_rows, d, generator=gen, device=dev).to(dtype)
        weight = torch.randn(vocab, d, generator=gen, device=dev).to(dtype)
        bias = torch.randn(vocab, generator=gen, device=dev).to(dtype)
        rows = torch.rand(n_rows, generator=gen, device=dev) < 0.6
        tokens, logp = sgk.head_sample(hidden, weight, bias, guide, guidance_scale=1.0, seed=4, rows=rows)
        assert int(tokens.max()) < vocab and torch.isfinite(logp).all()
        idx = torch.nonzero(rows).squeeze(1)
        tokens_i, _ = sgk.head_sample(hidden, weight, bias, guide, guidance_scale=1.0, seed=4, rows=idx)
        assert tokens_i.shape == idx.shape


def run_philox_rows(dev: str, gen: torch.Generator) -> None:
    """The Python-defined op that gives the references' Philox words under torch.compile."""
    from sgkernels import _rng

    rows = torch.tensor([0, 1, 77, 2**32 + 5], dtype=torch.int64, device=dev)
    words = _rng._philox_rows_op(rows, 5, 3)
    assert torch.equal(words.cpu(), torch.stack(_rng.row_words(5, 3, rows.cpu())))


def run_linear_cross_entropy(dev: str, gen: torch.Generator) -> None:
    """Both ops (the forward with its gradients, and the recomputing backward through reduction="none"
    and the confidence term), every kernel; odd sizes, V above one rows-kernel tile, several chunks."""
    M = importlib.import_module("sgkernels.ops.linear_cross_entropy")
    from sgkernels.training import confidence_aware_loss

    for n_rows, d, vocab, dtype in [(37, 24, 1000, torch.float32), (5, 16, 3, torch.bfloat16),
                                    (9, 40, 5001, torch.float16)]:
        x = torch.randn(n_rows, d, generator=gen, device=dev).to(dtype).requires_grad_()
        w = (torch.randn(vocab, d, generator=gen, device=dev) / d**0.5).to(dtype).requires_grad_()
        b = torch.randn(vocab, generator=gen, device=dev).to(dtype).requires_grad_()
        t = torch.randint(0, vocab, (n_rows,), generator=gen, device=dev)
        t[0] = -100
        old = M._CHUNK_ROWS
        M._CHUNK_ROWS = 4
        try:
            loss = sgk.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
            loss.backward()
            ref = sgk.ops.linear_cross_entropy_reference(x.detach().float(), w.detach().float(), t,
                                                         linear_bias=b.detach().float(), label_smoothing=0.1)
            assert torch.allclose(loss.float(), ref, rtol=2e-2, atol=2e-2), (loss, ref)
            per_row = sgk.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none")
            per_row.sum().backward()
            total = confidence_aware_loss(x, w, t, linear_bias=b, lambda_conf=0.5, temperature=0.7,
                                          suppress_ids=vocab - 1)[0]
            total.backward()
        finally:
            M._CHUNK_ROWS = old
        assert all(torch.isfinite(g).all() for g in (x.grad, w.grad, b.grad))


def run_block_refine(dev: str, gen: torch.Generator) -> None:
    """block_refine_step (mask and uniform modes, greedy and hf-filtered sampling, several commit tiles),
    block_commit, entropy_bound_step (the exact-entropy row kernel, then the accept kernel)."""
    from sgkernels.ops.block_refine import block_commit, block_refine_step
    from sgkernels.ops.entropy_bound import entropy_bound_step

    for batch, length, vocab, dtype in [(2, 32, 1000, torch.float32), (3, 70, 9000, torch.bfloat16)]:
        logits = (3 * torch.randn(batch, length, vocab, generator=gen, device=dev)).to(dtype)
        sample = torch.full((batch, length), vocab - 1, device=dev)
        committed = torch.rand(batch, length, generator=gen, device=dev) < 0.3
        noise = torch.randint(0, vocab, (batch, length), generator=gen, device=dev)
        for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=50, top_p=0.9)):
            prev, transfer, _, tokens, probs = block_refine_step(logits, sample, mask_token_id=vocab - 1, quota=4,
                                                                 threshold=0.5, editing_threshold=0.3, seed=3, **kw)
            assert int(transfer.sum()) >= batch and int(tokens.max()) < vocab and bool((probs <= 1).all())
            prev, _, _, _, _ = block_refine_step(logits, sample, committed=committed, noise=noise, quota=length // 2,
                                                 threshold=0.9, seed=3, **kw)
            out = block_commit(tokens, probs, sample, mask_token_id=vocab - 1, quota=2, threshold=0.5)
            assert out[0].shape == sample.shape
        prev, accepted, _, _, entropy = entropy_bound_step(logits, noise, entropy_bound=1.0, seed=5)
        assert bool(accepted.any()) and bool((entropy >= -1e-4).all())


# One run per op in the torch.ops.sgkernels namespace (a run may cover several ops).
RUNS: dict[str, Callable[[str, torch.Generator], None]] = {
    "guided_sample": run_guided_sample,
    "remask_lowest_confidence": run_remask,
    "self_guided_step": run_self_guided_step,
    "cross_entropy_fwd": run_cross_entropy,
    "cross_entropy_fwd_inplace": run_cross_entropy,
    "vq_lookup": run_vq_lookup,
    "head_sample": run_head_sample,
    "philox_rows": run_philox_rows,
    "linear_cross_entropy_fwd": run_linear_cross_entropy,
    "linear_cross_entropy_bwd": run_linear_cross_entropy,
    "block_refine_step": run_block_refine,
    "block_commit": run_block_refine,
    "entropy_bound_step": run_block_refine,
}
# Each Triton kernel of sgkernels.kernels and the run that launches it.
KERNELS: dict[str, Callable[[str, torch.Generator], None]] = {
    "sampling._sample_rows_kernel": run_guided_sample,
    "sampling._remask_kernel": run_remask,
    "sampling._philox_words_kernel": run_philox_words,
    "cross_entropy._xent_rows_kernel": run_cross_entropy,
    "head_sample._head_stats_kernel": run_head_sample,
    "head_sample._head_pick_kernel": run_head_sample,
    "linear_cross_entropy._lce_mm_kernel": run_linear_cross_entropy,
    "linear_cross_entropy._lce_rows_kernel": run_linear_cross_entropy,
    "block_refine._block_commit_kernel": run_block_refine,
    "block_refine._entropy_accept_kernel": run_block_refine,
}


def registered_ops() -> list[str]:
    """The op names of the torch.ops.sgkernels namespace (csrc/schema.cpp and any Python-defined op)."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sgkernels::"))


def triton_kernels() -> dict[str, object]:
    """``module.name`` -> the triton.jit function, for every ``*_kernel`` in sgkernels.kernels."""
    import sgkernels.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"sgkernels.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and getattr(obj, "__module__", mod.__name__) == mod.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def coverage() -> list[str]:
    """What RUNS and KERNELS miss (empty when every op and Triton kernel has a run)."""
    missing = [f"op {op}: no entry in RUNS" for op in registered_ops() if op not in RUNS]
    missing += [f"Triton kernel {k}: no entry in KERNELS" for k in triton_kernels() if k not in KERNELS]
    missing += [f"KERNELS names {k}, which does not exist" for k in KERNELS if k not in triton_kernels()]
    return missing


def main(argv: list[str]) -> int:
    missing = coverage()
    if missing:
        print("sanitize_small: not covered:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    if argv == ["--coverage"]:
        print(f"sanitize_small: covers {len(RUNS)} ops and {len(KERNELS)} Triton kernels")
        return 0
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    launches: dict[str, int] = {}
    for key, kernel in triton_kernels().items():
        launches[key] = 0
        kernel.pre_run_hooks.append(lambda *a, _key=key, **k: launches.__setitem__(_key, launches[_key] + 1))
    for run in dict.fromkeys(list(RUNS.values()) + list(KERNELS.values())):  # each run once, in order
        print(f"sanitize_small: {run.__name__}", flush=True)
        run(dev, gen)
    sgk.check_errors()
    torch.cuda.synchronize()
    silent = [k for k, n in launches.items() if n == 0]
    if silent:
        print(f"sanitize_small: these Triton kernels never launched: {silent}", file=sys.stderr)
        return 1
    print(f"sanitize_small: all kernels ran ({len(RUNS)} ops; Triton launches {launches})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
