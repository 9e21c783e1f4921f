"""What the commands of ``sgkernels`` (:mod:`sgkernels.cli`) share: the one-line user error and its checks."""
from __future__ import annotations

import os
import sys

from ._png import image_format, write_image

# `generate` shows a progress bar on a terminal, and for runs at least this long anywhere (logs of batch jobs).
PROGRESS_ALWAYS_FROM = 1000


class CLIError(Exception):
    """A user error: reported as one line, exit status 2."""


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """``--classes`` ("3,7,1") checked against ``num_classes``; None when not given."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            c = int(part)
        except ValueError:
            raise CLIError(f"--classes: expected comma-separated class ids, got {part!r}") from None
        if not 0 <= c < num_classes:
            raise CLIError(f"--classes: unknown class {c} (this model has classes 0..{num_classes - 1})")
        out.append(c)
    if not out:
        raise CLIError("--classes: expected at least one class")
    return out


def check_writable(path: str, image: bool = False) -> None:
    """CLIError unless ``path`` can be written (and, with ``image``, has a supported image extension)."""
    if os.path.isdir(path):
        raise CLIError(f"cannot write {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write {path}: permission denied")
    if image:
        try:
            image_format(path)
        except ValueError as e:
            raise CLIError(str(e)) from None


def save_image(path: str, rgb) -> None:
    """:func:`sgkernels._png.write_image` (atomic PNG / JPEG), OSError as a CLIError."""
    try:
        write_image(path, rgb)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def show_progress(args, num: int) -> bool:
    """A bar unless ``--no-progress``: when stderr is a terminal, or for ``num >= PROGRESS_ALWAYS_FROM`` images."""
    return not args.no_progress and (sys.stderr.isatty() or num >= PROGRESS_ALWAYS_FROM)


def model_options(args, device_type: str) -> tuple:
    """``(dtype or None, compile)`` of ``--dtype`` / ``--compile`` for a model on ``device_type``, checked
    before anything is loaded or written: ``--compile`` where torch.compile is unavailable, and
    ``--dtype float16`` on a CPU (:func:`sgkernels.pipeline.check_device_dtype`), are one error line."""
    from .sampler import compile_options

    from .pipeline import check_device_dtype

    dtype = getattr(args, "dtype", None)
    try:
        check_device_dtype(device_type, dtype)
    except ValueError as e:
        raise CLIError(f"--dtype {str(e).removeprefix('torch_dtype: ')}") from None
    compile = bool(getattr(args, "compile", False))
    if compile:
        try:
            compile_options(True)
        except ValueError as e:
            raise CLIError(f"--compile: {str(e).removeprefix('compile: ')}") from None
    return dtype, compile
