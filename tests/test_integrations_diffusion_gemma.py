"""DiffusionGemma through diffusers: :class:`FusedDiffusionGemmaPipeline` against the stock
``DiffusionGemmaPipeline`` on a tiny randomly initialised ``DiffusionGemmaForBlockDiffusion`` (greedy
token equality with and without adaptive stopping, two canvases, the scheduler conversions,
``from_pipe``, the progress bar)."""
from __future__ import annotations

import inspect
import io

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
if not hasattr(diffusers, "DiffusionGemmaPipeline") or not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("needs diffusers >= 0.42 and transformers with DiffusionGemma", allow_module_level=True)

from diffusers import BlockRefinementScheduler, DiffusionGemmaPipeline, EntropyBoundScheduler  # noqa: E402

from sgkernels.integrations.diffusers import (FusedBlockRefinementScheduler, FusedDiffusionGemmaPipeline,  # noqa: E402
                                              FusedEntropyBoundScheduler)

pytestmark = [pytest.mark.usefixtures("one_thread_for_tiny_models"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]
VOCAB, CANVAS = 96, 8


class _Processor:
    """The processor stand-in: a fixed token list per prompt (chat template and tokenizer)."""

    eos_token_id = None

    def __init__(self):
        self.tokenizer = self

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_tensors="pt",
                            return_dict=True):
        convs = messages if isinstance(messages[0], list) else [messages]
        rows = [[3 + (ord(c) % (VOCAB - 3)) for c in conv[-1]["content"]] for conv in convs]
        n = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])  # left-padded
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in s) for s in seqs]


def _tiny_model():
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=16,
                max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"], eos_token_id=None,
                pad_token_id=0, bos_token_id=None, num_experts=2, top_k_experts=1, moe_intermediate_size=32)
    torch.manual_seed(0)
    config = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=CANVAS)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():  # peaked logits: greedy decoding without near-ties
        model.lm_head.weight.mul_(8.0)
    # version skew of the installed pair: diffusers 0.42's pipeline passes `past_key_values=` to the decoder's
    # mask builder, which transformers >= 5.2x calls `cache=`; the shim (the test's, for both pipelines) renames it
    decoder = model.model.decoder
    build = type(decoder).create_diffusion_decoder_attention_mask
    if "past_key_values" not in inspect.signature(build).parameters:
        decoder.create_diffusion_decoder_attention_mask = (
            lambda *a, past_key_values=None, **kw: build(*a, cache=past_key_values, **kw))
    return model


@pytest.fixture(scope="module")
def pipes():
    stock = DiffusionGemmaPipeline(model=_tiny_model(), scheduler=BlockRefinementScheduler(), processor=_Processor())
    fused = FusedDiffusionGemmaPipeline.from_pipe(stock)
    for p in (stock, fused):
        p.set_progress_bar_config(disable=True)
    return stock, fused


def _run(pipe, **kw):
    args = dict(prompt=["Name a color.", "Hi"], gen_length=2 * CANVAS, num_inference_steps=4, temperature=0.0,
                eos_early_stop=False, output_type="seq", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).sequences


def test_from_pipe_converts_the_scheduler(pipes):
    stock, fused = pipes
    assert isinstance(fused.scheduler, FusedBlockRefinementScheduler) and fused.model is stock.model
    assert type(stock.scheduler) is BlockRefinementScheduler
    again = FusedDiffusionGemmaPipeline(**stock.components)
    assert isinstance(again.scheduler, FusedBlockRefinementScheduler)


@pytest.mark.parametrize("confidence_threshold", [None, 0.005])
def test_greedy_token_equal_to_stock(pipes, confidence_threshold):
    stock, fused = pipes
    want = _run(stock, confidence_threshold=confidence_threshold)
    got = _run(fused, confidence_threshold=confidence_threshold)
    assert want.shape == (2, 2 * CANVAS) and torch.equal(got, want)


def test_entropy_bound_scheduler_assigned_later_is_fused(pipes):
    stock, fused = pipes
    stock.scheduler, fused.scheduler = EntropyBoundScheduler(entropy_bound=0.1), EntropyBoundScheduler(entropy_bound=0.1)
    try:
        seqs = _run(fused, gen_length=CANVAS)  # sampled (annealed temperature): the same law, not the same draws
        assert isinstance(fused.scheduler, FusedEntropyBoundScheduler)
        assert seqs.shape == (2, CANVAS) and bool(((seqs >= 0) & (seqs < VOCAB)).all())
    finally:
        stock.scheduler = BlockRefinementScheduler()
        fused.scheduler = FusedBlockRefinementScheduler()


def test_progress_bar_as_stock(pipes):
    stock, fused = pipes
    for p in (stock, fused):
        buf = io.StringIO()
        p.set_progress_bar_config(file=buf, disable=False)
        try:
            _run(p, gen_length=CANVAS, confidence_threshold=None)
        finally:
            p.set_progress_bar_config(disable=True)
        assert "4/4" in buf.getvalue()
