"""sgkernels.integrations.llada.generate against a plain re-implementation of the published algorithm.

``reference_generate`` below follows LLaDA's generate() (and Fast-dLLM's threshold variant) step
by step: float64 Gumbel trick, float64 softmax confidence, per-row top-k. Greedy decoding must match
token for token; sampled decoding is compared in distribution (many rows of the same prompt).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers import chi_square_pvalue, has_cpu_kernel, joint_counts, two_sample_pvalue

import sgkernels as sgk
from sgkernels.integrations import llada

V, MASK = 12, 11  # vocabulary with the mask token last, as LLaDA's


@pytest.fixture(autouse=True)
def _backend():
    # The C++ CPU kernels of the sampling ops may be missing on a branch: fall back to the reference.
    ctx = contextlib.nullcontext() if has_cpu_kernel("self_guided_step") else sgk.use_backend("torch")
    with ctx:
        yield


class TinyBidirectionalLM(torch.nn.Module):
    """Embedding + one bidirectional attention layer + head; ``.logits`` as HF models return it."""

    def __init__(self, vocab=V, dim=32, max_len=64, mask_id=MASK, seed=0, sharpness=3.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.pos = torch.nn.Parameter(torch.randn(max_len, dim, generator=gen) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(dim, 3 * dim, generator=gen) / dim**0.5)
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=gen) * sharpness / dim**0.5)
        self.mask_id = mask_id
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.emb[x] + self.pos[: x.shape[1]]
        q, k, v = (h @ self.qkv).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        logits = (h + att @ v) @ self.head
        logits[..., self.mask_id] = -1e4  # like a trained LLaDA, (practically) never predicts [MASK]
        return SimpleNamespace(logits=logits)


def _transfer_top_k(transfer, conf, j, k, threshold):
    """Marks row j's k most confident positions; with a threshold, past the first only those reaching it."""
    _, idx = torch.topk(conf[j], k)
    transfer[j, idx] = True
    if threshold is not None:
        for r in range(1, k):
            if conf[j, idx[r]] < threshold:
                transfer[j, idx[r]] = False


def reference_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                       remasking="low_confidence", mask_id=MASK, threshold=None):
    """The published algorithm, written out plainly (float64 Gumbel trick and softmax, per-row top-k)."""
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        n_mask = (x[:, start:end] == mask_id).sum(1)
        counts = torch.stack([torch.tensor([int(n) // steps_per_block + (i < int(n) % steps_per_block)
                                            for i in range(steps_per_block)]) for n in n_mask])
        i = 0
        while True:
            if threshold is None and i == steps_per_block:
                break
            if threshold is not None and not bool((x[:, start:end] == mask_id).any()):
                break
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, un = model(torch.cat([x, un_x])).logits.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x).logits
            if temperature == 0:
                x0 = logits.argmax(-1)
            else:
                l64 = logits.double()
                x0 = (l64.exp() / (-torch.log(torch.rand_like(l64))) ** temperature).argmax(-1)
            if remasking == "low_confidence":
                conf = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
            else:
                conf = torch.rand(x0.shape, dtype=torch.float64)
            conf[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, -torch.inf)
            transfer = torch.zeros_like(mask_index)
            for j in range(batch):
                k = int(mask_index[j, :end].sum()) if threshold is not None else int(counts[j, i])
                _transfer_top_k(transfer, conf, j, k, threshold)
            x[transfer] = x0[transfer]
            i += 1
    return x


def _prompt(batch, plen=5, seed=1):
    return torch.randint(0, MASK, (batch, plen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("gen_length,block_length,steps", [(16, 16, 8), (16, 4, 8), (24, 8, 24), (12, 4, 6)])
def test_greedy_matches_reference_exactly(cfg_scale, gen_length, block_length, steps):
    model = TinyBidirectionalLM()
    prompt = _prompt(3)
    ref = reference_generate(model, prompt, steps, gen_length, block_length, cfg_scale=cfg_scale)
    out = llada.generate(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                         temperature=0.0, cfg_scale=cfg_scale, mask_id=MASK, seed=0)
    assert out.dtype == torch.int64 and out.shape == ref.shape
    assert (out[:, :5] == prompt).all()
    assert not (out == MASK).any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_steps_larger_than_block_skips_empty_steps():
    """steps_per_block > block_length: LLaDA has steps that fix nothing; we skip their model call."""
    model = TinyBidirectionalLM()
    prompt = _prompt(2)
    ref = reference_generate(model, prompt, 16, 8, 4, cfg_scale=0.0)
    model.calls = 0
    out = llada.generate(model, prompt, steps=16, gen_length=8, block_length=4, mask_id=MASK, seed=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert model.calls == 8  # 4 tokens per block, 1 per step, the other 4 steps of each block skipped


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_threshold_greedy_matches_fast_dllm(cfg_scale, threshold):
    model = TinyBidirectionalLM()
    prompt = _prompt(3)
    ref = reference_generate(model, prompt, 8, 16, 8, cfg_scale=cfg_scale, threshold=threshold)
    model.calls = 0
    out = llada.generate(model, prompt, steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale,
                         mask_id=MASK, seed=0, threshold=threshold)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert 2 <= model.calls <= 16  # at least one token per step and row, at most block_length steps per block


def test_threshold_unmasks_all_confident_positions_at_once():
    """A model certain of every position: threshold decoding fixes each block in a single step."""
    class Certain(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            logits = torch.full((*x.shape, V), -30.0)
            logits[..., 3] = 0.0
            return SimpleNamespace(logits=logits)

    model = Certain()
    out = llada.generate(model, _prompt(2), steps=4, gen_length=8, block_length=4, mask_id=MASK, threshold=0.9)
    assert model.calls == 2 and (out[:, 5:] == 3).all()


@pytest.mark.parametrize("remasking,cfg_scale,temperature", [
    ("low_confidence", 0.0, 1.0), ("low_confidence", 1.0, 0.7), ("random", 0.0, 1.0), ("random", 0.5, 1.0),
])
def test_sampled_generation_matches_reference_in_distribution(remasking, cfg_scale, temperature):
    """The joint distribution of whole generated answers (3 tokens, 2 blocks) agrees with the reference."""
    torch.manual_seed(0)
    model = TinyBidirectionalLM(vocab=5, mask_id=4, seed=3, sharpness=0.3)
    n = 4000
    prompt = torch.tensor([[0, 2, 1]]).expand(n, 3)
    kw = dict(steps=4, gen_length=4, block_length=2, temperature=temperature, cfg_scale=cfg_scale,
              remasking=remasking, mask_id=4)
    ref = reference_generate(model, prompt, **kw)[:, 3:]
    ours = llada.generate(model, prompt, seed=123, **kw)[:, 3:]
    assert len(joint_counts(ours)) > 5  # really random
    assert two_sample_pvalue(ours, ref) > 1e-3


def test_random_remasking_order_is_uniform():
    """Greedy tokens, random order: a model that writes "how many tokens are known" reveals the order."""
    class Counter(torch.nn.Module):
        def forward(self, x):
            known = (x != 4).sum(-1, keepdim=True) - 3  # answer tokens fixed so far
            return SimpleNamespace(logits=torch.nn.functional.one_hot(known, 5).float().expand(*x.shape, 5) * 10)

    n = 4800
    prompt = torch.tensor([[0, 2, 1]]).expand(n, 3)
    kw = dict(steps=4, gen_length=4, block_length=4, temperature=0.0, remasking="random", mask_id=4)
    ours = llada.generate(Counter(), prompt, seed=11, **kw)[:, 3:]
    assert (ours.sort(-1).values == torch.arange(4)).all()  # one token per step: a permutation of 0..3
    code = (ours * torch.tensor([64, 16, 4, 1])).sum(-1)
    counts = torch.bincount(code, minlength=256)
    counts = counts[counts > 0]
    assert counts.numel() == 24
    assert chi_square_pvalue(counts, torch.full((24,), 1 / 24)) > 1e-3
    torch.manual_seed(0)
    assert two_sample_pvalue(ours, reference_generate(Counter(), prompt, **kw)[:, 3:]) > 1e-3


def test_llada_temperature_is_softmax_temperature():
    """LLaDA's exp(l) / (-log u)^T trick samples softmax(l / T) exactly, which is what the op samples."""
    torch.manual_seed(0)
    logits = torch.randn(8, dtype=torch.float64) * 2
    t = 0.6
    n = 200_000
    l64 = logits.expand(n, 8)
    draws = (l64.exp() / (-torch.log(torch.rand_like(l64))) ** t).argmax(-1)
    probs = torch.softmax(logits / t, -1)
    assert chi_square_pvalue(torch.bincount(draws, minlength=8), probs) > 1e-3
    tokens, _ = sgk.guided_sample(logits.float().expand(n, 8), temperature=t, seed=5)
    assert chi_square_pvalue(torch.bincount(tokens, minlength=8), probs) > 1e-3


def test_seed_reproducible():
    model = TinyBidirectionalLM()
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=1.0, mask_id=MASK)
    a = llada.generate(model, _prompt(4), seed=7, **kw)
    b = llada.generate(model, _prompt(4), seed=7, **kw)
    c = llada.generate(model, _prompt(4), seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = llada.generate(model, _prompt(4), **kw)
    torch.manual_seed(3)
    assert torch.equal(d, llada.generate(model, _prompt(4), **kw))


def test_never_chooses_outside_the_current_block():
    """Each step only fixes positions of the current block; later blocks stay masked until their turn."""
    seen = []

    class Spy(TinyBidirectionalLM):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    model = Spy()
    llada.generate(model, _prompt(2), steps=6, gen_length=12, block_length=4, temperature=1.0, mask_id=MASK, seed=1)
    for step, x in enumerate(seen):
        block = step // 2
        assert (x[:, 5 + 4 * (block + 1):] == MASK).all()  # later blocks untouched
        assert not (x[:, : 5 + 4 * block] == MASK).any()  # earlier blocks complete


def test_get_num_transfer_tokens():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :7] = True
    out = llada.get_num_transfer_tokens(mask, 4)
    assert out.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=10, block_length=4), "multiple of block_length"),
    (dict(steps=6, gen_length=16, block_length=4), "multiple of the number of blocks"),
    (dict(remasking="top_p"), "remasking"),
    (dict(temperature=-1.0), "temperature"),
    (dict(steps=0), "steps"),
])
def test_bad_input(kw, match):
    args = dict(steps=8, gen_length=16, block_length=16)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        llada.generate(TinyBidirectionalLM(), _prompt(1), mask_id=MASK, **args)


def test_bad_prompt():
    with pytest.raises(TypeError, match="prompt"):
        llada.generate(TinyBidirectionalLM(), _prompt(1).float(), steps=4, gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="prompt"):
        llada.generate(TinyBidirectionalLM(), _prompt(1)[0], steps=4, gen_length=4, block_length=4)


def test_threshold_decoding_does_not_hang_on_a_model_that_predicts_mask_id():
    class AlwaysMask(torch.nn.Module):
        def forward(self, x):
            logits = torch.full((*x.shape, 16), -30.0)
            logits[..., 15] = 30.0  # mask_id below
            return type("Out", (), {"logits": logits})()

    prompt = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="mask_id"):
        llada.generate(AlwaysMask(), prompt, steps=4, gen_length=4, block_length=4, threshold=0.9, mask_id=15)


# --- LLaDA's current generate(): attention_mask, EOS/EoT flags; Fast-dLLM's factor rule -----------------

EOS, EOT = 9, 10  # stand-ins for LLaDA's 126081 / 126348 in the tiny vocabulary


class TinyLLaDA(TinyBidirectionalLM):
    """Shaped like LLaDA's HF model: ``model(input_ids, attention_mask=None).logits``, 2-D padding mask.

    ``eos_bias``: EOS / EoT logits just below the top one, so their probability is large everywhere
    (exercises the confidence renormalisation) without ties."""

    def __init__(self, eos_bias=False, **kw):
        super().__init__(**kw)
        self.eos_bias = eos_bias
        self.config = SimpleNamespace(vocab_size=self.emb.shape[0])

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        h = self.emb[input_ids] + self.pos[: input_ids.shape[1]]
        q, k, v = (h @ self.qkv).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        logits = (h + torch.softmax(scores, -1) @ v) @ self.head
        logits[..., self.mask_id] = -1e4
        if self.eos_bias:
            top = logits[..., :EOS].amax(-1)
            logits[..., EOS], logits[..., EOT] = top - 0.3, top - 0.7
        return SimpleNamespace(logits=logits)


def reference_generate_current(model, prompt, attention_mask, steps, gen_length, block_length, cfg_scale=0.0,
                               logits_eos_inf=False, confidence_eos_eot_inf=False, threshold=None, factor=None):
    """Greedy LLaDA generate() as published today (float32 softmax), with Fast-dLLM's threshold/factor rules."""
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), MASK, dtype=torch.long)
    x[:, :plen] = prompt
    am = None if attention_mask is None else torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=attention_mask.dtype)], -1)
    prompt_index = x != MASK
    spb = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        n_mask = (x[:, start:end] == MASK).sum(1)
        counts = [[int(n) // spb + (i < int(n) % spb) for i in range(spb)] for n in n_mask]
        i = 0
        while (x[:, start:end] == MASK).any() if (threshold or factor) else i < spb:
            mask_index = x == MASK
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                kw = {} if am is None else dict(attention_mask=torch.cat([am, am]))
                cond, un = model(torch.cat([x, un_x]), **kw).logits.chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x, **({} if am is None else dict(attention_mask=am))).logits
            if logits_eos_inf:
                logits[:, :, EOS] = -torch.inf
            x0 = logits.argmax(-1)
            if confidence_eos_eot_inf:  # at temperature 0 LLaDA's code sets both on the logits
                logits[:, :, EOS] = logits[:, :, EOT] = -torch.inf
            conf = torch.softmax(logits.float(), -1).gather(-1, x0[..., None])[..., 0]
            conf[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, -torch.inf)
            transfer = torch.zeros_like(mask_index)
            for j in range(batch):
                n_cand = int(mask_index[j, :end].sum())
                if factor is not None:
                    if n_cand == 0:
                        continue
                    threshs = [1 - factor / (n + 1) for n in range(1, n_cand + 1)]
                    threshs[0] = -1
                    srt = torch.sort(conf[j][mask_index[j]], descending=True)[0]
                    for top_i in range(n_cand):
                        if srt[top_i] < threshs[top_i]:
                            break
                    if top_i == 0 or top_i == n_cand - 1:
                        top_i += 1
                    k = top_i
                else:
                    k = n_cand if threshold is not None else counts[j][i]
                _transfer_top_k(transfer, conf, j, k, threshold)
            x[transfer] = x0[transfer]
            i += 1
    return x


def _left_padded(batch=3, plen=6, pad=8):
    prompt = _prompt(batch, plen, seed=2)
    am = torch.ones_like(prompt)
    for j in range(batch):
        prompt[j, : 2 * j], am[j, : 2 * j] = pad, 0
    return prompt, am


@pytest.mark.parametrize("kw", [
    dict(), dict(cfg_scale=1.0), dict(logits_eos_inf=True), dict(confidence_eos_eot_inf=True),
    dict(logits_eos_inf=True, confidence_eos_eot_inf=True, cfg_scale=0.5),
    dict(threshold=0.4), dict(factor=1.0), dict(factor=2.5, cfg_scale=1.0),
])
def test_current_llada_greedy_matches_reference_with_left_padding(monkeypatch, kw):
    monkeypatch.setattr(llada, "EOS_ID", EOS)
    monkeypatch.setattr(llada, "EOT_ID", EOT)
    model = TinyLLaDA(eos_bias=True)
    prompt, am = _left_padded()
    ref = reference_generate_current(model, prompt, am, 12, 12, 4, **kw)
    extra = {k: kw.pop(k) for k in ("threshold", "factor") if k in kw}
    out = llada.generate(model, prompt, am, 12, 12, 4, 0.0, mask_id=MASK, seed=0, **kw, **extra)  # LLaDA's order
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if kw.get("logits_eos_inf"):
        assert not (out[:, 6:] == EOS).any()


def test_attention_mask_reaches_the_model():
    model = TinyLLaDA()
    prompt, am = _left_padded()
    with_mask = llada.generate(model, prompt, am, 4, 4, 4, mask_id=MASK, seed=0)
    without = llada.generate(model, prompt, None, 4, 4, 4, mask_id=MASK, seed=0)
    assert not torch.equal(with_mask, without)
    torch.testing.assert_close(with_mask, reference_generate_current(model, prompt, am, 4, 4, 4), rtol=0, atol=0)


@pytest.mark.parametrize("rule", [dict(threshold=0.5), dict(factor=1.0)])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_threshold_and_factor_sample_the_candidate_rows_only(rule, cfg):
    """Fast-dLLM's rules read only the candidate rows: NaN logits in decoded rows change nothing (before,
    every row of the window was sampled, and such a row raised)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, MASK, (2, 10), generator=gen)
    x[:, 6:] = MASK
    x[1, 4] = MASK
    cand = x == MASK
    logits, uncond = 3 * torch.randn(2, 10, V, generator=gen), torch.randn(2, 10, V, generator=gen)
    kw = dict(cfg_scale=cfg, temperature=0.0, seed=1, **rule)
    want = llada.llada_step(x, cand, logits, uncond if cfg else None, None, **kw)
    bad, bad_u = logits.clone(), uncond.clone()
    bad[~cand], bad_u[~cand] = float("nan"), float("nan")
    assert torch.equal(llada.llada_step(x, cand, bad, bad_u if cfg else None, None, **kw), want)
    assert (want[cand] != MASK).any() and torch.equal(want[~cand], x[~cand])


def test_threshold_with_every_row_a_candidate_reads_the_logits_in_place(monkeypatch):
    """All rows candidates (a window's first step): the logits go to the sampler as a view, not as a
    [K, V] gathered copy (which cost 10x the step at V = 126464), with the tokens of the gather."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((2, 6), MASK)
    logits = 3 * torch.randn(2, 6, V, generator=gen)
    seen, real = [], llada.guided_sample
    monkeypatch.setattr(llada, "guided_sample", lambda cond, *a, **k: seen.append(cond) or real(cond, *a, **k))
    kw = dict(temperature=1.0, seed=3, threshold=0.5)
    got = llada.llada_step(x, x == MASK, logits, None, None, **kw)
    assert seen[0].data_ptr() == logits.data_ptr()
    tokens, _ = real(logits.reshape(12, V).clone(), None, guidance_scale=0.0, temperature=1.0, seed=3, offset=0)
    keep = got != MASK
    assert keep.any() and torch.equal(got[keep], tokens.reshape(2, 6)[keep])


def test_factor_count_rule():
    conf = torch.tensor([[0.99, 0.9, 0.5, 0.2], [0.99, 0.9, 0.8, 0.7], [0.3, 0.1, -torch.inf, -torch.inf]],
                        dtype=torch.float64)
    cand = torch.isfinite(conf)
    # factor 1: thresholds -1, 2/3, 3/4, 4/5: row 0 fails at n=3 -> 2; row 1 fails at the last -> all 4; row 2 -> both
    assert llada.factor_count(conf, cand, 1.0).tolist() == [2, 4, 2]


@pytest.mark.parametrize("kw,match", [
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.int64)), "attention_mask"),
    (dict(mask_id=99), "mask_id"),
    (dict(mask_id=-1), "mask_id"),
    (dict(threshold=0.9, factor=1.0), "threshold, factor"),
    (dict(factor=0.0), "factor"),
    (dict(logits_eos_inf=True), "logits_eos_inf"),
])
def test_bad_input_current(kw, match):
    args = dict(steps=4, gen_length=4, block_length=4, mask_id=MASK)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        llada.generate(TinyLLaDA(), _prompt(1), **args)


# ------------------------------------------------------------------------------------------------
# The fused-head path (sgkernels.head_sample on the candidate rows; no [B, L, V] logits)


class _TinyBase(torch.nn.Module):
    def __init__(self, vocab=V, dim=32, max_len=64, seed=0, head_inside=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen))
        self.pos = torch.nn.Parameter(torch.randn(max_len, dim, generator=gen) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(dim, 3 * dim, generator=gen) / dim**0.5)
        self.ff_out = torch.nn.Linear(dim, vocab) if head_inside else None

    def forward(self, x, attention_mask=None):
        h = self.emb[x] + self.pos[: x.shape[1]]
        q, k, v = (h @ self.qkv).chunk(3, dim=-1)
        h = h + torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        if self.ff_out is not None:  # LLaDA's remote code: the base model computes the logits
            return SimpleNamespace(logits=self.ff_out(h))
        return SimpleNamespace(last_hidden_state=h)


class TinyHFLM(torch.nn.Module):
    """HF-shaped: ``.model`` base + ``lm_head`` beside it (Llama/Qwen/Dream), or the head inside the
    base model with get/set_output_embeddings (LLaDA's remote code)."""

    def __init__(self, head_inside=False, seed=0):
        super().__init__()
        self.model = _TinyBase(seed=seed, head_inside=head_inside)
        self.lm_head = None if head_inside else torch.nn.Linear(32, V)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.get_output_embeddings().weight.copy_(torch.randn(V, 32, generator=gen) * 3.0 / 32**0.5)
            self.get_output_embeddings().bias.copy_(torch.randn(V, generator=gen))
            self.get_output_embeddings().bias[MASK] = -1e4  # (practically) never predicts [MASK]
        self.head_calls = 0
        self.get_output_embeddings().register_forward_hook(lambda *a: setattr(self, "head_calls", self.head_calls + 1))

    def get_output_embeddings(self):
        return self.model.ff_out if self.lm_head is None else self.lm_head

    def set_output_embeddings(self, m):
        self.model.ff_out = m

    def forward(self, x, attention_mask=None):
        out = self.model(x, attention_mask)
        return out if self.lm_head is None else SimpleNamespace(logits=self.lm_head(out.last_hidden_state))


@pytest.mark.parametrize("head_inside", [False, True], ids=["lm_head_beside", "llada_head_inside"])
@pytest.mark.parametrize("cfg_scale,temperature,remasking", [(0.0, 0.0, "low_confidence"), (1.0, 0.0, "low_confidence"),
                                                             (0.5, 0.8, "low_confidence"), (0.0, 1.0, "random")])
def test_fused_head_matches_logits_path(head_inside, cfg_scale, temperature, remasking):
    """fused_head: the backbone runs without its head (the head is never called), head_sample projects the
    candidate rows; greedy gives the logits path's tokens, sampling the same tokens with the same seed
    (the two differ only by the GEMM's rounding)."""
    model = TinyHFLM(head_inside=head_inside)
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=temperature, cfg_scale=cfg_scale,
              remasking=remasking, mask_id=MASK, seed=3)
    fused = llada.generate(model, prompt, **kw)
    assert model.head_calls == 0
    plain = llada.generate(model, prompt, fused_head=False, **kw)
    assert model.head_calls > 0
    assert torch.equal(fused, plain)
    assert not bool((fused == MASK).any())


def test_fused_head_explicit_head_and_eos():
    """head= with a backbone returning hidden states; logits_eos_inf via a -inf bias entry."""
    model = TinyHFLM()
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(2))
    vocab = llada.EOS_ID + 1
    head = torch.nn.Linear(32, vocab)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[llada.EOS_ID] = 50.0  # EOS would always win
        head.bias[MASK] = -1e4
    backbone = lambda x, **kw: model.model(x % V, **kw)  # noqa: E731  (ids past the tiny embedding wrap)
    kw = dict(steps=4, gen_length=8, block_length=8, temperature=0.0, mask_id=MASK, logits_eos_inf=True, seed=0)
    fused = llada.generate(backbone, prompt, head=head, **kw)
    plain = llada.generate(lambda x, **k: SimpleNamespace(logits=head(backbone(x, **k).last_hidden_state)), prompt,
                           **kw)
    assert torch.equal(fused, plain) and not bool((fused == llada.EOS_ID).any())


def test_fused_head_threads_share_one_model():
    """Two threads call generate on one LLaDA-shaped model (head inside the base model), interleaved
    so that B runs a whole call while A is inside its first forward (issue 22: A swapped the head for
    nn.Identity, so B failed with IndexError). Both get the single-threaded tokens; the model is never
    changed (same head module, no hook left)."""
    import threading

    model = TinyHFLM(head_inside=True)
    head = model.get_output_embeddings()
    prompt = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(steps=4, gen_length=8, block_length=8, temperature=0.0, mask_id=MASK, seed=3)
    ref = llada.generate(model, prompt, **kw)
    a_inside, b_done = threading.Event(), threading.Event()
    owner = {}

    def gate(module, inputs):  # thread A's first base-model forward waits for B's whole call
        if threading.get_ident() == owner.get("a") and not a_inside.is_set():
            a_inside.set()
            assert b_done.wait(60)

    handle = model.model.register_forward_pre_hook(gate)
    out, errors = {}, []

    def run(name):
        try:
            if name == "a":
                owner["a"] = threading.get_ident()
            else:
                assert a_inside.wait(60)
            out[name] = llada.generate(model, prompt, **kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        finally:
            if name == "b":
                b_done.set()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    handle.remove()
    assert not errors, errors
    assert torch.equal(out["a"], ref) and torch.equal(out["b"], ref)
    assert model.get_output_embeddings() is head and not head._forward_pre_hooks and model.head_calls == 0


def test_numpy_scalars():
    """numpy integers and floats wherever ints and floats are taken (issue 22)."""
    import numpy as np

    model = TinyHFLM()
    prompt = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(temperature=0.5, cfg_scale=0.5, mask_id=MASK, seed=3)
    ref = llada.generate(model, prompt, steps=4, gen_length=8, block_length=4, **kw)
    kw.update(temperature=np.float32(0.5), cfg_scale=np.float64(0.5), mask_id=np.int64(MASK))
    out = llada.generate(model, prompt, steps=np.int64(4), gen_length=np.int32(8), block_length=np.int64(4), **kw)
    assert torch.equal(out, ref)


def test_fused_head_refuses_a_bert_style_mlm_head():
    """BertForMaskedLM's head transforms the hidden states (dense, GELU, LayerNorm) before its projection:
    the fused head must fall back to the logits path, not project the base's hidden states directly."""
    transformers = pytest.importorskip("transformers")
    from sgkernels.integrations import _fused_head

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(cfg).eval()
    assert _fused_head.resolve(model) is None
    prompt = _prompt(2)
    kw = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK, seed=0)
    torch.testing.assert_close(llada.generate(model, prompt, **kw), llada.generate(model, prompt, fused_head=False, **kw),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Fast-dLLM's KV-cache variants (generate_with_prefix_cache / generate_with_dual_cache). Checked (not
# committed: Fast-dLLM's code) against Fast-dLLM's own functions on its modeling_llada.py, tiny config:
# 36/36 runs token- and nfe-equal. Here: a tiny model with Fast-dLLM's cache API.


class TinyFastDLLM(torch.nn.Module):
    """Two attention layers with Fast-dLLM's cache API: ``past_key_values`` a list of ``(k, v)`` per
    layer ``[B, 1, L, d]``, ``use_cache``, ``replace_position`` (bool ``[B, L]``: the cache entries the
    input replaces, in place). ``block_causal=(plen, block)``: a query in answer block j sees the prompt
    and blocks <= j only (then both caches are exact); None: bidirectional (the caches approximate)."""

    def __init__(self, block_causal=None, dim=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.block_causal = block_causal
        self.emb = torch.nn.Parameter(torch.randn(V, dim, generator=g))
        self.pos = torch.nn.Parameter(0.5 * torch.randn(64, dim, generator=g))
        self.qkv = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(dim, 3 * dim, generator=g) / dim**0.5)
                                          for _ in range(2))
        self.head = torch.nn.Parameter(4.0 * torch.randn(dim, V, generator=g) / dim**0.5)
        self.calls = 0

    def _block(self, p):
        plen, block = self.block_causal
        return torch.where(p < plen, -1, (p - plen) // block)

    def forward(self, input_ids, past_key_values=None, use_cache=False, replace_position=None):
        self.calls += 1
        b, n = input_ids.shape
        if past_key_values is None:
            qpos = torch.arange(n)
        elif replace_position is None:
            qpos = torch.arange(past_key_values[0][0].shape[-2], past_key_values[0][0].shape[-2] + n)
        else:
            qpos = replace_position[0].nonzero()[:, 0]
        h = self.emb[input_ids] + self.pos[qpos]
        present = []
        for layer, w in enumerate(self.qkv):
            q, k, v = (h @ w)[:, None].chunk(3, dim=-1)
            if past_key_values is not None:
                pk, pv = past_key_values[layer]
                if replace_position is None:
                    k, v = torch.cat([pk, k], -2), torch.cat([pv, v], -2)
                else:
                    pk[:, :, qpos], pv[:, :, qpos] = k, v
                    k, v = pk, pv
            present.append((k, v))
            kpos = torch.arange(k.shape[-2])
            mask = None
            if self.block_causal is not None:
                mask = self._block(kpos)[None, :] <= self._block(qpos)[:, None]
            h = h + torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, 0]
        logits = h @ self.head
        logits[..., MASK] = -1e4  # like a trained LLaDA, never predicts [MASK]
        return SimpleNamespace(logits=logits, past_key_values=present if use_cache else None)


@pytest.mark.parametrize("rule", [dict(), dict(threshold=0.6), dict(factor=1.0)], ids=["steps", "threshold", "factor"])
def test_fast_dllm_caches_exact_on_a_block_causal_model(rule):
    """On a block-causal model both caches are exact: the same tokens as generate() without a cache."""
    prompt = _prompt(2, plen=5)
    model = TinyFastDLLM(block_causal=(5, 4))
    want = llada.generate(model, prompt, steps=6, gen_length=12, block_length=4, mask_id=MASK, seed=0, **rule)
    for fn in (llada.generate_with_prefix_cache, llada.generate_with_dual_cache):
        model.calls = 0
        x, nfe = fn(model, prompt, steps=6, gen_length=12, block_length=4, mask_id=MASK, seed=0, **rule)
        assert torch.equal(x, want), fn.__name__
        assert nfe == model.calls and nfe >= 2 * 3  # a full forward + at least one cached step per block


def test_fast_dllm_caches_on_a_bidirectional_model_and_bad_input():
    prompt = _prompt(1, plen=5)
    model = TinyFastDLLM()
    for fn in (llada.generate_with_prefix_cache, llada.generate_with_dual_cache):
        x, nfe = fn(model, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK, seed=0)
        assert not (x == MASK).any() and torch.equal(x[:, :5], prompt) and nfe == 4  # 2 steps per block
    with pytest.raises(ValueError, match="past_key_values"):
        llada.generate_with_prefix_cache(TinyLLaDA(), prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK)

    class NoReplace(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="replace_position"):
        llada.generate_with_dual_cache(NoReplace(), prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK)
    with pytest.raises(ValueError, match="gen_length"):
        llada.generate_with_dual_cache(model, prompt, steps=4, gen_length=9, block_length=4, mask_id=MASK)
