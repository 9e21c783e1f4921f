"""Block diffusion through diffusers (LLaDA2 / DiffusionGemma): the fused scheduler step and the fused
pipeline against diffusers' stock ``BlockRefinementScheduler`` / ``LLaDA2Pipeline``.

* ``block_refinement_step``: one ``step()`` at LLaDA2's vocabulary (V = 157,184), block 32, float32
  logits: :class:`FusedBlockRefinementScheduler` (one fused op) against the stock step (softmax of the
  block, sort-based top-k / top-p, ``torch.multinomial``, a per-row loop with ``.item()``); greedy, and
  sampled at temperature 0.8, top-k 50, top-p 0.95.
* ``llada2_pipeline`` (``--e2e``): end to end on a tiny block-causal LM with LLaDA2's vocabulary
  (tests/tiny_block_lm.py; d = 128, 2 layers; prompt 64 + gen 256, block 32, greedy, token-equal):
  :class:`FusedLLaDA2Pipeline` (LM head only on the active block) against the stock pipeline;
  and with a long prompt (768) and a deeper backbone (d = 256, 4 layers), ``prefix_cache=True``.

Timings interleaved in one process (``median_ms_interleaved``); peak extra memory of one call each.
``python -m benchmarks.e2e_llada2_pipeline [--device cpu|cuda] [--quick] [--e2e] [--gen N] [--steps N]
[--long-prompt N] [--long-gen N] [--threads N] [--repeats N] [--no-peak] [--no-short]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from sgkernels.bench.timing import median_ms_interleaved, peak_mb

VOCAB, MASK_ID, BLOCK = 157184, 156895, 32


def _tiny_lm(d, layers, device, dtype=torch.float32):
    """The tests' tiny block-causal LM (tests/tiny_block_lm.py) at LLaDA2's vocabulary."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tiny_block_lm import TinyBlockLM

    return TinyBlockLM(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                       block_length=BLOCK, max_position_embeddings=2048).to(device, dtype).eval()


def step_rows(device: str, quick: bool) -> list[dict]:
    from diffusers import BlockRefinementScheduler

    from sgkernels.integrations.diffusers import FusedBlockRefinementScheduler

    stock = BlockRefinementScheduler(block_length=BLOCK, num_inference_steps=32)
    fused = FusedBlockRefinementScheduler.from_config(stock.config)
    for s in (stock, fused):
        s.set_timesteps(32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = 3.0 * torch.randn(1, BLOCK, VOCAB, generator=gen, device=device)
    x = torch.full((1, BLOCK), MASK_ID, device=device)
    x[:, :8] = torch.randint(0, VOCAB, (1, 8), generator=gen, device=device)
    rows = []
    for label, kw in (("greedy", dict(temperature=0.0)),
                      ("T=0.8 top_k=50 top_p=0.95", dict(temperature=0.8, top_k=50, top_p=0.95))):
        kw = dict(kw, mask_token_id=MASK_ID, threshold=0.7, editing_threshold=0.5)
        if kw["temperature"] == 0.0:
            a, b = stock.step(logits, 3, x, **kw), fused.step(logits, 3, x, **kw)
            assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in
                       ("prev_sample", "transfer_index", "editing_transfer_index", "sampled_tokens"))
        fns = {"sgkernels": lambda: fused.step(logits, 3, x, **kw), "diffusers step": lambda: stock.step(logits, 3, x, **kw)}
        ms = median_ms_interleaved(fns, device, repeats=3 if quick else 10, warmup=1 if quick else 2)
        for name, fn in fns.items():
            rows.append(dict(op="block_refinement_step", shape=f"B=1 L={BLOCK} V={VOCAB} {label}", dtype="float32",
                             impl=name, ms=ms[name], peak_mb=peak_mb(fn, device)))
    return rows


def e2e_rows(device: str, quick: bool, *, prompt=64, gen=256, d=128, layers=2, steps=32, caches=(False,),
             repeats=2, peak=True) -> list[dict]:
    """The stock pipeline and the fused one with each ``prefix_cache`` of ``caches``, interleaved."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    from sgkernels.integrations.diffusers import FusedLLaDA2Pipeline

    model = _tiny_lm(d, layers, device)
    stock = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=BLOCK))
    fused = FusedLLaDA2Pipeline.from_pipe(stock)
    for p in (stock, fused):
        p.set_progress_bar_config(disable=True)
    ids = torch.randint(0, MASK_ID, (1, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(input_ids=ids, gen_length=gen, block_length=BLOCK, num_inference_steps=steps, mask_token_id=MASK_ID,
              output_type="seq", temperature=0.0)
    fns = {"diffusers LLaDA2Pipeline": lambda: stock(**kw).sequences}
    for cache in caches:
        fns["sgkernels (prefix_cache)" if cache else "sgkernels"] = (
            lambda cache=cache: fused(**kw, prefix_cache=cache).sequences)
    want = fns["diffusers LLaDA2Pipeline"]()
    for name, fn in fns.items():
        assert torch.equal(fn(), want), f"greedy: {name} must be token-equal to the stock pipeline"
    ms = median_ms_interleaved(fns, device, repeats=repeats, warmup=0)
    shape = (f"e2e prompt {prompt} + gen {gen}, block {BLOCK}, {steps} steps, d={d}, {layers} layers, V={VOCAB} "
             f"(greedy, token-equal)")
    return [dict(op="llada2_pipeline", shape=shape, dtype="float32", impl=k, ms=v,
                 peak_mb=peak_mb(fns[k], device) if peak else None) for k, v in ms.items()]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """``python -m benchmarks`` rows: the step (the end-to-end rows: ``--e2e`` of this module's main)."""
    return step_rows(device, quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--e2e", action="store_true", help="also the end-to-end pipeline rows")
    p.add_argument("--no-step", action="store_true", help="skip the step rows")
    p.add_argument("--gen", type=int, default=256, help="generated tokens of the end-to-end rows")
    p.add_argument("--steps", type=int, default=32, help="num_inference_steps of the end-to-end rows")
    p.add_argument("--long-prompt", type=int, default=768, help="prompt of the prefix-cache row (0: skip it)")
    p.add_argument("--long-gen", type=int, default=None, help="generated tokens of the prefix-cache row (default: --gen)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs of the end-to-end rows")
    p.add_argument("--no-short", action="store_true", help="skip the short-prompt end-to-end rows")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 on a shared CPU box: OpenMP barriers of the tiny backbone's small "
                        "ops otherwise dominate both pipelines alike)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print("| op | shape | impl | ms | speed-up | peak extra MB |")
    print("|---|---|---|---:|---:|---:|", flush=True)

    def show(rows):
        base = {(r["op"], r["shape"]): r["ms"] for r in rows if not r["impl"].startswith("sgkernels")}
        for r in rows:
            ref = base.get((r["op"], r["shape"]))
            sp = f"{ref / r['ms']:.2f}x" if ref and r["impl"].startswith("sgkernels") else ""
            pk = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            print(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.1f} | {sp} | {pk} |", flush=True)

    if not a.no_step:
        show(step_rows(a.device, a.quick))
    if a.e2e:
        if not a.no_short:  # the default (no cache) and prefix_cache=True against one stock run
            show(e2e_rows(a.device, a.quick, gen=a.gen, steps=a.steps, repeats=a.repeats, peak=not a.no_peak,
                          caches=(False, True)))
        if a.long_prompt:
            show(e2e_rows(a.device, a.quick, prompt=a.long_prompt, gen=a.long_gen or a.gen, d=256, layers=4,
                          steps=a.steps, caches=(True,), repeats=a.repeats, peak=not a.no_peak))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
