"""Block diffusion through diffusers (LLaDA2 / DiffusionGemma): the fused schedulers against the stock
ones (greedy token equality in the mask and uniform modes, the sampled law, ``generator=``, config
round trips, bad input), and the fused pipeline against the stock ``LLaDA2Pipeline`` on a tiny
block-causal LM."""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "BlockRefinementScheduler"):  # pragma: no cover
    pytest.skip("needs diffusers >= 0.39", allow_module_level=True)

from diffusers import BlockRefinementScheduler  # noqa: E402

from sgkernels.integrations.diffusers import FusedBlockRefinementScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")
OUT_FIELDS = ("prev_sample", "transfer_index", "editing_transfer_index", "sampled_tokens")


def _pair(**config):
    stock = BlockRefinementScheduler(**config)
    return stock, FusedBlockRefinementScheduler.from_config(stock.config)


def _assert_same_step(a, b):
    for k in OUT_FIELDS:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    torch.testing.assert_close(b.sampled_probs, a.sampled_probs, rtol=1e-5, atol=1e-6)
    assert b.pred_logits is not None


@pytest.mark.parametrize("mode", ["mask", "uniform"])
@pytest.mark.parametrize("editing", [None, 0.3])
@pytest.mark.parametrize("threshold", [0.5, 1.5])
def test_greedy_equals_stock_over_steps(mode, editing, threshold):
    """Several steps of one block, the fused and the stock scheduler each fed its own output."""
    batch, length, vocab, steps = 2, 8, 40, 4
    stock, fused = _pair(block_length=length, num_inference_steps=steps, threshold=threshold, editing_threshold=editing)
    stock.set_timesteps(steps)
    fused.set_timesteps(steps)
    gen = torch.Generator().manual_seed(3)
    mask_id = vocab - 1 if mode == "mask" else None
    x = torch.full((batch, length), vocab - 1) if mode == "mask" else torch.randint(0, vocab, (batch, length))
    xs, xf = x.clone(), x.clone()
    gs, gf = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    prompt = torch.arange(length) < 2
    n_commit = n_edit = 0
    for step in range(6):
        logits = 3.0 * torch.randn(batch, length, vocab, generator=gen)
        kw = dict(mask_token_id=mask_id, temperature=0.0, prompt_mask=prompt if mode == "mask" else None)
        a = stock.step(logits, min(step, steps - 1), xs, generator=gs, **kw)
        b = fused.step(logits, min(step, steps - 1), xf, generator=gf, **kw)
        _assert_same_step(a, b)
        n_commit += int(a.transfer_index.sum())
        n_edit += int(a.editing_transfer_index.sum())
        xs, xf = a.prev_sample, b.prev_sample
    assert n_commit > 0 and (editing is None or n_edit > 0)  # the test exercised the commit and the edit
    if mode == "uniform":
        assert torch.equal(fused._committed, stock._committed)


def test_tuple_output_and_sampling_method_greedy():
    stock, fused = _pair(block_length=6, num_inference_steps=3)
    stock.set_timesteps(3)
    fused.set_timesteps(3)
    logits = torch.randn(2, 6, 30)
    x = torch.full((2, 6), 29)
    # sampling_method="greedy" at temperature 1: argmax and the untempered probability, as the stock step
    a = stock.step(logits, 0, x, mask_token_id=29, temperature=1.0, sampling_method="greedy", return_dict=False)
    b = fused.step(logits, 0, x, mask_token_id=29, temperature=1.0, sampling_method="greedy", return_dict=False)
    assert len(a) == len(b) == 6
    for u, v in zip(a[:4], b[:4]):
        assert torch.equal(u, v)
    torch.testing.assert_close(b[4], a[4])
    assert b[5] is logits


def test_bf16_logits_and_timestep_tensor():
    stock, fused = _pair(block_length=5, num_inference_steps=5, threshold=0.2)
    stock.set_timesteps(5)
    fused.set_timesteps(5)
    logits = (2 * torch.randn(3, 5, 64)).to(torch.bfloat16)
    x = torch.full((3, 5), 63)
    _assert_same_step(stock.step(logits, torch.tensor(1), x, mask_token_id=63),
                      fused.step(logits, torch.tensor(1), x, mask_token_id=63))


def test_generator_honoured_and_sampled_probs_are_the_filtered_law():
    _, fused = _pair(block_length=16, num_inference_steps=4)
    fused.set_timesteps(4)
    logits = 2 * torch.randn(2, 16, 50)
    x = torch.full((2, 16), 49)
    kw = dict(mask_token_id=49, temperature=0.7, top_k=8, top_p=0.8)
    out = [fused.step(logits, 0, x, generator=torch.Generator().manual_seed(s), **kw).sampled_tokens for s in (5, 5, 6)]
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    o = fused.step(logits, 0, x, generator=torch.Generator().manual_seed(5), **kw)
    S = BlockRefinementScheduler
    law = torch.softmax(S._top_p_filtering(S._top_k_filtering(logits / 0.7, top_k=8), top_p=0.8).float(), -1)
    torch.testing.assert_close(o.sampled_probs, law.gather(-1, o.sampled_tokens[..., None])[..., 0], rtol=1e-5,
                               atol=1e-6)
    assert bool((law.gather(-1, o.sampled_tokens[..., None]) > 0).all())


def test_uniform_mode_generator_gives_stock_noise_and_resets_per_block():
    stock, fused = _pair(block_length=8, num_inference_steps=4, threshold=2.0)
    for s in (stock, fused):
        s.set_timesteps(4)
    logits = torch.randn(1, 8, 20)
    x = torch.randint(0, 20, (1, 8))
    for step in (0, 1, 0):  # step 0 starts a new block: the committed state is reset
        a = stock.step(logits, step, x, generator=torch.Generator().manual_seed(step))
        b = fused.step(logits, step, x, generator=torch.Generator().manual_seed(step))
        _assert_same_step(a, b)
    assert int(fused._committed.sum()) == 2  # ceil(1 * 8 / 4) after the reset


def test_top_p_boundary_as_the_stock_scheduler():
    """A prefix mass of exactly top_p (probabilities 1/2, 1/4, 1/8, 1/16, 1/16: top_p 0.5 keeps two
    tokens, as diffusers' _top_p_filtering does; top-k 4, then top_p 0.5 of the renormalised set: two),
    and transformers' TopPLogitsWarper, which keeps one (the difference docs/ops.md states)."""
    from sgkernels.ops.filters import keep_mask_reference

    ln2 = math.log(2.0)
    logits = torch.tensor([[0.0, -ln2, -2 * ln2, -3 * ln2, -3 * ln2]])
    top4 = torch.tensor([[0.0, -ln2, -2 * ln2, -2 * ln2, -3 * ln2]])  # the top-4 set renormalised: 1/2, 1/4, 1/8, 1/8
    assert torch.softmax(logits, -1).tolist() == [[0.5, 0.25, 0.125, 0.0625, 0.0625]]  # exact in float32
    lowest = torch.finfo(torch.float32).min
    for x, top_k in ((logits, None), (top4, 4)):
        stock = BlockRefinementScheduler._top_p_filtering(BlockRefinementScheduler._top_k_filtering(x, top_k), 0.5)
        ours = keep_mask_reference(x, top_k=top_k or 0, top_p=0.5, filter_order="hf")
        assert ours.tolist() == (stock > lowest).tolist() == [[True, True, False, False, False]], top_k
    # the fused step draws from that set
    _, fused = _pair(block_length=64, num_inference_steps=1)
    fused.set_timesteps(1)
    rows = logits.expand(1, 64, 5).contiguous()
    out = fused.step(rows, 0, torch.full((1, 64), 4), mask_token_id=4, temperature=1.0, top_p=0.5,
                     generator=torch.Generator().manual_seed(0))
    assert set(out.sampled_tokens.reshape(-1).tolist()) == {0, 1}
    transformers = pytest.importorskip("transformers")
    warped = transformers.TopPLogitsWarper(0.5)(None, logits.clone())
    assert (warped > -math.inf).tolist() == [[True, False, False, False, False]]


def test_config_round_trip(tmp_path):
    stock, fused = _pair(block_length=16, num_inference_steps=8, threshold=0.8, editing_threshold=0.4, minimal_topk=2)
    fused.save_pretrained(tmp_path)
    again = FusedBlockRefinementScheduler.from_pretrained(tmp_path)
    assert isinstance(again, FusedBlockRefinementScheduler)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == dict(stock.config)
    assert BlockRefinementScheduler.from_pretrained(tmp_path).config.threshold == 0.8


@pytest.mark.parametrize("kwargs, name", [
    (dict(threshold=math.nan), "threshold"), (dict(editing_threshold=math.nan), "editing_threshold"),
    (dict(temperature=1.0, top_p=1.5), "top_p"), (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(sampling_method="beam"), "sampling_method"),
    (dict(filter_order="vllm"), "filter_order"), (dict(logits_shape=(2, 5, 30)), "model_output"),
])
def test_bad_input_names_the_argument_and_changes_nothing(kwargs, name):
    _, fused = _pair(block_length=6, num_inference_steps=3)
    fused.set_timesteps(3)
    x = torch.randint(0, 30, (2, 6))
    fused.step(torch.randn(2, 6, 30), 0, x)  # the uniform mode's committed state
    before = fused._committed.clone()
    logits = torch.randn(*kwargs.pop("logits_shape", (2, 6, 30)))
    with pytest.raises((ValueError, TypeError), match=name):
        fused.step(logits, 1, x, **kwargs)
    assert torch.equal(fused._committed, before)
    with pytest.raises(ValueError, match="block_length"):
        fused.set_timesteps(3, block_length=0)


# ------------------------------------------------------------------------------------------------
# FusedLLaDA2Pipeline against the stock LLaDA2Pipeline on a tiny block-causal LM

from diffusers import LLaDA2Pipeline  # noqa: E402
from tiny_block_lm import TinyBlockLM, TinyNoCacheLM  # noqa: E402

from sgkernels.integrations.diffusers import FusedLLaDA2Pipeline  # noqa: E402

VOCAB, MASK, BLOCK = 64, 63, 8


@pytest.fixture(scope="module")
def pipes():
    model = TinyBlockLM(vocab_size=VOCAB, block_length=BLOCK).eval()
    stock = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=BLOCK))
    fused = FusedLLaDA2Pipeline.from_pipe(stock)
    for p in (stock, fused):
        p.set_progress_bar_config(disable=True)
    return stock, fused


def _prompt():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB - 2, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    return ids, mask


def _run(pipe, **kw):
    ids, mask = _prompt()
    args = dict(input_ids=ids, attention_mask=mask, gen_length=27, block_length=BLOCK, num_inference_steps=4,
                mask_token_id=MASK, output_type="seq", threshold=0.7, editing_threshold=0.5, eos_token_id=None,
                max_post_steps=4)
    args.update(kw)
    return pipe(**args).sequences


def test_from_pipe_converts_the_scheduler(pipes):
    stock, fused = pipes
    assert isinstance(fused.scheduler, FusedBlockRefinementScheduler)
    again = FusedLLaDA2Pipeline(**stock.components)
    assert isinstance(again.scheduler, FusedBlockRefinementScheduler) and again.model is stock.model


def _matrix():
    return [pytest.param(v, pc, fh, id=f"{v}-cache{pc}-head{fh}")
            for v in ("editing", "no-editing", "eos", "greedy-method") for pc in (False, True) for fh in (True, False)]


@pytest.mark.parametrize("variant, prefix_cache, fused_head", _matrix())
def test_greedy_token_equal_to_stock(pipes, prefix_cache, fused_head, variant):
    stock, fused = pipes
    kw = {"no-editing": dict(editing_threshold=None), "greedy-method": dict(temperature=0.8, sampling_method="greedy"),
          "editing": {}, "eos": {}}[variant]
    if variant == "eos":  # a token the stock run commits early in row 0: its rows stop there
        kw = dict(eos_token_id=int(_run(stock)[0, 4]))
    want = _run(stock, **kw)
    got = _run(fused, prefix_cache=prefix_cache, fused_head=fused_head, **kw)
    assert torch.equal(got, want)
    if variant == "eos":
        assert bool((want == kw["eos_token_id"]).any())


def test_head_only_on_the_active_block(pipes):
    """fused_head: the LM head module never runs; prefix_cache: the backbone never sees more than a block
    at a time after the prompt's full blocks."""
    _, fused = pipes
    model = fused.model
    head_calls, lengths = [], []
    h1 = model.lm_head.register_forward_hook(lambda m, i, o: head_calls.append(tuple(o.shape)))
    h2 = model.model.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    try:
        _run(fused, prefix_cache=True)
        assert head_calls == [] and max(lengths) <= BLOCK
        lengths.clear()
        _run(fused)
        assert head_calls == [] and max(lengths) > BLOCK  # the whole window, without the head
        _run(fused, fused_head=False)
        assert head_calls and head_calls[0][-1] == VOCAB
    finally:
        h1.remove()
        h2.remove()


def _bar_states(text):
    """The final ``desc: n/total`` of every progress bar tqdm wrote (timings differ between runs)."""
    import re

    states = {}
    for desc, n, total in re.findall(r"(Blocks|Block \d+ Inference Steps): *\d+%\|[^|]*\| *(\d+)/(\d+)", text):
        states[desc] = (int(n), int(total))
    return states


def test_progress_bar_as_stock(pipes):
    """The stock bars (blocks, then steps per block), configured by set_progress_bar_config."""
    import io

    got = {}
    for name, pipe in zip(("stock", "fused"), pipes):
        buf = io.StringIO()
        pipe.set_progress_bar_config(file=buf, disable=False)
        try:
            _run(pipe)
        finally:
            pipe.set_progress_bar_config(disable=True)
        got[name] = _bar_states(buf.getvalue())
    assert got["fused"] == got["stock"] and got["fused"]["Blocks"] == (4, 4)  # prompt 11 + gen 27, block 8
    assert len(got["fused"]) == 5  # and one steps bar per block
    buf = io.StringIO()
    pipes[1].set_progress_bar_config(file=buf, disable=True)
    _run(pipes[1])
    assert buf.getvalue() == ""


def test_sampled_generator_and_tuple_output(pipes):
    _, fused = pipes
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = _run(fused, generator=torch.Generator().manual_seed(3), **kw)
    b = _run(fused, generator=torch.Generator().manual_seed(3), prefix_cache=True, **kw)
    c = _run(fused, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not bool((a == MASK).any())
    ids, mask = _prompt()
    seqs, texts = fused(input_ids=ids, attention_mask=mask, gen_length=9, block_length=BLOCK, mask_token_id=MASK,
                        output_type="seq", return_dict=False)
    assert seqs.shape == (2, 9) and texts is None


def test_callback_runs_the_stock_loop(pipes):
    stock, fused = pipes
    seen = []

    def cb(pipe, step, t, kw):
        seen.append(step)
        return kw

    assert torch.equal(_run(fused, callback_on_step_end=cb), _run(stock))
    assert seen
    with pytest.raises(ValueError, match="prefix_cache"):
        _run(fused, callback_on_step_end=cb, prefix_cache=True)


def test_bad_input(pipes):
    _, fused = pipes
    no_cache = FusedLLaDA2Pipeline(model=TinyNoCacheLM(vocab_size=VOCAB, block_length=BLOCK).eval(),
                                   scheduler=BlockRefinementScheduler(block_length=BLOCK))
    no_cache.set_progress_bar_config(disable=True)
    state = {k: v.clone() for k, v in no_cache.model.state_dict().items()}
    with pytest.raises(ValueError, match="prefix_cache"):
        _run(no_cache, prefix_cache=True)
    assert all(torch.equal(v, no_cache.model.state_dict()[k]) for k, v in state.items())
    assert _run(no_cache).shape == (2, 27)  # without the cache it runs
    for kw, name in ((dict(block_length=0), "block_length"), (dict(threshold=math.nan), "threshold"),
                     (dict(temperature=1.0, top_p=1.5), "top_p"), (dict(sampling_method="beam"), "sampling_method")):
        with pytest.raises(ValueError, match=name):
            _run(fused, **kw)
