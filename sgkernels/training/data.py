"""Training data: :class:`TokenDataset`, batch checks, and per-rank resumable batch streams."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..models.transformer import MaskTransformerConfig
from .config import TrainConfig


class TokenDataset(torch.utils.data.Dataset):
    """Token grids ``[M, N]`` or ``[M, H, W]`` (codebook ids) and labels ``[M]``; items ``(tokens [N], label)``."""

    def __init__(self, tokens, labels):
        tokens, labels = torch.as_tensor(tokens), torch.as_tensor(labels)
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() not in (2, 3):
            raise ValueError(f"tokens: expected an integer array [M, N] or [M, H, W], got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != tokens.shape[:1]:
            raise ValueError(f"labels: expected an integer array [{tokens.shape[0]}], got {tuple(labels.shape)} "
                             f"{labels.dtype}")
        self.tokens = tokens.reshape(tokens.shape[0], -1).long()
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i):
        return self.tokens[i], self.labels[i]

    @classmethod
    def load(cls, path: str) -> "TokenDataset":
        """Read ``.pt`` / ``.npz`` (keys ``tokens``, ``labels``) or ``.npy`` ([M, 1+N], column 0 = label)."""
        if path.endswith(".npy") or path.endswith(".npz"):
            import numpy as np

            data = np.load(path, allow_pickle=False)
            if path.endswith(".npz"):
                _require_keys(path, data.files)
                return cls(data["tokens"], data["labels"])
            if data.ndim != 2 or data.shape[1] < 2:
                raise ValueError(f"{path}: expected an array [M, 1 + N] (label, then the grid), got {data.shape}")
            return cls(data[:, 1:], data[:, 0])
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict with 'tokens' and 'labels'")
        _require_keys(path, data.keys())
        return cls(data["tokens"], data["labels"])


def _require_keys(path, keys):
    missing = [k for k in ("tokens", "labels") if k not in keys]
    if missing:
        raise ValueError(f"{path}: missing {missing} (expected keys 'tokens' and 'labels')")


def check_batch(batch, cfg: MaskTransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, N] int64, labels [B] int64)`` of a batch, or a clear error."""
    if isinstance(batch, dict):
        try:
            tokens, labels = batch["tokens"], batch["labels"]
        except KeyError as e:
            raise ValueError(f"batch: a dict batch needs 'tokens' and 'labels', got keys {sorted(batch)}") from e
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        tokens, labels = batch
    else:
        raise ValueError("batch: expected (tokens, labels) or {'tokens': ..., 'labels': ...}")
    tokens, labels = torch.as_tensor(tokens), torch.as_tensor(labels)
    h, w = cfg.grid_hw
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens: expected integer token ids, got {tokens.dtype}")
    if not ((tokens.dim() == 2 and tokens.shape[1] == cfg.num_tokens) or
            (tokens.dim() == 3 and tuple(tokens.shape[1:]) == (h, w))):
        raise ValueError(f"tokens: expected token grids [B, {h}, {w}] or [B, {cfg.num_tokens}] for the backbone's "
                         f"{h}x{w} grid, got {tuple(tokens.shape)}")
    b = tokens.shape[0]
    if b < 1:
        raise ValueError("tokens: empty batch")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (b,):
        raise ValueError(f"labels: expected integer class labels of shape ({b},), got {tuple(labels.shape)} "
                         f"{labels.dtype}")
    tokens, labels = tokens.reshape(b, cfg.num_tokens).long(), labels.long()
    if labels.device.type == "cpu" and bool(((labels < 0) | (labels >= cfg.num_classes)).any()):
        bad = labels[(labels < 0) | (labels >= cfg.num_classes)].unique().tolist()
        raise ValueError(f"labels: class labels must lie in [0, {cfg.num_classes}), got {bad}")
    if tokens.device.type == "cpu" and bool(((tokens < 0) | (tokens >= cfg.codebook_size)).any()):
        raise ValueError(f"tokens: expected codebook ids in [0, {cfg.codebook_size}) (no mask ids in training data)")
    return tokens, labels


def is_map_dataset(data) -> bool:
    return (isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
            and hasattr(data, "__len__") and hasattr(data, "__getitem__"))


def dataset_batches(dataset, config: TrainConfig, rank: int, world: int, start_step: int) -> Iterator:
    """Per-rank batches of a map-style dataset: DistributedSampler order, resumable at ``start_step``."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    per_epoch = len(sampler) // config.batch_size
    if per_epoch < 1:
        raise ValueError(f"dataset: {len(dataset)} samples are fewer than one batch of {config.batch_size} "
                         f"per process ({world} processes)")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * config.batch_size: per_epoch * config.batch_size]
        yield from DataLoader(dataset, batch_size=config.batch_size, sampler=indices, drop_last=True,
                              num_workers=config.num_workers)
        epoch, skip = epoch + 1, 0


def iterable_batches(data: Iterable) -> Iterator:
    """Batches of a re-iterable (list, IterableDataset, DataLoader: restarted when exhausted) or an iterator."""
    while True:
        it = iter(data)
        reusable = it is not data
        empty = True
        for batch in it:
            empty = False
            yield batch
        if empty or not reusable:
            raise ValueError("data: ran out of batches before config.steps (pass a re-iterable or a Dataset)")
