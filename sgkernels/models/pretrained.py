"""Load a transformer (and its TOAST guide) from a checkpoint folder: :func:`from_pretrained`.

Two layouts are read:

* sgkernels' own folders (:func:`sgkernels.models.checkpoint.save_checkpoint`), recognised by
  ``"format": "sgkernels.models"`` in ``config.json``;
* the official open-muse / UnlockMGM folders written by open-muse's ``ModelMixin.save_pretrained``
  (EMA folders too: ``EMAModel.save_pretrained`` goes through it). Their ``config.json`` holds the
  ``__init__`` arguments of ``MaskGitTransformer`` or ``MaskGitTransformerTOAST``, plus
  ``_class_name``, ``_version``, ``mask_token_id`` (= ``vocab_size - 1``) and, for an EMA folder,
  the EMA state (``decay``, ``optimization_step``, ...), which is ignored. The weights are
  ``pytorch_model.bin`` (``torch.save`` of the state dict; read with ``weights_only=True``), or
  ``model.safetensors`` / ``pytorch_model.safetensors``.

Only the MaskGIT configuration of the official code has a counterpart here (post-LN BERT blocks
with biases, LayerNorm on the embeddings, MLM head with LayerNorm, no encoder LayerNorm, no
cross-attention); any other value, an unknown key or a weight that does not fit raises
:class:`CheckpointError`, one line naming the file and the key.
"""
from __future__ import annotations

import json
import math
import os

import torch

from .. import _dataclass
from .._io import cast_weights, check_finite, first_line
from ..ops import _validate
from .checkpoint import FORMAT as SGKERNELS_FORMAT
from .checkpoint import load_checkpoint, recover
from .open_muse import backbone_key_map, convert_backbone, convert_toast, toast_key_map
from .toast import TOAST, TOASTConfig
from .transformer import MaskTransformer, MaskTransformerConfig

CONFIG_NAME = "config.json"
# Weight files of an official folder, in the order they are looked for.
WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.safetensors")
TRANSFORMER_CLASSES = ("MaskGitTransformer", "MaskGitTransformerTOAST")

# EMAModel.state_dict() minus shadow_params: written into config.json by EMAModel.save_pretrained.
EMA_KEYS = frozenset({"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup",
                      "inv_gamma", "power"})
# Keys that change nothing at inference: init scale, the T5 width (cross-attention is off),
# TOAST training switches.
_IGNORED = frozenset({"initializer_range", "encoder_hidden_size", "train_head", "predict_all", "lambda_var"})
# The MaskGIT configuration: key -> (required value, the official __init__ default).
_REQUIRED = {
    "norm_type": ("layernorm", "layernorm"),
    "use_normformer": (False, True),
    "use_encoder_layernorm": (False, True),
    "use_mlm_layer": (True, True),
    "use_mlm_layernorm": (True, True),
    "use_bias": (True, False),
    "layer_norm_embeddings": (True, False),
    "use_maskgit_mlp": (True, False),
    "add_cross_attention": (False, False),
    "project_encoder_hidden_states": (False, False),
}
# official key -> (MaskTransformerConfig field or None, the official __init__ default).
_SHAPE_KEYS = {
    "vocab_size": (None, None),
    "hidden_size": ("width", 768),
    "num_hidden_layers": ("depth", 12),
    "num_attention_heads": ("heads", 12),
    "intermediate_size": ("mlp_dim", 3072),
    "hidden_dropout": ("dropout", 0.1),
    "attention_dropout": ("attention_dropout", 0.1),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
    "codebook_size": ("codebook_size", 1024),
    "num_classes": ("num_classes", None),
    "num_vq_tokens": (None, 256),
    "max_position_embeddings": (None, 256),
    "mask_token_id": (None, None),
}
_TOAST_KEYS = {"use_toast": False, "tg_factor": 16, "use_blank_second": False}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read: the message is one line naming the file (and key)."""


def folder(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """``path[/subfolder]`` checked to be a directory holding a ``config.json``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path, got {type(path).__name__}")
    directory = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    recover(directory)  # an sgkernels save_checkpoint killed mid-swap
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a folder")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise CheckpointError(f"{os.path.join(directory, CONFIG_NAME)}: missing (not a checkpoint folder)")
    return directory


def read_config(directory: str) -> dict:
    """The ``config.json`` of ``directory`` as a dict (CheckpointError if it is not a JSON object)."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def weights_file(directory: str) -> str:
    """The weight file of an official folder (the first of :data:`WEIGHT_NAMES` present)."""
    for name in WEIGHT_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{directory}: no weights (expected one of {', '.join(WEIGHT_NAMES)})")


def read_weights(path: str, map_location="cpu") -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` dict from a ``.safetensors`` file or a ``torch.save`` file (weights only)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            device = "cpu" if map_location is None else str(torch.device(map_location))
            state = load_file(path, device=device)
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except ImportError:
        raise CheckpointError(f"{path}: a safetensors file: install safetensors to read it") from None
    except Exception as e:  # torch / safetensors raise many kinds on a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot be read as weights ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def check_keys(state: dict, expected, path: str, extra_ok=()) -> None:
    """CheckpointError naming the first missing / unexpected keys of ``state`` (``extra_ok``: prefixes allowed)."""
    expected = set(expected)
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(tuple(extra_ok)))

    def listed(keys):
        more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
        return ", ".join(keys[:5]) + more

    if missing:
        raise CheckpointError(f"{path}: missing key {listed(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key {listed(unexpected)}")


# Sane upper bounds of the official config's sizes (sgkernels._dataclass): checked before anything is built.
_MAX = {"vocab_size": 3 * _dataclass.MAX_VOCAB, "hidden_size": _dataclass.MAX_WIDTH, "num_hidden_layers": _dataclass.MAX_DEPTH,
        "num_attention_heads": _dataclass.MAX_WIDTH, "intermediate_size": _dataclass.MAX_MLP,
        "codebook_size": _dataclass.MAX_VOCAB, "num_classes": _dataclass.MAX_VOCAB, "num_vq_tokens": _dataclass.MAX_TOKENS,
        "max_position_embeddings": _dataclass.MAX_TOKENS + 1, "tg_factor": _dataclass.MAX_FACTORS}


def _int(config: dict, key: str, default, path: str) -> int:
    value = config.get(key, default)
    maximum = _MAX.get(key, 1 << 62)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise CheckpointError(f"{path}: {key} = {value!r}, expected an integer in [1, {maximum}]")
    return value


def open_muse_configs(config: dict, path: str) -> tuple[MaskTransformerConfig, TOASTConfig | None]:
    """Our configs for an official ``MaskGitTransformer`` / ``MaskGitTransformerTOAST`` ``config.json``."""
    cls = config.get("_class_name")
    if cls is not None and cls not in TRANSFORMER_CLASSES:
        raise CheckpointError(f"{path}: _class_name = {cls!r}, expected one of {', '.join(TRANSFORMER_CLASSES)}")
    for key in config:
        if not (key.startswith("_") or key in EMA_KEYS or key in _IGNORED or key in _REQUIRED
                or key in _SHAPE_KEYS or key in _TOAST_KEYS):
            raise CheckpointError(f"{path}: unknown key {key!r}")
    for key, (required, default) in _REQUIRED.items():
        value = config.get(key, default)
        if value != required:
            raise CheckpointError(
                f"{path}: {key} = {json.dumps(value)} is not supported (the MaskGIT configuration has {json.dumps(required)})")
    if "vocab_size" not in config:
        raise CheckpointError(f"{path}: missing key 'vocab_size'")
    if config.get("num_classes") is None:
        raise CheckpointError(f"{path}: num_classes is null: only class-conditional checkpoints are supported")
    fields = {}
    for key, (field, default) in _SHAPE_KEYS.items():
        if field is None:
            continue
        if field in ("dropout", "attention_dropout", "layer_norm_eps"):
            value = config.get(key, default)
            low_open, high_open = (True, False) if field == "layer_norm_eps" else (False, True)
            try:
                fields[field] = _dataclass.check_real(key, value, 0.0, 1.0, low_open=low_open, high_open=high_open)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: {e}") from None
        else:
            fields[field] = _int(config, key, default, path)
    vocab = _int(config, "vocab_size", None, path)
    k, c = fields["codebook_size"], fields["num_classes"]
    if vocab != k + c + 1:
        raise CheckpointError(f"{path}: vocab_size = {vocab}, expected codebook_size + num_classes + 1 = {k + c + 1}")
    if "mask_token_id" in config and config["mask_token_id"] != vocab - 1:
        raise CheckpointError(f"{path}: mask_token_id = {config['mask_token_id']!r}, expected vocab_size - 1 = {vocab - 1}")
    n = _int(config, "num_vq_tokens", 256, path)
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{path}: num_vq_tokens = {n} is not a square grid")
    positions = _int(config, "max_position_embeddings", 256, path)
    if positions != n + 1:
        raise CheckpointError(f"{path}: max_position_embeddings = {positions}, expected num_vq_tokens + 1 = {n + 1}")
    try:
        model_config = MaskTransformerConfig(grid_size=side, norm="post", gelu="exact", **fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not config.get("use_toast", False):
        return model_config, None
    if config.get("use_blank_second", False) is not True:
        raise CheckpointError(f"{path}: use_blank_second = {json.dumps(config.get('use_blank_second', False))} "
                              "is not supported (TOAST's pass 2 runs on a blank canvas: true)")
    factors = _int(config, "tg_factor", 16, path)
    return model_config, TOASTConfig.for_backbone(model_config, factors)


def _build(cls, config, state: dict[str, torch.Tensor]):
    with torch.device("meta"):
        module = cls(config)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def load_open_muse(directory: str, *, map_location="cpu",
                   torch_dtype: torch.dtype | None = None) -> tuple[MaskTransformer, TOAST | None]:
    """``(model, guide or None)`` from an official folder (see the module docstring); ``torch_dtype``
    as in :func:`from_pretrained`, checked."""
    config_path = os.path.join(directory, CONFIG_NAME)
    model_config, toast_config = open_muse_configs(read_config(directory), config_path)
    path = weights_file(directory)
    state = read_weights(path, map_location)
    expected = list(backbone_key_map(model_config))
    if toast_config is not None:
        expected += list(toast_key_map(toast_config.depth))
    check_keys(state, expected, path)
    state = cast_weights(state, path, CheckpointError, dtype=torch_dtype)
    check_finite(state, path, CheckpointError)
    try:
        model = _build(MaskTransformer, model_config, convert_backbone(state, model_config))
        guide = None
        if toast_config is not None:
            guide = _build(TOAST, toast_config, convert_toast(state, toast_config))
    except (KeyError, ValueError) as e:  # shape mismatches, named (the first few) by the converters
        message = str(e.args[0] if e.args else e)
        _, found, items = message.partition("shape mismatch: ")
        if found:
            message = f"shape mismatch with {CONFIG_NAME}: {items}"
        raise CheckpointError(f"{path}: {message}") from None
    return model, guide


def from_pretrained(path: str | os.PathLike, subfolder: str | None = None, *,
                    map_location="cpu", torch_dtype=None) -> tuple[MaskTransformer, TOAST | None]:
    """Load ``(model, guide or None)`` in eval mode from an sgkernels or official checkpoint folder.

    Args:
        path: the folder (``config.json`` + weights).
        subfolder: a folder inside ``path`` (e.g. ``"transformer"`` of a pipeline folder).
        map_location: where the tensors are loaded (``"cpu"`` by default).
        torch_dtype: the dtype of the parameters, hence of the activations (as diffusers' and
            transformers' ``torch_dtype``): ``torch.float32`` / ``torch.bfloat16`` / ``torch.float16``
            or their names; None or ``"auto"`` (default) keeps the stored dtype (the one holding most
            of the weights). The sampling ops compute in float32 whatever the logits' dtype.
    Raises:
        CheckpointError: one line naming the file (and the key) that cannot be read.
        TypeError, ValueError: a ``torch_dtype`` that is not one of those (before anything is read).
    """
    torch_dtype = _validate.check_dtype("torch_dtype", torch_dtype)
    directory = folder(path, subfolder)
    config = read_config(directory)
    if config.get("format") == SGKERNELS_FORMAT:
        try:
            return load_checkpoint(directory, map_location=map_location, torch_dtype=torch_dtype)
        except (OSError, KeyError, TypeError, ValueError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise CheckpointError(message) from None
    return load_open_muse(directory, map_location=map_location, torch_dtype=torch_dtype)
