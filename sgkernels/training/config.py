"""Hyper-parameters of guide training: :class:`TrainConfig`."""
from __future__ import annotations

import dataclasses
import math

from .. import _dataclass

ERROR_TOKEN_MODES = ("sample", "official")
CE_VOCABS = ("full", "codebook")
MIXED_PRECISIONS = ("bf16", "no")


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
        ce_vocab: the cross-entropy's normalisation: ``"full"`` (every id of the head: codebook,
            [MASK], classes; the official code) or ``"codebook"`` (:func:`sgkernels.training.aux_loss`).
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
    ce_vocab: str = "full"
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
        if self.ce_vocab not in CE_VOCABS:
            raise ValueError(f"TrainConfig.ce_vocab: expected one of {CE_VOCABS}, got {self.ce_vocab!r}")
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
