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

The config and the weights change together or not at all: :func:`save_checkpoint` writes the
complete new checkpoint into a sibling folder ``.<name>.new-*`` (any other files of an existing
``<dir>`` are carried over, hard-linked where possible), then swaps it in with two renames
(``<dir>`` -> ``.<name>.old-*``, new -> ``<dir>``) and deletes the old one. A process killed
between the two renames leaves no ``<dir>`` but a complete new folder: loading (and the next save)
finishes the swap first (:func:`recover`); the next save also removes leftovers of killed saves.

Loading builds the modules on the meta device and assigns the stored tensors (no random init of
large models). Missing, unexpected and mis-shaped keys raise ``KeyError``/``ValueError`` naming them.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile

import torch

from .._io import (
    WEIGHT_EXTENSIONS,
    _umask,
    atomic_write,
    cast_weights,
    check_state_dict,
    fsync_dir,
    read_weights,
    serialize,
    weights_format,
    write_json,
)
from .toast import TOAST, TOASTConfig, check_model_and_guide, compiled_inner
from .transformer import MaskTransformer, MaskTransformerConfig

FORMAT = "sgkernels.models"
VERSION = 1
CONFIG_NAME = "config.json"


def _leftovers(directory: str) -> tuple[list[str], list[str]]:
    """``(new, old)``: the swap folders of ``directory`` that killed saves may have left beside it."""
    parent, name = os.path.split(os.path.abspath(directory))
    try:
        entries = os.listdir(parent)
    except OSError:
        return [], []
    pick = lambda kind: sorted(os.path.join(parent, e) for e in entries if e.startswith(f".{name}.{kind}-"))  # noqa: E731
    return pick("new"), pick("old")


def recover(directory: str | os.PathLike) -> None:
    """Finish a :func:`save_checkpoint` that was killed between its two renames.

    If ``directory`` is missing but a swap had begun (an ``.<name>.old-*`` folder exists), the
    complete new folder (it holds ``config.json``, written last) is renamed into place, the newest
    if several. Nothing happens otherwise; leftovers are removed by the next save.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory):
        return
    new, old = _leftovers(directory)
    if not old:  # no swap began: a first save killed before its one rename left nothing to recover
        return
    complete = [d for d in new if os.path.isfile(os.path.join(d, CONFIG_NAME))]
    candidates = complete or [d for d in old if os.path.isfile(os.path.join(d, CONFIG_NAME))]
    if not candidates:
        return
    best = max(candidates, key=lambda d: os.stat(os.path.join(d, CONFIG_NAME)).st_mtime_ns)
    try:
        os.rename(best, directory)
    except OSError:  # another process recovered it first
        if not os.path.exists(directory):
            raise
    fsync_dir(os.path.dirname(os.path.abspath(directory)))


def _carry_over(src: str, dst: str, own: set[str]) -> None:
    """Hard-link (or copy) the entries of ``src`` other than the checkpoint's own files into ``dst``."""
    for entry in os.listdir(src):
        if entry in own:
            continue
        a, b = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(a) and not os.path.islink(a):
            shutil.copytree(a, b, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(a, b)


def _link_or_copy(a: str, b: str) -> None:
    if os.path.islink(a):
        os.symlink(os.readlink(a), b)
        return
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def save_checkpoint(directory: str | os.PathLike, model: MaskTransformer, guide: TOAST | None = None,
                    *, format: str = "auto") -> str:
    """Write ``model`` (and ``guide``) and their configs to ``directory`` (created if needed).

    The new config and weights replace the old ones together or not at all (module docstring).

    Args:
        format: ``"auto"`` (safetensors if importable, else torch), ``"safetensors"`` or ``"torch"``.
    Returns:
        the directory path.
    """
    check_model_and_guide(model, guide)
    model, guide = compiled_inner(model), compiled_inner(guide)  # torch.compile wrappers: the modules' own keys
    fmt = weights_format(format)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    recover(directory)
    new, old = _leftovers(directory)
    for leftover in new + old:  # of saves killed before or after their swap: directory is complete
        shutil.rmtree(leftover, ignore_errors=True)
    ext = WEIGHT_EXTENSIONS[fmt]
    tmp = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        atomic_write(os.path.join(tmp, "model" + ext), serialize(model.state_dict(), fmt))
        if guide is not None:
            atomic_write(os.path.join(tmp, "guide" + ext), serialize(guide.state_dict(), fmt))
        if os.path.isdir(directory):
            own = {CONFIG_NAME} | {n + e for n in ("model", "guide") for e in WEIGHT_EXTENSIONS.values()}
            _carry_over(directory, tmp, own)
        config = {
            "format": FORMAT,
            "version": VERSION,
            "weights": fmt,
            "model": model.config.to_dict(),
            "guide": None if guide is None else guide.config.to_dict(),
        }
        write_json(os.path.join(tmp, CONFIG_NAME), config)  # last: a new folder with a config is complete
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = None
    if os.path.isdir(directory):
        previous = os.path.join(parent, f".{name}.old-{secrets.token_hex(6)}")
        os.rename(directory, previous)
    os.rename(tmp, directory)
    fsync_dir(parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed and checked ``config.json`` of a checkpoint directory (after :func:`recover`)."""
    recover(directory)
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"not a checkpoint directory (no {CONFIG_NAME}): {os.fspath(directory)}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}: not an sgkernels.models checkpoint config")
    if config.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported version {config.get('version')!r} (this code reads {VERSION})")
    if config.get("weights") not in WEIGHT_EXTENSIONS:
        raise ValueError(f"{path}: unknown weights format {config.get('weights')!r}")
    for key in ("model", "guide"):
        if key not in config:
            raise ValueError(f"{path}: missing field {key!r}")
        if not isinstance(config[key], dict) and not (key == "guide" and config[key] is None):
            expected = "a JSON object" + (" or null" if key == "guide" else "")
            raise ValueError(f"{path}: {key}: expected {expected}, got {json.dumps(config[key])[:40]}")
    return config


def _config(cls, d: dict, path: str, key: str):
    """``cls.from_dict(d)``, its errors (unknown fields, bad values) named by file and key."""
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {key}: {e}") from None


def _build(cls, config, state: dict, what: str, dtype: torch.dtype | None = None):
    state = cast_weights(state, what, dtype=dtype)
    with torch.device("meta"):  # config sizes are bounded (sgkernels._dataclass): a quick build
        module = cls(config)
    check_state_dict(module, state, what)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def load_checkpoint(directory: str | os.PathLike, *, map_location="cpu",
                    torch_dtype: torch.dtype | None = None) -> tuple[MaskTransformer, TOAST | None]:
    """Read a directory written by :func:`save_checkpoint`: ``(model, guide or None)`` in eval mode.

    ``torch_dtype``: the parameters' dtype (a torch.dtype checked by the caller,
    :func:`sgkernels.ops._validate.check_dtype`); None keeps the stored one."""
    directory = os.fspath(directory)
    config = read_config(directory)
    fmt, ext = config["weights"], WEIGHT_EXTENSIONS[config["weights"]]
    config_path = os.path.join(directory, CONFIG_NAME)
    model_cfg = _config(MaskTransformerConfig, config["model"], config_path, "model")
    guide_cfg = None if config["guide"] is None else _config(TOASTConfig, config["guide"], config_path, "guide")
    if guide_cfg is not None:  # both configs checked before anything is read or built
        diff = [f for f in TOASTConfig.BACKBONE_FIELDS if getattr(guide_cfg, f) != getattr(model_cfg, f)]
        if diff:
            raise ValueError(f"{config_path}: guide: {', '.join(diff)} differ from the model's")
    model = _build(MaskTransformer, model_cfg, read_weights(os.path.join(directory, "model" + ext), fmt, map_location),
                   f"{directory}/model{ext}", torch_dtype).eval()
    guide = None
    if guide_cfg is not None:
        guide = _build(TOAST, guide_cfg, read_weights(os.path.join(directory, "guide" + ext), fmt, map_location),
                       f"{directory}/guide{ext}", torch_dtype).eval()
    return model, guide
