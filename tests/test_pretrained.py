"""models.from_pretrained: official open-muse / UnlockMGM folders and sgkernels folders (tiny, CPU)."""
import json
import os

import pytest
import torch

from official_folders import transformer_config, write_folder
from sgkernels.models import TOAST, CheckpointError, MaskTransformer, from_pretrained
from sgkernels.models.checkpoint import save_checkpoint
from test_models import NF, open_muse_state_dict, random_tokens, reference_forward, reference_toast, tiny

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


def official_folder(path, cfg, toast=True, weights="pytorch_model.bin", **config_overrides):
    config = {**transformer_config(cfg, NF, toast=toast), **config_overrides}
    return write_folder(path, config, open_muse_state_dict(cfg, NF, toast=toast), weights)


def test_official_toast_folder_matches_reference_forward(tmp_path):
    cfg = tiny()
    official_folder(tmp_path, cfg)
    model, guide = from_pretrained(tmp_path)
    assert not model.training and not guide.training
    assert model.config == cfg and guide.config.num_factors == NF
    sd = open_muse_state_dict(cfg, NF)
    tokens, labels = random_tokens(cfg, 3), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out = model(tokens, labels, return_hidden=True)
        ref_logits, ref_hidden = reference_forward(sd, model.input_ids(tokens, labels), cfg)
        smooth = guide(model, out.hidden_states, labels)
        ref_smooth = reference_toast(sd, ref_hidden, labels, cfg, NF)
    assert (out.logits - ref_logits).abs().max() < 1e-4
    assert (smooth - ref_smooth).abs().max() < 1e-4


def test_plain_maskgit_safetensors_in_a_subfolder(tmp_path):
    cfg = tiny(grid_size=4)
    official_folder(tmp_path / "transformer", cfg, toast=False, weights="model.safetensors")
    model, guide = from_pretrained(tmp_path, subfolder="transformer")
    assert guide is None and model.config.num_tokens == 16
    sd = open_muse_state_dict(cfg, toast=False)
    tokens = random_tokens(cfg, 2)
    with torch.no_grad():
        ref = reference_forward(sd, model.input_ids(tokens, torch.tensor([1, 3])), cfg)[0]
        assert (model(tokens, torch.tensor([1, 3])) - ref).abs().max() < 1e-4


def test_sgkernels_folder(tmp_path):
    cfg = tiny()
    m, g = MaskTransformer(cfg), TOAST(cfg, NF)
    save_checkpoint(tmp_path, m, g)
    m2, g2 = from_pretrained(tmp_path)
    for a, b in ((m, m2), (g, g2)):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("overrides, needle", [
    ({"use_bias": False}, "use_bias"),
    ({"use_normformer": True}, "use_normformer"),
    ({"use_encoder_layernorm": True}, "use_encoder_layernorm"),
    ({"vocab_size": 99}, "vocab_size"),
    ({"max_position_embeddings": 7}, "max_position_embeddings"),
    ({"num_classes": None}, "num_classes"),
    ({"use_blank_second": False}, "use_blank_second"),
    ({"_class_name": "MaskGitVQGAN"}, "_class_name"),
    ({"some_new_flag": 1}, "some_new_flag"),
])
def test_config_errors_name_the_file_and_key(tmp_path, overrides, needle):
    official_folder(tmp_path, tiny(), **overrides)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path)
    msg = _one_line(err)
    assert os.path.join(str(tmp_path), "config.json") in msg and needle in msg


def test_weights_errors_name_the_file_and_key(tmp_path):
    cfg = tiny()
    sd = open_muse_state_dict(cfg, NF)
    bin_path = os.path.join(str(tmp_path), "pytorch_model.bin")
    # config / weights mismatch: the config says width 64, the weights are width 32
    write_folder(tmp_path, transformer_config(tiny(width=64), NF), sd)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path)
    assert bin_path in _one_line(err) and "embed.word_embeddings.weight" in str(err.value)
    # a missing key, an unexpected key
    write_folder(tmp_path, transformer_config(cfg, NF), {k: v for k, v in sd.items() if k != "decoders.1.linear.weight"})
    with pytest.raises(CheckpointError, match=r"missing key decoders\.1\.linear\.weight") as err:
        from_pretrained(tmp_path)
    assert bin_path in _one_line(err)
    write_folder(tmp_path, transformer_config(cfg, NF, toast=False), sd)  # TOAST weights, plain config
    with pytest.raises(CheckpointError, match="unexpected key cls_anchor_gen") as err:
        from_pretrained(tmp_path)
    # not a state dict / not a weight file
    torch.save([1, 2], bin_path)
    with pytest.raises(CheckpointError, match="dict of tensors") as err:
        from_pretrained(tmp_path)
    with open(bin_path, "wb") as f:
        f.write(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match="cannot be read as weights") as err:
        from_pretrained(tmp_path)
    assert bin_path in _one_line(err)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder") as err:
        from_pretrained(tmp_path / "nope")
    _one_line(err)
    with pytest.raises(CheckpointError, match="config.json: missing"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot be read as JSON") as err:
        from_pretrained(tmp_path)
    _one_line(err)
    (tmp_path / "config.json").write_text(json.dumps(transformer_config(tiny(), NF)))
    with pytest.raises(CheckpointError, match="no weights.*pytorch_model.bin"):
        from_pretrained(tmp_path)
    # an sgkernels folder whose weights are gone
    save_checkpoint(tmp_path / "own", MaskTransformer(tiny()), format="torch")
    os.unlink(tmp_path / "own" / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt") as err:
        from_pretrained(tmp_path / "own")
    _one_line(err)
