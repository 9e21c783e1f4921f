"""sgkernels.integrations.dream.diffusion_generate against a plain re-implementation of Dream's sampler.

``reference_generate`` below follows Dream's ``diffusion_generate`` / ``_sample`` / ``sample_tokens``
as published: pad with masks, 4-D attention mask and position ids for left padding, logits shifted by
one, ``linspace(1, eps, steps + 1)`` schedule, top-p then top-k filter, per-row top-k of the confidence.
Greedy decoding must match token for token; ``origin`` and ``alg_temp`` are compared in distribution.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import has_cpu_kernel, joint_counts, two_sample_pvalue

import sgkernels as sgk

pytest.importorskip("transformers")
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import MaskedLMOutput  # noqa: E402

from sgkernels.integrations import dream  # noqa: E402
from sgkernels.ops.filters import confidence_reference, filter_logits_reference, keep_mask_reference

V, MASK, PAD = 16, 15, 14


@pytest.fixture(autouse=True)
def _backend():
    ctx = contextlib.nullcontext() if has_cpu_kernel("self_guided_step") else sgk.use_backend("torch")
    with ctx:
        yield


class TinyDreamConfig(PretrainedConfig):
    model_type = "tiny_dream_test"

    def __init__(self, vocab_size=V, hidden_size=32, mask_token_id=MASK, pad_token_id=PAD, seed=0, sharpness=3.0,
                 max_position_embeddings=64, **kwargs):
        self.vocab_size, self.hidden_size, self.seed, self.sharpness = vocab_size, hidden_size, seed, sharpness
        self.mask_token_id, self.max_position_embeddings = mask_token_id, max_position_embeddings
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def _attend(m, input_ids, attention_mask, position_ids):
    """One single-head attention layer with a residual over ``m.emb`` / ``m.pos`` / ``m.qkv``: ``[B, N, d]``."""
    pos = torch.arange(input_ids.shape[1]) if position_ids is None else position_ids
    h = m.emb[input_ids] + m.pos[pos]
    q, k, v = (h @ m.qkv).chunk(3, dim=-1)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    if isinstance(attention_mask, torch.Tensor):
        scores = scores.masked_fill(~attention_mask[:, 0], -1e9)
    return h + torch.softmax(scores, -1) @ v


class TinyDream(PreTrainedModel):
    """Shaped like Dream's model: ``forward(input_ids, attention_mask, position_ids)``, ``"full"`` or a
    ``[B, 1, N, N]`` bool mask, ``.logits`` predicting the *next* position (hence Dream's shift)."""

    config_class = TinyDreamConfig

    def __init__(self, config):
        super().__init__(config)
        gen = torch.Generator().manual_seed(config.seed)
        d, v = config.hidden_size, config.vocab_size
        self.emb = torch.nn.Parameter(torch.randn(v, d, generator=gen))
        self.pos = torch.nn.Parameter(torch.randn(config.max_position_embeddings, d, generator=gen) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(d, 3 * d, generator=gen) / d**0.5)
        self.head = torch.nn.Parameter(torch.randn(d, v, generator=gen) * config.sharpness / d**0.5)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        self.calls += 1
        logits = _attend(self, input_ids, attention_mask, position_ids) @ self.head
        logits[..., self.config.mask_token_id] = -1e4
        return MaskedLMOutput(logits=logits)


def reference_generate(model, input_ids, attention_mask=None, *, max_new_tokens, steps, eps=1e-3, temperature=0.0,
                       top_p=None, top_k=None, alg="maskgit_plus", alg_temp=None, mask_id=MASK):
    """Dream's published sampler, written out plainly (row by row)."""
    max_length = input_ids.shape[1] + max_new_tokens
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        am = F.pad(attention_mask, (0, max_new_tokens), value=1)
        tok_idx = am.long().cumsum(-1) - 1
        tok_idx.masked_fill_(am == 0, 1)
        am = am.bool()
        am = (am[:, None, :, None] & am[:, None, None, :])
    else:
        am, tok_idx = "full", None
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        masked = x == mask_id
        out = model(x, am, tok_idx).logits
        logits = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        t, s = timesteps[i], timesteps[i + 1]
        rows = logits[masked]
        if temperature > 0:
            rows = rows / temperature
        if top_p is not None and top_p < 1:  # keep while the mass before the token is <= top_p
            srt, idx = torch.sort(rows, descending=True)
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = torch.zeros_like(cum, dtype=torch.bool)
            drop[:, 1:] = cum[:, :-1] > top_p
            rows = rows.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), torch.finfo(rows.dtype).min)
        if top_k is not None:
            rows = rows.masked_fill(rows < torch.topk(rows, top_k)[0][:, -1:], torch.finfo(rows.dtype).min)
        probs = torch.softmax(rows, -1)
        if temperature > 0:
            x0 = torch.multinomial(probs, 1)[:, 0]
        else:
            x0 = probs.argmax(-1)
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            reveal = torch.rand(x0.shape) < p_transfer
            x[masked] = torch.where(reveal, x0, mask_id)
            continue
        if alg == "maskgit_plus":
            conf = probs.gather(-1, x0[:, None])[:, 0]
        elif alg == "topk_margin":
            top2 = probs.sort(-1, descending=True).values
            conf = top2[:, 0] - top2[:, 1]
        else:
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)
        n_mask = masked.sum() / masked.shape[0]
        k = int(n_mask * (1 - s / t)) if i < steps - 1 else int(n_mask)
        full = torch.full(x.shape, -torch.inf)
        full[masked] = conf
        cand = torch.full_like(x, mask_id)
        cand[masked] = x0
        for r in range(x.shape[0]):
            if k == 0:
                continue
            if not alg_temp:
                idx = torch.topk(full[r], k).indices
            else:
                idx = torch.multinomial(torch.softmax(full[r] / alg_temp, -1), k)
            x[r, idx] = cand[r, idx]
    return x


def _model(seed=0, **kw):
    return TinyDream(TinyDreamConfig(seed=seed, **kw)).eval()


def _batch(left_padded: bool):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, PAD, (3, 6), generator=gen)
    am = torch.ones_like(ids)
    if left_padded:
        ids[0, :2], am[0, :2] = PAD, 0
        ids[2, :4], am[2, :4] = PAD, 0
    return ids, am


@pytest.mark.parametrize("alg,left_padded,steps,new,filt", [
    ("maskgit_plus", False, 8, 8, {}), ("maskgit_plus", True, 5, 12, {}), ("maskgit_plus", True, 6, 6, dict(top_p=0.9)),
    ("topk_margin", True, 8, 8, {}), ("topk_margin", False, 4, 8, dict(top_k=3)),
    ("entropy", True, 5, 12, {}), ("entropy", True, 6, 6, dict(top_p=0.95, top_k=4)),
])
def test_greedy_matches_reference_exactly(alg, left_padded, steps, new, filt):
    # filters on a flatter model: a filter that keeps a single token gives confidence exactly 1 (or entropy 0),
    # and such exact ties are ordered differently by torch.topk and by us
    model = _model(sharpness=1.0 if filt else 3.0)
    ids, am = _batch(left_padded)
    ref = reference_generate(model, ids.clone(), am, max_new_tokens=new, steps=steps, alg=alg, **filt)
    out = dream.diffusion_generate(model, ids, attention_mask=am, max_new_tokens=new, steps=steps, alg=alg,
                                   temperature=0.0, seed=0, **filt)
    assert out.shape == (3, 6 + new) and (out[:, :6] == ids).all() and not (out == MASK).any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_greedy_origin_and_dict_output_with_history():
    model = _model()
    ids, am = _batch(True)
    res = dream.diffusion_generate(model, ids, attention_mask=am, max_new_tokens=6, steps=6, alg="origin",
                                   output_history=True, return_dict_in_generate=True, seed=3)
    assert isinstance(res, dream.DreamModelOutput) and len(res.history) == 6
    assert torch.equal(res.history[-1], res.sequences) and not (res.sequences == MASK).any()
    # greedy origin: each revealed position holds the argmax of its shifted logits at that step
    for before, after in zip([F.pad(ids, (0, 6), value=MASK)] + list(res.history[:-1]), res.history):
        changed = (before != after)
        assert (before[changed] == MASK).all()


@pytest.mark.parametrize("kw", [
    dict(alg="origin", temperature=1.0),
    dict(alg="maskgit_plus", temperature=0.8, top_p=0.9),
    dict(alg="entropy", temperature=1.0, top_k=3, alg_temp=0.5),
    dict(alg="topk_margin", temperature=0.0, alg_temp=1.0),
])
def test_sampled_generation_matches_reference_in_distribution(kw):
    torch.manual_seed(0)
    model = _model(seed=3, vocab_size=6, mask_token_id=5, pad_token_id=4, sharpness=0.5)
    n = 3000
    ids = torch.tensor([[0, 2, 1]]).expand(n, 3)
    gen = dict(max_new_tokens=3, steps=3, mask_id=5)
    ref = reference_generate(model, ids.clone(), **gen, **kw)[:, 3:]
    gen["mask_token_id"] = gen.pop("mask_id")
    ours = dream.diffusion_generate(model, ids, seed=123, **gen, **kw)[:, 3:]
    assert len(joint_counts(ours)) > (2 if kw["temperature"] == 0 else 4)  # really random
    assert two_sample_pvalue(ours, ref) > 1e-3


def test_patch_and_seed():
    model = _model()
    dream.patch(model)
    ids, am = _batch(True)
    kw = dict(attention_mask=am, max_new_tokens=6, steps=6, temperature=1.0, alg="entropy", top_p=0.95)
    a = model.diffusion_generate(ids, seed=5, **kw)
    assert torch.equal(a, model.diffusion_generate(ids, seed=5, **kw))
    assert not torch.equal(a, model.diffusion_generate(ids, seed=6, **kw))
    assert model._sgkernels_original_diffusion_generate is None  # TinyDream had none


def test_hooks_are_called_like_dreams():
    model = _model()
    ids, _ = _batch(False)
    seen = []

    def tokens_hook(step, x, logits):
        seen.append(step)
        if step is not None:
            x[:, -1] = 3  # force the last token
        return x

    out = dream.diffusion_generate(model, ids, max_new_tokens=4, steps=4, alg="maskgit_plus",
                                   generation_tokens_hook_func=tokens_hook, seed=0)
    assert seen == [None, 0, 1, 2, 3] and (out[:, -1] == 3).all()


def test_filters_reference():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    assert keep_mask_reference(logits, top_k=2).tolist() == [[True, True, True, False, False]]  # ties kept
    assert keep_mask_reference(logits, top_p=float(p[0]) - 1e-6).tolist() == [[True, False, False, False, False]]
    assert keep_mask_reference(logits, top_p=float(p[0]) + 1e-3).tolist() == [[True, True, True, False, False]]
    assert keep_mask_reference(logits, min_p=0.3).tolist() == [[True, True, True, False, False]]
    assert keep_mask_reference(logits, top_k=1, top_p=0.99).tolist() == [[True, False, False, False, False]]
    assert torch.isinf(filter_logits_reference(logits, top_k=1)[0, 1:]).all()
    q = torch.softmax(logits, -1)
    torch.testing.assert_close(confidence_reference(logits, "margin"), q[:, 0] - q[:, 1])
    torch.testing.assert_close(confidence_reference(logits, "prob", torch.tensor([3])), q[:, 3])
    torch.testing.assert_close(confidence_reference(logits, "entropy"), (q * torch.log(q + 1e-10)).sum(-1))


@pytest.mark.parametrize("kw,err,match", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(alg="greedy"), ValueError, "alg"),
    (dict(alg="confidence_threshold"), ValueError, "alg"),
    (dict(attention_mask=torch.ones(3, 5, dtype=torch.int64)), ValueError, "attention_mask"),
    (dict(mask_token_id=99), ValueError, "mask_token_id"),
    (dict(steps=0), ValueError, "steps"),
    (dict(alg_temp=-1.0), ValueError, "alg_temp"),
    (dict(max_length=4), ValueError, "max_length"),
    (dict(bogus=1), TypeError, "bogus"),
])
def test_bad_input(kw, err, match):
    ids, _ = _batch(False)
    args = dict(max_new_tokens=4, steps=4, alg="maskgit_plus")
    args.update(kw)
    if "max_length" in kw:
        args.pop("max_new_tokens")
    with pytest.raises(err, match=match):
        dream.diffusion_generate(_model(), ids, **args)


def test_filter_argument_errors():
    from sgkernels.ops._validate import check_confidence, check_filters
    from sgkernels.ops.filters import DREAM_CONFIDENCES

    with pytest.raises(ValueError, match="min_p"):
        check_filters(min_p=2.0)
    with pytest.raises(ValueError, match="confidence"):
        check_confidence("logp", DREAM_CONFIDENCES)
    with pytest.raises(ValueError, match="confidence"):
        check_confidence("negentropy")


# ------------------------------------------------------------------------------------------------
# The fused-head path (sgkernels.head_sample on the sampled rows; no [B, N, V] logits)


class _TinyDreamBase(torch.nn.Module):
    """TinyDream's backbone: ``forward(input_ids, attention_mask, position_ids)`` -> ``.last_hidden_state``."""

    def __init__(self, d=32, seed=0, max_len=64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, d, generator=gen))
        self.pos = torch.nn.Parameter(torch.randn(max_len, d, generator=gen) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(d, 3 * d, generator=gen) / d**0.5)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(last_hidden_state=_attend(self, input_ids, attention_mask, position_ids))


class TinyDreamHF(torch.nn.Module):
    """Shaped like Dream's HF ``DreamModel``: ``.model`` (the base, ``get_decoder()``) and an ``lm_head``
    beside it (``get_output_embeddings()``); ``forward(input_ids, attention_mask, position_ids)``."""

    def __init__(self, seed=0, sharpness=3.0):
        super().__init__()
        self.model = _TinyDreamBase(seed=seed)
        self.lm_head = torch.nn.Linear(32, V)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(V, 32, generator=gen) * sharpness / 32**0.5)
            self.lm_head.bias.copy_(torch.randn(V, generator=gen))
            self.lm_head.bias[MASK] = -1e4  # (practically) never predicts the mask
        self.config = SimpleNamespace(vocab_size=V, mask_token_id=MASK, pad_token_id=PAD)
        self.head_calls = 0
        self.lm_head.register_forward_hook(lambda *a: setattr(self, "head_calls", self.head_calls + 1))

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids).last_hidden_state
        return MaskedLMOutput(logits=self.lm_head(hidden))


def _masked_prompt(ids):
    """A prompt with a mask token at position 0 of one row (the logits path then materialises the shift)."""
    ids = ids.clone()
    ids[1, 0] = MASK
    return ids


@pytest.mark.parametrize("alg", dream.ALGS)
@pytest.mark.parametrize("temperature,filt,alg_temp", [
    (0.0, {}, None), (0.0, dict(top_p=0.9, top_k=4), None), (0.8, dict(top_p=0.9), None), (1.0, dict(top_k=3), 0.5),
])
@pytest.mark.parametrize("prompt", ["plain", "left_padded", "mask_at_0"])
def test_fused_head_matches_logits_path(alg, temperature, filt, alg_temp, prompt):
    """fused_head: the head is never called, head_sample projects the sampled rows of the shifted hidden
    states with the logits path's row keys: the same tokens, greedy and sampled (same seed)."""
    model = TinyDreamHF(sharpness=1.0 if filt else 3.0)
    ids, am = _batch(prompt == "left_padded")
    if prompt == "mask_at_0":
        ids = _masked_prompt(ids)
    kw = dict(attention_mask=am, max_new_tokens=8, steps=5, alg=alg, temperature=temperature, alg_temp=alg_temp,
              mask_token_id=MASK, seed=11, **filt)
    fused = dream.diffusion_generate(model, ids, **kw)
    assert model.head_calls == 0
    plain = dream.diffusion_generate(model, ids, fused_head=False, **kw)
    assert model.head_calls > 0
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    if prompt != "mask_at_0":  # (with a mask in a prompt, k is the batch mean: a row may keep masks, as in Dream)
        assert not bool((fused[:, 6:] == MASK).any())


@pytest.mark.parametrize("alg,filt", [("maskgit_plus", {}), ("topk_margin", dict(top_k=3)),
                                      ("entropy", dict(top_p=0.95, top_k=4)), ("maskgit_plus", dict(top_p=0.9))])
def test_fused_head_greedy_matches_reference(alg, filt):
    """Left-padded batch, greedy: the fused path gives Dream's published sampler's tokens."""
    model = TinyDreamHF(sharpness=1.0 if filt else 3.0)
    ids, am = _batch(True)
    ref = reference_generate(model, ids.clone(), am, max_new_tokens=10, steps=5, alg=alg, **filt)
    out = dream.diffusion_generate(model, ids, attention_mask=am, max_new_tokens=10, steps=5, alg=alg, temperature=0.0,
                                   mask_token_id=MASK, seed=0, **filt)
    assert model.head_calls == 1 * 5  # the reference's calls only
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fused_head_explicit_head_patch_and_hooks():
    """head= with a backbone; patch() forwards head/fused_head; a hook forces the logits path."""
    model = TinyDreamHF()
    ids, am = _batch(True)
    kw = dict(attention_mask=am, max_new_tokens=6, steps=6, alg="entropy", temperature=0.7, top_p=0.95,
              mask_token_id=MASK, seed=4)
    plain = dream.diffusion_generate(model, ids, fused_head=False, **kw)
    calls = model.head_calls
    assert torch.equal(dream.diffusion_generate(model.model, ids, head=model.lm_head, **kw), plain)
    assert torch.equal(dream.diffusion_generate(model.model, ids, head=(model.lm_head.weight, model.lm_head.bias),
                                                **kw), plain)
    dream.patch(model)
    assert torch.equal(model.diffusion_generate(ids, **kw), plain) and model.head_calls == calls
    seen = []
    out = model.diffusion_generate(ids, generation_tokens_hook_func=lambda step, x, logits: seen.append(logits) or x,
                                   **kw)
    # the hook gets the logits: the logits path ran (its materialised shift keys rows over all N positions, so
    # the sampled tokens are another draw)
    assert model.head_calls == calls + 6 and seen[0] is None and seen[1].shape == (3, 12, V)
    assert out.shape == plain.shape and not bool((out == MASK).any())
    with pytest.raises(ValueError, match="mask_token_id"):
        dream.diffusion_generate(model.model, ids, head=torch.nn.Linear(32, 8), **dict(kw, mask_token_id=9))


def _upstream_dream():
    """Dream's published ``generation_utils.py`` (Dream-org's Hugging Face repos, or NVlabs/Fast-dLLM
    ``dream/model/generation_utils.py``) when ``SGK_DREAM_GENERATION_UTILS`` names a local copy."""
    import importlib.util
    import os

    path = os.environ.get("SGK_DREAM_GENERATION_UTILS")
    if not path or not os.path.exists(path):
        pytest.skip("set SGK_DREAM_GENERATION_UTILS to a local copy of Dream's generation_utils.py")
    spec = importlib.util.spec_from_file_location("dream_generation_utils_upstream", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("alg,filt,steps", [
    ("origin", {}, 1), ("origin", dict(top_p=0.9), 1), ("maskgit_plus", {}, 4), ("maskgit_plus", dict(top_p=0.9), 10),
    ("topk_margin", dict(top_k=4), 4), ("entropy", dict(top_p=0.95, top_k=4), 10), ("entropy", {}, 4),
])
@pytest.mark.parametrize("left_padded", [False, True])
def test_greedy_matches_upstream(alg, filt, steps, left_padded):
    """Greedy: upstream Dream's ``_sample`` (origin with 1 step: its reveal draws do not matter), the
    logits path and the fused-head path give the same tokens."""
    up = _upstream_dream()
    model = TinyDreamHF(sharpness=1.0 if filt else 3.0)
    ids, am = _batch(left_padded)
    cfg = up.DreamGenerationConfig(max_length=16, mask_token_id=MASK, steps=steps, eps=1e-3, alg=alg, alg_temp=None,
                                   temperature=0.0, top_p=filt.get("top_p"), top_k=filt.get("top_k"),
                                   output_history=False, return_dict_in_generate=False)
    model.device = torch.device("cpu")  # what _sample reads of its ``self`` besides calling it
    with torch.no_grad():
        ref = up.DreamGenerationMixin._sample(model, ids.clone(), am, cfg, lambda s, x, lg: x, lambda s, x, lg: lg)
    kw = dict(attention_mask=am, max_new_tokens=10, steps=steps, alg=alg, temperature=0.0, mask_token_id=MASK, seed=0,
              **filt)
    torch.testing.assert_close(dream.diffusion_generate(model, ids, **kw), ref, rtol=0, atol=0)
    torch.testing.assert_close(dream.diffusion_generate(model, ids, fused_head=False, **kw), ref, rtol=0, atol=0)


def test_numpy_scalars():
    """numpy integers and floats for steps, temperature, top_k / top_p, eps (issue 22)."""
    import numpy as np

    model, (ids, am) = _model(), _batch(True)
    kw = dict(attention_mask=am, max_new_tokens=6, alg="entropy", seed=5)
    ref = dream.diffusion_generate(model, ids, steps=6, temperature=1.0, top_p=0.9, top_k=7, eps=1e-3, **kw)
    out = dream.diffusion_generate(model, ids, steps=np.int64(6), temperature=np.float32(1.0),
                                   top_p=np.float64(0.9), top_k=np.int32(7), eps=np.float64(1e-3), **kw)
    assert torch.equal(out, ref)
