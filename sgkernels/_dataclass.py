"""Dataclass configs to and from JSON-ready dicts (shared by model, guide and training configs)."""
from __future__ import annotations

import dataclasses
import math
import numbers


def from_dict(cls, d: dict):
    """``cls(**d)`` for a dataclass ``cls``; ValueError naming any field ``cls`` does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    return cls(**d)


# Sane upper bounds of the sizes in a model config. A config.json past them (hidden_size 1e9, 1e7
# layers, ...) is refused before any module is built, even on the meta device: under them a build
# takes well under a second and no tensor size overflows. They are far above any published model.
MAX_WIDTH = 1 << 17  # hidden size, channels
MAX_MLP = 1 << 20  # MLP hidden size
MAX_DEPTH = 1024  # transformer layers
MAX_VOCAB = 1 << 24  # codebook size, classes, codes
MAX_TOKENS = 1 << 16  # image tokens per sample (a 256 x 256 grid)
MAX_FACTORS = 1 << 12  # TOAST anchor factors
MAX_LEVELS = 16  # VQGAN resolution levels (len(channel_mult))
MAX_BLOCKS = 64  # VQGAN residual blocks per level
MAX_RESOLUTION = 1 << 16  # VQGAN image side


def check_int(name: str, value, maximum: int) -> int:
    """``value`` if it is an int in ``[1, maximum]`` (bools refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"{name}: expected an int in [1, {maximum}], got {value!r}")
    return value


def check_real(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the interval (``low_open`` / ``high_open``: that end excluded), else
    TypeError (not a number) / ValueError (NaN, inf, out of range) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")
    return v
