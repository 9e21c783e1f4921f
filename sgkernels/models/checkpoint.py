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

import json
import os

import torch

from .._io import (
    WEIGHT_EXTENSIONS,
    atomic_write,
    check_state_dict,
    read_weights,
    serialize,
    weights_format,
    write_json,
)
from .toast import TOAST, TOASTConfig, check_model_and_guide
from .transformer import MaskTransformer, MaskTransformerConfig

FORMAT = "sgkernels.models"
VERSION = 1
CONFIG_NAME = "config.json"


def save_checkpoint(directory: str | os.PathLike, model: MaskTransformer, guide: TOAST | None = None,
                    *, format: str = "auto") -> str:
    """Write ``model`` (and ``guide``) and their configs to ``directory`` (created if needed).

    Args:
        format: ``"auto"`` (safetensors if importable, else torch), ``"safetensors"`` or ``"torch"``.
    Returns:
        the directory path.
    """
    check_model_and_guide(model, guide)
    fmt = weights_format(format)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    ext = WEIGHT_EXTENSIONS[fmt]
    atomic_write(os.path.join(directory, "model" + ext), serialize(model.state_dict(), fmt))
    if guide is not None:
        atomic_write(os.path.join(directory, "guide" + ext), serialize(guide.state_dict(), fmt))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "weights": fmt,
        "model": model.config.to_dict(),
        "guide": None if guide is None else guide.config.to_dict(),
    }
    write_json(os.path.join(directory, CONFIG_NAME), config)
    keep = {"model" + ext} | ({"guide" + ext} if guide is not None else set())
    for name in ("model", "guide"):
        for e in WEIGHT_EXTENSIONS.values():
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
    if config.get("weights") not in WEIGHT_EXTENSIONS:
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
    fmt, ext = config["weights"], WEIGHT_EXTENSIONS[config["weights"]]
    model_cfg = MaskTransformerConfig.from_dict(config["model"])
    model = _build(MaskTransformer, model_cfg, read_weights(os.path.join(directory, "model" + ext), fmt, map_location),
                   f"{directory}/model{ext}").eval()
    guide = None
    if config["guide"] is not None:
        guide_cfg = TOASTConfig.from_dict(config["guide"])
        guide = _build(TOAST, guide_cfg, read_weights(os.path.join(directory, "guide" + ext), fmt, map_location),
                       f"{directory}/guide{ext}").eval()
        guide.check_backbone(model)
    return model, guide
