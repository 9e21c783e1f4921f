"""Small CUDA runs of every kernel, for ``compute-sanitizer --tool memcheck`` (gpu_suite.sh).

Odd sizes on purpose, so out-of-bounds tile accesses would show. Exits non-zero if a result is
wrong, so a clean sanitizer run also means the kernels ran.
"""
from __future__ import annotations

import torch

import sgkernels as sgk


def main() -> int:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    for batch, n_tok, vocab, dtype in [(2, 37, 1000, torch.float32), (3, 5, 3, torch.bfloat16), (1, 3, 70001, torch.float16)]:
        logits = torch.randn(batch, n_tok, vocab + 3, generator=gen, device=dev).to(dtype)[..., :vocab]
        guide = torch.randn(batch, n_tok, vocab, generator=gen, device=dev).to(dtype)
        tokens, logp = sgk.guided_sample(logits, guide, guidance_scale=1.0, seed=1)
        assert int(tokens.max()) < vocab and torch.isfinite(logp).all()
        sgk.guided_sample(logits, None, temperature=0.0, seed=1)
        is_masked = torch.rand(batch, n_tok, generator=gen, device=dev) < 0.7
        toks = torch.where(is_masked, vocab, 0)
        n = torch.full((batch,), 2, device=dev)
        remask = sgk.remask_lowest_confidence(logp, is_masked, n, choice_temperature=2.0, seed=2)
        assert torch.equal(remask.sum(-1), torch.minimum(n, is_masked.sum(-1)))
        new_tokens, new_mask = sgk.self_guided_step(toks, is_masked, logits, guide, n, guidance_scale=1.0,
                                                    temperature=1.0, choice_temperature=3.0, seed=3)
        assert not (new_mask & ~is_masked).any()
    if hasattr(sgk, "vq_lookup"):
        for n_rows, k, d in [(37, 129, 13), (1000, 1024, 64), (5, 1, 1)]:
            z = torch.randn(n_rows, d, device=dev)
            cb = torch.randn(k, d, device=dev)
            idx = sgk.vq_lookup(z, cb)
            dist = torch.cdist(z.double(), cb.double())
            got = dist.gather(1, idx[:, None])[:, 0]
            assert torch.allclose(got, dist.min(-1).values, rtol=1e-4, atol=1e-4)
    sgk.check_errors()
    torch.cuda.synchronize()
    print("sanitize_small: all kernels ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
