"""The paper's model at its real size, end to end: seconds per image, sgkernels against the official loop.

The ImageNet 256 ``MaskGitTransformerTOAST`` (hidden 768, 24 layers, 16 heads, MLP 3072, vocabulary
2025, 257 positions, 16 TOAST factors; 215.8 M parameters) and open-muse's default ``MaskGitVQGAN``
(54.5 M), with seeded random weights written in the official folder format into a temporary
directory (:func:`sgkernels.bench.official_folders.write_paper_folders`; deleted at the end), loaded
once. Batch 2 on CPU (64 on CUDA), T = 18, s = 1, tau0 = 25.

Timed, interleaved in one process after a warm-up call of each (:func:`sgkernels.bench.timing.autorange`):

* ``official generate_sg + decode_code (float32 eager)``: the official loop and decoder as users run
  them today (:func:`sgkernels.bench.anchors.official_generate_sg`,
  :func:`~sgkernels.bench.anchors.official_decode_code`), on the same weights;
* ``sgkernels``: :class:`sgkernels.SelfGuidedPipeline` (sampling + decode) in float32; and, where the
  pipeline takes them, in bfloat16 (``torch_dtype``) and bfloat16 + ``compile=True`` (CPU), or
  bfloat16 + ``cuda_graph=True`` (CUDA).

A row's time is ms per image (the call's median / batch). Peak memory: the extra peak of one call
(:func:`sgkernels.bench.timing.peak_mb`) with 2 steps (a step's working set does not grow with the
step count; the decode is included). Each comparison is its own (shape, dtype) key, so the official
row is repeated under each dtype with the same measurement.

``python -m sgkernels.bench.ops.paper_realsize --profile`` prints the per-part split and top ops of
one sampling call and one decode (torch.profiler).
"""
from __future__ import annotations

import inspect
import tempfile

import torch

from .. import anchors
from ..official_folders import write_paper_folders
from ..timing import autorange, peak_mb

STEPS, GUIDANCE_SCALE, CHOICE_TEMPERATURE = 18, 1.0, 25.0
OFFICIAL = "official generate_sg + decode_code (float32 eager)"


def batch_size(device: str) -> int:
    return 2 if device == "cpu" else 64


def load(root, device: str, dtype: torch.dtype = torch.float32):
    """The pipeline on the folders under ``root`` (``torch_dtype`` where the pipeline takes it)."""
    from ...pipeline import SelfGuidedPipeline

    t, v = f"{root}/transformer", f"{root}/vae"
    kw = {} if dtype == torch.float32 else dict(torch_dtype=dtype)
    return SelfGuidedPipeline.from_pretrained(t, v, device=device, **kw)


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def official_images(pipe, labels, steps: int = STEPS) -> torch.Tensor:
    """The official loop and decoder on ``pipe``'s (float32) modules: images ``[B, 3, 256, 256]``."""
    tokens = anchors.official_generate_sg(pipe.model, pipe.guide, labels, steps=steps,
                                          guidance_scale=GUIDANCE_SCALE, choice_temperature=CHOICE_TEMPERATURE)
    return anchors.official_decode_code(pipe.vqgan, tokens)


def variants(root, device: str) -> list[tuple[str, str, object, dict]]:
    """``(dtype label, impl, pipeline, call options)`` of the sgkernels rows this install can run."""
    from ...pipeline import SelfGuidedPipeline
    from ...sampler import SelfGuidedSampler

    out = [("float32", "sgkernels", load(root, device), {})]
    if not _takes(SelfGuidedPipeline.from_pretrained, "torch_dtype"):
        return out
    bf16 = load(root, device, torch.bfloat16)
    if device == "cpu":
        if _takes(SelfGuidedSampler.__init__, "compile"):
            out.append(("bfloat16 + compile", "sgkernels", bf16, dict(compile=True)))
        out.append(("bfloat16", "sgkernels", bf16, {}))
    else:
        out.append(("bfloat16 + CUDA graph", "sgkernels", bf16, dict(cuda_graph=True)))
        out.append(("bfloat16", "sgkernels", bf16, {}))
    return out


def run(device: str = "cpu", quick: bool = False, *, writer=write_paper_folders, batch: int | None = None,
        steps: int = STEPS) -> list[dict]:
    """The rows (see the module docstring). ``writer(root, seed)`` writes the folders (tests pass a tiny
    one), ``batch`` / ``steps`` override the real run's."""
    b = batch_size(device) if batch is None else batch
    with tempfile.TemporaryDirectory(prefix="sgkernels-paper-") as root:
        writer(root, seed=0)
        vs = variants(root, device)
        official_pipe = vs[0][2]
        labels = torch.arange(b, device=device) * 97 % official_pipe.num_classes

        def official(n):
            return lambda: official_images(official_pipe, labels, steps=n)

        def ours(pipe, opts, n):
            return lambda: pipe(labels, seed=0, steps=n, guidance_scale=GUIDANCE_SCALE,
                                choice_temperature=CHOICE_TEMPERATURE, **opts)

        fns = {OFFICIAL: official(steps), **{label: ours(pipe, opts, steps) for label, _, pipe, opts in vs}}
        # warm-up: a 2-step call of each (threads, allocator, torch.compile's graphs: one per batch shape,
        # not per step); the peak memory of such a call is a full call's (a step's working set does not
        # grow with the step count, and the decode is included)
        short = {OFFICIAL: official(2), **{label: ours(pipe, opts, 2) for label, _, pipe, opts in vs}}
        for fn in short.values():
            fn()
        stats = autorange(fns, device, warmup=0, number=1, min_repeats=1 if quick else 2,
                          max_repeats=1 if quick else 3, max_time=0.0)
        peaks = {name: peak_mb(fn, device) for name, fn in short.items()}
        name = "MaskGIT-256 TOAST + VQGAN" if writer is write_paper_folders else "small config"
    shape = f"{name}, B={b} T={steps} s=1 tau0=25, ms per image"
    off = stats[OFFICIAL]
    rows = []
    for label, impl, _, _ in vs:
        st = stats[label]
        common = dict(op="paper_realsize", shape=shape, dtype=label)
        rows.append(dict(common, impl=impl, ms=st.median_ms / b, spread=st.spread, peak_mb=peaks[label]))
        rows.append(dict(common, impl=OFFICIAL, ms=off.median_ms / b, spread=off.spread, peak_mb=peaks[OFFICIAL]))
    return rows


# --- profile -----------------------------------------------------------------------------------------

def _region_hooks(module, name: str) -> list:
    """Enter ``record_function(name)`` around ``module``'s outermost forwards."""
    state = {"depth": 0, "rf": None}

    def pre(mod, args):
        if state["depth"] == 0:
            state["rf"] = torch.profiler.record_function(name)
            state["rf"].__enter__()
        state["depth"] += 1

    def post(mod, args, out):
        state["depth"] -= 1
        if state["depth"] == 0:
            state["rf"].__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]


REGIONS = ("backbone pass", "guide pass (TOAST + backbone pass 2)", "decode")


def split(prof, rest: str) -> dict:
    """``{region: {op: self ms}}``: every event's self CPU time under its nearest enclosing region
    (``rest`` outside any)."""
    out: dict = {}
    for ev in prof.events():
        if ev.name in REGIONS:
            continue
        region, p = rest, ev.cpu_parent
        while p is not None:
            if p.name in REGIONS:
                region = p.name
                break
            p = p.cpu_parent
        d = out.setdefault(region, {})
        d[ev.name] = d.get(ev.name, 0.0) + ev.self_cpu_time_total / 1e3
    return out


def profile(root, device: str = "cpu", dtype: torch.dtype = torch.float32, steps: int = STEPS, top: int = 8,
            official: bool = True, **call_opts) -> str:
    """Markdown: where one sampling call and one decode of the pipeline (and of the official loop) spend time."""
    from torch.profiler import ProfilerActivity

    pipe = load(root, device, dtype)
    b = batch_size(device)
    labels = torch.arange(b, device=device) * 97 % pipe.num_classes
    kw = dict(steps=steps, guidance_scale=GUIDANCE_SCALE, choice_temperature=CHOICE_TEMPERATURE, **call_opts)
    pipe(labels, seed=0, **dict(kw, steps=2))  # warm-up
    handles = _region_hooks(pipe.model, REGIONS[0]) + _region_hooks(pipe.guide, REGIONS[1])
    try:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            from ...sampler import SelfGuidedSampler

            tokens = SelfGuidedSampler(pipe.model, pipe.guide, **{k: v for k, v in kw.items()})(labels, seed=0)
            with torch.profiler.record_function(REGIONS[2]):
                images = pipe.vqgan.decode(tokens.reshape(b, *pipe.model.config.grid_hw))
    finally:
        for h in handles:
            h.remove()
    del images
    lines = [_table(f"sgkernels {str(dtype).replace('torch.', '')}"
                    + (f" {call_opts}" if call_opts else ""), split(prof, "head + sampling op + loop"), steps, top)]
    if official:
        official_pipe = pipe if dtype == torch.float32 else load(root, device)
        official_images(official_pipe, labels, steps=2)
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            tokens = anchors.official_generate_sg(official_pipe.model, official_pipe.guide, labels, steps=steps,
                                                  guidance_scale=GUIDANCE_SCALE, choice_temperature=CHOICE_TEMPERATURE)
            with torch.profiler.record_function(REGIONS[2]):
                anchors.official_decode_code(official_pipe.vqgan, tokens)
        lines.append(_table("official generate_sg + decode_code float32", split(prof, "sampling loop (both passes, "
                                                                                     "head, step)"), steps, top))
    return "\n\n".join(lines)


def _table(title: str, parts: dict, steps: int, top: int) -> str:
    total = sum(sum(d.values()) for d in parts.values())
    out = [f"**{title}** (one call, batch 2, T={steps}: {total / 1e3:.1f} s of CPU self time)", "",
           "| part | ms | % | top ops (self ms) |", "|---|---:|---:|---|"]
    for region, d in sorted(parts.items(), key=lambda kv: -sum(kv[1].values())):
        ms = sum(d.values())
        ops = ", ".join(f"`{k}` {v:.0f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top])
        out.append(f"| {region} | {ms:.0f} | {100 * ms / total:.1f} | {ops} |")
    return "\n".join(out)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sgkernels.bench.ops.paper_realsize", description=__doc__.split("\n")[0])
    p.add_argument("--profile", action="store_true", help="print the per-part split (torch.profiler) instead of timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-official", action="store_true")
    a = p.parse_args(argv)
    if not a.profile:
        from .. import ops

        rows = run(a.device)
        print(ops.table(rows, ops.peaks(rows, a.device, True)))
        return 0
    with tempfile.TemporaryDirectory(prefix="sgkernels-paper-") as root:
        write_paper_folders(root, seed=0)
        opts = dict(compile=True) if a.compile else {}
        print(profile(root, a.device, getattr(torch, a.dtype), a.steps, official=not a.no_official, **opts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
