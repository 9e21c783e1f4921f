"""Image files (8-bit RGB PNG with no imaging dependency; JPEG through Pillow) and image tiling."""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np

from ._io import atomic_write

# extension -> format; PNG needs nothing, JPEG needs Pillow.
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


def png_bytes(rgb: np.ndarray) -> bytes:
    """The bytes of a PNG file holding ``rgb`` (uint8 [H, W, 3])."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected uint8 [H, W, 3], got shape {rgb.shape}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def png_shape(path: str) -> tuple[int, int, int] | None:
    """``(H, W, 3)`` of a complete, intact 8-bit RGB PNG as :func:`png_bytes` writes it, else None.

    Every chunk's CRC is checked, the image data must decompress to exactly ``H`` rows of ``1 + 3 W``
    bytes, and the file must end with IEND: a truncated or corrupted file is None (never raises).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos, header, idat, ended = 8, None, [], False
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            return None
        if kind == b"IHDR" and length == 13:
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if not ended or header is None or header[2:] != (8, 2, 0, 0, 0):
        return None
    width, height = header[0], header[1]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error:
        return None
    return (height, width, 3) if len(raw) == height * (1 + 3 * width) else None


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write ``rgb`` (uint8 [H, W, 3]) to ``path`` as a PNG, atomically (:func:`sgkernels._io.atomic_write`)."""
    atomic_write(path, png_bytes(rgb))


def image_format(path: str) -> str:
    """``"png"`` or ``"jpeg"`` from ``path``'s extension; ValueError listing the supported ones otherwise."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"{path}: unsupported image extension {ext or '(none)'!r}; "
                         f"supported: {', '.join(IMAGE_FORMATS)}")
    if IMAGE_FORMATS[ext] == "jpeg":
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise ValueError(f"{path}: writing JPEG needs Pillow (pip install pillow); or write a .png") from None
    return IMAGE_FORMATS[ext]


def write_image(path: str, rgb: np.ndarray, quality: int = 95) -> None:
    """Write ``rgb`` (uint8 [H, W, 3]) to ``path`` as PNG or JPEG by its extension (:func:`image_format`),
    atomically: a killed or failed write leaves any existing ``path`` as it was."""
    if image_format(path) == "png":
        write_png(path, rgb)
        return
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    atomic_write(path, buf.getvalue())


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
