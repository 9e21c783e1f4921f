"""Loading hostile folders (issue 22): ``models.from_pretrained``, ``MaskGitVQGAN.from_pretrained``,
sgkernels folders and ``SelfGuidedPipeline``. Every way a folder can be broken is one
:class:`CheckpointError` line naming the file (and the key), raised quickly: config sizes are
bounded before any module is built; weights that are not floating point are refused, mixed
floating dtypes are cast to the model's."""
import json
import os
import time

import pytest
import torch

from official_folders import transformer_config, vqgan_config, vqgan_state_dict, write_folder
from sgkernels import SelfGuidedPipeline
from sgkernels.models import TOAST, CheckpointError, MaskGitVQGAN, MaskTransformer, from_pretrained
from sgkernels.models.checkpoint import save_checkpoint
from test_models import NF, open_muse_state_dict, tiny

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


def _refused(load, *needles, seconds=60.0):
    """``load()`` raises one CheckpointError line holding every needle, within ``seconds`` (a loose guard:
    a config past the bounds used to hang or run out of memory; the refusal itself takes milliseconds,
    plus torch's one-time meta-device set-up where a module is built)."""
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load()
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert time.perf_counter() - t0 < seconds, "the check came after building or loading"
    return msg


def _official(path, toast=True, weights="pytorch_model.bin", state=None, **overrides):
    cfg = tiny()
    config = {**transformer_config(cfg, NF, toast=toast), **overrides}
    return write_folder(path, config, open_muse_state_dict(cfg, NF, toast=toast) if state is None else state, weights)


def _vqgan(path, state=None, **overrides):
    c = vqgan_config(**overrides)
    return write_folder(path, c, vqgan_state_dict(vqgan_config()) if state is None else state)


def _own(path, fmt="safetensors"):
    cfg = tiny()
    return save_checkpoint(path, MaskTransformer(cfg), TOAST(cfg, NF), format=fmt)


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    for dotted, value in changes.items():
        node, *rest = dotted.split("__")
        if rest:
            config[node][rest[0]] = value
        else:
            config[node] = value
    with open(path, "w") as f:
        json.dump(config, f)
    return path


# ---------------------------------------------------------------------------------- config sizes
@pytest.mark.parametrize("key, value", [("hidden_size", 10**9), ("num_hidden_layers", 10**7),
                                        ("intermediate_size", 10**12), ("tg_factor", 10**8)])
def test_official_sizes_are_bounded_before_building(tmp_path, key, value):
    _official(tmp_path, **{key: value})
    _refused(lambda: from_pretrained(tmp_path), os.path.join(str(tmp_path), "config.json"), key)


@pytest.mark.parametrize("field, value", [("model__depth", 10**5), ("model__width", 10**9),
                                          ("guide__num_factors", 10**9)])
def test_sgkernels_sizes_are_bounded_before_building(tmp_path, field, value):
    directory = _own(tmp_path / "m")
    config = _edit_config(directory, **{field: value})
    _refused(lambda: from_pretrained(directory), config, field.split("__")[1])


@pytest.mark.parametrize("key, value", [("num_res_blocks", 10**5), ("hidden_channels", 10**9),
                                        ("channel_mult", [1] * 1000), ("num_embeddings", 10**12)])
def test_vqgan_sizes_are_bounded_before_building(tmp_path, key, value):
    _vqgan(tmp_path, **{key: value})
    _refused(lambda: MaskGitVQGAN.from_pretrained(tmp_path), os.path.join(str(tmp_path), "config.json"), key)


# ------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("key, value", [("hidden_dropout", "x"), ("layer_norm_eps", -1.0), ("layer_norm_eps", 0.0),
                                        ("attention_dropout", 1.5)])
def test_official_bad_numbers(tmp_path, key, value):
    _official(tmp_path, **{key: value})
    _refused(lambda: from_pretrained(tmp_path), "config.json", key)


@pytest.mark.parametrize("key, value", [("commitment_cost", "x"), ("dropout", "x"), ("commitment_cost", -1.0),
                                        ("dropout", float("nan"))])
def test_vqgan_bad_numbers(tmp_path, key, value):
    _vqgan(tmp_path, **{key: value})
    _refused(lambda: MaskGitVQGAN.from_pretrained(tmp_path), "config.json", key)


@pytest.mark.parametrize("field, value", [("model", 5), ("model", None), ("model", [1, 2]), ("guide", 5),
                                          ("guide", [1]), ("model__dropout", "x"), ("model__layer_norm_eps", -1.0),
                                          ("guide__anchor_norm_eps", "x"), ("model__depth", "2")])
def test_sgkernels_bad_config_values(tmp_path, field, value):
    directory = _own(tmp_path / "m")
    config = _edit_config(directory, **{field: value})
    _refused(lambda: from_pretrained(directory), config, field.split("__")[-1])


# ------------------------------------------------------------------------------------ weight files
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"], ids=["empty", "truncated"])
def test_official_broken_weight_file(tmp_path, content):
    _official(tmp_path / "t")
    _vqgan(tmp_path / "v")
    for directory in (tmp_path / "t", tmp_path / "v"):
        path = directory / "pytorch_model.bin"
        path.write_bytes(content)
        load = from_pretrained if directory.name == "t" else MaskGitVQGAN.from_pretrained
        _refused(lambda: load(directory), str(path), "cannot be read as weights")


class _Code:  # a pickle that would run code: torch.load(weights_only=True) refuses it
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("torch", "model.pt")])
@pytest.mark.parametrize("how", ["empty", "truncated", "pickle_with_code"])
def test_sgkernels_broken_weight_file(tmp_path, fmt, name, how):
    directory = _own(tmp_path / "m", fmt)
    path = os.path.join(directory, name)
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:
        torch.save({"word_embeddings.weight": _Code()}, path)
        data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data)
    _refused(lambda: from_pretrained(directory), path, "cannot be read as weights")


# ----------------------------------------------------------------------------------- weight dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_weights_are_refused(tmp_path, dtype):
    cfg = tiny()
    sd = open_muse_state_dict(cfg, NF)
    sd["embed.embeddings_ln.bias"] = sd["embed.embeddings_ln.bias"].to(dtype)
    _official(tmp_path / "t", state=sd)
    _refused(lambda: from_pretrained(tmp_path / "t"), "pytorch_model.bin", "embed.embeddings_ln.bias", str(dtype))
    vsd = vqgan_state_dict(vqgan_config())
    vsd["decoder.conv_out.bias"] = vsd["decoder.conv_out.bias"].to(dtype)
    _vqgan(tmp_path / "v", state=vsd)
    _refused(lambda: MaskGitVQGAN.from_pretrained(tmp_path / "v"), "decoder.conv_out.bias", str(dtype))
    directory = _own(tmp_path / "m", "torch")
    path = os.path.join(directory, "model.pt")
    state = torch.load(path, weights_only=True)
    state["head.bias"] = state["head.bias"].to(dtype)
    torch.save(state, path)
    _refused(lambda: from_pretrained(directory), path, "head.bias", str(dtype))


def test_mixed_float_weights_are_cast_to_the_model_dtype(tmp_path):
    """One float16 tensor among float32 ones loads as float32 (and samples); an all-float16 VQGAN
    stays float16, and the pipeline still returns float32 images (its documented output)."""
    cfg = tiny()
    sd = open_muse_state_dict(cfg, NF)
    sd["mlm_layer.mlm_dense.weight"] = sd["mlm_layer.mlm_dense.weight"].half()
    _official(tmp_path / "t", state=sd)
    model, guide = from_pretrained(tmp_path / "t")
    assert {p.dtype for p in model.parameters()} == {torch.float32} == {p.dtype for p in guide.parameters()}
    vsd = {k: v.half() for k, v in vqgan_state_dict(vqgan_config()).items()}
    _vqgan(tmp_path / "v", state=vsd)
    vqgan = MaskGitVQGAN.from_pretrained(tmp_path / "v")
    assert {p.dtype for p in vqgan.parameters()} == {torch.float16}
    pipe = SelfGuidedPipeline(model, guide, vqgan).to("cpu")
    images = pipe([1, 2], steps=2, seed=0, output="float")
    assert images.dtype == torch.float32 and images.shape == (2, 3, 6, 6)


def test_cast_that_overflows_is_refused(tmp_path):
    """A float32 tensor among float16 ones whose values do not fit float16 is named, not loaded as inf."""
    vsd = {k: v.half() for k, v in vqgan_state_dict(vqgan_config()).items()}
    vsd["decoder.conv_out.bias"] = torch.full((3,), 1e6)
    _vqgan(tmp_path, state=vsd)
    _refused(lambda: MaskGitVQGAN.from_pretrained(tmp_path), "decoder.conv_out.bias", "range")
