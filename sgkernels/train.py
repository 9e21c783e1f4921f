"""Fine-tune a TOAST guide H with the self-guidance auxiliary task (METHOD.md, "Auxiliary task").

Per training step, for a batch of token grids ``x`` ``[B, N]`` and class labels ``c`` ``[B]``:

1. **mask**: ``u ~ U(0, 1)`` per sample, ``r = cos(pi/2 u)``; ``max(1, round(N r))`` positions chosen
   uniformly at random get the [MASK] id;
2. **error tokens**: each still-visible position is replaced, with probability ``error_ratio``
   (0.3), by an error token drawn from the **frozen base model on an all-mask input** (class token
   kept, ``error_token_conditional``): ``token ~ softmax(l_base)`` with :func:`sgkernels.guided_sample`
   (``error_token_mode="sample"``, the paper). ``error_token_mode="official"`` keeps the official
   code's behaviour, ``token ~ softmax(softmax(l_base))``: nearly uniform error tokens;
3. **targets**: the original token at the error positions, ``ignore_index`` everywhere else;
4. **loss**: pass 1 of the frozen backbone on the corrupted grid, then the guide's pass 2 (``l_smooth``);
   ``L = CE(l_smooth, targets, label_smoothing=0.1) + 0.1 * sum_l MSE(A_l(out_l), in_l)``
   (:meth:`TOAST.reconstruction_loss`). Only the guide's parameters train; the backbone stays in
   eval mode and gets no gradients.

Optimiser: AdamW (fused where available), lr 1e-4, betas (0.9, 0.96), weight decay 0, linear warmup
(5k steps) then constant; an EMA of the guide (decay 0.9999) is kept and is what gets saved for
sampling. Everything is in :class:`TrainConfig`.

:func:`train_guide` runs single-process or under ``torchrun`` (DistributedDataParallel; the process
group is initialised from the environment when ``WORLD_SIZE > 1``: gloo on CPU, nccl on CUDA), bf16
autocast on CUDA only, a tqdm bar on rank 0.

Output directory::

    <out_dir>/checkpoints/step_XXXXXXXX/   one directory per saved step (the last ``keep_last`` kept)
        guide.safetensors  ema.safetensors  (guide.pt / ema.pt without safetensors)
        state.pt           step, optimiser state, RNG states (per rank), configs
    <out_dir>/final/                       save_checkpoint(backbone, EMA guide): load_checkpoint() it
    <out_dir>/log.jsonl                    {"step", "loss", "ce", "recon", "lr"} every log_every steps

A step directory is written under a temporary name (each file via temp file + ``os.replace``, fsynced)
and renamed into place, so every ``step_*`` directory is complete: a run killed at any point resumes
(``resume=True``) from its newest one. The corruption's random numbers are a function of
``(seed, rank, step)``, and a Dataset's sampling order of ``(seed, epoch)``, so a resumed run
continues exactly as the uninterrupted run would have.

Command line (see ``python -m sgkernels.train --help``)::

    python -m sgkernels.train CKPT_DIR DATA --out OUT --steps 50000 --batch-size 32
    torchrun --nproc_per_node 8 -m sgkernels.train CKPT_DIR DATA --out OUT ...
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Iterable, Iterator, NamedTuple

import torch
from torch import nn

from .models.checkpoint import _atomic_write, _read_weights, _serialize, safetensors_available
from .models.toast import TOAST, TOASTConfig
from .models.transformer import MaskTransformer, MaskTransformerConfig
from .ops import fused_cross_entropy, guided_sample
from . import _dataclass

ERROR_TOKEN_MODES = ("sample", "official")
MIXED_PRECISIONS = ("bf16", "no")
CHECKPOINT_FORMAT = "sgkernels.train"
CHECKPOINT_VERSION = 1
_STEP_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"

__all__ = [
    "Corruption",
    "TokenDataset",
    "TrainConfig",
    "TrainResult",
    "aux_loss",
    "corrupt",
    "latest_checkpoint",
    "load_train_checkpoint",
    "main",
    "sample_error_tokens",
    "train_guide",
]


# ------------------------------------------------------------------------------------------ config
@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_guide` (defaults: the paper / official code).

    Attributes:
        steps: total optimiser steps (global, counted across resumes), >= 1.
        batch_size: per-process batch size when the data is a Dataset (an iterable yields its own).
        lr, betas, weight_decay, eps: AdamW; ``fused``: use the fused kernel where torch has one.
        warmup_steps: linear warmup ``lr * min(1, (step+1)/warmup_steps)``, then constant.
        max_grad_norm: gradient-norm clipping (None: off; the paper does not clip).
        ema_decay: decay of the guide's EMA, in [0, 1).
        error_ratio: fraction of the still-visible tokens replaced by error tokens (0.3).
        error_token_mode: ``"sample"`` (tokens ~ softmax(l_base)) or ``"official"``
            (~ softmax(softmax(l_base)), the official code: nearly uniform).
        error_token_conditional: the all-mask pass that draws error tokens keeps the class token
            (False: [MASK] in the class slot too).
        label_smoothing: of the cross-entropy (0.1); recon_weight: TOAST's reconstruction term (0.1).
        mixed_precision: ``"bf16"`` (autocast on CUDA; CPU always runs float32) or ``"no"``.
        save_every: checkpoint every this many steps (and at the end); keep_last: step directories kept.
        log_every: append to ``log.jsonl`` every this many steps.
        seed: seeds the corruption randomness and the Dataset order.
        num_workers: DataLoader workers for a Dataset.
        progress: tqdm bar on rank 0.
    """

    steps: int = 50_000
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.0
    eps: float = 1e-8
    fused: bool = True
    warmup_steps: int = 5_000
    max_grad_norm: float | None = None
    ema_decay: float = 0.9999
    error_ratio: float = 0.3
    error_token_mode: str = "sample"
    error_token_conditional: bool = True
    label_smoothing: float = 0.1
    recon_weight: float = 0.1
    mixed_precision: str = "bf16"
    save_every: int = 1_000
    keep_last: int = 2
    log_every: int = 50
    seed: int = 0
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"TrainConfig.{name}: expected an int >= {minimum}, got {v!r}")

        for name in ("steps", "batch_size", "save_every", "keep_last", "log_every"):
            pos_int(name)
        for name in ("warmup_steps", "seed", "num_workers"):
            pos_int(name, 0)
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas: expected two floats in [0, 1), got {self.betas!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("eps", 0.0, math.inf),
                             ("ema_decay", 0.0, 1.0), ("error_ratio", 0.0, 1.0), ("label_smoothing", 0.0, 1.0),
                             ("recon_weight", 0.0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"TrainConfig.{name}: expected a float in [{lo}, {hi}], got {v!r}")
        if self.ema_decay >= 1.0:
            raise ValueError(f"TrainConfig.ema_decay: expected a float in [0, 1), got {self.ema_decay!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"TrainConfig.max_grad_norm: expected None or a positive float, got {self.max_grad_norm!r}")
        if self.error_token_mode not in ERROR_TOKEN_MODES:
            raise ValueError(f"TrainConfig.error_token_mode: expected one of {ERROR_TOKEN_MODES}, "
                             f"got {self.error_token_mode!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"TrainConfig.mixed_precision: expected one of {MIXED_PRECISIONS}, "
                             f"got {self.mixed_precision!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _dataclass.from_dict(cls, d)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): linear warmup, then constant."""
        if self.warmup_steps <= 0:
            return self.lr
        return self.lr * min(1.0, (step + 1) / self.warmup_steps)


# ------------------------------------------------------------------------------------- the task
class Corruption(NamedTuple):
    """A corrupted batch (all ``[B, N]`` unless noted).

    inputs: int64 grid fed to the backbone (mask id at masked positions, error tokens at error
    positions, the original token elsewhere); targets: int64, the original token at the error
    positions, ``ignore_index`` elsewhere; is_masked / is_error: bool; mask_ratio: float32 ``[B]``,
    r = cos(pi/2 u); error_tokens: int64, the tokens drawn from the base model at every position
    (None when ``error_ratio == 0``).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    is_masked: torch.Tensor
    is_error: torch.Tensor
    mask_ratio: torch.Tensor
    error_tokens: torch.Tensor | None


@torch.no_grad()
def sample_error_tokens(backbone: MaskTransformer, class_labels: torch.Tensor | None, *, mode: str = "sample",
                        seed: int | None = None) -> torch.Tensor:
    """One token per position ``[B, N]`` from the frozen ``backbone`` on an all-mask grid.

    ``mode="sample"``: ``~ softmax(logits)`` (:func:`sgkernels.guided_sample`, exact). ``"official"``:
    ``~ softmax(softmax(logits))``, the official code (it applies softmax to probabilities).
    ``class_labels=None`` (or entries -1) puts [MASK] in the class slot. ``seed``: guided_sample's seed.
    """
    if mode not in ERROR_TOKEN_MODES:
        raise ValueError(f"mode: expected one of {ERROR_TOKEN_MODES}, got {mode!r}")
    cfg = backbone.config
    b = class_labels.shape[0] if class_labels is not None else 1
    device = class_labels.device if class_labels is not None else next(backbone.parameters()).device
    blank = torch.full((b, cfg.num_tokens), cfg.mask_token_id, dtype=torch.int64, device=device)
    logits = backbone(blank, class_labels)
    if mode == "official":
        logits = torch.softmax(logits.float(), dim=-1)
    tokens, _ = guided_sample(logits, seed=seed)
    return tokens


@torch.no_grad()
def corrupt(backbone: MaskTransformer, tokens: torch.Tensor, class_labels: torch.Tensor, *,
            error_ratio: float = 0.3, error_token_mode: str = "sample", error_token_conditional: bool = True,
            ignore_index: int = -100, generator: torch.Generator | None = None,
            sample_seed: int | None = None) -> Corruption:
    """The auxiliary task's corruption of ``tokens`` ``[B, N]`` (codebook ids) with labels ``[B]``.

    ``generator`` (on ``tokens``' device) drives the mask ratios and the positions (None: torch's
    default generator); ``sample_seed`` is :func:`sgkernels.guided_sample`'s seed for the error
    tokens (None: drawn from torch's default CPU generator).
    """
    cfg = backbone.config
    b, n = tokens.shape
    device = tokens.device
    u = torch.rand(b, device=device, generator=generator)
    ratio = torch.cos(0.5 * math.pi * u)
    num_masked = torch.round(n * ratio.double()).long().clamp(1, n)
    ranks = torch.rand(b, n, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
    is_masked = ranks < num_masked[:, None]
    pick = torch.rand(b, n, device=device, generator=generator) < error_ratio
    is_error = pick & ~is_masked
    error_tokens = None
    inputs = tokens.masked_fill(is_masked, cfg.mask_token_id)
    if error_ratio > 0:
        labels = class_labels if error_token_conditional else torch.full_like(class_labels, -1)
        error_tokens = sample_error_tokens(backbone, labels, mode=error_token_mode, seed=sample_seed)
        inputs = torch.where(is_error, error_tokens, inputs)
    targets = torch.where(is_error, tokens, torch.full_like(tokens, ignore_index))
    return Corruption(inputs, targets, is_masked, is_error, ratio, error_tokens)


def aux_loss(backbone: MaskTransformer, guide: nn.Module, inputs: torch.Tensor, class_labels: torch.Tensor,
             targets: torch.Tensor, *, label_smoothing: float = 0.1, recon_weight: float = 0.1,
             ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, recon)`` of the guide on a corrupted batch (see :func:`corrupt`).

    ``ce`` is the label-smoothed cross-entropy of pass 2's logits averaged over the labelled
    (error) positions, 0 when there are none; ``recon`` is TOAST's weighted reconstruction term.
    ``guide`` may be a :class:`TOAST` or a DDP wrapper around one.
    """
    with torch.no_grad():
        hidden = backbone(inputs, class_labels, return_hidden=True).hidden_states
    out = guide(backbone, hidden, class_labels, return_layers=True)
    toast = guide.module if hasattr(guide, "module") else guide
    k = out.logits.shape[-1]
    flat_t = targets.reshape(-1)
    ce_sum = fused_cross_entropy(out.logits.reshape(-1, k), flat_t, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, reduction="sum")
    count = (flat_t != ignore_index).sum().clamp_min(1)  # stays on the device: no sync
    ce = ce_sum.float() / count
    recon = toast.reconstruction_loss(out, weight=recon_weight).float()
    return ce + recon, ce, recon


# ---------------------------------------------------------------------------------------- data
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


def _check_batch(batch, cfg: MaskTransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
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


def _is_map_dataset(data) -> bool:
    return (isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
            and hasattr(data, "__len__") and hasattr(data, "__getitem__"))


def _dataset_batches(dataset, config: TrainConfig, rank: int, world: int, start_step: int) -> Iterator:
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


def _iterable_batches(data: Iterable) -> Iterator:
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


# ------------------------------------------------------------------------------------ distributed
class _Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int
    created: bool  # this call initialised the process group (and destroys it)


def _init_distributed(device: torch.device | None) -> _Dist:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, False)
    if world <= 1:
        return _Dist(0, 1, 0, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _step_seed(seed: int, rank: int, step: int, tag: str) -> int:
    digest = hashlib.blake2b(f"sgkernels.train/{tag}/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # in [0, 2**62)


class _GuideLoss(nn.Module):
    """The guide plus the auxiliary loss, as one module for DistributedDataParallel.

    The backbone is held outside the module tree (not a parameter of DDP's model).
    """

    def __init__(self, guide: TOAST, backbone: MaskTransformer, config: TrainConfig, ignore_index: int):
        super().__init__()
        self.guide = guide
        self._backbone = (backbone,)
        self._config = config
        self._ignore_index = ignore_index

    def forward(self, inputs, class_labels, targets):
        cfg = self._config
        return aux_loss(self._backbone[0], self.guide, inputs, class_labels, targets, label_smoothing=cfg.label_smoothing,
                        recon_weight=cfg.recon_weight, ignore_index=self._ignore_index)


# ------------------------------------------------------------------------------------- checkpoints
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _step_dirs(out_dir: str) -> list[tuple[int, str]]:
    root = _checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX):].isdigit():
            found.append((int(name[len(_STEP_PREFIX):]), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Path of the newest complete ``step_*`` directory under ``<out_dir>/checkpoints``, or None."""
    dirs = _step_dirs(os.fspath(out_dir))
    return dirs[-1][1] if dirs else None


def _weights_format() -> tuple[str, str]:
    return ("safetensors", ".safetensors") if safetensors_available() else ("torch", ".pt")


def _save_train_checkpoint(out_dir: str, step: int, guide: TOAST, ema: TOAST, optimizer, config: TrainConfig,
                           backbone_config: MaskTransformerConfig, rng: list, keep_last: int) -> str:
    root = _checkpoint_root(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{_STEP_PREFIX}{step:08d}")
    if os.path.isdir(final):  # this step is already saved (e.g. resumed at the last step)
        return final
    fmt, ext = _weights_format()
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_STEP_PREFIX}{step:08d}-", dir=root)
    try:
        _atomic_write(os.path.join(tmp, "guide" + ext), _serialize(guide.state_dict(), fmt))
        _atomic_write(os.path.join(tmp, "ema" + ext), _serialize(ema.state_dict(), fmt))
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "weights": fmt,
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "config": config.to_dict(),
            "guide_config": guide.config.to_dict(),
            "backbone_config": backbone_config.to_dict(),
        }
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write(os.path.join(tmp, "state.pt"), buf.getvalue())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _step_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    _remove_stale_temps(root)
    return final


def _remove_stale_temps(root: str) -> None:
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_train_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a ``step_*`` directory: its ``state.pt`` dict plus ``"guide"`` and ``"ema"`` state dicts."""
    path = os.fspath(path)
    state_path = os.path.join(path, "state.pt")
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"not a training checkpoint (no state.pt): {path}")
    state = torch.load(state_path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_path}: not an {CHECKPOINT_FORMAT} checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{state_path}: unsupported version {state.get('version')!r}")
    fmt = state["weights"]
    ext = ".safetensors" if fmt == "safetensors" else ".pt"
    state["guide"] = _read_weights(os.path.join(path, "guide" + ext), fmt, map_location)
    state["ema"] = _read_weights(os.path.join(path, "ema" + ext), fmt, map_location)
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class TrainResult:
    """What :func:`train_guide` returns: the trained guide, its EMA (for sampling), the final step,
    the last step's losses (local to this rank), and the final checkpoint directory (rank 0; else None)."""

    guide: TOAST
    ema: TOAST
    step: int
    loss: float | None
    ce: float | None
    recon: float | None
    final_dir: str | None


def _make_optimizer(params, config: TrainConfig, device: torch.device):
    kw = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps)
    if config.fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(params, **kw)


def train_guide(backbone: MaskTransformer, guide: TOAST, data, config: TrainConfig | None = None,
                out_dir: str | os.PathLike = "out", resume: bool = False, *, device=None,
                ignore_index: int = -100, save_final: bool = True) -> TrainResult:
    """Fine-tune ``guide`` on the auxiliary task over the frozen ``backbone``; see the module docstring.

    Args:
        backbone: the frozen MaskGIT model (moved to ``device``, eval mode; ``requires_grad`` is off
            during training and restored afterwards).
        guide: the :class:`TOAST` guide to train (moved to ``device``), built for ``backbone``.
        data: a map-style ``Dataset`` of ``(tokens, label)`` items (batched per process with a
            DistributedSampler, ``config.batch_size``), or an iterable of per-process batches
            ``(tokens [B, N] or [B, H, W], labels [B])`` / dicts with those keys (restarted when
            exhausted if re-iterable; on resume it starts from its beginning).
        config: :class:`TrainConfig` (defaults if None).
        out_dir: where checkpoints, ``final/`` and ``log.jsonl`` go.
        resume: continue from the newest checkpoint in ``out_dir`` (from scratch if there is none).
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        save_final: write ``<out_dir>/final`` (backbone + EMA guide, :func:`save_checkpoint`) at the end.
    Returns:
        :class:`TrainResult`.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(backbone, MaskTransformer):
        raise TypeError(f"backbone: expected a MaskTransformer, got {type(backbone).__name__}")
    if not isinstance(guide, TOAST):
        raise TypeError(f"guide: expected a TOAST guide, got {type(guide).__name__}")
    guide.check_backbone(backbone)
    out_dir = os.fspath(out_dir)

    dist_info = _init_distributed(torch.device(device) if device is not None else None)
    rank, world = dist_info.rank, dist_info.world
    if device is None:
        device = torch.device(f"cuda:{dist_info.local_rank % torch.cuda.device_count()}") \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    flags = [p.requires_grad for p in backbone.parameters()]
    try:
        return _train(backbone, guide, data, config, out_dir, resume, device, rank, world, ignore_index, save_final)
    finally:
        for p, flag in zip(backbone.parameters(), flags):
            p.requires_grad_(flag)
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(backbone, guide, data, config, out_dir, resume, device, rank, world, ignore_index, save_final):
    import torch.distributed as dist

    is_main = rank == 0
    bcfg = backbone.config
    backbone.to(device).eval().requires_grad_(False)
    guide.to(device).train()
    params = list(guide.parameters())
    optimizer = _make_optimizer(params, config, device)

    start_step = 0
    ema_state = None
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_train_checkpoint(ckpt, map_location="cpu")
        if state["guide_config"] != guide.config.to_dict():
            raise ValueError(f"{ckpt}: the checkpoint's guide config {state['guide_config']} differs from the "
                             f"guide's {guide.config.to_dict()}")
        if state["backbone_config"] != bcfg.to_dict():
            raise ValueError(f"{ckpt}: the checkpoint was trained for another backbone config")
        guide.load_state_dict(state["guide"])
        ema_state = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
    model: nn.Module = _GuideLoss(guide, backbone, config, ignore_index)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # broadcasts rank 0's
    ema = copy.deepcopy(guide).eval().requires_grad_(False)  # after the broadcast: the same on every rank
    if ema_state is not None:
        ema.load_state_dict(ema_state)
    ema_params = list(ema.parameters())

    if _is_map_dataset(data):
        batches = _dataset_batches(data, config, rank, world, start_step)
    else:
        batches = _iterable_batches(data)

    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and config.mixed_precision == "bf16")
    bar = None
    if is_main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="train guide", dynamic_ncols=True)
    log_path = os.path.join(out_dir, "log.jsonl")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        _remove_stale_temps(_checkpoint_root(out_dir))

    step = start_step
    loss = ce = recon = None
    try:
        while step < config.steps:
            tokens, labels = _check_batch(next(batches), bcfg)
            tokens = tokens.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = torch.Generator(device=device).manual_seed(_step_seed(config.seed, rank, step, "mask"))
            with autocast:
                c = corrupt(backbone, tokens, labels, error_ratio=config.error_ratio,
                            error_token_mode=config.error_token_mode,
                            error_token_conditional=config.error_token_conditional, ignore_index=ignore_index,
                            generator=gen, sample_seed=_step_seed(config.seed, rank, step, "error"))
                loss, ce, recon = model(c.inputs, labels, c.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - config.ema_decay)
            step += 1

            if bar is not None:
                bar.update(1)
            if is_main and (step % config.log_every == 0 or step == config.steps):  # (a host sync on CUDA)
                values = {"loss": float(loss.detach()), "ce": float(ce.detach()), "recon": float(recon.detach())}
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **values, "lr": lr}) + "\n")
            if step % config.save_every == 0 or step == config.steps:
                rng = [_rng_state()]
                if world > 1:
                    gathered = [None] * world
                    dist.all_gather_object(gathered, rng[0])
                    rng = gathered
                if is_main:
                    _save_train_checkpoint(out_dir, step, guide, ema, optimizer, config, bcfg, rng, config.keep_last)
                if world > 1:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()

    final_dir = None
    if save_final and is_main:
        from .models.checkpoint import save_checkpoint

        final_dir = save_checkpoint(os.path.join(out_dir, "final"), backbone, ema)
    if world > 1:
        dist.barrier()
    as_float = (lambda t: None if t is None else float(t.detach()))
    return TrainResult(guide, ema, step, as_float(loss), as_float(ce), as_float(recon), final_dir)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m sgkernels.train",
        description="Fine-tune a TOAST guide with the self-guidance auxiliary task. Reads a checkpoint "
                    "directory written by sgkernels.save_checkpoint (its guide is fine-tuned; a new one is "
                    "created if it has none) and a token dataset; writes checkpoints under OUT/checkpoints and "
                    "the backbone + EMA guide to OUT/final. Multi-GPU: torchrun --nproc_per_node G -m "
                    "sgkernels.train ...",
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model weights [+ guide])")
    p.add_argument("data", help="token dataset: .pt or .npz with 'tokens' [M, H, W] or [M, N] and 'labels' [M]; "
                                "or .npy [M, 1 + N] int array, column 0 the class label")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--error-token-mode", choices=ERROR_TOKEN_MODES, default=d.error_token_mode,
                   help="'sample': error tokens ~ softmax(base logits) (paper); 'official': softmax of probabilities")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=d.mixed_precision)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--num-factors", type=int, default=16, help="TOAST factors of a new guide")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .models.checkpoint import load_checkpoint

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay, max_grad_norm=args.max_grad_norm, error_token_mode=args.error_token_mode,
        mixed_precision=args.mixed_precision, save_every=args.save_every, log_every=args.log_every, seed=args.seed,
        num_workers=args.num_workers, progress=not args.no_progress,
    )
    backbone, guide = load_checkpoint(args.checkpoint)
    if guide is None:
        torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        guide = TOAST(TOASTConfig.for_backbone(backbone.config, args.num_factors))
    dataset = TokenDataset.load(args.data)
    result = train_guide(backbone, guide, dataset, config, args.out, resume=args.resume, device=args.device)
    if result.final_dir is not None:
        print(f"trained {result.step} steps; backbone + EMA guide saved to {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
