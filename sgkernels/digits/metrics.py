"""Sample-quality metrics on the digits classifier (a toy stand-in for Inception-v3 features).

* :func:`fid`: Frechet distance between Gaussians fitted to two feature sets
  ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017);
* :func:`inception_score`: ``exp(E_x KL(p(y|x) || p(y)))`` over class probabilities, in
  ``[1, num_classes]`` (Salimans et al. 2016);
* :func:`precision_recall`: improved precision / recall with k-NN manifolds (Kynkaenniemi et al.
  2019, k = 3): precision = fraction of generated samples inside the real manifold (the union of
  balls around each real feature with radius its k-th nearest real neighbour distance), recall the
  other way around.
"""
from __future__ import annotations

import numpy as np
import torch


def _as64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features: expected an array [M >= 2, D], got shape {x.shape}")
    return x


def fid(features_a, features_b) -> float:
    """Frechet distance between ``[M, D]`` and ``[M', D]`` feature sets (0 for identical sets)."""
    a, b = _as64(features_a), _as64(features_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = sum of sqrt(eig(S_a^1/2 S_b S_a^1/2)): symmetric PSD, stable eigh (no sqrtm).
    w, v = np.linalg.eigh(s_a)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(half @ s_b @ half), 0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
    return max(value, 0.0)


def inception_score(probs, splits: int = 1) -> float:
    """``exp(E KL(p(y|x) || p(y)))`` of class probabilities ``[M, C]`` (mean over ``splits`` chunks)."""
    p = _as64(probs)
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12))).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d, 0.0))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    d = _pairwise(queries, manifold)
    return float((d <= radii[None, :] * (1 + 1e-9) + 1e-12).any(axis=1).mean())


PR_NEIGHBOURS = 3  # k of precision / recall: a sample set needs more than k images


def precision_recall(real, fake, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds, ``k`` = 3) of ``fake`` features against ``real``."""
    r, f = _as64(real), _as64(fake)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision_recall: need more than k={k} samples per set, got {len(r)} and {len(f)}")
    precision = _coverage(r, _radii(r, k), f)
    recall = _coverage(f, _radii(f, k), r)
    return precision, recall


@torch.no_grad()
def classifier_outputs(classifier, images: torch.Tensor, batch_size: int = 500):
    """``(features [M, D], probabilities [M, C])`` of images ``[M, 1, 32, 32]``."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(images[i:i + batch_size])
        feats.append(f)
        probs.append(torch.softmax(classifier.head(f), dim=-1))
    return torch.cat(feats), torch.cat(probs)


def evaluate_images(classifier, fake: torch.Tensor, real: torch.Tensor) -> dict:
    """FID, IS, precision and recall of generated ``fake`` images against ``real`` ones."""
    ff, pf = classifier_outputs(classifier, fake)
    fr, _ = classifier_outputs(classifier, real)
    p, r = precision_recall(fr, ff, k=PR_NEIGHBOURS)
    return {"fid": fid(fr, ff), "inception_score": inception_score(pf), "precision": p, "recall": r}
