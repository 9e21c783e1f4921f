"""Argument checks shared by the sampling ops. Every message names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

from .. import _rng

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The model dtypes by name (``torch_dtype="bfloat16"``, ``--dtype bfloat16``): weights and activations.
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_logits(name: str, x, *, min_dim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, bfloat16 or float16 logits, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims [..., V], got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: expected vocabulary size V >= 1, got shape {tuple(x.shape)}")


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (same as {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (same as {ref_name}), got {x.device}")


def check_float(name: str | None, value, *, nonneg: bool = True) -> float:
    """``value`` as a finite float (``>= 0`` unless ``nonneg=False``); the one check of float arguments.

    ``name`` prefixes the message; None leaves it out (argparse, which names the option itself).
    """
    prefix = "" if name is None else f"{name}: "
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # Real: numpy scalars too
        raise TypeError(f"{prefix}expected a float, got {type(value).__name__}")
    value = float(value)
    # comparisons, not math.isfinite: they also work on the SymFloat torch.compile may pass
    if not (value == value and abs(value) != math.inf) or (nonneg and value < 0):
        raise ValueError(f"{prefix}expected a finite float{' >= 0' if nonneg else ''}, got {value}")
    return value


def check_guidance_scale(value, name: str | None = "guidance_scale") -> float:
    """The guidance scale s: any finite float (0 = no guidance); its one Python-side check."""
    return check_float(name, value, nonneg=False)


def check_dtype(name: str | None, value, *, auto: bool = True) -> torch.dtype | None:
    """A model dtype (``torch_dtype=``, ``--dtype``): a torch.dtype among :data:`FLOAT_DTYPES` or its name
    (``"float32"``, ``"bfloat16"``, ``"float16"``); with ``auto``, None or ``"auto"`` too, both
    returned as None (the checkpoint's own dtype). ``name`` as in :func:`check_float`.
    """
    prefix = "" if name is None else f"{name}: "
    names = ", ".join(DTYPE_NAMES) + (", 'auto' or None" if auto else "")
    if auto and (value is None or (isinstance(value, str) and value == "auto")):
        return None
    if isinstance(value, str):
        if value not in DTYPE_NAMES:
            raise ValueError(f"{prefix}expected one of {names}, got {value!r}")
        return DTYPE_NAMES[value]
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{prefix}expected a torch.dtype or one of {names}, got {type(value).__name__}")
    if value not in FLOAT_DTYPES:
        raise ValueError(f"{prefix}expected torch.float32, torch.bfloat16 or torch.float16, got {value}")
    return value


def check_positive_int(name: str | None, value) -> int:
    """``value`` as an int ``>= 1`` (bools are refused, numpy integers accepted); ``name`` as in :func:`check_float`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{'' if name is None else f'{name}: '}expected an int >= 1, got {value!r}")
    return int(value)


def check_seed(name: str | None, value) -> int:
    """``value`` as a seed: an int (numpy integers too) in [0, 2**63); ``name`` as in :func:`check_float`.

    The range of :func:`sgkernels._rng.resolve_seed`, which the ops apply; front ends (the CLI) check
    here so that the message names their argument.
    """
    prefix = "" if name is None else f"{name}: "
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}expected an int, got {type(value).__name__}")
    if not 0 <= value < _rng.MAX_SEED:
        raise ValueError(f"{prefix}expected an int in [0, 2**63), got {value}")
    return int(value)


def check_mask(name: str, mask, shape: torch.Size, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name}: expected device {device}, got {mask.device}")


def num_to_mask_tensor(num_to_mask, batch: int, device: torch.device) -> torch.Tensor:
    """``num_to_mask`` as an int64 tensor [B] on ``device``; ints are checked here, tensors in-kernel."""
    if isinstance(num_to_mask, bool):
        raise TypeError("num_to_mask: expected an int or an int64 tensor [B], got bool")
    if isinstance(num_to_mask, int):
        if num_to_mask < 0:
            raise ValueError(f"num_to_mask: expected a value >= 0, got {num_to_mask}")
        return torch.full((batch,), num_to_mask, dtype=torch.int64, device=device)
    if not isinstance(num_to_mask, torch.Tensor):
        raise TypeError(f"num_to_mask: expected an int or an int64 tensor [B], got {type(num_to_mask).__name__}")
    if num_to_mask.dtype.is_floating_point or num_to_mask.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"num_to_mask: expected an integer tensor, got {num_to_mask.dtype}")
    if num_to_mask.dim() == 0:
        num_to_mask = num_to_mask.expand(batch)
    if num_to_mask.shape != (batch,):
        raise ValueError(f"num_to_mask: expected shape ({batch},), got {tuple(num_to_mask.shape)}")
    if num_to_mask.device != device:
        raise ValueError(f"num_to_mask: expected device {device}, got {num_to_mask.device}")
    return num_to_mask.to(torch.int64).contiguous()


# ------------------------------------------------------------------------------------------------
# Token filters and confidences (semantics: sgkernels/ops/filters.py)

CONFIDENCES = ("logp", "prob", "margin", "entropy")


def check_filters(top_k=0, top_p=1.0, min_p=0.0) -> tuple[int, float, float]:
    """The one validator of filter arguments: returns ``(top_k, top_p, min_p)`` as int, float, float.

    ``top_k``: int >= 0 (0 = off); ``top_p``: float in (0, 1] (1 = off); ``min_p``: float in [0, 1] (0 = off).
    """
    # numbers.Integral / numbers.Real: numpy scalars too (np.int64, np.float32, ...)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k: expected an int >= 0 (0 = off), got {type(top_k).__name__}")
    top_k = int(top_k)
    if top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k}")
    for name, value in (("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    top_p, min_p = float(top_p), float(min_p)
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a float in (0, 1] (1 = off), got {top_p}")
    if not (math.isfinite(min_p) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p: expected a float in [0, 1] (0 = off), got {min_p}")
    return top_k, top_p, min_p


def check_confidence(kind, allowed=CONFIDENCES) -> str:
    """``kind`` if it is one of ``allowed`` (the remask confidences), else ValueError naming ``confidence``."""
    if kind not in allowed:
        raise ValueError(f"confidence: expected one of {allowed}, got {kind!r}")
    return kind


def check_inputs(name: str, x, guide_name: str, guide) -> None:
    """A float input ``x`` and its optional guide (same shape, dtype and device): the sampling ops' pair."""
    check_logits(name, x)
    if guide is not None:
        check_logits(guide_name, guide)
        check_same(guide_name, guide, name, x)


def check_sampling(guidance_scale, temperature, top_k, top_p, min_p, confidence):
    """guided_sample's scalar arguments (head_sample's too), checked and normalised:
    ``(guidance_scale, temperature, top_k, top_p, min_p)``; ``confidence`` None or one of CONFIDENCES."""
    guidance_scale = check_guidance_scale(guidance_scale)
    temperature = check_float("temperature", temperature)
    top_k, top_p, min_p = check_filters(top_k, top_p, min_p)
    if confidence is not None:
        check_confidence(confidence)
    return guidance_scale, temperature, top_k, top_p, min_p


# ------------------------------------------------------------------------------------------------
# RNG seed and offset: ints, or 0-dim int64 tensors (read by the kernels from memory)


def check_rng(seed, offset, device: torch.device):
    """The one validator of ``seed`` / ``offset``: returns ``(seed_int, offset_int, seed_t, offset_t)``.

    An int (``seed`` None: drawn from torch's default CPU generator) is checked to lie in
    [0, 2**63) and passed as the int, with tensor None. A 0-dim int64 tensor on ``device`` (CPU
    tensors: on CPU only) is passed as the tensor (its int slot 0): the kernels read it from memory,
    so a CUDA graph or a compiled graph replays with whatever value it holds at launch. Its value is
    not read on the host (no sync); the C++ CPU kernels check it is >= 0, the Triton kernels use its
    64-bit pattern as is.
    """
    out = []
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, torch.Tensor):
            if value.dim() != 0 or value.dtype != torch.int64:
                raise TypeError(f"{name}: expected an int or a 0-dim int64 tensor, got {value.dtype} of shape "
                                f"{tuple(value.shape)}")
            if value.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} (the logits' device), got {value.device}")
            out.append((0, value))
        elif name == "seed":
            out.append((_rng.resolve_seed(value), None))
        else:
            out.append((_rng.check_offset(value), None))
    (s, s_t), (o, o_t) = out
    return s, o, s_t, o_t


def reference_rng(seed, offset, device: torch.device):
    """The seed and offset of a reference: ints (or SymInts) as given, the wrapper having checked them
    (no second range check: a seed drawn under torch.compile is data-dependent), or, when either is a
    tensor, both as checked ints read on the host (:func:`check_rng`, :func:`rng_ints`)."""
    if not isinstance(seed, torch.Tensor) and not isinstance(offset, torch.Tensor):
        return seed, offset
    return rng_ints(*check_rng(seed, offset, device))


def rng_ints(seed: int, offset: int, seed_t, offset_t) -> tuple[int, int]:
    """The seed and offset as ints (reads the tensors on the host: for the references only)."""
    if seed_t is not None:
        seed = _rng.resolve_seed(int(seed_t))
    if offset_t is not None:
        offset = _rng.check_offset(int(offset_t))
    return seed, offset


def check_head(weight, bias, d: int, device: torch.device) -> None:
    """An LM head: ``weight`` [V, d] and ``bias`` [V] or None, float dtypes, on ``device``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor [V, d], got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight: expected float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape [V, {d}] with V >= 1 (d of hidden), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight: expected device {device} (same as hidden), got {weight.device}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor [V] or None, got {type(bias).__name__}")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias: expected float32, bfloat16 or float16, got {bias.dtype}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias: expected device {device} (same as hidden), got {bias.device}")


def check_rows(rows, lead: torch.Size, device: torch.device) -> None:
    """``rows`` of a row-selecting op: None, a bool mask of shape ``lead``, or an integer index
    tensor [K] into the ``lead.numel()`` flattened rows (range checked on CPU only: no sync)."""
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows: expected None, a bool mask or an integer index tensor, got {type(rows).__name__}")
    if rows.device != device:
        raise ValueError(f"rows: expected device {device}, got {rows.device}")
    if rows.dtype == torch.bool:
        if rows.shape != lead:
            raise ValueError(f"rows: a bool mask must have shape {tuple(lead)}, got {tuple(rows.shape)}")
        return
    if rows.dtype.is_floating_point or rows.dtype.is_complex:
        raise TypeError(f"rows: expected a bool mask or an integer index tensor, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows: an index tensor must be 1-D [K], got shape {tuple(rows.shape)}")
    if rows.device.type == "cpu" and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= lead.numel()):
        raise ValueError(f"rows: indices must lie in [0, {lead.numel()}), got [{int(rows.min())}, {int(rows.max())}]")
