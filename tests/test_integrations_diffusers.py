"""FusedAmusedScheduler / FusedAmusedPipeline against diffusers' AmusedScheduler / AmusedPipeline.

Tiny randomly initialised UVit2DModel, VQModel and CLIP text encoder, a tokenizer built in tmp_path:
everything offline.
"""
from __future__ import annotations

import contextlib
import json
import string

import pytest
import torch
from helpers import chi_square_pvalue, has_cpu_kernel

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import sgkernels as sgk  # noqa: E402
from sgkernels.integrations.diffusers import FusedAmusedPipeline, FusedAmusedScheduler, GuidedLogits  # noqa: E402

CODEBOOK, MASK = 8, 31


@pytest.fixture(autouse=True)
def _backend():
    ctx = contextlib.nullcontext() if has_cpu_kernel("guided_sample") else sgk.use_backend("torch")
    with ctx:
        yield


@pytest.fixture
def components(tmp_path):
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    transformer = UVit2DModel(
        hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2,
        micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=32, codebook_size=CODEBOOK, in_channels=8,
        block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1,
        num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0, intermediate_size=8,
        layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=4,
    ).eval()
    vqvae = VQModel(
        act_fn="silu", block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], in_channels=3,
        latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=CODEBOOK, out_channels=3,
        sample_size=8, up_block_types=["UpDecoderBlock2D"], mid_block_add_attention=False,
        lookup_from_codebook=True,
    ).eval()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"), model_max_length=8)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=8, layer_norm_eps=1e-5,
        num_attention_heads=1, num_hidden_layers=1, vocab_size=64, projection_dim=8, max_position_embeddings=8,
    )).eval()
    return dict(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                scheduler=AmusedScheduler(mask_token_id=MASK))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- pipeline


def test_pipeline_end_to_end(components):
    from diffusers import AmusedPipeline

    pipe = AmusedPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FusedAmusedScheduler.from_config(pipe.scheduler.config)
    out = pipe("a cat", num_inference_steps=4, height=8, width=8, output_type="np", generator=_gen()).images
    assert out.shape == (1, 8, 8, 3) and (out >= 0).all() and (out <= 1).all()
    again = pipe("a cat", num_inference_steps=4, height=8, width=8, output_type="np", generator=_gen()).images
    assert (out == again).all()  # reproducible under a generator

    fused = FusedAmusedPipeline(**components)
    fused.set_progress_bar_config(disable=True)
    assert isinstance(fused.scheduler, FusedAmusedScheduler)
    images = fused(["a cat", "a dog"], num_inference_steps=4, height=8, width=8, generator=_gen()).images
    assert len(images) == 2 and images[0].size == (8, 8)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_fused_cfg_matches_materialised_blend(components, guidance_scale, monkeypatch):
    """FusedAmusedPipeline (blend inside the op) == AmusedPipeline + FusedAmusedScheduler (blend tensor)."""
    from diffusers import AmusedPipeline

    plain = AmusedPipeline(**components)
    plain.scheduler = FusedAmusedScheduler.from_config(plain.scheduler.config)
    fused = FusedAmusedPipeline(**components)
    for p in (plain, fused):
        p.set_progress_bar_config(disable=True)
    seen = []
    step = FusedAmusedScheduler.step

    def spy(self, model_output, *args, **kwargs):
        seen.append(type(model_output))
        return step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(FusedAmusedScheduler, "step", spy)
    kw = dict(num_inference_steps=6, height=8, width=8, guidance_scale=guidance_scale, output_type="latent")
    a = plain(["a cat", "a dog"], generator=_gen(3), **kw).images
    n_plain = len(seen)
    b = fused(["a cat", "a dog"], generator=_gen(3), **kw).images
    assert torch.equal(a, b)
    expected = GuidedLogits if guidance_scale > 1 else torch.Tensor
    assert all(t is torch.Tensor or t is torch.nn.Parameter for t in seen[:n_plain])
    assert all(issubclass(t, expected) for t in seen[n_plain:]) and len(seen) == 2 * n_plain
    assert not fused.transformer._forward_hooks  # the hook is removed after the call


# ------------------------------------------------------------------------------ scheduler, greedy


def _near_greedy_logits(batch, n_tok, seed, layout):
    """Rows whose top token wins with probability >= 1 - e^-6 and whose top probabilities all differ."""
    gen = _gen(seed)
    logits = torch.full((batch, n_tok, CODEBOOK), -torch.inf)
    top = torch.randint(0, CODEBOOK, (batch, n_tok), generator=gen)
    runner_up = (top + 1) % CODEBOOK
    gaps = torch.stack([6 + 6 * torch.randperm(n_tok, generator=gen) / n_tok for _ in range(batch)])
    logits.scatter_(-1, top[..., None], gaps[..., None])
    logits.scatter_(-1, runner_up[..., None], 0.0)
    if layout == "2d":
        side = int(n_tok**0.5)
        logits = logits.permute(0, 2, 1).reshape(batch, CODEBOOK, side, side)
    return logits, top


@pytest.mark.parametrize("layout", ["2d", "seq"])
@pytest.mark.parametrize("schedule,starting_mask_ratio", [("cosine", 1.0), ("linear", 1.0), ("cosine", 0.7)])
def test_zero_temperature_step_matches_reference_exactly(layout, schedule, starting_mask_ratio):
    from diffusers import AmusedScheduler

    ref = AmusedScheduler(mask_token_id=MASK, masking_schedule=schedule)
    ours = FusedAmusedScheduler.from_config(ref.config)
    steps, batch, n_tok = 6, 3, 36
    for s in (ref, ours):
        s.set_timesteps(steps, temperature=(0, 0))
    for k, timestep in enumerate(ref.timesteps):
        logits, top = _near_greedy_logits(batch, n_tok, seed=k, layout=layout)
        sample = torch.where(torch.rand(batch, n_tok, generator=_gen(100 + k)) < 0.8, MASK, top)
        sample[0, :] = MASK
        if layout == "2d":
            sample = sample.reshape(batch, 6, 6)
        a = ref.step(logits, timestep, sample, starting_mask_ratio=starting_mask_ratio, generator=_gen(k))
        b = ours.step(logits, timestep, sample, starting_mask_ratio=starting_mask_ratio, generator=_gen(k))
        assert (a.pred_original_sample.reshape(batch, -1) == torch.where(sample.reshape(batch, -1) == MASK, top,
                                                                         sample.reshape(batch, -1))).all()
        assert b.prev_sample.shape == sample.shape and b.pred_original_sample.shape == sample.shape
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=0, atol=0)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=0)
    tup = ours.step(logits, ref.timesteps[0], sample, return_dict=False, generator=_gen())
    assert isinstance(tup, tuple) and len(tup) == 2


# ------------------------------------------------------------------------- scheduler, statistical


def test_sampled_step_matches_reference_in_distribution():
    """Many rows with the same model_output: tokens ~ softmax exactly; remask count exact; remask positions
    and the joint (position, token, re-masked) frequencies agree with diffusers' in distribution."""
    from diffusers import AmusedScheduler

    from scipy.stats import chi2_contingency

    n_tok, reps = 12, 6000
    gen = _gen(7)
    row_logits = torch.randn(n_tok, CODEBOOK, generator=gen) * 1.5
    row_sample = torch.where(torch.rand(n_tok, generator=gen) < 0.75, MASK, 0)
    row_sample[:3] = MASK
    logits = row_logits.expand(reps, n_tok, CODEBOOK)
    sample = row_sample.expand(reps, n_tok).contiguous()
    ref = AmusedScheduler(mask_token_id=MASK)
    ours = FusedAmusedScheduler.from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(8, temperature=(3, 0))
    t = ref.timesteps[1]  # choice temperature 3 * (1 - 1/7)
    a = ref.step(logits, t, sample, generator=_gen(1))
    b = ours.step(logits, t, sample, generator=_gen(2))
    unknown = row_sample == MASK
    # tokens: exact softmax at every masked position
    probs = torch.softmax(row_logits, -1)
    for pos in torch.nonzero(unknown).flatten().tolist():
        counts = torch.bincount(b.pred_original_sample[:, pos], minlength=CODEBOOK)
        assert chi_square_pvalue(counts, probs[pos]) > 1e-4
    assert (b.pred_original_sample[:, ~unknown] == sample[:, ~unknown]).all()
    # remask count: exact, per row
    ra, rb = a.prev_sample == MASK, b.prev_sample == MASK
    torch.testing.assert_close(rb.sum(-1), ra.sum(-1), rtol=0, atol=0)
    assert not rb[:, ~unknown].any()
    # remask positions, and the joint (position, token, remasked)
    table = torch.stack([ra.sum(0), rb.sum(0)])[:, unknown].double()
    assert chi2_contingency(table.numpy())[1] > 1e-4
    cells_a = (torch.arange(n_tok) * CODEBOOK + a.pred_original_sample) * 2 + ra
    cells_b = (torch.arange(n_tok) * CODEBOOK + b.pred_original_sample) * 2 + rb
    ca = torch.bincount(cells_a[:, unknown].flatten(), minlength=n_tok * CODEBOOK * 2)
    cb = torch.bincount(cells_b[:, unknown].flatten(), minlength=n_tok * CODEBOOK * 2)
    keep = (ca + cb) >= 20
    joint = torch.stack([torch.cat([ca[keep], ca[~keep].sum(0, keepdim=True)]),
                         torch.cat([cb[keep], cb[~keep].sum(0, keepdim=True)])]).double()
    assert chi2_contingency(joint.numpy())[1] > 1e-4


def test_generator_reproducible_and_mask_len():
    sched = FusedAmusedScheduler(mask_token_id=MASK)
    sched.set_timesteps(4)
    logits = torch.randn(2, 16, CODEBOOK, generator=_gen())
    sample = torch.full((2, 16), MASK)
    a = sched.step(logits, sched.timesteps[0], sample, generator=_gen(5))
    b = sched.step(logits, sched.timesteps[0], sample, generator=_gen(5))
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.pred_original_sample, b.pred_original_sample)
    # step 0 of 4, cosine: floor(16 * cos(pi/8)) = 14 re-masked per row
    assert ((a.prev_sample == MASK).sum(-1) == 14).all()
    last = sched.step(logits, sched.timesteps[-1], sample, generator=_gen(5))  # timestep 0: nothing re-masked
    assert not (last.prev_sample == MASK).any()


def test_step_bad_arguments():
    sched = FusedAmusedScheduler(mask_token_id=MASK)
    logits = torch.randn(1, 4, CODEBOOK)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(logits, 0, torch.full((1, 4), MASK))
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(logits, 17, torch.full((1, 4), MASK))
    with pytest.raises(ValueError, match="both"):
        sched.step(logits, 0, torch.full((1, 4), MASK), uncond_logits=logits)


def test_step_accepts_float64_model_output():
    """diffusers' AmusedScheduler takes float64 logits; so does the fused step (sampled in float32)."""
    from diffusers import AmusedScheduler

    ref = AmusedScheduler(mask_token_id=MASK)
    ours = FusedAmusedScheduler.from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(4, temperature=(0, 0))
    logits, top = _near_greedy_logits(2, 16, seed=3, layout="seq")
    sample = torch.full((2, 16), MASK)
    t = ref.timesteps[0]
    a = ref.step(logits.double(), t, sample, generator=_gen(0))
    b = ours.step(logits.double(), t, sample, generator=_gen(0))
    f = ours.step(logits, t, sample, generator=_gen(0))
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=0, atol=0)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=0)
    assert torch.equal(b.prev_sample, f.prev_sample)
    finite = logits.clamp_min(-30.0).double()
    guided = ours.step(finite, t, sample, generator=_gen(0), uncond_logits=finite, guidance_scale=2.0)
    assert torch.equal(guided.pred_original_sample, b.pred_original_sample)  # uncond == cond: the blend is cond
