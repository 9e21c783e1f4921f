"""The paper's model at its real size (issue 25, part B), tested on tiny configs: the official-style
anchor (``generate_sg`` + ``decode_code``) against our modules, the guide pass's cuts against the
previous formulas (the same tokens for fixed seeds), and the ``paper_realsize`` row's structure.
The real size itself is the slow tier's (tests/conftest.py SLOW_TESTS)."""
from __future__ import annotations

import os

import pytest
import torch

import sgkernels as sgk
from official_folders import transformer_config, vqgan_config, vqgan_state_dict, write_folder
from sgkernels.bench import anchors
from sgkernels.bench.ops import paper_realsize
from sgkernels.models import MaskGitVQGAN, toast_from_open_muse, transformer_from_open_muse
from sgkernels.models.toast import TOAST
from sgkernels.nn.attention import SelfAttention, attention
from test_models import NF, open_muse_state_dict, random_tokens, tiny

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


def tiny_models(seed=0):
    cfg = tiny(dropout=0.0, attention_dropout=0.0)
    sd = open_muse_state_dict(cfg, NF, seed=seed)
    return transformer_from_open_muse(sd, cfg).eval(), toast_from_open_muse(sd, cfg).eval()


def tiny_writer(root, seed=0):
    cfg = tiny()
    write_folder(f"{root}/transformer", transformer_config(cfg, NF), open_muse_state_dict(cfg, NF, seed=seed))
    c = vqgan_config(num_embeddings=cfg.codebook_size)
    write_folder(f"{root}/vae", c, vqgan_state_dict(c, seed=seed))


# --- the official-style anchor -------------------------------------------------------------------

def test_official_passes_equal_our_modules():
    """official_forward / official_toast_forward compute what our model and guide compute, on every
    position and the full vocabulary (the class row and the non-codebook columns are extra)."""
    model, guide = tiny_models()
    cfg = model.config
    tok, labels = random_tokens(cfg, 3, seed=2), torch.tensor([0, 2, 4])
    ids = torch.cat([(labels + cfg.codebook_size)[:, None], tok], 1)
    with torch.no_grad():
        logits, hidden = anchors.official_forward(model, ids)
        ours = model(tok, labels, return_hidden=True)
        assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
        torch.testing.assert_close(logits[:, 1:, :cfg.codebook_size], ours.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, ours.hidden_states, rtol=1e-5, atol=1e-5)
        smooth = anchors.official_toast_forward(model, guide, ids, hidden)
        torch.testing.assert_close(smooth[:, 1:, :cfg.codebook_size], guide(model, hidden, labels),
                                   rtol=1e-5, atol=1e-5)


def test_official_decode_code_equals_our_decode(tmp_path):
    c = vqgan_config()
    vq = MaskGitVQGAN.from_pretrained(write_folder(tmp_path, c, vqgan_state_dict(c)))
    tok = torch.randint(0, c["num_embeddings"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official = anchors.official_decode_code(vq, tok)
    assert official.shape == (2, 3, 6, 6) and (official.min() < 0 or official.max() > 1)  # not clamped
    torch.testing.assert_close(official.clamp(0, 1), vq.decode(tok), rtol=1e-5, atol=1e-5)


def test_official_generate_sg_fills_every_position():
    model, guide = tiny_models()
    labels = torch.tensor([1, 3])
    before = labels.clone()
    tokens = anchors.official_generate_sg(model, guide, labels, steps=4, guidance_scale=1.0, choice_temperature=2.0)
    assert tokens.shape == (2, model.config.num_tokens) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < model.config.codebook_size)).all()
    assert torch.equal(labels, before)  # the official code shifts class_ids in place; the anchor does not


# --- the guide pass's cuts: the same tokens as the previous formulas ------------------------------

def _previous_attention(self, h, value_feedback=None, *, dropout=True):
    """SelfAttention.forward before issue 25: value(h) + value(f), two GEMMs, every row of h its own."""
    b, t, _ = h.shape
    shape = (b, t, self.heads, self.width // self.heads)
    q, k, v = self.query(h).view(shape), self.key(h).view(shape), self.value(h)
    if value_feedback is not None:
        v = v + self.value(value_feedback)
    return self.out(attention(q, k, v.view(shape)).reshape(b, t, self.width))


def test_value_feedback_is_one_gemm_with_the_bias_twice():
    torch.manual_seed(0)
    att = SelfAttention(16, 2).eval()
    torch.nn.init.normal_(att.value.bias)
    h, f = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    torch.testing.assert_close(att(h, f), _previous_attention(att, h, f), rtol=1e-6, atol=1e-6)
    # a blank canvas of batch 1 against per-image feedback: broadcast, as if repeated
    torch.testing.assert_close(att(h[:1], f), att(h[:1].expand(3, 5, 16).contiguous(), f), rtol=0, atol=0)
    assert att(h[:1], f).shape == (3, 5, 16)


def test_guide_pass_embeds_the_blank_canvas_once(monkeypatch):
    """At inference pass 2 runs on a batch-1 canvas (broadcast from layer 0's values on); with
    per-layer outputs or dropout it runs per image, as before."""
    model, guide = tiny_models()
    labels = torch.tensor([1, 3, 4])
    seen = []
    monkeypatch.setattr(type(model), "embed", lambda self, ids, dropout=True, _f=type(model).embed:
                        seen.append(ids.shape[0]) or _f(self, ids, dropout=dropout))
    with torch.no_grad():
        hidden = model(random_tokens(model.config, 3), labels, return_hidden=True).hidden_states
        shared = guide(model, hidden, labels)
        per_image = guide(model, hidden, labels, return_layers=True).logits
    assert seen == [3, 1, 3]
    torch.testing.assert_close(shared, per_image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_sampler_tokens_equal_the_previous_passes(monkeypatch, cfg_scale):
    """Seeded float32 sampling gives the same tokens with the cuts as with the previous formulas
    (value(h) + value(f), the canvas per image)."""
    model, guide = tiny_models(seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(steps=6, guidance_scale=1.0, choice_temperature=4.5, cfg_scale=cfg_scale)
    now = [sgk.SelfGuidedSampler(model, guide, **kw)(labels, seed=s) for s in range(4)]
    monkeypatch.setattr(SelfAttention, "forward", _previous_attention)
    real_forward = TOAST.forward
    monkeypatch.setattr(TOAST, "forward", lambda self, backbone, hidden, labels, **k:
                        _per_image_canvas(real_forward, self, backbone, hidden, labels, **k))
    before = [sgk.SelfGuidedSampler(model, guide, **kw)(labels, seed=s) for s in range(4)]
    for a, b in zip(now, before):
        assert torch.equal(a, b)


def _per_image_canvas(real_forward, self, backbone, hidden, labels, *, with_head=True, dropout=True, **kw):
    """TOAST.forward with pass 2 on a canvas per image (return_layers=True takes that path)."""
    out = real_forward(self, backbone, hidden, labels, return_layers=True, with_head=with_head, dropout=dropout)
    return out.logits if with_head else out


# --- the row ----------------------------------------------------------------------------------------

def test_paper_realsize_row_structure(monkeypatch):
    """The row's code path on a tiny config, float32 only: our row and the official row per dtype, ms
    per image, peak memory; the warm-up and the timed rounds as documented."""
    monkeypatch.setattr(paper_realsize, "variants",
                        lambda root, device: [("float32", "sgkernels", paper_realsize.load(root, device), {})])
    rows = paper_realsize.run("cpu", quick=True, writer=tiny_writer, batch=2, steps=2)
    assert [(r["dtype"], r["impl"]) for r in rows] == [("float32", "sgkernels"), ("float32", paper_realsize.OFFICIAL)]
    assert all(r["op"] == "paper_realsize" and r["ms"] > 0 and "B=2 T=2" in r["shape"] for r in rows)
    assert all({"spread", "peak_mb"} <= set(r) for r in rows)


# --- the decode: the same images whatever the number of threads ---------------------------------------

@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_decode_does_not_depend_on_the_thread_count(tmp_path, restore_threads):
    """1, 2 and 3 threads (torchrun gives each process 1; one process uses every core) decode to the
    same bits: NCHW GroupNorm, 1x1 convolutions as matmuls, a power-of-two thread count."""
    c = vqgan_config(resolution=64, hidden_channels=32, channel_mult=[1, 2], z_channels=8)
    vq = MaskGitVQGAN.from_pretrained(write_folder(tmp_path, c, vqgan_state_dict(c)))
    tok = torch.randint(0, c["num_embeddings"], (2, 32 * 32), generator=torch.Generator().manual_seed(0))
    images = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        images.append(vq.decode(tok))
        assert torch.get_num_threads() == n  # restored
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


# --- the CLI on a machine with too little memory ---------------------------------------------------------

def test_generate_refuses_a_batch_that_does_not_fit_in_memory(tmp_path, capsys, monkeypatch):
    """``--batch-size 64`` (the default) of the paper's model needs a few GB on a CPU: with less memory
    available, one line saying how much and which --batch-size fits, before anything is written."""
    from sgkernels import _cli, cli
    from sgkernels.pipeline import SelfGuidedPipeline
    from test_pipeline import make_folders

    model, vae = make_folders(tmp_path / "ckpt")
    pipe = SelfGuidedPipeline.from_pretrained(model, vae, device="cpu")
    monkeypatch.setattr(_cli, "available_memory", lambda: pipe.memory_needed(5))
    out = tmp_path / "s.npz"
    argv = ["generate", "--model", model, "--vae", vae, "--count", "64", "--steps", "2", "--no-progress",
            "--out-npz", out]
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    gib = pipe.memory_needed(64) / 2**30
    assert err[0] == (f"sgkernels: error: --batch-size 64: about {gib:.1f} GiB of memory needed, "
                      f"{pipe.memory_needed(5) / 2**30:.1f} GiB available; use --batch-size 4 or less")
    assert not out.exists() and not os.path.exists(f"{out}.parts")
    assert cli.main([str(a) for a in argv[:-2] + ["--batch-size", "4", "--count", "4", "--out-npz", out]]) == 0


def test_memory_needed_of_the_paper_model():
    """The estimate at the paper's size (float32): ~35 MB per image of sampling, ~336 MB per decoded
    image, 8 decoded at a time; bfloat16 halves it."""
    cfg = sgk.MaskTransformerConfig.maskgit_256()
    with torch.device("meta"):
        pipe = sgk.SelfGuidedPipeline.__new__(sgk.SelfGuidedPipeline)
        pipe.model, pipe.guide, pipe.vqgan = sgk.MaskTransformer(cfg), None, MaskGitVQGAN()
    need = pipe.memory_needed(64)
    assert 4.5e9 < need < 5.5e9 and 0.3e9 < pipe.memory_needed(1) < 0.45e9
    pipe.model.to(torch.bfloat16), pipe.vqgan.to(torch.bfloat16)
    assert pipe.memory_needed(64) < 0.55 * need


# --- the real size (slow tier) ------------------------------------------------------------------------

def test_real_size_tokens_equal_the_previous_passes(tmp_path, monkeypatch):
    """The paper's model at its real size (seeded random weights in the official layout): the guide
    pass's cuts give the same tokens as the previous formulas (2 steps, 2 images, float32)."""
    from sgkernels.bench.official_folders import write_paper_folders

    t, v = write_paper_folders(tmp_path, seed=0)
    model, guide = sgk.models.from_pretrained(t)
    labels = torch.tensor([207, 360])
    kw = dict(steps=2, guidance_scale=1.0, choice_temperature=25.0)
    now = sgk.SelfGuidedSampler(model, guide, **kw)(labels, seed=3)
    monkeypatch.setattr(SelfAttention, "forward", _previous_attention)
    real_forward = TOAST.forward
    monkeypatch.setattr(TOAST, "forward", lambda self, backbone, hidden, labels, **k:
                        _per_image_canvas(real_forward, self, backbone, hidden, labels, **k))
    assert torch.equal(now, sgk.SelfGuidedSampler(model, guide, **kw)(labels, seed=3))
