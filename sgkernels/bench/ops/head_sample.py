"""head_sample (LM head fused with guided sampling) against the head GEMM + guided_sample.

Rows (``python -m benchmarks --only head_sample``, or ``python -m sgkernels.bench.ops.head_sample
[--device cuda] [--quick] [--e2e]`` for the table with peak memory as a % of the logits tensor):

* LLaDA-shaped step: L = 1024 positions, block of 32 decoded rows, V = 126464, hidden d (1024 on
  CPU; 4096 on CUDA): full-logits head ``h @ W.T + b`` over all L positions then guided_sample on
  the block's rows (what the drop-ins did), vs ``head_sample(..., rows=block)``; with CFG the
  baseline projects both halves, head_sample blends the hidden states and projects once;
* all rows: R = 256, d = 1024, V = 32768: torch matmul + guided_sample vs head_sample;
* ``dream_step`` (``--only dream_step``): the llada_step shape with Dream's released options
  (temperature 0.2, top_p 0.95, entropy confidence): head_sample's row-chunk path vs the full head +
  guided_sample with the same options;
* ``--e2e``: ``integrations.llada.generate`` on a small LLaDA-shaped model (large vocabulary) with
  ``fused_head`` on and off; ``--e2e-dream``: ``integrations.dream.diffusion_generate`` likewise on a
  small Dream-shaped model (``lm_head`` beside the base model, alg entropy, top_p 0.95, greedy).

Peak extra memory: CPU peak RSS growth / CUDA allocator peak of one call (sgkernels/bench/timing.py).
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

import sgkernels as sgk

from ..timing import measure_interleaved, median_ms_interleaved, peak_mb


def _setup(device, rows_total, d, vocab, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(rows_total, d, generator=gen, device=device).to(dtype)
    hu = torch.randn(rows_total, d, generator=gen, device=device).to(dtype)
    w = (torch.randn(vocab, d, generator=gen, device=device) / d**0.5).to(dtype)
    b = (0.1 * torch.randn(vocab, generator=gen, device=device)).to(dtype)
    return h, hu, w, b


def _cases(device, d=None):
    big_d = d if d is not None else (1024 if device == "cpu" else 4096)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    return [
        # name, rows_total, decoded rows, d, V, dtype, cfg, sampling options
        ("llada_step", 1024, 32, big_d, 126464, dt, False, {}),
        ("llada_step_cfg", 1024, 32, big_d, 126464, dt, True, {}),
        ("all_rows", 256, 256, 1024, 32768, dt, False, {}),
        # Dream's released settings (top_p 0.95, entropy confidence): head_sample's row-chunk path
        ("dream_step", 1024, 32, big_d, 126464, dt, False, dict(temperature=0.2, top_p=0.95, confidence="entropy")),
    ]


def _fns(h, hu, w, b, n_dec, cfg, opts=None):
    rows_total = h.shape[0]
    start = (rows_total - n_dec) // 2
    idx = torch.arange(start, start + n_dec, device=h.device)
    guide = hu if cfg else None
    opts = opts or {}

    def baseline():
        logits = h @ w.T + b  # the model's head over every position
        ul = (hu @ w.T + b) if cfg else None
        return sgk.guided_sample(logits[start:start + n_dec], None if ul is None else ul[start:start + n_dec],
                                 guidance_scale=1.0 if cfg else 0.0, seed=0, **opts)

    def fused():
        return sgk.head_sample(h, w, b, guide, guidance_scale=1.0 if cfg else 0.0, seed=0,
                               rows=None if n_dec == rows_total else idx, **opts)

    return baseline, fused


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    out = []
    for name, rows_total, n_dec, d, vocab, dtype, cfg, opts in _cases(device):
        h, hu, w, b = _setup(device, rows_total, d, vocab, dtype)
        baseline, fused = _fns(h, hu, w, b, n_dec, cfg, opts)
        common = dict(op="head_sample", shape=f"{name} L={rows_total} rows={n_dec} d={d} V={vocab}",
                      dtype=str(dtype).replace("torch.", ""))
        out += measure_interleaved([(fused, dict(impl="sgkernels", gflops=None)),
                                    (baseline, dict(impl="torch matmul + guided_sample"))], device, quick, **common)
    return out


class _SmallLLaDA(torch.nn.Module):
    """A LLaDA-shaped model for the end-to-end row: embedding, a few pre-LN bidirectional blocks,
    final norm, an ``ff_out`` head over a large vocabulary inside the base model (as LLaDA's code)."""

    def __init__(self, vocab=126464, d=256, layers=2, heads=4, device="cpu", dtype=torch.float32):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.emb = torch.nn.Embedding(vocab, d)
        self.model.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, norm_first=True, dropout=0.0)
            for _ in range(layers))
        self.model.ln_f = torch.nn.LayerNorm(d)
        self.model.ff_out = torch.nn.Linear(d, vocab)
        self.to(device, dtype).eval()

    def get_output_embeddings(self):
        return self.model.ff_out

    def set_output_embeddings(self, m):
        self.model.ff_out = m

    def forward(self, x, attention_mask=None):
        h = self.model.emb(x)
        for blk in self.model.blocks:
            h = blk(h)
        return SimpleNamespace(logits=self.model.ff_out(self.model.ln_f(h)))


def e2e(device: str, quick: bool) -> list[dict]:
    from sgkernels.integrations import llada

    torch.manual_seed(0)
    model = _SmallLLaDA(device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    prompt = torch.randint(0, 126000, (1, 64), device=device)
    kw = dict(steps=8 if quick else 32, gen_length=64 if quick else 256, block_length=32, temperature=0.0,
              mask_id=126336, seed=0)
    fns = {"fused_head": lambda: llada.generate(model, prompt, **kw),
           "logits path": lambda: llada.generate(model, prompt, fused_head=False, **kw)}
    assert torch.equal(fns["fused_head"](), fns["logits path"]())  # greedy: token-equal
    ms = median_ms_interleaved(fns, device, repeats=2 if quick else 3, warmup=1)
    shape = f"e2e llada.generate L={64 + kw['gen_length']} gen={kw['gen_length']} d=256 V=126464 steps={kw['steps']}"
    return [dict(op="head_sample", shape=shape, dtype="float32", impl="sgkernels" if k == "fused_head" else k,
                 ms=v, peak_mb=peak_mb(fns[k], device)) for k, v in ms.items()]


class _SmallDream(torch.nn.Module):
    """A Dream-shaped model for the end-to-end row: a base model (embedding, a few pre-LN bidirectional
    blocks, final norm) returning ``.last_hidden_state``, and a bias-free ``lm_head`` beside it over a large
    vocabulary, called ``model(x, attention_mask, position_ids)`` (as Dream's HF ``DreamModel``)."""

    def __init__(self, vocab=126464, d=256, layers=2, heads=4, device="cpu", dtype=torch.float32):
        super().__init__()
        self.model = _DreamBase(vocab, d, layers, heads)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.config = SimpleNamespace(vocab_size=vocab)
        self.to(device, dtype).eval()

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, x, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.lm_head(self.model(x, attention_mask, position_ids).last_hidden_state))


class _DreamBase(torch.nn.Module):
    def __init__(self, vocab, d, layers, heads):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, norm_first=True, dropout=0.0)
            for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)

    def forward(self, x, attention_mask=None, position_ids=None):
        h = self.emb(x)
        for blk in self.blocks:
            h = blk(h)
        return SimpleNamespace(last_hidden_state=self.ln_f(h))


def e2e_dream(device: str, quick: bool) -> list[dict]:
    from sgkernels.integrations import dream

    torch.manual_seed(0)
    model = _SmallDream(device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    prompt = torch.randint(0, 126000, (1, 64), device=device)
    kw = dict(max_new_tokens=64 if quick else 256, steps=8 if quick else 32, alg="entropy", temperature=0.0,
              top_p=0.95, mask_token_id=126336, seed=0)
    fns = {"fused_head": lambda: dream.diffusion_generate(model, prompt, **kw),
           "logits path": lambda: dream.diffusion_generate(model, prompt, fused_head=False, **kw)}
    assert torch.equal(fns["fused_head"](), fns["logits path"]())  # greedy: token-equal
    ms = median_ms_interleaved(fns, device, repeats=2 if quick else 3, warmup=1)
    shape = (f"e2e dream.diffusion_generate prompt 64 + gen {kw['max_new_tokens']}, {kw['steps']} steps, entropy, "
             f"top_p 0.95, d=256, 2 layers, V=126464 (greedy, token-equal)")
    return [dict(op="head_sample", shape=shape, dtype="float32", impl="sgkernels" if k == "fused_head" else k,
                 ms=v, peak_mb=peak_mb(fns[k], device)) for k, v in ms.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--e2e", action="store_true", help="also the end-to-end generate row")
    p.add_argument("--e2e-dream", action="store_true", help="also the end-to-end Dream diffusion_generate row")
    p.add_argument("--only", nargs="*", help="case names (llada_step, llada_step_cfg, all_rows)")
    p.add_argument("--d", type=int, default=None,
                   help="hidden size of the llada_step cases (default: 1024 on CPU, 4096 on CUDA)")
    a = p.parse_args(argv)
    print("| case | impl | ms | speed-up | peak extra MB | % of logits tensor |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rows_total, n_dec, d, vocab, dtype, cfg, opts in _cases(a.device, a.d):
        if (a.only and name not in a.only) or (not a.only and opts):
            continue
        h, hu, w, b = _setup(a.device, rows_total, d, vocab, dtype)
        baseline, fused = _fns(h, hu, w, b, n_dec, cfg, opts)
        # the method: temperature 0 has no second pass (pick a tile, recompute it)
        greedy = lambda: sgk.head_sample(h, w, b, rows=None if n_dec == rows_total else  # noqa: E731
                                         torch.arange(n_dec, device=h.device), temperature=0.0, seed=0,
                                         confidence=opts.get("confidence"))
        if opts:
            name += " " + " ".join(f"{k}={v}" for k, v in opts.items())
        ms = median_ms_interleaved({"fused": fused, "baseline": baseline, "fused T=0": greedy}, a.device,
                                   repeats=2 if a.quick else 5, warmup=1)
        logits_mb = rows_total * vocab * torch.finfo(dtype).bits / 8 / 2**20
        for impl, fn in (("head_sample", fused), ("matmul + guided_sample", baseline), ("head_sample T=0", greedy)):
            key = {"head_sample": "fused", "matmul + guided_sample": "baseline", "head_sample T=0": "fused T=0"}[impl]
            mem = peak_mb(fn, a.device)
            mem_s = "" if mem is None else f"{mem:.0f}"
            pct = "" if mem is None else f"{100 * mem / logits_mb:.1f}%"
            print(f"| {name} L={rows_total} rows={n_dec} d={d} V={vocab} {str(dtype)[6:]} | {impl} | {ms[key]:.1f} | "
                  f"{ms['baseline'] / ms[key]:.2f}x | {mem_s} | {pct} |", flush=True)
    for flag, fn in ((a.e2e, e2e), (a.e2e_dream, e2e_dream)):
        if not flag:
            continue
        rows = fn(a.device, a.quick)
        base = {r["impl"]: r for r in rows}
        for r in rows:
            print(f"| {r['shape']} | {r['impl']} | {r['ms']:.0f} | {base['logits path']['ms'] / r['ms']:.2f}x | "
                  f"{r['peak_mb']:.0f} | |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
