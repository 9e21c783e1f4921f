"""MaskGitVQGAN: open-muse layout, an independent functional forward, folder loading (tiny, CPU)."""
import os

import pytest
import torch
import torch.nn.functional as F

from official_folders import vqgan_config, vqgan_shapes, vqgan_state_dict, write_folder
from sgkernels.models import CheckpointError, MaskGitVQGAN, MaskGitVQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

CONFIG_KEYS = {k: v for k, v in vqgan_config().items() if not k.startswith("_")}


def _reference_layers(sd):
    """conv, group norm and residual block of MaskGIT's VQGAN on plain ops, reading weights from ``sd``
    (the 1x1 shortcut is applied to the block's output)."""

    def conv(name, x, bias=True):
        w = sd[name + ".weight"]
        return F.conv2d(x, w, sd[name + ".bias"] if bias else None, padding=w.shape[-1] // 2)

    def gn(name, x):
        return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def res(p, x):
        y = conv(p + "conv1", F.silu(gn(p + "norm1", x)), bias=False)
        y = conv(p + "conv2", F.silu(gn(p + "norm2", y)), bias=False)
        return y + (conv(p + "nin_shortcut", y, bias=False) if p + "nin_shortcut.weight" in sd else x)

    return conv, gn, res


def reference_decode(sd, c, tokens):
    """MaskGIT's VQGAN decoder on plain ops (the 1x1 shortcut is applied to the block's output)."""
    conv, gn, res = _reference_layers(sd)
    b, n = tokens.shape
    side = int(n ** 0.5)
    z = sd["quantize.embedding.weight"][tokens].reshape(b, side, side, -1).permute(0, 3, 1, 2)
    x = conv("decoder.conv_in", z)
    for j in range(c["num_res_blocks"]):
        x = res(f"decoder.mid.{j}.", x)
    for i in reversed(range(len(c["channel_mult"]))):
        for j in range(c["num_res_blocks"]):
            x = res(f"decoder.up.{i}.block.{j}.", x)
        if i:
            x = conv(f"decoder.up.{i}.upsample_conv", x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    return conv("decoder.conv_out", F.silu(gn("decoder.norm_out", x)))


def reference_encode(sd, c, images):
    conv, gn, res = _reference_layers(sd)
    x = conv("encoder.conv_in", images, bias=False)
    levels = len(c["channel_mult"])
    for i in range(levels):
        for j in range(c["num_res_blocks"]):
            x = res(f"encoder.down.{i}.block.{j}.", x)
        if i != levels - 1:
            x = (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]) / 4
    for j in range(c["num_res_blocks"]):
        x = res(f"encoder.mid.{j}.", x)
    z = conv("encoder.conv_out", F.silu(gn("encoder.norm_out", x)))
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    codes = sd["quantize.embedding.weight"].double()
    return torch.cdist(flat, codes).argmin(1).reshape(z.shape[0], -1), z


@pytest.fixture
def folder(tmp_path):
    c = vqgan_config()
    return write_folder(tmp_path / "vae", c, vqgan_state_dict(c)), c


def test_state_dict_layout_is_open_muse():
    model = MaskGitVQGAN(MaskGitVQGANConfig(**CONFIG_KEYS))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == vqgan_shapes(vqgan_config())
    assert MaskGitVQGANConfig().to_dict() == {**CONFIG_KEYS, "resolution": 256, "hidden_channels": 128,
                                              "channel_mult": [1, 1, 2, 2, 4], "z_channels": 256,
                                              "num_embeddings": 1024, "quantized_embed_dim": 256}
    assert MaskGitVQGANConfig().downsample_factor == 16


def test_decode_and_encode_match_reference(folder):
    path, c = folder
    vq = MaskGitVQGAN.from_pretrained(path)
    sd = vqgan_state_dict(c)
    tokens = torch.randint(0, c["num_embeddings"], (3, 9), generator=torch.Generator().manual_seed(1))
    ref = reference_decode(sd, c, tokens)
    assert ref.min() < 0 or ref.max() > 1  # so the clamp is exercised
    images = vq.decode(tokens)
    assert images.shape == (3, 3, 6, 6)
    assert (images - ref.clamp(0, 1)).abs().max() < 1e-5
    assert torch.equal(vq.decode(tokens.reshape(3, 3, 3)), images)
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    ref_tokens, z = reference_encode(sd, c, x)
    tokens = vq.encode(x)
    assert tokens.shape == (4, 36) and tokens.dtype == torch.int64
    assert torch.equal(tokens, ref_tokens)


def test_safetensors_and_ignored_keys(tmp_path):
    c = vqgan_config(num_resolutions=2, reduction_factor=2, latent_size=3)
    write_folder(tmp_path, c, vqgan_state_dict(c), "model.safetensors")
    assert MaskGitVQGAN.from_pretrained(tmp_path).codebook_size == 16


def test_bad_input(folder, tmp_path):
    path, c = folder
    vq = MaskGitVQGAN.from_pretrained(path)
    with pytest.raises(ValueError, match="square grid"):
        vq.decode(torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.decode(torch.full((1, 9), 16))
    with pytest.raises(ValueError, match="multiples of 2"):
        vq.encode(torch.rand(1, 3, 5, 6))
    cfg_path = os.path.join(str(tmp_path / "bad"), "config.json")
    bin_path = os.path.join(str(tmp_path / "bad"), "pytorch_model.bin")
    sd = vqgan_state_dict(c)
    for config, state, needle in [
        (vqgan_config(_class_name="MaskGitTransformerTOAST"), sd, cfg_path + ": _class_name"),
        (vqgan_config(extra=1), sd, cfg_path + ": unknown key 'extra'"),
        (vqgan_config(z_channels=4), sd, cfg_path + ": z_channels"),
        (vqgan_config(num_embeddings=32), sd, bin_path + ": quantize.embedding.weight has shape (16, 8)"),
        (vqgan_config(), {k: v for k, v in sd.items() if "conv_out" not in k}, bin_path + ": missing key"),
    ]:
        write_folder(tmp_path / "bad", config, state)
        with pytest.raises(CheckpointError) as err:
            MaskGitVQGAN.from_pretrained(tmp_path / "bad")
        assert needle in str(err.value) and "\n" not in str(err.value)
