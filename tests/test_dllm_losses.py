"""dLLM fine-tuning losses on the fused linear cross-entropy: confidence_aware_loss against diffusers'
compute_confidence_aware_loss (values and gradients, every backend), LLaDA's SFT loss, and a tiny LM
trained a few steps with the fused and the unfused loss (same parameters to rounding)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from op_contract import run_on

import sgkernels as sgk
from sgkernels.training import confidence_aware_loss

M = importlib.import_module("sgkernels.ops.linear_cross_entropy")  # the module (the package exports the function)
OP = "linear_cross_entropy_fwd"  # the backends of the fused op (tests/op_contract.py)
diffusers_tu = pytest.importorskip("diffusers.training_utils")


def _data(n=24, d=16, vocab=37, seed=0, ignore_frac=0.5, lead=(2, 12), sharp=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen)
    w = torch.randn(vocab, d, generator=gen) * sharp / d**0.5
    b = torch.randn(vocab, generator=gen)
    # labels: the argmax for about half the rows (so the confidence term has correct rows)
    logits = F.linear(x, w, b)
    y = torch.where(torch.rand(lead, generator=gen) < 0.5, logits.argmax(-1),
                    torch.randint(0, vocab, lead, generator=gen))
    y[torch.rand(lead, generator=gen) < ignore_frac] = -100
    pw = torch.rand(lead, generator=gen) * 2 + 0.1
    return x, w, b, y, pw


def _grads(fn, x, w, b, *args, **kw):
    xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
    loss, sft, conf = fn(xs, ws, bs, *args, **kw)
    gx, gw, gb = torch.autograd.grad(loss, (xs, ws, bs))
    return loss.detach(), sft.detach(), conf.detach(), gx, gw, gb


def _fused(x, w, b, y, **kw):
    return confidence_aware_loss(x, w, y, linear_bias=b, **kw)


def _diffusers(x, w, b, y, *, suppress_ids=None, **kw):
    logits = F.linear(x, w, b)
    if suppress_ids is not None:  # train_llada2: the mask id's column set to finfo.min on a clone
        logits = logits.clone()
        logits[..., suppress_ids] = torch.finfo(torch.float32).min
    return diffusers_tu.compute_confidence_aware_loss(logits, y, **kw)


@pytest.mark.parametrize("lambda_conf,temperature,weighted,suppress", [
    (0.0, 1.0, True, [4]), (0.5, 1.0, False, None), (1.0, 0.5, True, [4]),
])
def test_confidence_aware_loss_equals_diffusers(backend, monkeypatch, lambda_conf, temperature, weighted, suppress):
    monkeypatch.setattr(M, "_CHUNK_ROWS", 5)  # several chunks
    x, w, b, y, pw = _data(lead=(2, 6) if backend.interpreter else (2, 12))
    kw = dict(lambda_conf=lambda_conf, temperature=temperature, per_token_weights=pw if weighted else None)
    out = run_on(backend, _grads, _fused, x, w, b, y, suppress_ids=suppress, **kw)
    ref = _grads(_diffusers, x, w, b, y, suppress_ids=suppress, **kw)
    if lambda_conf:
        assert float(ref[2]) > 0.05  # the entropy term is exercised
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_confidence_aware_loss_gradients_of_each_output():
    """Gradients through loss_sft and loss_conf separately (not only through loss)."""
    x, w, b, y, pw = _data(seed=3)
    for pick in (1, 2):
        outs = []
        for fn in (_fused, _diffusers):
            xs, ws, bs = (v.detach().clone().requires_grad_() for v in (x, w, b))
            res = fn(xs, ws, bs, y, lambda_conf=0.7, temperature=0.8, per_token_weights=pw)
            outs.append(torch.autograd.grad(res[pick], (xs, ws, bs)))
        for o, r in zip(*outs):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_confidence_aware_loss_bf16_is_float32_math():
    """bf16 inputs: diffusers' loss in float32 on the same (rounded) inputs, to bf16 rounding of the
    outputs. (diffusers run in bf16 differs by more: its argmax test on bf16 logits has ties, and its
    entropy and sums are rounded to bf16; measured here: 0.2 on loss_conf.)"""
    x, w, b, y, pw = (v.bfloat16() if v.is_floating_point() else v for v in _data(seed=5))
    out = _grads(_fused, x, w, b, y, lambda_conf=0.5, per_token_weights=pw)
    ref = _grads(_diffusers, x.float(), w.float(), b.float(), y, lambda_conf=0.5, per_token_weights=pw.float())
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), r, rtol=2**-7, atol=2e-3)


def test_confidence_aware_loss_bad_input():
    x, w, b, y, pw = _data()
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            confidence_aware_loss(x, w, y, temperature=t, lambda_conf=0.5)
    with pytest.raises(ValueError, match="token_weight"):
        confidence_aware_loss(x, w, y, per_token_weights=pw[:1])
    with pytest.raises(ValueError, match="target"):
        confidence_aware_loss(x, w, torch.full_like(y, 37))
    with pytest.raises(ValueError, match="linear_weight"):
        confidence_aware_loss(x, w[:, :3], y)


def test_llada_sft_loss():
    """LLaDA's SFT recipe: sum over masked rows of CE / p_mask / answer_length, over the batch size."""
    x, w, b, y, _ = _data(seed=7, ignore_frac=0.0)
    gen = torch.Generator().manual_seed(1)
    p_mask = torch.rand(2, generator=gen)[:, None].expand(2, 12) * 0.9 + 0.1
    masked = torch.rand(2, 12, generator=gen) < p_mask
    answer_len = torch.tensor([[9.0], [12.0]]).expand(2, 12)
    xs = x.clone().requires_grad_()
    logits = F.linear(xs, w, b)
    ref = (F.cross_entropy(logits[masked], y[masked], reduction="none") / p_mask[masked] / answer_len[masked]).sum() / 2
    x2 = x.clone().requires_grad_()
    fused = sgk.linear_cross_entropy(x2, w, torch.where(masked, y, -100), linear_bias=b,
                                     token_weight=1.0 / (p_mask * answer_len), reduction="sum") / 2
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(torch.autograd.grad(fused, x2)[0], torch.autograd.grad(ref, xs)[0])


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)

    def hidden(self, ids):
        h = self.emb(ids)
        return torch.tanh(self.mix(h + h.mean(1, keepdim=True)))


def test_tiny_lm_training_fused_equals_unfused():
    """A few Adam steps of a tiny masked LM: the fused loss gives the unfused loss's parameters."""
    torch.manual_seed(0)
    base = _TinyLM()
    models = {k: _TinyLM() for k in ("fused", "unfused")}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-2) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    for _step in range(4):
        ids = torch.randint(0, 49, (4, 10), generator=gen)
        masked = torch.rand(4, 10, generator=gen) < 0.5
        inputs = ids.masked_fill(masked, 49)
        labels = torch.where(masked, ids, -100)
        pw = torch.rand(4, 10, generator=gen) + 0.5
        for k, m in models.items():
            h = m.hidden(inputs)
            if k == "fused":
                loss = confidence_aware_loss(h, m.head.weight, labels, linear_bias=m.head.bias, lambda_conf=0.3,
                                             per_token_weights=pw, suppress_ids=49)[0]
            else:
                loss = _diffusers(h, m.head.weight, m.head.bias, labels, suppress_ids=49, lambda_conf=0.3,
                                  per_token_weights=pw)[0]
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
    for (name, p), q in zip(models["fused"].named_parameters(), models["unfused"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
