"""The two small conv nets of the digits model, and their directory format.

* :class:`Tokenizer`: conv encoder 32x32 -> 8x8 grid of ``code_dim`` vectors, an EMA
  :class:`sgkernels.nn.VectorQuantizer` (``codebook_size`` codes), and a conv decoder back to 32x32
  (sigmoid output). 64 tokens per image.
* :class:`Classifier`: a digits CNN (the evaluation network): ``features(x)`` is the penultimate
  layer (FID / precision / recall), ``forward(x)`` the class logits (Inception Score).

Directory format (``save_net`` / ``load_net``): ``config.json`` ``{"format": "sgkernels.digits",
"kind": ..., "config": {...}}`` and ``weights.safetensors`` (float16 by default; loaded as float32).
The generator (MaskTransformer + TOAST guide) is an :func:`sgkernels.save_checkpoint` directory,
read as float32 by :func:`load_generator_float`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from .._io import atomic_write, check_state_dict, read_weights, serialize, write_json
from ..models.checkpoint import load_checkpoint
from ..nn import VectorQuantizer

FORMAT = "sgkernels.digits"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    channels: int = 32
    code_dim: int = 16
    codebook_size: int = 64
    beta: float = 0.25
    decay: float = 0.99


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 16
    feature_dim: int = 64
    num_classes: int = 10


class _DigitsNet(nn.Module):
    """A net of the digits model: ``KIND`` names it in ``config.json``, ``Config`` is its frozen config
    dataclass, ``self.config`` the one it was built from (``Config()`` when None)."""

    KIND: str
    Config: type

    def __init__(self, config=None):
        super().__init__()
        self.config = self.Config() if config is None else config


class Tokenizer(_DigitsNet):
    """Images ``[B, 1, 32, 32]`` <-> 64 tokens (an 8x8 grid) through an EMA vector quantizer."""

    KIND, Config = "tokenizer", TokenizerConfig

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__(config)
        config = self.config
        c, d = config.channels, config.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(c // 2, c, 4, stride=2, padding=1), nn.GELU(),   # 16x16
            nn.Conv2d(c, c, 4, stride=2, padding=1), nn.GELU(),        # 8x8
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, d, 1),
        )
        self.quantizer = VectorQuantizer(config.codebook_size, d, beta=config.beta, ema=True, decay=config.decay)
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.GELU(),   # 16x16
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.GELU(),  # 32x32
            nn.Conv2d(c // 2, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor):
        """``x`` [B, 1, 32, 32] -> ``(reconstruction [B, 1, 32, 32], vq loss, tokens [B, 8, 8])``."""
        z_q, vq_loss, idx = self.quantizer(self.encoder(x * 2 - 1))
        return torch.sigmoid(self.decoder(z_q)), vq_loss, idx

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 32, 32]`` -> int64 tokens ``[B, 64]`` (row-major 8x8)."""
        _, _, idx = self.quantizer(self.encoder(x * 2 - 1))
        return idx.reshape(idx.shape[0], -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 tokens ``[B, 64]`` -> images ``[B, 1, 32, 32]`` in [0, 1]."""
        b, n = tokens.shape
        side = int(round(n ** 0.5))
        z_q = self.quantizer.get_codebook_entry(tokens.reshape(b, side, side), (b, side, side, self.config.code_dim))
        return torch.sigmoid(self.decoder(z_q))


class Classifier(_DigitsNet):
    """The evaluation CNN of images ``[B, 1, 32, 32]``: ``features`` (penultimate layer, for FID /
    precision / recall) and ``forward`` (class logits, for the Inception Score)."""

    KIND, Config = "classifier", ClassifierConfig

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__(config)
        config = self.config
        c = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),            # 16
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 8
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(16 * c, config.feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images ``[B, 1, 32, 32]`` in [0, 1]."""
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


_KINDS = {cls.KIND: cls for cls in (Tokenizer, Classifier)}


def save_net(directory: str, net: _DigitsNet, *, half: bool = True) -> str:
    kind = net.KIND
    os.makedirs(directory, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in net.state_dict().items()}
    atomic_write(os.path.join(directory, "weights.safetensors"), serialize(state, "safetensors"))
    cfg = {"format": FORMAT, "kind": kind, "config": dataclasses.asdict(net.config)}
    write_json(os.path.join(directory, "config.json"), cfg)
    return directory


def load_net(directory: str, kind: str) -> nn.Module:
    """Read a ``save_net`` directory of ``kind`` (``"tokenizer"`` / ``"classifier"``), float32, eval mode."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {kind} in {directory} (missing config.json)")
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("kind") != kind:
        raise ValueError(f"{path}: not an sgkernels.digits {kind} config")
    cls = _KINDS[kind]
    net = cls(cls.Config(**cfg["config"]))
    state = {k: v.float() for k, v in read_weights(os.path.join(directory, "weights.safetensors"),
                                                    "safetensors", "cpu").items()}
    check_state_dict(net, state, f"{directory}/weights.safetensors")
    net.load_state_dict(state)
    return net.eval()


def load_generator_float(directory: str):
    """``(MaskTransformer, TOAST guide or None)`` of a generator checkpoint directory, as float32."""
    model, guide = load_checkpoint(directory)
    return model.float(), (guide.float() if guide is not None else None)
