"""SelfGuidedSampler on tiny models (CPU), plus one 2-step run at the MaskGIT-256 shape."""
import time

import pytest
import torch

import sgkernels as sgk
from sgkernels import sampler as sampler_module
from sgkernels.models import TOAST, MaskTransformer, MaskTransformerConfig
from sgkernels.sampler import SelfGuidedSampler

TINY = dict(codebook_size=16, num_classes=5, grid_size=4, width=32, depth=2, heads=4, mlp_dim=48)


@pytest.fixture(autouse=True)
def _sampling_backend():
    """The fused C++ CPU kernel when this build has it, else the PyTorch reference (same semantics)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("sgkernels::self_guided_step", "CPU"):
        yield
    else:
        with sgk.use_backend("torch"):
            yield


pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = MaskTransformerConfig(**TINY)
    model, guide = MaskTransformer(cfg), TOAST(cfg, num_factors=4)
    model.reset_parameters(std=0.3)  # peaked logits, and a guide that matters
    guide.reset_parameters(std=0.3)
    return model, guide


LABELS = torch.tensor([0, 3, 4])


def test_tokens_and_determinism(tiny):
    model, guide = tiny
    s = SelfGuidedSampler(model, guide, steps=5)
    a = s(LABELS, seed=7)
    assert a.shape == (3, 16) and a.dtype == torch.int64
    assert ((a >= 0) & (a < 16)).all()
    assert torch.equal(a, s(LABELS, seed=7))
    assert not torch.equal(a, s(LABELS, seed=8))
    torch.manual_seed(123)
    b = s(LABELS)
    torch.manual_seed(123)
    assert torch.equal(b, s(LABELS))


def test_guidance_zero_is_plain_maskgit(tiny):
    model, guide = tiny
    plain = SelfGuidedSampler(model, None, steps=6, choice_temperature=4.5)
    zero = SelfGuidedSampler(model, guide, steps=6, guidance_scale=0.0, choice_temperature=4.5)
    assert plain.passes_per_step == zero.passes_per_step == 1
    assert torch.equal(plain(LABELS, seed=3), zero(LABELS, seed=3))
    guided = SelfGuidedSampler(model, guide, steps=6, guidance_scale=3.0, choice_temperature=4.5)
    assert guided.passes_per_step == 2
    assert not torch.equal(plain(LABELS, seed=3), guided(LABELS, seed=3))


@pytest.mark.parametrize("preset", ["maskgit", "unlockmgm"])
@pytest.mark.parametrize("steps", [1, 4, 9])
def test_masked_count_follows_schedule(tiny, steps, preset):
    model, guide = tiny
    seen = []
    s = SelfGuidedSampler(model, guide, steps=steps, preset=preset)
    out = s(LABELS, seed=0, callback=lambda k, tok, m: seen.append((k, tok.clone(), m.clone())))
    n, masked = 16, torch.full((3,), 16)
    rules = dict(rounding="float32", at_least_one=True) if preset == "unlockmgm" else {}
    assert [k for k, _, _ in seen] == list(range(steps))
    for k, tok, m in seen:
        masked = sgk.mask_len(k, steps, n, masked, **rules)
        assert torch.equal(m.sum(1), masked)
        assert torch.equal(tok == model.config.mask_token_id, m)
    assert int(masked.sum()) == 0
    assert torch.equal(seen[-1][1], out)


def test_one_fused_step_per_iteration(tiny, monkeypatch):
    model, guide = tiny
    calls = []
    real = sampler_module.self_guided_step

    def spy(tokens, is_masked, logits, guide_logits, n, **kw):
        calls.append((logits.shape, guide_logits is not None, kw))
        return real(tokens, is_masked, logits, guide_logits, n, **kw)

    monkeypatch.setattr(sampler_module, "self_guided_step", spy)
    s = SelfGuidedSampler(model, guide, steps=4, choice_temperature=10.0, temperature_decay="compound",
                          guidance_scale=1.5, temperature=0.7, fused_head=False)
    s(LABELS, seed=11)
    assert len(calls) == 4
    for k, (shape, has_guide, kw) in enumerate(calls):
        assert shape == (3, 16, 16) and has_guide
        assert kw["offset"] == k and kw["seed"] == 11
        assert kw["guidance_scale"] == 1.5 and kw["temperature"] == 0.7
        assert kw["choice_temperature"] == pytest.approx(sgk.choice_temperature(k, 4, 10.0, "compound"))


# ------------------------------------------------------------------------------------------------
# Presets: "unlockmgm" against an independent reimplementation of the official generate_sg rules


def official_rules_generate(model, guide, labels, *, steps, guidance_scale, tau0, seed):
    """The official UnlockMGM ``generate_sg`` loop (muse/modeling_transformer_toast.py), written out
    here independently: argmax tokens (the official draws them with torch.multinomial), and the
    confidence noise taken from sgkernels' stream (position b * N + n, offset = step) in place of
    torch's uniform. Float32 schedule, at least one re-mask, decoded positions at log(float32 max),
    ``conf < sort(conf)[mask_len]``, compounded tau; returns the last step's sampled ids."""
    from sgkernels import _rng

    cfg = model.config
    b, n = labels.shape[0], cfg.num_tokens
    ids = torch.full((b, n), cfg.mask_token_id, dtype=torch.int64)
    tau = tau0
    for step in range(steps):
        out = model(ids, labels, return_hidden=True)
        logits = out.logits
        if guidance_scale != 0:
            smooth = guide(model, out.hidden_states, labels)
            logits = smooth + (1 + guidance_scale) * (logits - smooth)
        unknown = ids == cfg.mask_token_id
        sampled = torch.where(unknown, logits.argmax(-1), ids)
        ratio = 1.0 * (step + 1) / steps
        mask_ratio = torch.cos(torch.tensor(ratio) * torch.pi * 0.5)
        probs = logits.softmax(dim=-1).gather(-1, sampled[..., None]).squeeze(-1)
        probs = torch.where(unknown, probs, torch.finfo(probs.dtype).max)
        mask_len = (n * mask_ratio).floor().unsqueeze(0)
        mask_len = torch.max(torch.tensor([1]), torch.min(unknown.sum(dim=-1, keepdim=True) - 1, mask_len))
        tau = tau * (1.0 - ratio)
        _, _, w2, w3 = _rng.row_words(seed, step, torch.arange(b * n))
        conf = torch.log(probs.clamp(min=1e-20)) + tau * _rng.gumbel(w2, w3).reshape(b, n)
        cut = torch.gather(torch.sort(conf, dim=-1).values, 1, mask_len.long())
        ids = torch.where(conf < cut, cfg.mask_token_id, sampled)
    return sampled


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_unlockmgm_preset_matches_official_rules(tiny, guidance_scale):
    """Argmax tokens: the default preset gives the official loop's tokens, decoded positions come
    back along the way (a large tau0 so that they do on 16 positions), and "maskgit" differs."""
    TAU0 = 100.0
    model, guide = tiny
    model.eval()
    guide.eval()
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    remasked_decoded = 0
    for seed in range(4):
        prev = []

        def count(k, tok, m):
            nonlocal remasked_decoded
            if prev:
                remasked_decoded += int((m & ~prev[-1]).sum())
            prev.append(m.clone())

        s = SelfGuidedSampler(model, guide, steps=8, guidance_scale=guidance_scale, choice_temperature=TAU0,
                              temperature=0.0)
        with torch.no_grad():
            want = official_rules_generate(model, guide, labels, steps=8, guidance_scale=guidance_scale, tau0=TAU0,
                                           seed=seed)
        got = s(labels, seed=seed, callback=count)
        assert torch.equal(got, want), (seed, (got != want).sum())
    assert remasked_decoded > 0, "no decoded position was re-masked: rule 3 untested"
    maskgit = SelfGuidedSampler(model, guide, steps=8, guidance_scale=guidance_scale, choice_temperature=TAU0,
                                temperature=0.0, preset="maskgit")
    assert not torch.equal(maskgit(labels, seed=0), official_rules_generate(
        model, guide, labels, steps=8, guidance_scale=guidance_scale, tau0=TAU0, seed=0))


def test_preset_fields_and_overrides(tiny):
    model, guide = tiny
    s = SelfGuidedSampler(model, guide)
    assert (s.preset, s.temperature_decay, s.mask_rounding, s.at_least_one, s.tie_rule) == (
        "unlockmgm", "compound", "float32", True, "strict_below")
    assert s.decoded_confidence == pytest.approx(88.72283935546875, abs=0)
    m = SelfGuidedSampler(model, guide, preset="maskgit")
    assert (m.temperature_decay, m.mask_rounding, m.at_least_one, m.decoded_confidence, m.tie_rule) == (
        "maskgit", "float64", False, None, "exact_k")
    o = SelfGuidedSampler(model, guide, temperature_decay="maskgit", decoded_confidence=None)
    assert (o.temperature_decay, o.decoded_confidence, o.tie_rule) == ("maskgit", None, "strict_below")
    with pytest.raises(ValueError, match="preset"):
        SelfGuidedSampler(model, guide, preset="muse")
    with pytest.raises(ValueError, match="preset"):  # issue 22: was "TypeError: unhashable type"
        SelfGuidedSampler(model, guide, preset=["maskgit"])
    with pytest.raises(ValueError, match="tie_rule"):
        SelfGuidedSampler(model, guide, tie_rule="lowest")
    with pytest.raises(ValueError, match="mask_rounding"):
        SelfGuidedSampler(model, guide, mask_rounding="bf16")
    with pytest.raises(TypeError, match="at_least_one"):
        SelfGuidedSampler(model, guide, at_least_one=1)


def test_step_logits(tiny):
    """The passes of a step: l_base, l_smooth from pass 1's hidden states, and CFG's combination."""
    model, guide = tiny
    model.eval()
    tok = torch.full((3, 16), model.config.mask_token_id)
    tok[:, ::3] = 5
    s = SelfGuidedSampler(model, guide, cfg_scale=2.0)
    with torch.no_grad():
        logits, smooth = s._logits(tok, LABELS)
        out = model(tok, LABELS, return_hidden=True)
        uncond = model(tok, torch.full_like(LABELS, -1))
        torch.testing.assert_close(logits, uncond + 3.0 * (out.logits - uncond), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(smooth, guide(model, out.hidden_states, LABELS), rtol=1e-4, atol=1e-4)
    assert s.passes_per_step == 3
    a = s(LABELS, seed=2)
    assert not torch.equal(a, SelfGuidedSampler(model, guide)(LABELS, seed=2))


def test_modes_restored_and_progress(tiny):
    model, guide = tiny
    model.train()
    guide.train()
    SelfGuidedSampler(model, guide, steps=2)(LABELS, seed=0, progress=True)
    assert model.training and guide.training
    model.eval()
    guide.eval()


@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_step_with_grad_enabled(tiny, fused_head, cfg_scale):
    """step() outside torch.no_grad(), parameters requiring grad (issue 22: a shape error, TOAST's
    grad path ignored with_head=False): the tokens of the no_grad call, and no graph."""
    model, guide = tiny
    s = SelfGuidedSampler(model, guide, steps=4, cfg_scale=cfg_scale, fused_head=fused_head)
    tok = torch.full((3, 16), model.config.mask_token_id)
    tok[:, ::3] = 5
    masked = tok == model.config.mask_token_id
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    out = s.step(tok, masked, LABELS, 1, 7)
    with torch.no_grad():
        ref = s.step(tok, masked, LABELS, 1, 7)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and not any(o.requires_grad for o in out)


def test_sampling_never_changes_the_modules_modes(tiny):
    """Sampling a model in training mode: the mode is never changed (not even during the loop:
    another thread may be training it) and dropout is off: the tokens of the model in eval mode."""
    model, guide = tiny
    cfg = MaskTransformerConfig(**{**TINY, "dropout": 0.5, "attention_dropout": 0.5})
    m, g = MaskTransformer(cfg).eval(), TOAST(cfg, num_factors=4).eval()
    m.load_state_dict(model.state_dict())
    g.load_state_dict(guide.state_dict())
    s = SelfGuidedSampler(m, g, steps=4)
    ref = s(LABELS, seed=3)
    m.train(), g.train()
    seen = []
    out = s(LABELS, seed=3, callback=lambda *_: seen.append((m.training, g.training)))
    assert seen == [(True, True)] * 4 and torch.equal(out, ref)


def test_threads_sharing_a_model_in_training_mode(tiny):
    """Two threads sample with one model in training mode (dropout 0.5), interleaved by events so
    that thread A finishes while thread B is mid-loop (issue 22: A restored train() under B, whose
    remaining steps then ran with dropout). Both get the single-threaded tokens."""
    import threading

    model, guide = tiny
    cfg = MaskTransformerConfig(**{**TINY, "dropout": 0.5, "attention_dropout": 0.5})
    m, g = MaskTransformer(cfg).eval(), TOAST(cfg, num_factors=4).eval()
    m.load_state_dict(model.state_dict())
    g.load_state_dict(guide.state_dict())
    ref = {k: SelfGuidedSampler(m, g, steps=4)(LABELS, seed=k) for k in (1, 2)}
    m.train(), g.train()
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    out, errors = {}, []

    def a_cb(step, *_):
        if step == 0:
            a_in.set()
            assert b_in.wait(60)

    def b_cb(step, *_):
        if step == 0:
            b_in.set()
            assert a_done.wait(60)

    def run(k, cb, start=None, done=None):
        try:
            if start is not None:
                assert start.wait(60)
            out[k] = SelfGuidedSampler(m, g, steps=4)(LABELS, seed=k, callback=cb)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            if done is not None:
                done.set()

    threads = [threading.Thread(target=run, args=(1, a_cb, None, a_done)),
               threading.Thread(target=run, args=(2, b_cb, a_in))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    assert m.training and g.training


def test_bad_input(tiny):
    model, guide = tiny
    s = SelfGuidedSampler(model, guide, steps=2)
    with pytest.raises(ValueError, match=r"class_labels: expected values in \[0, 5\), got \[5\]"):
        s(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="class_labels"):
        s(torch.tensor([-1]))
    with pytest.raises(TypeError, match="class_labels"):
        s(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="class_labels"):
        s(torch.tensor([[0]]))
    for steps in (0, -3, 2.0):
        with pytest.raises(ValueError, match="steps"):
            SelfGuidedSampler(model, guide, steps=steps)
    other = TOAST(MaskTransformerConfig(**{**TINY, "width": 16, "heads": 2}))
    with pytest.raises(ValueError, match="another backbone.*width"):
        SelfGuidedSampler(model, other)
    with pytest.raises(ValueError, match="temperature_decay"):
        SelfGuidedSampler(model, guide, temperature_decay="linear")
    with pytest.raises(ValueError, match="choice_temperature"):
        SelfGuidedSampler(model, guide, choice_temperature=-1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        SelfGuidedSampler(model, guide, guidance_scale=float("nan"))
    with pytest.raises(TypeError, match="model"):
        SelfGuidedSampler(guide)
    with pytest.raises(ValueError, match="cuda_graph"):
        SelfGuidedSampler(model, guide, cuda_graph=True)(LABELS)


def test_grid_size_mismatch(tiny):
    model, _ = tiny
    small = MaskTransformer(MaskTransformerConfig(**{**TINY, "grid_size": 3}))
    with pytest.raises(ValueError, match="grid 3x3"):
        small(torch.zeros(1, 16, dtype=torch.int64), torch.tensor([0]))
    # a guide only depends on width/depth/classes/codebook: it works for any grid
    guide = TOAST(small.config, num_factors=4)
    assert SelfGuidedSampler(small, guide, steps=2)(torch.tensor([1]), seed=0).shape == (1, 9)


def _fast_random_init(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Cheap random weights (trunc_normal_ over 216M parameters takes a minute on 2 busy cores)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias") or name.endswith("norm.bias"):
                p.zero_()
            else:
                p.uniform_(-0.035, 0.035, generator=gen)  # ~ std 0.02
        if hasattr(module, "selection"):
            module.selection.copy_(torch.eye(module.selection.shape[0]))


def test_maskgit_256_two_steps_cpu():
    cfg = MaskTransformerConfig.maskgit_256()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model, guide = MaskTransformer(cfg), TOAST(cfg)
    gen = torch.Generator().manual_seed(0)
    for m in (model, guide):
        m.to_empty(device="cpu")
        _fast_random_init(m, gen)
    s = SelfGuidedSampler(model, guide, steps=2)
    counts = []
    out = s(torch.tensor([207]), seed=0, callback=lambda k, t, m: counts.append(int(m.sum())))
    assert out.shape == (1, 256) and ((out >= 0) & (out < 1024)).all()
    assert counts == [sgk.mask_len(0, 2, 256, 256, rounding="float32", at_least_one=True), 0]
    print(f"MaskGIT-256, 2 guided steps, B=1, CPU: {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("cfg_scale,guidance_scale,temperature", [(0.0, 1.5, 1.0), (2.0, 1.0, 0.7), (0.0, 0.0, 1.0),
                                                                   (1.0, 2.0, 0.0)])
def test_fused_head_equals_logits_path(tiny, monkeypatch, cfg_scale, guidance_scale, temperature):
    """fused_head (head_sample on the masked rows, guide and CFG blended on the head's input features)
    gives the logits path's tokens: the same streams, logits equal up to float rounding."""
    model, guide = tiny
    calls = []
    real = sampler_module.head_sample

    def spy(base, weight, bias, g, **kw):
        calls.append((base.shape, g is not None, int(kw["rows"].sum())))
        return real(base, weight, bias, g, **kw)

    monkeypatch.setattr(sampler_module, "head_sample", spy)
    kw = dict(steps=5, guidance_scale=guidance_scale, cfg_scale=cfg_scale, temperature=temperature,
              choice_temperature=4.0)
    fused = SelfGuidedSampler(model, guide, **kw)(LABELS, seed=21)
    plain = SelfGuidedSampler(model, guide, fused_head=False, **kw)(LABELS, seed=21)
    assert torch.equal(fused, plain)
    assert len(calls) == 5 and calls[0] == ((3, 16, 32), guidance_scale != 0, 48)
    assert [c[2] for c in calls] == sorted((c[2] for c in calls), reverse=True)  # only masked rows
