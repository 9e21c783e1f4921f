"""block_refine_step / block_commit (the fused step of diffusers' BlockRefinementScheduler): the op
contract on every backend (mask and uniform modes, greedy and sampled, both filter orders, strided
logits, multi-tile rows, several commit tiles), bad input, opcheck, the commit rule against its
definition, the filter orders' laws by chi-square, and ``filter_order`` on guided_sample."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import chi_square_pvalue
from op_contract import DTYPE_IDS, Bad, Case, OpContract, backend_params, bad_list, run_on, shrink_tiles

import sgkernels as sgk
from sgkernels.ops.block_refine import (block_commit, block_commit_reference, block_refine_step,
                                        block_refine_step_reference)
from sgkernels.ops.filters import keep_mask_reference

OP = "block_refine_step"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter


def _inputs(batch, length, vocab, seed, dtype=torch.float32, window=0):
    """logits [B, L, V] (a [:, -L:] slice of a [B, window + L, V] tensor when ``window``), a block
    with masks (mask id vocab - 1) and decoded tokens, committed / noise for the uniform mode."""
    gen = torch.Generator().manual_seed(seed)
    full = (2.5 * torch.randn(batch, window + length, vocab, generator=gen)).to(dtype)
    logits = full[:, window:]
    sample = torch.randint(0, vocab - 1, (batch, length), generator=gen)
    sample[torch.rand(batch, length, generator=gen) < 0.6] = vocab - 1
    committed = torch.rand(batch, length, generator=gen) < 0.4
    noise = torch.randint(0, vocab, (batch, length), generator=gen)
    prompt = torch.zeros(length, dtype=torch.bool)
    prompt[: length // 4] = True
    return logits, sample, committed, noise, prompt


def _case(mode, temperature, dtype=torch.float32, filt=None, length=12, vocab=37, window=0, tiles=None,
          commit_tile=None, edit=0.2, threshold=0.4, batch=3):
    filt = dict(filt or {})

    def make(backend, monkeypatch):
        if tiles is not None:
            from sgkernels.kernels import sampling

            shrink_tiles(monkeypatch, sampling, tiles)
        if commit_tile is not None:
            from sgkernels.kernels import block_refine

            monkeypatch.setattr(block_refine, "_COMMIT_TILE", commit_tile)
        logits, sample, committed, noise, prompt = _inputs(batch, length, vocab, seed=length + vocab, dtype=dtype,
                                                           window=window)
        kw = dict(threshold=threshold, editing_threshold=edit, temperature=temperature, seed=11, offset=3, **filt)
        if mode == "mask":
            kw.update(mask_token_id=vocab - 1, prompt_mask=prompt, quota=3)
        else:
            kw.update(committed=committed, noise=noise, quota=length // 2)
        return (logits, sample), kw

    name = "-".join(f"{k}{v}" for k, v in filt.items())
    opts = "".join(f"-{o}" for o in (name, f"win{window}" if window else None, f"tiles{tiles}" if tiles else None,
                                     f"ctile{commit_tile}" if commit_tile else None, f"edit{edit}",
                                     f"thr{threshold}") if o)
    return Case(f"{DTYPE_IDS[dtype]}-{mode}-T{temperature}-L{length}{opts}", dtype, make)


class TestContract(OpContract):
    def call(self, logits, sample, **kw):
        return block_refine_step(logits, sample, **kw)

    def reference(self, logits, sample, **kw):
        return block_refine_step_reference(logits, sample, **kw)

    def reference_cases(self):
        cases = []
        for mode in ("mask", "uniform"):
            cases += [_case(mode, 0.0), _case(mode, 0.8, filt=dict(top_k=6, top_p=0.8)),
                      _case(mode, 1.3, filt=dict(top_k=6, top_p=0.8, filter_order="dream")),
                      _case(mode, 1.0, filt=dict(top_p=0.9), window=5, edit=None, threshold=1.5)]
        cases += [_case("mask", 0.0, dtype=torch.bfloat16), _case("uniform", 0.7, dtype=torch.float16),
                  # multi-tile rows (Triton; few rows: 32 interpreted passes per filter)
                  _case("mask", 0.9, filt=dict(top_k=9, top_p=0.7), tiles=16, batch=1, length=3),
                  _case("mask", 0.0, tiles=16),
                  _case("uniform", 0.0, length=21, commit_tile=8),  # several commit tiles (Triton)
                  _case("mask", 1.0, length=21, commit_tile=8, threshold=-1.0)]
        return cases

    def check(self, out, ref, tol, args, kwargs):
        prev, transfer, edit, tokens, probs = out
        r_prev, r_transfer, r_edit, r_tokens, r_probs = ref
        for a, b in ((prev, r_prev), (transfer, r_transfer), (edit, r_edit), (tokens, r_tokens)):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, r_probs, rtol=tol.rtol, atol=tol.atol)

    def bad_inputs(self):
        logits, sample, committed, noise, prompt = _inputs(2, 6, 11, seed=0)
        m = dict(mask_token_id=10, quota=2, threshold=0.5)
        return bad_list(
            Bad("threshold", ValueError, (logits, sample), dict(m, threshold=math.nan)),
            Bad("editing_threshold", ValueError, (logits, sample), dict(m, editing_threshold=math.nan)),
            Bad("top_p", ValueError, (logits, sample), dict(m, temperature=1.0, top_p=1.5)),
            Bad("top_p", ValueError, (logits, sample), dict(m, temperature=1.0, top_p=0.0)),
            Bad("top_k", ValueError, (logits, sample), dict(m, temperature=1.0, top_k=-2)),
            Bad("temperature", ValueError, (logits, sample), dict(m, temperature=-1.0)),
            Bad("filter_order", ValueError, (logits, sample), dict(m, filter_order="vllm")),
            Bad("logits", ValueError, (logits[:, :5], sample), m),
            Bad("logits", ValueError, (logits[0], sample), m),
            Bad("logits", TypeError, (logits.long(), sample), m),
            Bad("sample", TypeError, (logits, sample.int()), m),
            Bad("prompt_mask", ValueError, (logits, sample), dict(m, prompt_mask=prompt[:3])),
            Bad("committed", ValueError, (logits, sample), dict(quota=2, threshold=0.5, noise=noise)),
            Bad("noise", ValueError, (logits, sample), dict(quota=2, threshold=0.5, committed=committed,
                                                            noise=noise[:, :3])),
            Bad("quota", TypeError, (logits, sample), dict(m, quota=2.5)),
            Bad("mask_token_id", TypeError, (logits, sample), dict(m, mask_token_id=10.0)),
        )

    def opcheck_samples(self, device):
        logits, sample, committed, noise, prompt = (t.to(device) for t in _inputs(2, 6, 11, seed=1))
        status = torch.zeros(1, dtype=torch.int32, device=device)
        tokens = logits.argmax(-1)
        probs = torch.softmax(logits, -1).amax(-1)
        return [
            (OP, (logits, sample, None, prompt, None, 10, 2, 0.5, 0.2, 0.0, 0, 1.0, "hf", 3, 0, status)),
            (OP, (logits, sample, committed, None, noise, None, 4, 0.5, None, 0.8, 4, 0.9, "hf", 3, 1, status)),
            (OP, (logits, sample, None, None, None, 10, 2, 0.5, None, 1.0, 4, 0.9, "dream", 0, 0, status,
                  torch.tensor(5, device=device))),
            ("block_commit", (tokens, probs, sample, None, prompt, None, 10, 2, 0.5, 0.1)),
            ("block_commit", (tokens, probs, sample, committed, None, noise, None, 3, 0.9, 0.3)),
        ]


# ------------------------------------------------------------------------------------------------
# The commit rule against its definition (diffusers' loop), block_commit on every backend


def _stock_commit_mask(probs, sample, mask_id, num, threshold, edit_thr, prompt):
    """diffusers' mask-mode transfer, written as its loop (ties do not occur in these inputs)."""
    active = sample == mask_id
    conf = torch.where(active, probs, -math.inf)
    transfer = torch.zeros_like(active)
    for b in range(sample.shape[0]):
        high = conf[b] > threshold
        if int(high.sum()) >= num:
            transfer[b] = high
        else:
            k = min(num, int(active[b].sum()))
            if k:
                transfer[b, torch.topk(conf[b], k).indices] = True
    return transfer


@pytest.mark.parametrize("num", [0, 2, 5, 50])
@pytest.mark.parametrize("threshold", [0.3, 0.9, 2.0])
def test_reference_commit_is_diffusers_rule(num, threshold):
    gen = torch.Generator().manual_seed(num)
    probs = torch.rand(4, 16, generator=gen)
    sample = torch.randint(0, 5, (4, 16), generator=gen)
    sample[torch.rand(4, 16, generator=gen) < 0.5] = 9
    sample[3] = 1  # a row without masks
    tokens = torch.randint(0, 10, (4, 16), generator=gen)
    _, transfer, _ = block_commit_reference(tokens, probs, sample, mask_token_id=9, quota=num, threshold=threshold)
    assert torch.equal(transfer, _stock_commit_mask(probs, sample, 9, num, threshold, None, None))


def test_block_commit_backends_equal_reference(backend):
    gen = torch.Generator().manual_seed(2)
    probs = torch.rand(3, 21, generator=gen)
    probs[0, 3] = probs[0, 5]  # a tie: the lower position first
    sample = torch.randint(0, 8, (3, 21), generator=gen)
    sample[torch.rand(3, 21, generator=gen) < 0.6] = 9
    tokens = torch.randint(0, 10, (3, 21), generator=gen)
    committed = torch.rand(3, 21, generator=gen) < 0.3
    noise = torch.randint(0, 10, (3, 21), generator=gen)
    prompt = torch.arange(21) < 4
    for kw in (dict(mask_token_id=9, prompt_mask=prompt, quota=4, threshold=0.7, editing_threshold=0.2),
               dict(mask_token_id=9, quota=-1, threshold=0.1, editing_threshold=0.5),  # no schedule: no commit
               dict(committed=committed, noise=noise, quota=12, threshold=0.8, editing_threshold=0.0)):
        got = run_on(backend, block_commit, tokens, probs, sample, **kw)
        want = block_commit_reference(tokens, probs, sample, **kw)
        for a, b in zip(got, want):
            assert torch.equal(a, b), kw
    _, transfer, _ = block_commit_reference(tokens, probs, sample, mask_token_id=9, quota=-1, threshold=0.1)
    assert not transfer.any()


def test_mask_mode_editing_needs_a_positive_threshold():
    logits, sample, _, _, _ = _inputs(2, 8, 13, seed=4)
    kw = dict(mask_token_id=12, quota=2, threshold=0.5, temperature=0.0, seed=0)
    assert not block_refine_step_reference(logits, sample, editing_threshold=0.0, **kw)[2].any()
    assert not block_refine_step_reference(logits, sample, editing_threshold=-0.3, **kw)[2].any()
    assert block_refine_step_reference(logits, sample, editing_threshold=1e-6, **kw)[2].any()


# ------------------------------------------------------------------------------------------------
# The sampled law: diffusers' (top-k, then top-p on the renormalised top-k set) and Dream's


def _stock_law(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """diffusers' BlockRefinementScheduler sampling distribution of one row (its own filter code)."""
    from diffusers import BlockRefinementScheduler as S

    x = S._top_p_filtering(S._top_k_filtering(row[None] / temperature, top_k=top_k), top_p=top_p)
    return torch.softmax(x.double(), -1)[0]


def _chi_backends():
    """The backends; the interpreter's chi-square is slow (~10 s each: thousands of interpreted rows;
    the contract's token equality with the reference covers its kernels in the fast tier)."""
    return [pytest.param(*p.values, id=p.id, marks=list(p.marks) + ([pytest.mark.slow] if p.id == "triton-interpret"
                                                                   else []))
            for p in backend_params(OP)]


@pytest.mark.parametrize("filt", [dict(top_k=7), dict(top_p=0.8), dict(top_k=12, top_p=0.7),
                                  dict(top_k=12, top_p=0.7, filter_order="dream")],
                         ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
@pytest.mark.parametrize("chi_backend", _chi_backends())
def test_sampled_law_chi_square(chi_backend, filt):
    backend = chi_backend
    pytest.importorskip("diffusers")
    gen = torch.Generator().manual_seed(6)
    vocab, temperature = 40, 0.9
    row = 1.5 * torch.randn(vocab, generator=gen)
    rows = 1500 if backend.interpreter else 12000
    logits = row.expand(rows // 30, 30, vocab)
    sample = torch.full((rows // 30, 30), vocab - 1)
    _, _, _, tokens, probs = run_on(backend, block_refine_step, logits, sample, mask_token_id=vocab - 1, quota=1,
                                    threshold=0.5, temperature=temperature, seed=21, **filt)
    k, p = filt.get("top_k", 0), filt.get("top_p", 1.0)
    if filt.get("filter_order", "hf") == "hf":
        law = _stock_law(row, temperature, k or None, p)
    else:
        x = row.double() / temperature
        law = torch.softmax(x.masked_fill(~keep_mask_reference(x, k, p, 0.0, "dream"), -math.inf), -1)
        assert not torch.allclose(law, _stock_law(row, temperature, k, p))  # the two orders differ here
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab)
    assert bool((counts[law == 0] == 0).all())
    assert chi_square_pvalue(counts, law) > 1e-4, (counts, law * tokens.numel())
    torch.testing.assert_close(probs.reshape(-1), law[tokens.reshape(-1)].float(), rtol=1e-5, atol=1e-6)


def test_filter_order_on_guided_sample(backend):
    """guided_sample / head_sample take ``filter_order``; "hf" keeps diffusers' set, "dream" the intersection."""
    gen = torch.Generator().manual_seed(8)
    logits = 2.0 * torch.randn(5, 33, generator=gen)
    for order in ("hf", "dream"):
        kw = dict(temperature=0.8, top_k=10, top_p=0.6, seed=4, offset=1, filter_order=order)
        got = run_on(backend, sgk.guided_sample, logits, confidence="prob", **kw)
        want = sgk.guided_sample_reference(logits, confidence="prob", **kw)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    x = logits.double() / 0.8
    hf = keep_mask_reference(x, 10, 0.6, 0.0, "hf")
    assert torch.equal(hf, torch.stack([_stock_law(r.float(), 1.0, 10, 0.6) > 0 for r in x]))
    assert (hf.sum(-1) <= keep_mask_reference(x, 10, 0.6, 0.0, "dream").sum(-1)).all()
    with pytest.raises(ValueError, match="filter_order"):
        sgk.guided_sample(logits, filter_order="HF")


@pytest.mark.slow  # a torch.compile (~20 s on the 2-core box)
def test_compiles_fullgraph_with_a_tensor_seed():
    """The step traces into one graph (no host sync, no graph break) and gives the eager tokens."""
    logits, sample, committed, noise, prompt = _inputs(2, 8, 23, seed=3)
    seed = torch.tensor(7)

    def step(logits, sample, seed):
        return block_refine_step(logits, sample, mask_token_id=22, prompt_mask=prompt, quota=2, threshold=0.4,
                                 editing_threshold=0.2, temperature=0.9, top_k=5, top_p=0.9, seed=seed)

    got = torch.compile(step, fullgraph=True)(logits, sample, seed)
    want = step(logits, sample, seed)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
