"""Files of weights: atomic writes, safetensors / torch weight files, state-dict checks.

Every checkpoint format of the package (``models.checkpoint``, ``training.checkpoints``,
``digits.nets``) writes through :func:`atomic_write` (temp file in the same directory, fsync,
``os.replace``), so a file that exists is complete. Weights are a plain ``{name: tensor}`` dict,
stored with safetensors (``"safetensors"``) or ``torch.save`` (``"torch"``, read back with
``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import torch
from torch import nn

WEIGHT_EXTENSIONS = {"safetensors": ".safetensors", "torch": ".pt"}


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def weights_format(fmt: str = "auto") -> str:
    """``"safetensors"`` or ``"torch"``; ``"auto"`` picks safetensors when it is importable."""
    if fmt == "auto":
        return "safetensors" if safetensors_available() else "torch"
    if fmt not in WEIGHT_EXTENSIONS:
        raise ValueError(f"format must be 'auto', 'safetensors' or 'torch', got {fmt!r}")
    if fmt == "safetensors" and not safetensors_available():
        raise ImportError("format='safetensors' needs the safetensors package")
    return fmt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` via a temp file + fsync + os.replace, with the usual 0o666 & ~umask mode."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0o600: keep checkpoints readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, obj) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON with a final newline."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def fsync_dir(path: str) -> None:
    """fsync a directory (makes renames inside it durable); a no-op where the OS does not allow it."""
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


def serialize(state: dict[str, torch.Tensor], fmt: str) -> bytes:
    """The bytes of a weight file of format ``fmt`` (``"safetensors"`` / ``"torch"``) holding ``state``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={"format": "pt"})
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def first_line(err: BaseException) -> str:
    """``"Type: first line of the message"`` (an empty message gives the type alone): for one-line errors."""
    lines = str(err).strip().splitlines()
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


def read_weights(path: str, fmt: str, map_location) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict of a weight file written from :func:`serialize`.

    A file that is missing raises FileNotFoundError; one that cannot be read (empty, truncated, a
    pickle with code, not a dict of tensors) a one-line ValueError naming it.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint weights missing: {path}")
    if fmt == "safetensors" and not safetensors_available():
        raise ImportError(f"{path} is a safetensors file: install safetensors to read it")
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            device = "cpu" if map_location is None else str(torch.device(map_location))
            state = load_file(path, device=device)
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch / safetensors raise many kinds on a corrupt or foreign file
        raise ValueError(f"{path}: cannot be read as weights ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return state


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def cast_weights(state: dict[str, torch.Tensor], what: str, error=ValueError,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``state`` with every tensor in the model's dtype, or ``error`` naming the tensors that are not weights.

    The model's dtype is ``dtype`` when given (a ``torch_dtype=`` argument, checked by the caller), else
    the floating dtype holding most of the elements (float64 as float32: the ops take float32 /
    bfloat16 / float16); the other floating tensors are cast to it (one float16 tensor among float32
    ones loads as float32). Integer, bool, complex and float8 tensors are refused, and so is a
    finite value that the cast would turn into inf (float32 weights past 65504 asked in float16).
    """
    bad = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in WEIGHT_DTYPES]
    if bad:
        raise error(f"{what}: expected floating-point weights (float32, bfloat16, float16), got {listed(bad, sep=', ')}")
    totals: dict[torch.dtype, int] = {}
    for v in state.values():
        totals[v.dtype] = totals.get(v.dtype, 0) + v.numel()
    if not totals:
        return state
    if dtype is None:
        dtype = max(totals, key=totals.get)
        dtype = torch.float32 if dtype == torch.float64 else dtype
    out = {}
    for k, v in state.items():
        out[k] = v if v.dtype == dtype else v.to(dtype)
        # a finite value past the model dtype's range would load as inf: name it instead
        if out[k] is not v and v.numel() and v.device.type != "meta" and bool(torch.isfinite(v).all()) \
                and not bool(torch.isfinite(out[k]).all()):
            raise error(f"{what}: {k} ({v.dtype}) has values outside the range of the model's dtype {dtype}")
    return out


def listed(items, limit: int = 3, sep: str = "; ") -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, plus ``" (+n more)"``: one short line however many."""
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(str(i) for i in items[:limit]) + more


def listed_keys(keys, limit: int = 3) -> str:
    """``['a', 'b', 'c'] (+n more)``: the first ``limit`` keys as a list, and how many were left out."""
    keys = list(keys)
    return f"{keys[:limit]}" + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_finite(state: dict[str, torch.Tensor], what: str, error=ValueError) -> None:
    """Raise ``error`` naming the floating-point tensors of ``state`` that hold NaN or +-inf (corrupt weights)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel()
           and v.device.type != "meta" and not bool(torch.isfinite(v).all())]
    if bad:
        raise error(f"{what}: corrupt weights: non-finite values (NaN or inf) in {listed(bad, sep=', ')}")


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming the missing / unexpected keys, the shape mismatches and the non-finite tensors of ``state``
    for ``module`` (at most 3 of each, then "(+n more)": the message stays one short line)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {listed_keys(missing)}"] if missing else []) + (
            [f"unexpected keys {listed_keys(unexpected)}"] if unexpected else [])
        raise KeyError(f"{what}: " + "; ".join(parts))
    bad = [f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}" for k in expected if tuple(state[k].shape) != expected[k]]
    if bad:
        raise ValueError(f"{what}: shape mismatch: " + listed(bad))
    check_finite(state, what)
