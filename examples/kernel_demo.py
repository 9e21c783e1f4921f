"""``python -m examples.kernel_demo`` (from the repository root): the fused step on a synthetic model.

The "model" is synthetic: a fixed per-position distribution over 16 gray levels that draws the
letters "SG" on a 32x32 token grid, and a guide that is its spatially blurred ("smoothed") version.
The demo runs the full MaskGIT loop (cosine schedule, choice-temperature decay) with the fused
``self_guided_step``, times each step against the open-muse-style eager step of ``benchmarks/`` on
the same logits, and writes a picture of the unmasking order. (The trained model's demo is
``sgkernels demo``.)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import sgkernels as sgk
from sgkernels._png import tile, write_png
from sgkernels.bench.anchors import open_muse_step

LEVELS = 16
GLYPHS = {
    "S": ["01110", "10001", "10000", "01110", "00001", "10001", "01110"],
    "G": ["01110", "10001", "10000", "10111", "10001", "10001", "01111"],
}


def target_image(size: int = 32) -> torch.Tensor:
    """float [size, size] in [0, 1]: "SG" drawn in 3x3 pixel strokes."""
    img = torch.zeros(size, size)
    for i, ch in enumerate("SG"):
        for y, row in enumerate(GLYPHS[ch]):
            for x, bit in enumerate(row):
                if bit == "1":
                    y0, x0 = 5 + 3 * y, 1 + 16 * i + 3 * x
                    img[y0 : y0 + 3, x0 : x0 + 3] = 1.0
    return img


def synthetic_logits(batch: int, size: int = 32):
    """Base and guide logits [B, size*size, LEVELS]: peaked at the target gray level, guide blurred."""
    levels = torch.linspace(0, 1, LEVELS)
    img = target_image(size)
    base = -((img.reshape(-1, 1) - levels) ** 2) / 0.02
    blurred = F.avg_pool2d(img[None, None], 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    guide = -((blurred.reshape(-1, 1) - levels) ** 2) / 0.02
    return base.expand(batch, -1, -1).contiguous(), guide.expand(batch, -1, -1).contiguous()


def sample(logits, guide, steps, guidance_scale, tau0, seed, eager=False, history=None):
    batch, n_tok, vocab = logits.shape
    mask_id = vocab
    tokens = torch.full((batch, n_tok), mask_id, dtype=torch.int64)
    is_masked = torch.ones(batch, n_tok, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    step_times = []
    for k in range(steps):
        n = sgk.mask_len(k, steps, n_tok, is_masked.sum(-1))
        tau = sgk.choice_temperature(k, steps, tau0)
        t0 = time.perf_counter()
        if eager:
            tokens, is_masked = open_muse_step(tokens, is_masked, logits, guide, n, guidance_scale=guidance_scale,
                                               temperature=1.0, choice_temperature=tau, mask_id=mask_id, generator=gen)
        else:
            tokens, is_masked = sgk.self_guided_step(tokens, is_masked, logits, guide, n, guidance_scale=guidance_scale,
                                                     temperature=1.0, choice_temperature=tau, seed=seed, offset=k)
        step_times.append(time.perf_counter() - t0)
        if history is not None:
            history.append((tokens.clone(), is_masked.clone()))
    sgk.check_errors()
    return tokens, step_times


def to_rgb(tokens, is_masked, size):
    gray = (tokens.clamp(max=LEVELS - 1).float() / (LEVELS - 1) * 255).to(torch.uint8).numpy()
    rgb = np.repeat(gray.reshape(size, size, 1), 3, axis=2)
    rgb[is_masked.numpy().reshape(size, size)] = (220, 60, 60)  # masked positions in red
    return rgb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.kernel_demo", description="Self-guided sampling demo (synthetic model).")
    parser.add_argument("--out", default="demo.png", help="picture of the unmasking order (PNG)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--choice-temperature", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = 32
    logits, guide = synthetic_logits(args.batch, size)
    print(f"sgkernels {sgk.__version__}, backend {sgk.get_backend()}: B={args.batch}, N={size * size}, V={LEVELS}, T={args.steps}")
    history = []
    tokens, fused = sample(logits, guide, args.steps, args.guidance_scale, args.choice_temperature, args.seed, history=history)
    ms = lambda ts: 1e3 * sum(ts) / len(ts)  # noqa: E731
    _, eager = sample(logits, guide, args.steps, args.guidance_scale, args.choice_temperature, args.seed, eager=True)
    # The same loop at MaskGIT-256 size (V = 1024), where the sampling step costs the most.
    gen = torch.Generator().manual_seed(args.seed)
    big_l, big_g = torch.randn(8, 1024, 1024, generator=gen), torch.randn(8, 1024, 1024, generator=gen)
    _, fused_big = sample(big_l, big_g, 4, 1.0, 4.5, args.seed)
    _, eager_big = sample(big_l, big_g, 4, 1.0, 4.5, args.seed, eager=True)
    print(f"toy grid          : fused {ms(fused):8.3f} ms/step, eager open-muse step {ms(eager):8.3f} ms/step "
          f"({ms(eager) / ms(fused):.1f}x)")
    print(f"B=8 N=1024 V=1024 : fused {ms(fused_big):8.3f} ms/step, eager open-muse step {ms(eager_big):8.3f} ms/step "
          f"({ms(eager_big) / ms(fused_big):.1f}x)")
    target = (target_image(size) * (LEVELS - 1)).round().long().reshape(-1)
    acc = (tokens == target).float().mean().item()
    print(f"tokens equal to the target glyph's gray level: {acc:.1%}")
    shown = min(args.batch, 4)
    frames = np.stack([np.stack([to_rgb(t[b], m[b], size) for t, m in history]) for b in range(shown)])
    write_png(args.out, tile(frames, scale=3))
    print(f"wrote {args.out}: rows = samples, columns = steps 1..{args.steps} (red = still masked)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
