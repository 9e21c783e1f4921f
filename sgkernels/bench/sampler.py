"""``sgkernels bench sampler``: images/s of a self-guided MaskGIT model, stock loop against fused sampler.

For a paper-model folder pair (``--model`` transformer + TOAST guide, ``--vae`` VQGAN; official
open-muse / UnlockMGM or sgkernels folders) or a digits model folder (``--model``, default the
embedded one), per batch size:

* ``official loop (eager step)``: the official code's loop with the same modules
  (:func:`sgkernels.bench.anchors.official_sampling_loop`: base pass, guide pass, eager open-muse
  step), then the decoder;
* ``sgkernels``: :class:`sgkernels.SelfGuidedSampler` (fused head + fused sampling ops), then the
  decoder;
* ``sgkernels + CUDA graph`` (CUDA only): the same sampler with ``cuda_graph=True``.

Each batch is one timed call (sampling + decode, the same labels and seed), the implementations
interleaved (:func:`sgkernels.bench.timing.autorange`); images/s = batch / median time. Where the
time goes (ms per step: backbone pass, guide pass, the rest of the step = the sampling op; ms per
batch: decode) is the median of up to 3 more calls of each, interleaved, with
:class:`sgkernels.bench.parts.PartTimer` hooks; not for the CUDA graph, whose replays run no Python.
Peak memory: one call each (:func:`sgkernels.bench.timing.peak_mb`).
"""
from __future__ import annotations

import dataclasses
import statistics

import torch

from .anchors import official_sampling_loop
from .parts import PartTimer
from .timing import autorange, peak_mb

STOCK, FUSED, GRAPHED = "official loop (eager step)", "sgkernels", "sgkernels + CUDA graph"
PARTS = ("backbone", "guide", "sampling", "decode")


@dataclasses.dataclass
class ImageModel:
    """What the sampler bench runs: backbone, guide (or None), a decoder ``tokens [B, N] -> images``,
    the sampler's settings and a description."""

    model: torch.nn.Module
    guide: torch.nn.Module | None
    decode: object
    sampler_kw: dict
    name: str


def load_image_model(model_dir, vae_dir, *, device, steps=None, guidance_scale=None, choice_temperature=None,
                     model_subfolder=None, vae_subfolder=None) -> ImageModel:
    """The paper's pipeline (``vae_dir`` given: its settings default to T = 18, s = 1, tau_0 = 25) or a
    digits model folder (``vae_dir`` None; ``model_dir`` None = the embedded one; its tuned settings)."""
    if vae_dir is not None:
        from ..pipeline import SelfGuidedPipeline
        from ..pipeline_cli import CHOICE_TEMPERATURE, GUIDANCE_SCALE, STEPS

        pipe = SelfGuidedPipeline.from_pretrained(model_dir, vae_dir, transformer_subfolder=model_subfolder,
                                                  vae_subfolder=vae_subfolder, device=device)
        h, w = pipe.model.config.grid_hw
        kw = dict(steps=STEPS, guidance_scale=GUIDANCE_SCALE, choice_temperature=CHOICE_TEMPERATURE)
        decode = lambda tokens: pipe.vqgan.decode(tokens.reshape(-1, h, w))  # noqa: E731
        model, guide, name = pipe.model, pipe.guide, f"{model_dir} + VQGAN {vae_dir}"
    else:
        from ..digits.pipeline import DEFAULTS, DigitsModel

        dm = DigitsModel.load(model_dir)
        dm.tokenizer.to(device)
        kw = dict(steps=DEFAULTS.steps, guidance_scale=DEFAULTS.guidance_scale,
                  choice_temperature=DEFAULTS.choice_temperature, preset="maskgit")
        decode = dm.tokenizer.decode
        model, guide, name = dm.model, dm.guide, f"digits model {dm.directory}"
    given = dict(steps=steps, guidance_scale=guidance_scale, choice_temperature=choice_temperature)
    kw.update({k: v for k, v in given.items() if v is not None})
    if guide is None:
        kw["guidance_scale"] = 0.0 if guidance_scale is None else kw["guidance_scale"]
    model.to(device).eval()
    if guide is not None:
        guide.to(device).eval()
    return ImageModel(model, guide, decode, kw, name)


def _impls(im: ImageModel, device) -> dict:
    """name -> (sample(labels) -> tokens, sampler)."""
    from ..sampler import SelfGuidedSampler

    fused = SelfGuidedSampler(im.model, im.guide, **im.sampler_kw)
    out = {STOCK: (lambda labels: official_sampling_loop(fused, labels), fused),
           FUSED: (lambda labels: fused(labels, seed=0), fused)}
    if torch.device(device).type == "cuda":
        graphed = SelfGuidedSampler(im.model, im.guide, cuda_graph=True, **im.sampler_kw)
        out[GRAPHED] = (lambda labels: graphed(labels, seed=0), graphed)
    return out


def breakdown(im: ImageModel, sample, labels, steps: int, device) -> dict:
    """Where one call's time goes: ms per step of backbone / guide / rest of the step, ms of the decode."""
    with PartTimer(device) as pt:
        pt.attach(im.model, "backbone")
        if im.guide is not None:
            pt.attach(im.guide, "guide")
        with torch.no_grad():
            with pt.section("loop"):
                tokens = sample(labels)
            with pt.section("decode"):
                im.decode(tokens)
    rest = pt.ms["loop"] - pt.ms["backbone"] - pt.ms["guide"]
    return {"backbone": pt.ms["backbone"] / steps, "guide": pt.ms["guide"] / steps, "sampling": max(rest, 0.0) / steps,
            "decode": pt.ms["decode"], "backbone_calls": pt.calls["backbone"], "guide_calls": pt.calls["guide"]}


def median_parts(calls: dict, rounds: int) -> dict:
    """name -> the per-key median over ``rounds`` interleaved calls of ``calls[name]()`` (a dict of numbers)."""
    got = {name: [] for name in calls}
    for _ in range(max(rounds, 1)):
        for name, fn in calls.items():
            got[name].append(fn())
    return {name: {k: statistics.median(d[k] for d in ds) for k in ds[0]} for name, ds in got.items()}


def run(im: ImageModel, batch_sizes, device, *, repeats: int = 3, max_time: float = 30.0, progress=None) -> list[dict]:
    """One row per (batch size, implementation); ``progress(text)`` is called before each phase."""
    impls = _impls(im, device)
    steps = im.sampler_kw["steps"]
    num_classes = im.model.config.num_classes
    rows = []
    for b in batch_sizes:
        labels = torch.arange(b, device=device) % num_classes

        def call(sample):
            def fn():
                with torch.no_grad():
                    return im.decode(sample(labels))
            return fn

        fns = {name: call(sample) for name, (sample, _) in impls.items()}
        if progress:
            progress(f"batch {b}: timing")
        stats = autorange(fns, device, warmup=1, min_repeats=repeats, max_repeats=max(repeats, 20), max_time=max_time,
                          block_ms=0.0)
        if progress:
            progress(f"batch {b}: where the time goes")
        parts = median_parts({name: (lambda sample=sample: breakdown(im, sample, labels, steps, device))
                              for name, (sample, _) in impls.items() if name != GRAPHED}, min(repeats, 3))
        for name in impls:
            if progress:
                progress(f"batch {b}: {name}: peak memory")
            st = stats[name]
            rows.append(dict(impl=name, batch_size=b, steps=steps, images_per_s=b / (st.median_ms * 1e-3),
                             **st.as_dict(), peak_mb=peak_mb(fns[name], device), parts=parts.get(name)))
        stock = next(r for r in rows if r["batch_size"] == b and r["impl"] == STOCK)
        for r in rows:
            if r["batch_size"] == b:
                r["speedup"] = stock["median_ms"] / r["median_ms"]
    return rows
