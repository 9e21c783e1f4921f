"""Save / load a :class:`MaskTransformer` (+ optional :class:`TOAST` guide) to / from a directory.

Layout of a checkpoint directory::

    <dir>/config.json          {"format": "sgkernels.models", "version": 1,
                                "weights": "safetensors" | "torch",
                                "model": MaskTransformerConfig.to_dict(),
                                "guide": TOASTConfig.to_dict() or null}
    <dir>/model.safetensors    the model's state_dict  (or model.pt with "weights": "torch")
    <dir>/guide.safetensors    the guide's state_dict, only with a guide  (or guide.pt)

Weights are written with safetensors when it is importable (``format="auto"``), else with
``torch.save`` (a plain ``{name: tensor}`` dict, read back with ``torch.load(weights_only=True)``).
Every file is written to a temporary file in the same directory and moved into place with
``os.replace``; ``config.json`` is written last, so a directory whose config exists holds complete
weights for it. Files of the other format or of a guide that is no longer saved are removed after
the new config is in place.

Loading builds the modules on the meta device and assigns the stored tensors (no random init of
large models). Missing, unexpected and mis-shaped keys raise ``KeyError``/``ValueError`` naming them.
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import torch
from torch import nn

from .toast import TOAST, TOASTConfig, check_model_and_guide
from .transformer import MaskTransformer, MaskTransformerConfig

FORMAT = "sgkernels.models"
VERSION = 1
CONFIG_NAME = "config.json"
_EXT = {"safetensors": ".safetensors", "torch": ".pt"}


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, data: bytes) -> None:
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


def _serialize(state: dict[str, torch.Tensor], fmt: str) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={"format": "pt"})
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _read_weights(path: str, fmt: str, map_location) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint weights missing: {path}")
    if fmt == "safetensors":
        if not safetensors_available():
            raise ImportError(f"{path} is a safetensors file: install safetensors to read it")
        from safetensors.torch import load_file

        device = "cpu" if map_location is None else str(torch.device(map_location))
        return load_file(path, device=device)
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return state


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming the missing / unexpected keys and the shape mismatches of ``state`` for ``module``."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {unexpected}"] if unexpected else [])
        raise KeyError(f"{what}: " + "; ".join(parts))
    bad = [f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}" for k in expected if tuple(state[k].shape) != expected[k]]
    if bad:
        raise ValueError(f"{what}: shape mismatch: " + "; ".join(bad))


def save_checkpoint(directory: str | os.PathLike, model: MaskTransformer, guide: TOAST | None = None,
                    *, format: str = "auto") -> str:
    """Write ``model`` (and ``guide``) and their configs to ``directory`` (created if needed).

    Args:
        format: ``"auto"`` (safetensors if importable, else torch), ``"safetensors"`` or ``"torch"``.
    Returns:
        the directory path.
    """
    check_model_and_guide(model, guide)
    if format == "auto":
        format = "safetensors" if safetensors_available() else "torch"
    if format not in _EXT:
        raise ValueError(f"format must be 'auto', 'safetensors' or 'torch', got {format!r}")
    if format == "safetensors" and not safetensors_available():
        raise ImportError("format='safetensors' needs the safetensors package")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    ext = _EXT[format]
    _atomic_write(os.path.join(directory, "model" + ext), _serialize(model.state_dict(), format))
    if guide is not None:
        _atomic_write(os.path.join(directory, "guide" + ext), _serialize(guide.state_dict(), format))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "weights": format,
        "model": model.config.to_dict(),
        "guide": None if guide is None else guide.config.to_dict(),
    }
    _atomic_write(os.path.join(directory, CONFIG_NAME), (json.dumps(config, indent=2) + "\n").encode())
    keep = {"model" + ext} | ({"guide" + ext} if guide is not None else set())
    for name in ("model", "guide"):
        for e in _EXT.values():
            if name + e not in keep and os.path.exists(os.path.join(directory, name + e)):
                os.unlink(os.path.join(directory, name + e))
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed and checked ``config.json`` of a checkpoint directory."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"not a checkpoint directory (no {CONFIG_NAME}): {os.fspath(directory)}")
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}: not an sgkernels.models checkpoint config")
    if config.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported version {config.get('version')!r} (this code reads {VERSION})")
    if config.get("weights") not in _EXT:
        raise ValueError(f"{path}: unknown weights format {config.get('weights')!r}")
    for key in ("model", "guide"):
        if key not in config:
            raise ValueError(f"{path}: missing field {key!r}")
    return config


def _build(cls, config, state: dict, what: str):
    with torch.device("meta"):
        module = cls(config)
    check_state_dict(module, state, what)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_checkpoint(directory: str | os.PathLike, *, map_location="cpu") -> tuple[MaskTransformer, TOAST | None]:
    """Read a directory written by :func:`save_checkpoint`: ``(model, guide or None)`` in eval mode."""
    directory = os.fspath(directory)
    config = read_config(directory)
    fmt, ext = config["weights"], _EXT[config["weights"]]
    model_cfg = MaskTransformerConfig.from_dict(config["model"])
    model = _build(MaskTransformer, model_cfg, _read_weights(os.path.join(directory, "model" + ext), fmt, map_location),
                   f"{directory}/model{ext}").eval()
    guide = None
    if config["guide"] is not None:
        guide_cfg = TOASTConfig.from_dict(config["guide"])
        guide = _build(TOAST, guide_cfg, _read_weights(os.path.join(directory, "guide" + ext), fmt, map_location),
                       f"{directory}/guide{ext}").eval()
        guide.check_backbone(model)
    return model, guide
