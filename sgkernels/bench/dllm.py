"""``sgkernels bench dllm``: tokens/s of a diffusion LM, the upstream algorithm against the drop-in.

``--model`` is a local transformers folder (``config.json`` + weights, as ``save_pretrained``
writes it). It is loaded with the class its config names (``architectures``), or, when the folder
ships its own modeling code (``auto_map``, as LLaDA's and Dream's do), through ``AutoModel`` with
``trust_remote_code=True``, which runs that code and therefore needs ``--trust-remote-code``.

Pipelines (``--pipeline``), each the drop-in against its reference written as the public code
writes it (:mod:`sgkernels.bench.anchors`), same prompts, same settings:

* ``llada``: :func:`sgkernels.integrations.llada.generate` against LLaDA's ``generate()``;
* ``fast-dllm``: the same with ``threshold`` against Fast-dLLM's threshold decoding (no cache);
* ``dream``: :func:`sgkernels.integrations.dream.diffusion_generate` against Dream's ``_sample``.

Per batch size: the two interleaved (:func:`sgkernels.bench.timing.autorange`), tokens/s =
batch * gen_length / median time; NFE (model calls per generation) and ms per step in the model's
forward and in the rest (sampling) as the median of up to 3 more calls with
:class:`sgkernels.bench.parts.PartTimer` hooks; peak memory of one call; and the token agreement of
greedy runs (temperature 0) of the two, which is 100 % unless confidences tie.
"""
from __future__ import annotations

import json
import os

import torch

from . import anchors
from .parts import PartTimer
from .sampler import median_parts
from .timing import autorange, peak_mb

PIPELINES = ("llada", "fast-dllm", "dream")
UPSTREAM = {"llada": "LLaDA generate()", "fast-dllm": "Fast-dLLM threshold (no cache)", "dream": "Dream _sample"}
FUSED = "sgkernels"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(ValueError):
    """A folder that is not a loadable transformers model (reported as one line by the CLI)."""


class PipelineMismatch(ValueError):
    """The model does not run under the pipeline: the first generation failed (message: its first line)."""


def load_lm(path: str, *, device, dtype=None, trust_remote_code: bool = False):
    """A transformers model from the local folder ``path`` (see the module docstring), in eval mode on ``device``."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelFolderError(f"--model: {path} is not a folder")
    if not os.path.isfile(cfg_path):
        raise ModelFolderError(f"--model: {path} has no config.json (a transformers model folder)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"--model: cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"--model: {cfg_path} is not a JSON object")
    try:
        import transformers
    except ImportError:
        raise ModelFolderError("bench dllm needs transformers: pip install transformers") from None
    auto_map = cfg.get("auto_map") or {}
    kw = {} if dtype is None else {"dtype": dtype}
    if auto_map:
        if not trust_remote_code:
            raise ModelFolderError(f"--model: {path} ships its own modeling code (auto_map in config.json); "
                                   "pass --trust-remote-code to run it")
        for name in ("AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM"):
            if name in auto_map:
                cls = getattr(transformers, name)
                break
        else:
            raise ModelFolderError(f"--model: {cfg_path}'s auto_map has no AutoModel entry")
        kw["trust_remote_code"] = True
    else:
        archs = cfg.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            raise ModelFolderError(f"--model: {cfg_path} names no architecture that transformers has "
                                   f"(architectures = {archs})")
    try:
        model = cls.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"--model: cannot load {path}: {first}") from None
    return model.to(device).eval()


def mask_id_of(model) -> int | None:
    """The mask id the model's config states (``mask_token_id``), else None."""
    cfg = getattr(model, "config", None)
    for key in ("mask_token_id", "mask_id"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _generators(model, pipeline, *, mask_id, gen_length, block_length, steps, temperature, threshold, top_p, alg):
    """name -> generate(prompt, temperature) -> [B, l + gen_length]."""
    if pipeline == "dream":
        from ..integrations import dream

        kw = dict(max_new_tokens=gen_length, steps=steps, top_p=top_p, alg=alg)
        return {UPSTREAM[pipeline]: lambda p, t: anchors.dream_generate(model, p, mask_id=mask_id, temperature=t, **kw),
                FUSED: lambda p, t: dream.diffusion_generate(model, p, mask_token_id=mask_id, temperature=t, seed=0,
                                                             **kw)}
    from ..integrations import llada

    thr = threshold if pipeline == "fast-dllm" else None
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, mask_id=mask_id)
    return {UPSTREAM[pipeline]: lambda p, t: anchors.llada_generate(model, p, temperature=t, threshold=thr, **kw),
            FUSED: lambda p, t: llada.generate(model, p, temperature=t, threshold=thr, seed=0, **kw)}


def _forward_modules(model) -> list:
    """The modules whose forwards are the model's: the model and its base (the drop-ins' fused head calls
    the base alone)."""
    mods = [model]
    dec = getattr(model, "get_decoder", None)
    base = dec() if callable(dec) else getattr(model, "model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        mods.append(base)
    return mods


def breakdown(model, gen, prompt, temperature, device) -> dict:
    """NFE and ms per step of model forward / the rest (sampling) of one generation."""
    with PartTimer(device) as pt:
        for m in _forward_modules(model):
            pt.attach(m, "forward")
        with torch.no_grad(), pt.section("total"):
            gen(prompt, temperature)
    nfe = pt.calls["forward"]
    per = max(nfe, 1)
    return {"nfe": nfe, "forward": pt.ms["forward"] / per,
            "sampling": max(pt.ms["total"] - pt.ms["forward"], 0.0) / per}


def prompts(vocab: int, mask_id: int, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """Random prompt ids (never ``mask_id``), the same for every implementation."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randint(0, vocab - 1, (batch, length), generator=gen)
    p = p + (p >= mask_id).long()  # skip the mask id
    return p.to(device)


def run(model, pipeline: str, batch_sizes, device, *, mask_id: int, prompt_length: int = 32, gen_length: int = 64,
        block_length: int = 32, steps: int = 32, temperature: float = 0.0, threshold: float = 0.9,
        top_p: float | None = None, alg: str = "maskgit_plus", repeats: int = 3, max_time: float = 30.0,
        progress=None) -> list[dict]:
    """One row per (batch size, implementation). Raises what the drop-in raises on a model that does not
    fit the pipeline (its first generation is the check)."""
    vocab = model.config.vocab_size
    gens = _generators(model, pipeline, mask_id=mask_id, gen_length=gen_length, block_length=block_length,
                       steps=steps, temperature=temperature, threshold=threshold, top_p=top_p, alg=alg)
    rows = []
    for b in batch_sizes:
        prompt = prompts(vocab, mask_id, b, prompt_length, device)
        if progress:
            progress(f"batch {b}: greedy agreement")
        greedy = {}
        with torch.no_grad():
            for name in (FUSED, UPSTREAM[pipeline]):  # the drop-in first: it checks its arguments
                try:
                    greedy[name] = gens[name](prompt, 0.0)
                except (ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
                    if rows:
                        raise
                    msg = str(e).strip().splitlines()
                    raise PipelineMismatch(f"{name}: {type(e).__name__}: {msg[0] if msg else ''}") from e
        ref, ours = greedy[UPSTREAM[pipeline]][:, prompt_length:], greedy[FUSED][:, prompt_length:]
        agreement = float((ref == ours).float().mean())
        fns = {name: (lambda g=g: g(prompt, temperature)) for name, g in gens.items()}
        if progress:
            progress(f"batch {b}: timing")
        with torch.no_grad():
            stats = autorange(fns, device, warmup=1, min_repeats=repeats, max_repeats=max(repeats, 20),
                              max_time=max_time, block_ms=0.0)
        if progress:
            progress(f"batch {b}: where the time goes")
        with torch.no_grad():
            all_parts = median_parts({name: (lambda g=g: breakdown(model, g, prompt, temperature, device))
                                      for name, g in gens.items()}, min(repeats, 3))
        for name in gens:
            if progress:
                progress(f"batch {b}: {name}: peak memory")
            with torch.no_grad():
                mem = peak_mb(fns[name], device)
            parts = dict(all_parts[name])
            st = stats[name]
            rows.append(dict(impl=name, batch_size=b, tokens_per_s=b * gen_length / (st.median_ms * 1e-3),
                             **st.as_dict(), nfe=round(parts.pop("nfe")), parts=parts, peak_mb=mem,
                             greedy_agreement=agreement))
        stock = next(r for r in rows if r["batch_size"] == b and r["impl"] != FUSED)
        for r in rows:
            if r["batch_size"] == b:
                r["speedup"] = stock["median_ms"] / r["median_ms"]
    return rows
