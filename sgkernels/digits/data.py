"""scikit-learn's digits (1,797 8x8 images, 10 classes) upscaled to 32x32 with a fixed split.

Images are float32 ``[M, 1, 32, 32]`` in ``[0, 1]`` (pixel values 0..16 divided by 16, bilinear
upscaling); labels int64 ``[M]``. The split is a seeded permutation: the first ``num_train`` (1,500)
images train every stage, the other 297 are held out (the real set of FID / precision / recall).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NUM_CLASSES = 10
NUM_TRAIN = 1500
SPLIT_SEED = 0


def _load_raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def upscale(images8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[M, 8, 8]`` or ``[M, 1, 8, 8]`` in [0, 1] -> ``[M, 1, size, size]`` (bilinear, clamped)."""
    x = images8 if images8.dim() == 4 else images8[:, None]
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def load_split(split: str = "train", *, num_train: int = NUM_TRAIN, seed: int = SPLIT_SEED):
    """``(images [M, 1, 32, 32] float32 in [0, 1], labels [M] int64)`` of ``"train"``, ``"heldout"`` or ``"all"``."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'all', got {split!r}")
    images, labels = _load_raw()
    perm = np.random.default_rng(seed).permutation(len(labels))
    if split == "train":
        perm = perm[:num_train]
    elif split == "heldout":
        perm = perm[num_train:]
    x = upscale(torch.from_numpy(images[perm]))
    return x, torch.from_numpy(labels[perm])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[M, 1, H, W]`` in [0, 1] -> uint8 RGB ``[M, H, W, 3]`` (white digit on black, as the data)."""
    g = (images.detach().float().clamp(0, 1)[:, 0] * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(g[..., None], 3, axis=-1)
