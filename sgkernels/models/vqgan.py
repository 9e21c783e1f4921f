"""MaskGIT's VQGAN tokenizer in open-muse's ``MaskGitVQGAN`` layout: :class:`MaskGitVQGAN`.

The parameter names and ``config.json`` keys are those of open-muse's ``MaskGitVQGAN`` (the
PyTorch port of MaskGIT's JAX tokenizer used by the official self-guidance code), so its
published folders load with :meth:`MaskGitVQGAN.from_pretrained`. The network, for
``hidden_channels = h``, ``channel_mult = (m_0, .., m_{R-1})``:

* encoder: 3x3 conv (no bias) to ``h``; per level ``i``: ``num_res_blocks`` residual blocks to
  ``h * m_i``, then a 2x2 average pool except at the last level; ``num_res_blocks`` blocks at
  ``h * m_{R-1}``; GroupNorm, SiLU, 1x1 conv (bias) to ``z_channels``;
* quantizer: nearest code of ``num_embeddings`` codes of dimension ``quantized_embed_dim``
  (squared Euclidean distance), found by :func:`sgkernels.vq_lookup` through
  :class:`sgkernels.nn.VectorQuantizer`;
* decoder: 3x3 conv (bias) to ``h * m_{R-1}``; ``num_res_blocks`` blocks; per level ``i = R-1 .. 0``:
  ``num_res_blocks`` blocks to ``h * m_i``, then (``i > 0``) nearest 2x upsampling and a 3x3 conv
  (bias); GroupNorm, SiLU, 3x3 conv (bias) to ``num_channels``.

A residual block is ``y = conv2(SiLU(GN(conv1(SiLU(GN(x))))))`` (bias-free 3x3 convs, GroupNorm
with 32 groups and eps 1e-6) plus ``x``, or, when the width changes, plus ``nin_shortcut(y)``:
MaskGIT's block applies its 1x1 shortcut conv to the block's output, not to its input. The
convolutions are stride 1 with odd kernels, so the official "same" padding is ``k // 2``.
Images are in [0, 1] (the tokenizer was trained on unnormalised pixels); ``decode`` clamps to
[0, 1] as the official pipeline does before converting to 8 bits.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dataclass
from .._io import cast_weights, check_finite
from ..nn.vector_quantizer import VectorQuantizer
from ..ops import _validate, vq_lookup
from .pretrained import CONFIG_NAME, CheckpointError, check_keys, folder, read_config, read_weights, weights_file

# Derived from channel_mult / resolution; open-muse sets them as attributes, a config.json may hold them.
_DERIVED_KEYS = ("num_resolutions", "reduction_factor", "latent_size")


@dataclasses.dataclass(frozen=True)
class MaskGitVQGANConfig:
    """The ``__init__`` arguments of open-muse's ``MaskGitVQGAN`` (its defaults: the ImageNet tokenizer).

    ``attn_resolutions`` and ``resample_with_conv`` are kept for the config's sake: the network has
    no attention layers and always resamples as described in the module docstring.
    """

    resolution: int = 256
    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    num_embeddings: int = 1024
    quantized_embed_dim: int = 256
    dropout: float = 0.0
    resample_with_conv: bool = True
    commitment_cost: float = 0.25

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{name}: expected a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.channel_mult or min(self.channel_mult) < 1 or len(self.channel_mult) > _dataclass.MAX_LEVELS:
            raise ValueError(f"channel_mult: expected 1 to {_dataclass.MAX_LEVELS} positive integers, "
                             f"got {list(self.channel_mult)[:20]}")
        # sizes within sane bounds (sgkernels._dataclass): a config.json is checked before any module is built
        bounds = dict(resolution=_dataclass.MAX_RESOLUTION, num_channels=_dataclass.MAX_WIDTH,
                      hidden_channels=_dataclass.MAX_WIDTH, num_res_blocks=_dataclass.MAX_BLOCKS,
                      z_channels=_dataclass.MAX_WIDTH, num_embeddings=_dataclass.MAX_VOCAB,
                      quantized_embed_dim=_dataclass.MAX_WIDTH)
        for name, maximum in bounds.items():
            _dataclass.check_int(name, getattr(self, name), maximum)
        widths = [self.hidden_channels * m for m in self.channel_mult]
        if max(widths) > _dataclass.MAX_WIDTH:
            raise ValueError(f"hidden_channels * channel_mult = {widths}: expected widths of at most {_dataclass.MAX_WIDTH}")
        if any(w % 32 for w in widths):
            raise ValueError(f"hidden_channels * channel_mult = {widths}: every width must be a multiple of 32 "
                             "(GroupNorm with 32 groups)")
        if self.z_channels != self.quantized_embed_dim:
            raise ValueError(f"z_channels ({self.z_channels}) must equal quantized_embed_dim ({self.quantized_embed_dim})")
        object.__setattr__(self, "dropout", _dataclass.check_real("dropout", self.dropout, 0.0, 1.0, high_open=True))
        object.__setattr__(self, "commitment_cost",
                           _dataclass.check_real("commitment_cost", self.commitment_cost, 0.0, 1e6))

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: ``2 ** (len(channel_mult) - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskGitVQGANConfig":
        return _dataclass.from_dict(cls, d)


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        self.nin_shortcut = _conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(self.dropout(F.silu(self.norm2(y))))
        return y + (x if self.nin_shortcut is None else self.nin_shortcut(y))


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks), then the resampling (set by the owner)."""

    def __init__(self, cin: int, cout: int, config: MaskGitVQGANConfig):
        super().__init__()
        blocks = []
        for _ in range(config.num_res_blocks):
            blocks.append(ResnetBlock(cin, cout, config.dropout))
            cin = cout
        self.block = nn.ModuleList(blocks)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x


class DownLevel(_Level):
    def __init__(self, cin: int, cout: int, config: MaskGitVQGANConfig, downsample: bool):
        super().__init__(cin, cout, config)
        self.downsample = downsample

    def forward(self, x):
        x = self.blocks(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpLevel(_Level):
    def __init__(self, cin: int, cout: int, config: MaskGitVQGANConfig, upsample: bool):
        super().__init__(cin, cout, config)
        self.upsample_conv = _conv(cout, cout, 3) if upsample else None

    def forward(self, x):
        x = self.blocks(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


def _mid(width: int, config: MaskGitVQGANConfig) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(width, width, config.dropout) for _ in range(config.num_res_blocks))


class Encoder(nn.Module):
    def __init__(self, config: MaskGitVQGANConfig):
        super().__init__()
        h, mult = config.hidden_channels, config.channel_mult
        self.conv_in = _conv(config.num_channels, h, 3, bias=False)
        ins = (1,) + mult
        self.down = nn.ModuleList(DownLevel(h * ins[i], h * mult[i], config, i != len(mult) - 1)
                                  for i in range(len(mult)))
        self.mid = _mid(h * mult[-1], config)
        self.norm_out = _norm(h * mult[-1])
        self.conv_out = _conv(h * mult[-1], config.z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: MaskGitVQGANConfig):
        super().__init__()
        h, mult = config.hidden_channels, config.channel_mult
        self.conv_in = _conv(config.z_channels, h * mult[-1], 3)
        self.mid = _mid(h * mult[-1], config)
        # up[i] works at level i (input width h * mult[i+1], h * mult[-1] at the last level); run from the last.
        self.up = nn.ModuleList(UpLevel(h * mult[min(i + 1, len(mult) - 1)], h * mult[i], config, i != 0)
                                for i in range(len(mult)))
        self.norm_out = _norm(h * mult[0])
        self.conv_out = _conv(h * mult[0], config.num_channels, 3)

    def forward(self, z):
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class MaskGitVQGAN(nn.Module):
    """MaskGIT's VQGAN tokenizer (open-muse layout; see the module docstring).

    * ``encode(images)``: float ``[B, C, H, W]`` in [0, 1] -> int64 tokens ``[B, (H/f) * (W/f)]``
      (``f`` = :attr:`MaskGitVQGANConfig.downsample_factor`, 16 for the ImageNet tokenizer);
    * ``decode(tokens)``: ``[B, n*n]`` (square grid) or ``[B, h, w]`` -> float images
      ``[B, C, h*f, w*f]`` clamped to [0, 1].
    """

    def __init__(self, config: MaskGitVQGANConfig | None = None):
        super().__init__()
        config = MaskGitVQGANConfig() if config is None else config
        if not isinstance(config, MaskGitVQGANConfig):
            raise TypeError(f"config: expected a MaskGitVQGANConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.num_embeddings, config.quantized_embed_dim, config.commitment_cost)

    @property
    def codebook_size(self) -> int:
        return self.config.num_embeddings

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, h*w]`` (row-major grid) of ``images`` ``[B, C, H, W]`` in [0, 1]."""
        c, f = self.config.num_channels, self.config.downsample_factor
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != c:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a float tensor [B, {c}, H, W], got {shape}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images: height and width must be multiples of {f}, got {tuple(images.shape[2:])}")
        z = self.encoder(images.to(self.quantize.embedding.weight.dtype))
        codes = self.quantize.codebook()
        return vq_lookup(z.permute(0, 2, 3, 1), codes).flatten(1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] of token ids ``[B, n*n]`` or ``[B, h, w]``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError("tokens: expected an int64 tensor [B, N] or [B, h, w]")
        if tokens.dim() == 2:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ValueError(f"tokens: {tokens.shape[1]} tokens per image is not a square grid: pass [B, h, w]")
            tokens = tokens.reshape(tokens.shape[0], side, side)
        if tokens.dim() != 3:
            raise ValueError(f"tokens: expected shape [B, N] or [B, h, w], got {tuple(tokens.shape)}")
        k = self.codebook_size
        if tokens.device.type == "cpu" and tokens.numel() and bool(((tokens < 0) | (tokens >= k)).any()):
            raise ValueError(f"tokens: expected codebook ids in [0, {k})")
        z = self.quantize.get_codebook_entry(tokens.long()).permute(0, 3, 1, 2)
        return self.decoder(z).clamp_(0.0, 1.0)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, *,
                        map_location="cpu", torch_dtype=None) -> "MaskGitVQGAN":
        """Load an open-muse ``MaskGitVQGAN`` folder (``config.json`` + ``pytorch_model.bin`` or safetensors).

        ``torch_dtype``: the parameters' (and so the decode's) dtype, as in
        :func:`sgkernels.models.from_pretrained` (None / ``"auto"``: the stored one). Raises
        :class:`~sgkernels.models.pretrained.CheckpointError` (one line naming the file and the key)
        for a folder that is not such a tokenizer, TypeError / ValueError for a bad ``torch_dtype``.
        """
        torch_dtype = _validate.check_dtype("torch_dtype", torch_dtype)
        directory = folder(path, subfolder)
        config_path = os.path.join(directory, CONFIG_NAME)
        raw = read_config(directory)
        name = raw.get("_class_name")
        if name is not None and name != "MaskGitVQGAN":
            raise CheckpointError(f"{config_path}: _class_name = {name!r}, expected 'MaskGitVQGAN'")
        fields = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _DERIVED_KEYS}
        names = {f.name for f in dataclasses.fields(MaskGitVQGANConfig)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise CheckpointError(f"{config_path}: unknown key {unknown[0]!r}")
        try:
            config = MaskGitVQGANConfig(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: {e}") from None
        path = weights_file(directory)
        state = read_weights(path, map_location)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(state, expected, path)
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                                      f"from {CONFIG_NAME}")
        state = cast_weights(state, path, CheckpointError, dtype=torch_dtype)
        check_finite(state, path, CheckpointError)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()
