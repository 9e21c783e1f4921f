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
