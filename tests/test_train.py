"""sgkernels.training: the auxiliary-task corruption, the training loop, DDP, SIGKILL + resume, the CLI (tiny, CPU)."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import chi_square_pvalue
from sgkernels.models import TOAST, MaskTransformer, MaskTransformerConfig
from sgkernels.models.checkpoint import load_checkpoint, save_checkpoint
from sgkernels.sampler import SelfGuidedSampler
from sgkernels.training import (
    TokenDataset,
    TrainConfig,
    aux_loss,
    corrupt,
    latest_checkpoint,
    load_train_checkpoint,
    sample_error_tokens,
    train_guide,
)
from sgkernels.training.__main__ import main as cli_main
from sgkernels.training.checkpoints import step_dirs

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
TINY = dict(codebook_size=16, num_classes=5, grid_size=3, width=32, depth=2, heads=4, mlp_dim=48)
NF = 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> MaskTransformerConfig:
    return MaskTransformerConfig(**{**TINY, **kw})


def build(seed: int = 0, guide_seed: int | None = None, **kw):
    torch.manual_seed(seed)
    cfg = tiny(**kw)
    backbone = MaskTransformer(cfg).eval()
    if guide_seed is not None:
        torch.manual_seed(guide_seed)
    return backbone, TOAST(cfg, num_factors=NF)


def random_data(cfg, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.grid_hw
    return (torch.randint(0, cfg.codebook_size, (m, h, w), generator=g),
            torch.randint(0, cfg.num_classes, (m,), generator=g))


def fast_config(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=4, warmup_steps=0, lr=1e-3, save_every=1000, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ corruption
def test_corruption_mask_count_error_fraction_and_labels():
    backbone, _ = build(grid_size=4)
    cfg = backbone.config
    n, b = cfg.num_tokens, 4000
    tokens = torch.randint(0, cfg.codebook_size, (b, n), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, cfg.num_classes, (b,), generator=torch.Generator().manual_seed(2))
    c = corrupt(backbone, tokens, labels, generator=torch.Generator().manual_seed(3), sample_seed=4)

    # masked count = max(1, round(N cos(pi/2 u))), u ~ U(0, 1)
    expect = torch.round(n * c.mask_ratio.double()).long().clamp_min(1)
    assert torch.equal(c.is_masked.sum(1), expect)
    u = (2 / math.pi) * torch.acos(c.mask_ratio.double().clamp(0, 1))
    ks = (torch.sort(u).values - torch.arange(1, b + 1, dtype=torch.float64) / b).abs().max()
    assert ks < 1.63 / math.sqrt(b)  # Kolmogorov-Smirnov, alpha = 1%
    # ~30% of the still-visible tokens replaced
    visible = ~c.is_masked
    frac = (c.is_error & visible).sum() / visible.sum()
    assert abs(float(frac) - 0.3) < 0.015, frac
    assert not bool((c.is_error & c.is_masked).any())
    # the grid fed to the backbone, and labels only at the error positions
    mask_id = cfg.mask_token_id
    assert torch.equal(c.inputs[c.is_masked], torch.full_like(c.inputs[c.is_masked], mask_id))
    assert torch.equal(c.inputs[c.is_error], c.error_tokens[c.is_error])
    keep = visible & ~c.is_error
    assert torch.equal(c.inputs[keep], tokens[keep])
    assert torch.equal(c.targets != -100, c.is_error)
    assert torch.equal(c.targets[c.is_error], tokens[c.is_error])
    # reproducible from the generator and the sampling seed
    c2 = corrupt(backbone, tokens, labels, generator=torch.Generator().manual_seed(3), sample_seed=4)
    assert torch.equal(c.inputs, c2.inputs) and torch.equal(c.targets, c2.targets)


def test_corruption_error_ratio_zero_and_ignore_index():
    backbone, _ = build()
    tokens, labels = random_data(backbone.config, 8)
    c = corrupt(backbone, tokens.reshape(8, -1), labels, error_ratio=0.0, ignore_index=-1)
    assert c.error_tokens is None and not bool(c.is_error.any())
    assert bool((c.targets == -1).all())


def _favouring_backbone(token: int, strength: float = 30.0):
    backbone, _ = build()
    with torch.no_grad():
        backbone.head.bias[token] = strength
    return backbone


def test_error_tokens_come_from_the_base_model():
    fav = 7
    backbone = _favouring_backbone(fav)
    cfg = backbone.config
    tokens, labels = random_data(cfg, 600, seed=5)
    c = corrupt(backbone, tokens.reshape(600, -1), labels, generator=torch.Generator().manual_seed(0), sample_seed=1)
    err = c.inputs[c.is_error]
    assert err.numel() > 300
    assert float((err == fav).float().mean()) > 0.95  # the base model's distribution

    # the same draw at every position: chi-square against softmax(l_base) on an all-mask grid
    with torch.no_grad():
        backbone.head.bias[: cfg.codebook_size] = torch.linspace(-2, 2, cfg.codebook_size)
    labels = torch.randint(0, cfg.num_classes, (3000,), generator=torch.Generator().manual_seed(2))
    drawn = sample_error_tokens(backbone, labels, seed=3)
    blank = torch.full((3000, cfg.num_tokens), cfg.mask_token_id)
    with torch.no_grad():
        probs = torch.softmax(backbone(blank, labels).double(), -1).reshape(-1, cfg.codebook_size).mean(0)
    counts = torch.bincount(drawn.reshape(-1), minlength=cfg.codebook_size)
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_official_error_tokens_are_nearly_uniform():
    fav = 7
    backbone = _favouring_backbone(fav)
    cfg = backbone.config
    labels = torch.randint(0, cfg.num_classes, (3000,), generator=torch.Generator().manual_seed(2))
    drawn = sample_error_tokens(backbone, labels, mode="official", seed=3)
    counts = torch.bincount(drawn.reshape(-1), minlength=cfg.codebook_size)
    # softmax of a one-hot probability vector: e / (e + K - 1) for the favoured token, 1 / (e + K - 1) else
    k = cfg.codebook_size
    probs = torch.full((k,), 1.0 / (math.e + k - 1), dtype=torch.float64)
    probs[fav] = math.e / (math.e + k - 1)
    assert chi_square_pvalue(counts, probs) > 1e-3
    assert float(counts[fav] / counts.sum()) < 0.25 and bool((counts > 0).all())
    with pytest.raises(ValueError, match="mode"):
        sample_error_tokens(backbone, labels, mode="nope")


# ---------------------------------------------------------------------------------- loss pieces
def test_aux_loss_is_ce_at_error_positions_plus_recon():
    backbone, guide = build()
    cfg = backbone.config
    tokens, labels = random_data(cfg, 4)
    c = corrupt(backbone, tokens.reshape(4, -1), labels, generator=torch.Generator().manual_seed(0), sample_seed=0)
    loss, ce, recon = aux_loss(backbone, guide, c.inputs, labels, c.targets, ce_vocab="codebook")
    hidden = backbone(c.inputs, labels, return_hidden=True).hidden_states
    out = guide(backbone, hidden, labels, return_layers=True)
    ref_ce = F.cross_entropy(out.logits.reshape(-1, cfg.codebook_size), c.targets.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(recon, guide.reconstruction_loss(out, 0.1))
    torch.testing.assert_close(loss, ref_ce + recon)
    # no labelled position: the CE term is 0, not NaN
    loss0, ce0, _ = aux_loss(backbone, guide, c.inputs, labels, torch.full_like(c.targets, -100))
    assert float(ce0.detach()) == 0.0 and math.isfinite(float(loss0.detach()))


def test_aux_loss_full_vocab_is_the_official_normalisation():
    """ce_vocab="full" (the default): the softmax and label smoothing over every id of the head
    (codebook, [MASK], classes), as the official code; the backbone still gets no gradient."""
    backbone, guide = build()
    cfg = backbone.config
    tokens, labels = random_data(cfg, 4)
    c = corrupt(backbone, tokens.reshape(4, -1), labels, generator=torch.Generator().manual_seed(1), sample_seed=1)
    loss, ce, recon = aux_loss(backbone, guide, c.inputs, labels, c.targets)
    hidden = backbone(c.inputs, labels, return_hidden=True).hidden_states
    out = guide(backbone, hidden, labels, return_layers=True)
    # an independent full-vocabulary head: the backbone's head over the last block's output
    h = out.layer_outputs[-1][:, 1:]
    if backbone.final_norm is not None:
        h = backbone.final_norm(h)
    h = backbone.head_norm(F.gelu(backbone.head_dense(h), approximate="none" if cfg.gelu == "exact" else "tanh"))
    full = h @ backbone.head.weight.t() + backbone.head.bias
    assert full.shape[-1] == cfg.vocab_size > cfg.codebook_size
    torch.testing.assert_close(full[..., :cfg.codebook_size], out.logits, rtol=1e-5, atol=1e-5)
    ref_ce = F.cross_entropy(full.reshape(-1, cfg.vocab_size), c.targets.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    codebook_ce = aux_loss(backbone, guide, c.inputs, labels, c.targets, ce_vocab="codebook")[1]
    assert abs(float(ce.detach()) - float(codebook_ce.detach())) > 1e-4
    backbone.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None for p in guide.parameters())
    with pytest.raises(ValueError, match="ce_vocab"):
        aux_loss(backbone, guide, c.inputs, labels, c.targets, ce_vocab="all")
    with pytest.raises(ValueError, match="ce_vocab"):
        TrainConfig(ce_vocab="all")


def test_aux_loss_full_vocab_fused_head_keeps_loss_and_gradients(monkeypatch):
    """ce_vocab="full" runs the head's last linear fused with the loss (sgkernels.linear_cross_entropy,
    only the labelled positions projected): the loss and the guide's gradients are those of the
    unfused full-vocabulary cross-entropy."""
    import sgkernels.training.task as task_mod

    calls = []
    fused_fn = task_mod.linear_cross_entropy
    monkeypatch.setattr(task_mod, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused_fn(*a, **k))
    backbone, guide = build()
    cfg = backbone.config
    tokens, labels = random_data(cfg, 4, seed=5)
    c = corrupt(backbone, tokens.reshape(4, -1), labels, generator=torch.Generator().manual_seed(2), sample_seed=2)
    params = [p for p in guide.parameters() if p.requires_grad]
    loss, ce, _ = aux_loss(backbone, guide, c.inputs, labels, c.targets)
    fused = torch.autograd.grad(loss, params, allow_unused=True)
    assert calls == [1]
    hidden = backbone(c.inputs, labels, return_hidden=True).hidden_states.detach()
    out = guide(backbone, hidden, labels, return_layers=True)
    full = backbone.logits_from_hidden(out.layer_outputs[-1], full_vocab=True)
    ref_ce = F.cross_entropy(full.reshape(-1, cfg.vocab_size), c.targets.reshape(-1), label_smoothing=0.1)
    ref = ref_ce + guide.reconstruction_loss(out, 0.1)
    unfused = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(fused, unfused):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ training
def test_training_reduces_loss_only_guide_changes_ema_differs(tmp_path):
    backbone, guide = build()
    cfg = backbone.config
    tokens, labels = random_data(cfg, 8, seed=3)
    batch = (tokens, labels)
    fixed = corrupt(backbone, tokens.reshape(8, -1), labels, generator=torch.Generator().manual_seed(9), sample_seed=9)

    def fixed_loss(g):
        with torch.no_grad():
            return float(aux_loss(backbone, g, fixed.inputs, labels, fixed.targets)[0])

    backbone_before, guide_before, before = state_of(backbone), state_of(guide), fixed_loss(guide)
    result = train_guide(backbone, guide, [batch], fast_config(steps=40, lr=3e-3), tmp_path)
    assert result.step == 40
    after = fixed_loss(result.guide)
    assert after < before - 0.1, (before, after)
    assert states_equal(state_of(backbone), backbone_before)  # bitwise unchanged
    assert all(p.requires_grad for p in backbone.parameters())  # the caller's flags are restored
    changed = [k for k, v in state_of(guide).items() if not torch.equal(guide_before[k], v)]
    assert len(changed) == len(guide_before)
    ema = state_of(result.ema)
    assert not states_equal(ema, state_of(guide)) and not states_equal(ema, guide_before)
    # the final directory is a sampling-ready checkpoint holding the EMA guide
    model2, guide2 = load_checkpoint(tmp_path / "final")
    assert states_equal(state_of(guide2), ema) and states_equal(state_of(model2), backbone_before)
    out = SelfGuidedSampler(model2, guide2, steps=3)(torch.tensor([0, 1]), seed=0)
    assert out.shape == (2, cfg.num_tokens)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 41))


def test_warmup_and_config_roundtrip():
    c = TrainConfig(lr=1e-4, warmup_steps=4)
    assert [c.lr_at(s) for s in range(6)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    d = TrainConfig()
    assert (d.lr, d.betas, d.weight_decay, d.warmup_steps, d.ema_decay, d.error_ratio, d.label_smoothing,
            d.recon_weight, d.error_token_mode) == (1e-4, (0.9, 0.96), 0.0, 5000, 0.9999, 0.3, 0.1, 0.1, "sample")


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"), (dict(steps=-3), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(error_token_mode="x"), "error_token_mode"),
    (dict(error_ratio=1.5), "error_ratio"), (dict(betas=(0.9, 1.0)), "betas"), (dict(save_every=0), "save_every"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_bad_input(tmp_path):
    backbone, guide = build()
    cfg = backbone.config
    tokens, labels = random_data(cfg, 8)
    bad_labels = labels.clone()
    bad_labels[2] = cfg.num_classes
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 5\)"):
        train_guide(backbone, guide, TokenDataset(tokens, bad_labels), fast_config(), tmp_path / "a")
    with pytest.raises(ValueError, match="class labels"):
        train_guide(backbone, guide, [(tokens, labels - 1)], fast_config(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"token grids \[B, 3, 3\]"):
        train_guide(backbone, guide, [(torch.zeros(8, 4, 4, dtype=torch.long), labels)], fast_config(), tmp_path / "b")
    with pytest.raises(ValueError, match="tokens"):
        train_guide(backbone, guide, [(torch.zeros(8, 10, dtype=torch.long), labels)], fast_config(), tmp_path / "b")
    with pytest.raises(ValueError, match="codebook ids"):
        train_guide(backbone, guide, [(torch.full((8, 9), cfg.mask_token_id), labels)], fast_config(), tmp_path / "b")
    with pytest.raises(ValueError, match="labels"):
        train_guide(backbone, guide, [(tokens, labels[:3])], fast_config(), tmp_path / "b")
    with pytest.raises(ValueError, match="steps"):
        train_guide(backbone, guide, [(tokens, labels)], TrainConfig(steps=0), tmp_path / "c")
    other, _ = build(width=48, heads=4)
    with pytest.raises(ValueError, match="another backbone"):
        train_guide(other, guide, [(tokens, labels)], fast_config(), tmp_path / "d")
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_guide(backbone, guide, TokenDataset(tokens[:3], labels[:3]), fast_config(), tmp_path / "e")
    with pytest.raises(ValueError, match="ran out"):
        train_guide(backbone, guide, iter([(tokens, labels)]), fast_config(steps=2), tmp_path / "f")
    with pytest.raises(TypeError, match="TrainConfig"):
        train_guide(backbone, guide, [(tokens, labels)], {"steps": 1}, tmp_path / "g")
    assert not os.path.exists(tmp_path / "a" / "checkpoints")


# --------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    backbone, guide = build(seed=0, guide_seed=100 + rank)  # different inits: DDP broadcasts rank 0's
    torch.save(state_of(guide), os.path.join(result_dir, f"init{rank}.pt"))
    tokens, labels = random_data(backbone.config, 32)
    result = train_guide(backbone, guide, TokenDataset(tokens, labels), fast_config(steps=3, save_every=2), out_dir)
    torch.save({"guide": state_of(result.guide), "ema": state_of(result.ema), "step": result.step,
                "loss": result.loss}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    out, res = tmp_path / "out", tmp_path / "res"
    res.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), str(res)), nprocs=2, join=True)
    r0, r1 = (torch.load(res / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    i0, i1 = (torch.load(res / f"init{r}.pt", weights_only=True) for r in (0, 1))
    assert not states_equal(i0, i1)
    assert r0["step"] == r1["step"] == 3
    assert states_equal(r0["guide"], r1["guide"]) and states_equal(r0["ema"], r1["ema"])
    assert not states_equal(r0["guide"], i0)
    assert r0["loss"] != r1["loss"]  # each rank trained on its own shard / corruption
    ckpt = load_train_checkpoint(latest_checkpoint(out))
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2 and states_equal(ckpt["guide"], r0["guide"])


# -------------------------------------------------------------------------------- SIGKILL + resume
class SlowDataset(TokenDataset):
    def __init__(self, tokens, labels, delay: float):
        super().__init__(tokens, labels)
        self.delay = delay

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return super().__getitem__(i)


RESUME_STEPS = 40


def resume_setup(delay: float):
    backbone, guide = build(seed=0, guide_seed=1)
    tokens, labels = random_data(backbone.config, 24, seed=7)
    config = fast_config(steps=RESUME_STEPS, save_every=3, keep_last=2, warmup_steps=5, log_every=1)
    return backbone, guide, SlowDataset(tokens, labels, delay), config


_RESUME_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_train import resume_setup
from sgkernels.training import train_guide
backbone, guide, data, config = resume_setup(delay=0.02)
train_guide(backbone, guide, data, config, sys.argv[1], resume=True)
"""


def test_sigkill_mid_run_then_resume(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT.format(tests=TESTS_DIR))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while latest_checkpoint(out) is None:
            if proc.poll() is not None:
                pytest.fail("training exited before its first checkpoint:\n" + proc.stdout.read().decode())
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 90 s")
            time.sleep(0.05)
        time.sleep(0.4)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    # no corrupt file: every complete step directory loads; leftovers are only temporaries
    dirs = step_dirs(str(out))
    assert dirs
    for step, path in dirs:
        state = load_train_checkpoint(path)
        assert state["step"] == step and step % 3 == 0
    killed_at = dirs[-1][0]
    assert 0 < killed_at < RESUME_STEPS
    assert not os.path.exists(out / "final")

    backbone, guide, data, config = resume_setup(delay=0.0)
    result = train_guide(backbone, guide, data, config, out, resume=True)
    assert result.step == RESUME_STEPS
    final = load_train_checkpoint(latest_checkpoint(out))
    assert final["step"] == RESUME_STEPS
    assert [s for s, _ in step_dirs(str(out))] == [39, 40]
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]
    steps_logged = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps_logged[-1] == RESUME_STEPS and max(steps_logged) == RESUME_STEPS
    assert steps_logged == list(range(1, RESUME_STEPS + 1))  # no step logged twice across the kill

    # the resumed run continues exactly where the uninterrupted run would be
    backbone, guide, data, config = resume_setup(delay=0.0)
    ref = train_guide(backbone, guide, data, config, tmp_path / "ref", save_final=False)
    assert states_equal(state_of(result.guide), state_of(ref.guide))
    assert states_equal(state_of(result.ema), state_of(ref.ema))

    # resuming a finished run is a no-op
    backbone, guide, data, config = resume_setup(delay=0.0)
    again = train_guide(backbone, guide, data, config, out, resume=True, save_final=False)
    assert again.step == RESUME_STEPS and states_equal(state_of(again.guide), state_of(ref.guide))


def test_resume_rejects_a_checkpoint_of_another_guide(tmp_path):
    backbone, guide = build()
    tokens, labels = random_data(backbone.config, 8)
    train_guide(backbone, guide, [(tokens, labels)], fast_config(steps=2), tmp_path, save_final=False)
    other = TOAST(backbone.config, num_factors=NF + 1)
    with pytest.raises(ValueError, match="guide config"):
        train_guide(backbone, other, [(tokens, labels)], fast_config(steps=3), tmp_path, resume=True)


# ------------------------------------------------------------------------------------------- CLI
_LAZY_SCRIPT = """
import sys
import sgkernels
assert "sgkernels.training" not in sys.modules, "import sgkernels imported the training package"
import sgkernels.training as training
assert sgkernels.training is training
from sgkernels.training import aux_loss  # the one name the docs use (issue 22: no half-working alias)
assert aux_loss is training.aux_loss and not hasattr(sgkernels, "train")
assert sgkernels.train_guide is training.train_guide and sgkernels.TrainConfig is training.TrainConfig
"""


def test_training_is_imported_lazily():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", _LAZY_SCRIPT], env=env, check=True, timeout=120)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert "--error-token-mode" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["npy", "pt"])
def test_cli_trains_a_guide_for_a_checkpoint(tmp_path, fmt):
    backbone, _ = build()
    cfg = backbone.config
    save_checkpoint(tmp_path / "ckpt", backbone)  # no guide: the CLI creates one
    tokens, labels = random_data(cfg, 6)
    if fmt == "npy":
        data = tmp_path / "tokens.npy"
        np.save(data, np.concatenate([labels.numpy()[:, None], tokens.reshape(6, -1).numpy()], axis=1))
    else:
        data = tmp_path / "tokens.pt"
        torch.save({"tokens": tokens, "labels": labels}, data)
    argv = [str(tmp_path / "ckpt"), str(data), "--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "2",
            "--warmup-steps", "0", "--save-every", "2", "--num-factors", str(NF), "--no-progress"]
    assert cli_main(argv) == 0
    model, guide = load_checkpoint(tmp_path / "out" / "final")
    assert guide is not None and guide.config.num_factors == NF
    assert load_train_checkpoint(latest_checkpoint(tmp_path / "out"))["step"] == 3
    assert cli_main(argv[:-1] + ["--resume", "--steps", "4", "--no-progress"]) == 0
    assert load_train_checkpoint(latest_checkpoint(tmp_path / "out"))["step"] == 4


def test_token_dataset_load_errors(tmp_path):
    torch.save({"tokens": torch.zeros(3, 9, dtype=torch.long)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="labels"):
        TokenDataset.load(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="integer"):
        TokenDataset(torch.zeros(3, 9), torch.zeros(3, dtype=torch.long))
