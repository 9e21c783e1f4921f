"""SelfGuidedPipeline and sharded .npz generation (tiny official-layout folders, CPU, gloo)."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from official_folders import transformer_config, vqgan_config, vqgan_state_dict, write_folder
from sgkernels import SelfGuidedPipeline, SelfGuidedSampler
from sgkernels.generate_sharded import batch_seed, generate_to_npz
from sgkernels.models import CheckpointError, MaskGitVQGAN
from sgkernels.pipeline import to_uint8
from test_models import NF, open_muse_state_dict, tiny

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

STEPS = 4
OPTS = dict(steps=STEPS, guidance_scale=1.0, choice_temperature=2.0)


def make_folders(root, vq_codes=16):
    cfg = tiny()
    write_folder(root / "transformer", transformer_config(cfg, NF), open_muse_state_dict(cfg, NF))
    c = vqgan_config(num_embeddings=vq_codes)
    write_folder(root / "vae", c, vqgan_state_dict(c))
    return str(root / "transformer"), str(root / "vae")


@pytest.fixture
def folders(tmp_path):
    return make_folders(tmp_path)


def test_pipeline_is_sampler_then_decode(folders):
    pipe = SelfGuidedPipeline.from_pretrained(*folders, device="cpu")
    labels = torch.tensor([0, 3, 4])
    images = pipe(labels, seed=5, **OPTS)
    assert images.shape == (3, 3, 6, 6) and images.dtype == torch.float32
    tokens = SelfGuidedSampler(pipe.model, pipe.guide, **OPTS)(labels, seed=5)
    vq = MaskGitVQGAN.from_pretrained(folders[1])
    assert torch.equal(images, vq.decode(tokens))
    pixels = pipe([0, 3, 4], seed=5, output="uint8", **OPTS)
    assert pixels.shape == (3, 6, 6, 3) and pixels.dtype == torch.uint8
    # the official conversion: uint8(255 * clip(x, 0, 1)), truncating
    expected = (np.clip(images.permute(0, 2, 3, 1).numpy(), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(pixels.numpy(), expected) and torch.equal(to_uint8(images), pixels)
    pil = pipe(3, seed=5, output="pil", **OPTS)
    assert len(pil) == 1 and pil[0].size == (6, 6)


def test_pipeline_errors(tmp_path, folders):
    t, _ = folders
    _, vae32 = make_folders(tmp_path / "other", vq_codes=32)
    with pytest.raises(CheckpointError) as err:
        SelfGuidedPipeline.from_pretrained(t, vae32, device="cpu")
    assert str(err.value) == (f"{os.path.join(vae32, 'config.json')}: num_embeddings = 32, but the transformer has "
                              "codebook_size = 16")
    with pytest.raises(CheckpointError, match="_class_name = 'MaskGitTransformerTOAST'"):
        SelfGuidedPipeline.from_pretrained(t, t, device="cpu")  # the transformer folder given as the VAE
    pipe = SelfGuidedPipeline.from_pretrained(*folders, device="cpu")
    with pytest.raises(ValueError, match=r"class_ids: expected values in \[0, 5\), got \[7\]"):
        pipe([1, 7])
    with pytest.raises(ValueError, match="output"):
        pipe([1], output="png")
    pipe.guide = None
    with pytest.raises(ValueError, match="no TOAST guide"):
        pipe([1])
    assert pipe([1], guidance_scale=0.0, steps=2, seed=0).shape == (1, 3, 6, 6)


def test_generate_to_npz_and_resume(folders, tmp_path, monkeypatch):
    pipe = SelfGuidedPipeline.from_pretrained(*folders, device="cpu")
    out = str(tmp_path / "samples.npz")
    assert generate_to_npz(pipe, out, num_images=7, batch_size=3, seed=1, progress=False, **OPTS) == out
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (7, 6, 6, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1]  # balanced: i % num_classes
    assert not os.path.exists(out + ".parts")
    second = pipe(torch.tensor([3, 4, 0]), seed=batch_seed(1, 1), output="uint8", **OPTS)
    assert np.array_equal(images[3:6], second.numpy())
    with pytest.raises(FileExistsError):
        generate_to_npz(pipe, out, num_images=7, batch_size=3, seed=1, progress=False, **OPTS)

    # interrupted after two batches, then resumed: same file, finished batches not sampled again
    calls = []
    real = SelfGuidedPipeline.__call__

    def flaky(self, *a, **kw):
        calls.append(kw["seed"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(SelfGuidedPipeline, "__call__", flaky)
    resumed = str(tmp_path / "resumed.npz")
    with pytest.raises(KeyboardInterrupt):
        generate_to_npz(pipe, resumed, num_images=7, batch_size=3, seed=1, progress=False, **OPTS)
    assert sorted(os.listdir(resumed + ".parts")) == ["batch_000000.npz", "batch_000001.npz", "run.json"]
    with pytest.raises(ValueError, match="run.json: an interrupted run with other settings \\(seed\\)"):
        generate_to_npz(pipe, resumed, num_images=7, batch_size=3, seed=2, progress=False, **OPTS)
    calls.clear()
    generate_to_npz(pipe, resumed, num_images=7, batch_size=3, seed=1, progress=True, **OPTS)
    assert calls == [batch_seed(1, 2)]
    with np.load(resumed) as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["arr_1"], labels)


def _rank(rank, world, init_file, folders, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pipe = SelfGuidedPipeline.from_pretrained(*folders, device="cpu")
        generate_to_npz(pipe, out, num_images=7, batch_size=2, seed=3, class_ids=[4, 2, 0], progress=False, **OPTS)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_images_of_one(folders, tmp_path):
    two = str(tmp_path / "two.npz")
    mp.start_processes(_rank, args=(2, str(tmp_path / "pg"), folders, two), nprocs=2, join=True, start_method="fork")
    one = str(tmp_path / "one.npz")
    pipe = SelfGuidedPipeline.from_pretrained(*folders, device="cpu")
    generate_to_npz(pipe, one, num_images=7, batch_size=2, seed=3, class_ids=[4, 2, 0], progress=False, **OPTS)
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_1"].tolist() == [4, 2, 0, 4, 2, 0, 4]
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        assert len(np.unique(a["arr_0"].reshape(7, -1), axis=0)) == 7
