"""``MaskGitVQGAN.encode``: the VQ kernel inside a real tokenizer, against the official quantizer.

The official MaskGIT VQGAN (open-muse / UnlockMGM ``VectorQuantizer.get_code``) finds each latent's
code with the unfused distance ``||z||^2 + ||e||^2 - 2 z e^T`` ([N, K] float32 matrix) and an argmin.
sgkernels' ``encode`` calls ``vq_lookup`` (running minimum, no [N, K] matrix). Rows:

* ``vqgan_quantize``: only the quantizer, at the ImageNet-256 tokenizer's shape (16x16 latents per
  image, K = 1024 codes of dimension 256), for a batch of images;
* ``vqgan_encode``: the whole ``encode`` (convolutional encoder + quantizer) of a narrower
  tokenizer (``hidden_channels=32``, so that a CPU run takes seconds), fused quantizer against the
  same encoder followed by the official quantizer. Tokens are checked equal.

``python -m benchmarks --only vqgan_encode [--device cuda] [--quick]``.
"""
from __future__ import annotations

import torch

from ..timing import peak_mb, stats_interleaved


def official_get_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The official quantizer's nearest code: unfused distances + argmin. ``z`` [N, D] -> int64 [N]."""
    distances = (z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1) - 2 * (z @ codebook.t())
    return distances.argmin(dim=1)


def _rows(op: str, shape: str, fns: dict, device: str, quick: bool) -> list[dict]:
    repeats, warmup = (3, 1) if quick else (9, 2)
    st = stats_interleaved(fns, device, repeats=repeats, warmup=warmup)
    return [{"op": op, "shape": shape, "dtype": "float32", "impl": name, "ms": st[name].median_ms,
             "spread": st[name].spread,
             "peak_mb": peak_mb(fn, device), "gflops": None} for name, fn in fns.items()]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    from sgkernels.models.vqgan import MaskGitVQGAN, MaskGitVQGANConfig
    from sgkernels.ops.vq_lookup import vq_lookup

    gen = torch.Generator().manual_seed(0)
    rows = []
    images = 4 if device == "cpu" else 64
    z = torch.randn(images * 256, 256, generator=gen).to(device)
    cb = torch.randn(1024, 256, generator=gen).to(device)
    assert torch.equal(vq_lookup(z, cb), official_get_code(z, cb))
    rows += _rows("vqgan_quantize", f"{images} images x 16x16 latents, K=1024 D=256",
                  {"sgkernels": lambda: vq_lookup(z, cb),
                   "official get_code (unfused distances)": lambda: official_get_code(z, cb)}, device, quick)

    torch.manual_seed(0)
    vae = MaskGitVQGAN(MaskGitVQGANConfig(hidden_channels=32)).to(device).eval()
    x = torch.rand(images, 3, 256, 256, generator=gen).to(device)
    codes = vae.quantize.codebook()

    def official_encode():
        lat = vae.encoder(x).permute(0, 2, 3, 1)
        return official_get_code(lat.reshape(-1, lat.shape[-1]), codes).reshape(images, -1)

    with torch.no_grad():
        assert torch.equal(vae.encode(x), official_encode())
        rows += _rows("vqgan_encode", f"{images} images 256x256, hidden 32, K=1024 D=256",
                      {"sgkernels": lambda: vae.encode(x), "encoder + official get_code": official_encode},
                      device, quick)
    return rows
