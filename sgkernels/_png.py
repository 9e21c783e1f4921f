"""Minimal PNG writer (8-bit RGB) and image tiling, so pictures need no imaging dependency."""
from __future__ import annotations

import struct
import zlib

import numpy as np


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write ``rgb`` (uint8 [H, W, 3]) to ``path`` as a PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected uint8 [H, W, 3], got shape {rgb.shape}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def tile(images: np.ndarray, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """Tile uint8 images [rows, cols, H, W, 3] into one [H', W', 3] picture, upscaled by ``scale``."""
    rows, cols, height, width, _ = images.shape
    images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    height, width = height * scale, width * scale
    out = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), background, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (height + pad), pad + c * (width + pad)
            out[y : y + height, x : x + width] = images[r, c]
    return out


def grid(images: np.ndarray, cols: int, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """Tile uint8 images [M, H, W, 3] row by row, ``cols`` per row (the last row padded with black)."""
    rows = -(-len(images) // cols)
    cells = np.zeros((rows * cols,) + images.shape[1:], dtype=np.uint8)
    cells[: len(images)] = images
    return tile(cells.reshape(rows, cols, *images.shape[1:]), pad=pad, scale=scale, background=background)
