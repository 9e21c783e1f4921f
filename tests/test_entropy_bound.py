"""entropy_bound_step (the fused step of diffusers' EntropyBoundScheduler): the op contract on every
backend, the accept set against diffusers' definition, the exact entropy, the sampled law, bad input,
opcheck, and FusedEntropyBoundScheduler against the stock scheduler."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import chi_square_pvalue
from op_contract import DTYPE_IDS, Bad, Case, OpContract, bad_list, run_on, shrink_tiles

from sgkernels.ops.entropy_bound import entropy_accept_reference, entropy_bound_step, entropy_bound_step_reference

OP = "entropy_bound_step"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(batch, length, vocab, seed, dtype=torch.float32, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, length, vocab, generator=gen)).to(dtype)
    noise = torch.randint(0, vocab, (batch, length), generator=gen)
    return logits, noise


def _case(bound, dtype=torch.float32, length=12, vocab=29, tiles=None, commit_tile=None, batch=3):
    def make(backend, monkeypatch):
        if tiles is not None:
            from sgkernels.kernels import sampling

            shrink_tiles(monkeypatch, sampling, tiles)
        if commit_tile is not None:
            from sgkernels.kernels import block_refine

            monkeypatch.setattr(block_refine, "_COMMIT_TILE", commit_tile)
        logits, noise = _inputs(batch, length, vocab, seed=length + vocab, dtype=dtype, scale=4.0)
        return (logits, noise), dict(entropy_bound=bound, seed=5, offset=2)

    opts = "".join(f"-{o}" for o in (f"tiles{tiles}" if tiles else None, f"ctile{commit_tile}" if commit_tile else None)
                   if o)
    return Case(f"{DTYPE_IDS[dtype]}-bound{bound}-L{length}{opts}", dtype, make)


class TestContract(OpContract):
    def call(self, logits, noise, **kw):
        return entropy_bound_step(logits, noise, **kw)

    def reference(self, logits, noise, **kw):
        return entropy_bound_step_reference(logits, noise, **kw)

    def reference_cases(self):
        return [_case(0.1), _case(1.5), _case(-1.0), _case(1e9), _case(0.8, dtype=torch.bfloat16),
                _case(2.0, tiles=8, batch=1, length=4),  # multi-tile rows (Triton)
                _case(3.0, length=21, commit_tile=8)]  # several accept tiles (Triton)

    def check(self, out, ref, tol, args, kwargs):
        prev, accepted, tokens, probs, entropy = out
        r_prev, r_accepted, r_tokens, r_probs, r_entropy = ref
        for a, b in ((prev, r_prev), (accepted, r_accepted), (tokens, r_tokens)):
            assert torch.equal(a, b)
        torch.testing.assert_close(probs, r_probs, rtol=tol.rtol, atol=tol.atol)
        torch.testing.assert_close(entropy, r_entropy, rtol=1e-5, atol=2e-6)

    def bad_inputs(self):
        logits, noise = _inputs(2, 5, 9, seed=0)
        return bad_list(
            Bad("entropy_bound", ValueError, (logits, noise), dict(entropy_bound=math.nan)),
            Bad("entropy_bound", TypeError, (logits, noise), dict(entropy_bound="0.1")),
            Bad("logits", ValueError, (logits[0], noise), dict(entropy_bound=0.1)),
            Bad("noise", ValueError, (logits, noise[:, :3]), dict(entropy_bound=0.1)),
            Bad("noise", TypeError, (logits, noise.int()), dict(entropy_bound=0.1)),
        )

    def opcheck_samples(self, device):
        logits, noise = (t.to(device) for t in _inputs(2, 6, 11, seed=1))
        status = torch.zeros(1, dtype=torch.int32, device=device)
        return [(OP, (logits, noise, 0.5, 3, 1, status)),
                (OP, (logits, noise, 0.5, 0, 0, status, torch.tensor(7, device=device)))]


def test_accept_set_is_diffusers_rule():
    gen = torch.Generator().manual_seed(1)
    entropy = torch.rand(5, 16, generator=gen) * 0.2
    for bound in (0.0, 0.1, 0.35, 5.0):
        s, idx = torch.sort(entropy, dim=-1)
        want = torch.zeros_like(entropy, dtype=torch.bool).scatter(-1, idx, torch.cumsum(s, -1) - s <= bound)
        assert torch.equal(entropy_accept_reference(entropy, bound), want)


def test_entropy_and_law(backend):
    logits, noise = _inputs(1, 1, 20, seed=3)
    rows = 600 if backend.interpreter else 6000
    x = logits.expand(rows // 20, 20, 20)
    _, _, tokens, probs, entropy = run_on(backend, entropy_bound_step, x, noise.expand(rows // 20, 20),
                                          entropy_bound=0.5, seed=9)
    q = torch.softmax(logits[0, 0].double(), -1)
    torch.testing.assert_close(entropy, torch.full_like(entropy, float(-(q * q.log()).sum())), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.reshape(-1), q[tokens.reshape(-1)].float(), rtol=1e-5, atol=1e-7)
    assert chi_square_pvalue(torch.bincount(tokens.reshape(-1), minlength=20), q) > 1e-4


# ------------------------------------------------------------------------------------------------
# FusedEntropyBoundScheduler


def test_scheduler_accepts_what_stock_accepts():
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "EntropyBoundScheduler"):
        pytest.skip("needs diffusers >= 0.39")
    from sgkernels.integrations.diffusers import FusedEntropyBoundScheduler

    stock = diffusers.EntropyBoundScheduler(entropy_bound=0.3, num_inference_steps=8)
    fused = FusedEntropyBoundScheduler.from_config(stock.config)
    for s in (stock, fused):
        s.set_timesteps(8)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 50, (3, 16), generator=gen)
    n_acc = 0
    for t in range(0, 8, 3):
        logits = 6.0 * torch.randn(3, 16, 50, generator=gen)
        a = stock.step(logits, t, x, generator=torch.Generator().manual_seed(t))
        b = fused.step(logits, t, x, generator=torch.Generator().manual_seed(t))
        assert torch.equal(a.accepted_index, b.accepted_index)
        torch.testing.assert_close(b.pred_logits, a.pred_logits)
        assert torch.equal(b.prev_sample[b.accepted_index], b.sampled_tokens[b.accepted_index])
        q = torch.softmax(a.pred_logits.float(), -1)
        torch.testing.assert_close(b.sampled_probs, q.gather(-1, b.sampled_tokens[..., None])[..., 0])
        c = fused.step(logits, t, x, generator=torch.Generator().manual_seed(t))  # same generator state
        assert torch.equal(c.prev_sample, b.prev_sample)
        n_acc += int(a.accepted_index.sum())
        tup = fused.step(logits, t, x, return_dict=False)
        assert len(tup) == 5
    assert 0 < n_acc < 3 * 16 * 3
    with pytest.raises(ValueError, match="entropy_bound"):
        fused.step(logits, 0, x, entropy_bound=math.nan)
    with pytest.raises(ValueError, match="model_output"):
        fused.step(logits[:, :4], 0, x)
