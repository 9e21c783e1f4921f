"""Training checkpoints: one complete ``step_XXXXXXXX`` directory per saved step.

Layout under ``<out_dir>/checkpoints/``::

    step_XXXXXXXX/   guide.safetensors  ema.safetensors  (guide.pt / ema.pt without safetensors)
                     state.pt           step, optimiser state, RNG states (per rank), configs

A step directory is written under a temporary name (each file via :func:`sgkernels._io.atomic_write`)
and renamed into place, so every ``step_*`` directory is complete; the last ``keep_last`` are kept.
An old step directory is pruned by renaming it to a temporary name first and deleting it after, so
a run killed while pruning leaves no incomplete ``step_*`` directory (only a temporary, which
:func:`step_dirs` ignores and :func:`remove_stale_temps` deletes).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile

import torch

from .._io import WEIGHT_EXTENSIONS, atomic_write, fsync_dir, read_weights, serialize, weights_format
from ..models.toast import TOAST
from ..models.transformer import MaskTransformerConfig
from .config import TrainConfig

CHECKPOINT_FORMAT = "sgkernels.train"
CHECKPOINT_VERSION = 1
_STEP_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


def checkpoint_root(out_dir: str) -> str:
    """``<out_dir>/checkpoints``: where the step directories live."""
    return os.path.join(out_dir, "checkpoints")


def step_dirs(out_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete step directory, oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX):].isdigit():
            found.append((int(name[len(_STEP_PREFIX):]), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Path of the newest complete ``step_*`` directory under ``<out_dir>/checkpoints``, or None."""
    dirs = step_dirs(os.fspath(out_dir))
    return dirs[-1][1] if dirs else None


def save_train_checkpoint(out_dir: str, step: int, guide: TOAST, ema: TOAST, optimizer, config: TrainConfig,
                          backbone_config: MaskTransformerConfig, rng: list, keep_last: int) -> str:
    """Write ``<out_dir>/checkpoints/step_{step:08d}`` atomically; keep the newest ``keep_last`` step directories."""
    root = checkpoint_root(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{_STEP_PREFIX}{step:08d}")
    if os.path.isdir(final):  # this step is already saved (e.g. resumed at the last step)
        return final
    fmt = weights_format()
    ext = WEIGHT_EXTENSIONS[fmt]
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_STEP_PREFIX}{step:08d}-", dir=root)
    try:
        atomic_write(os.path.join(tmp, "guide" + ext), serialize(guide.state_dict(), fmt))
        atomic_write(os.path.join(tmp, "ema" + ext), serialize(ema.state_dict(), fmt))
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "weights": fmt,
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "config": config.to_dict(),
            "guide_config": guide.config.to_dict(),
            "backbone_config": backbone_config.to_dict(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(os.path.join(tmp, "state.pt"), buf.getvalue())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in step_dirs(out_dir)[:-keep_last]:
        prune(old)
    remove_stale_temps(root)
    return final


def prune(path: str) -> None:
    """Delete the step directory ``path``: renamed to a temporary name first (atomic), then removed."""
    root, name = os.path.split(path)
    trash = os.path.join(root, f"{_TMP_PREFIX}trash-{name}-{os.getpid()}")
    os.rename(path, trash)
    fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temps(root: str) -> None:
    """Remove the temporaries a killed run left in ``root``."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_train_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a ``step_*`` directory: its ``state.pt`` dict plus ``"guide"`` and ``"ema"`` state dicts."""
    path = os.fspath(path)
    state_path = os.path.join(path, "state.pt")
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"not a training checkpoint (no state.pt): {path}")
    state = torch.load(state_path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_path}: not an {CHECKPOINT_FORMAT} checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{state_path}: unsupported version {state.get('version')!r}")
    fmt = state.get("weights")
    if fmt not in WEIGHT_EXTENSIONS:
        raise ValueError(f"{state_path}: unknown weights format {fmt!r}")
    ext = WEIGHT_EXTENSIONS[fmt]
    state["guide"] = read_weights(os.path.join(path, "guide" + ext), fmt, map_location)
    state["ema"] = read_weights(os.path.join(path, "ema" + ext), fmt, map_location)
    return state


def rng_state() -> dict:
    """This process's torch (and initialised CUDA) generator states, for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
