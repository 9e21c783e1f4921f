"""``sgkernels bench dllm``: tokens/s of a diffusion LM, the upstream algorithm against the drop-in.

``--model`` is a local transformers folder (``config.json`` + weights, as ``save_pretrained``
writes it), loaded as ``AutoModel.from_pretrained(folder)`` would load it (:func:`load_lm`): with
the class its config names (``architectures``); a folder that ships its own modeling code
(``auto_map``, as LLaDA's, Dream's and LLaDA2's do) for a ``model_type`` transformers does not know
runs that code only with ``trust_remote_code`` (``--trust-remote-code``), where transformers would
ask or refuse; with ``auto_map`` but a ``model_type`` transformers knows, transformers' own class.

Pipelines (``--pipeline``), each the drop-in against its reference written as the public code
writes it (:mod:`sgkernels.bench.anchors`, or the stock diffusers pipeline), same prompts, same
settings:

* ``llada``: :func:`sgkernels.integrations.llada.generate` against LLaDA's ``generate()``;
* ``fast-dllm``: the same with ``threshold`` against Fast-dLLM's threshold decoding (no cache);
* ``dream``: :func:`sgkernels.integrations.dream.diffusion_generate` against Dream's ``_sample``;
* ``llada2``: ``FusedLLaDA2Pipeline`` (:mod:`sgkernels.integrations.diffusers`) against diffusers'
  ``LLaDA2Pipeline`` with its ``BlockRefinementScheduler`` (block diffusion: ``steps`` is the
  pipeline's ``num_inference_steps``, per block; ``threshold``, ``editing_threshold``; no EOS early
  stop, so that every run makes ``gen_length`` tokens); with ``prefix_cache`` a third row, the fused
  pipeline with ``prefix_cache=True`` (exact only for block-causal attention).

Per batch size: the implementations interleaved (:func:`sgkernels.bench.timing.autorange`), tokens/s =
batch * gen_length / median time; NFE (model calls per generation) and ms per step in the model's
forward and in the rest (sampling, commit) as the median of up to 3 more calls with
:class:`sgkernels.bench.parts.PartTimer` hooks; peak memory of one call; and the token agreement of
greedy runs (temperature 0) of each implementation with the reference, which is 100 % unless
confidences tie.
"""
from __future__ import annotations

import json
import os

import torch

from . import anchors
from .parts import PartTimer
from .sampler import median_parts
from .timing import autorange, peak_mb

PIPELINES = ("llada", "fast-dllm", "dream", "llada2")
UPSTREAM = {"llada": "LLaDA generate()", "fast-dllm": "Fast-dLLM threshold (no cache)", "dream": "Dream _sample",
            "llada2": "diffusers LLaDA2Pipeline"}
FUSED = "sgkernels"
FUSED_CACHE = "sgkernels + prefix cache"
# The pipelines' own defaults where the options mean different things per pipeline (None: not used).
DEFAULTS = {"steps": {"llada": 128, "fast-dllm": 128, "dream": 128, "llada2": 32},
            "threshold": {"llada": None, "fast-dllm": 0.9, "dream": None, "llada2": 0.7},
            "editing_threshold": {"llada": None, "fast-dllm": None, "dream": None, "llada2": 0.5}}
# The auto classes tried on a folder's auto_map, in order: a class with the LM head first (LLaDA2's
# auto_map names its base model under AutoModel), AutoModel last (Dream names its LM there only).
AUTO_CLASSES = ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel")
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
    model_type = cfg.get("model_type")
    # As AutoModel.from_pretrained(folder) without trust_remote_code (transformers' resolve_trust_remote_code):
    # an auto_map for a model_type transformers has -> its own class; for one it has not -> it asks on a
    # terminal and refuses otherwise. The CLI never asks: it names the flag.
    remote = bool(auto_map) and (trust_remote_code or not _known_model_type(model_type))
    if remote:
        if not trust_remote_code:
            raise ModelFolderError(f"--model: {path} ships its own modeling code (auto_map in config.json, "
                                   f"model_type {model_type!r} is not one transformers has); pass "
                                   "--trust-remote-code to run it")
        for name in AUTO_CLASSES:
            if name in auto_map:
                cls = getattr(transformers, name)
                break
        else:
            raise ModelFolderError(f"--model: {cfg_path}'s auto_map has no entry for a model class "
                                   f"({', '.join(AUTO_CLASSES)}); it has {sorted(auto_map)}")
        kw["trust_remote_code"] = True
    else:
        archs = cfg.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            hint = " (its auto_map code runs with --trust-remote-code)" if auto_map else ""
            raise ModelFolderError(f"--model: {cfg_path} names no architecture that transformers has "
                                   f"(architectures = {archs}){hint}")
    try:
        model = cls.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"--model: cannot load {path}: {first}") from None
    return model.to(device).eval()


def _known_model_type(model_type) -> bool:
    """Whether transformers has its own config class for ``model_type`` (then it ignores an auto_map
    unless ``trust_remote_code=True``)."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def mask_id_of(model) -> int | None:
    """The mask id the model's config states (``mask_token_id``), else None."""
    cfg = getattr(model, "config", None)
    for key in ("mask_token_id", "mask_id"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _generators(model, pipeline, *, mask_id, gen_length, block_length, steps, temperature, threshold, top_p, alg,
                editing_threshold=None, prefix_cache=False):
    """name -> generate(prompt, temperature) -> [B, l + gen_length]; the reference first."""
    if pipeline == "dream":
        from ..integrations import dream

        kw = dict(max_new_tokens=gen_length, steps=steps, top_p=top_p, alg=alg)
        return {UPSTREAM[pipeline]: lambda p, t: anchors.dream_generate(model, p, mask_id=mask_id, temperature=t, **kw),
                FUSED: lambda p, t: dream.diffusion_generate(model, p, mask_token_id=mask_id, temperature=t, seed=0,
                                                             **kw)}
    if pipeline == "llada2":
        return _llada2_generators(model, mask_id=mask_id, gen_length=gen_length, block_length=block_length,
                                  steps=steps, threshold=threshold, editing_threshold=editing_threshold,
                                  prefix_cache=prefix_cache)
    from ..integrations import llada

    thr = threshold if pipeline == "fast-dllm" else None
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, mask_id=mask_id)
    return {UPSTREAM[pipeline]: lambda p, t: anchors.llada_generate(model, p, temperature=t, threshold=thr, **kw),
            FUSED: lambda p, t: llada.generate(model, p, temperature=t, threshold=thr, seed=0, **kw)}


def _llada2_generators(model, *, mask_id, gen_length, block_length, steps, threshold, editing_threshold,
                       prefix_cache):
    """diffusers' ``LLaDA2Pipeline`` + ``BlockRefinementScheduler`` against ``FusedLLaDA2Pipeline`` (and
    with ``prefix_cache=True``), on ``model``; no tokenizer (the prompts are ids), no EOS early stop."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    from ..integrations.diffusers import FusedLLaDA2Pipeline

    stock = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=block_length))
    fused = FusedLLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=block_length))
    for pipe in (stock, fused):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(gen_length=gen_length, block_length=block_length, num_inference_steps=steps, threshold=threshold,
              editing_threshold=editing_threshold if editing_threshold else None, mask_token_id=mask_id,
              eos_early_stop=False, use_chat_template=False, output_type="seq")

    def call(pipe, **extra):
        def gen(p, t):
            g = torch.Generator(device=p.device).manual_seed(0)
            out = pipe(input_ids=p, temperature=t, generator=g, **kw, **extra)
            return torch.cat([p, out.sequences], dim=1)
        return gen

    gens = {UPSTREAM["llada2"]: call(stock), FUSED: call(fused)}
    if prefix_cache:
        gens[FUSED_CACHE] = call(fused, prefix_cache=True)
    return gens


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
        block_length: int = 32, steps: int = 32, temperature: float = 0.0, threshold: float | None = 0.9,
        top_p: float | None = None, alg: str = "maskgit_plus", editing_threshold: float | None = None,
        prefix_cache: bool = False, repeats: int = 3, max_time: float = 30.0, progress=None) -> list[dict]:
    """One row per (batch size, implementation). Raises :class:`PipelineMismatch` when the model does not run
    under the pipeline (its first generation is the check)."""
    vocab = model.config.vocab_size
    gens = _generators(model, pipeline, mask_id=mask_id, gen_length=gen_length, block_length=block_length,
                       steps=steps, temperature=temperature, threshold=threshold, top_p=top_p, alg=alg,
                       editing_threshold=editing_threshold, prefix_cache=prefix_cache)
    upstream = UPSTREAM[pipeline]
    rows = []
    for b in batch_sizes:
        prompt = prompts(vocab, mask_id, b, prompt_length, device)
        if progress:
            progress(f"batch {b}: greedy agreement")
        greedy = {}
        with torch.no_grad():
            for name in [n for n in gens if n != upstream] + [upstream]:  # the drop-ins first: they check arguments
                try:
                    greedy[name] = gens[name](prompt, 0.0)
                except (ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as e:
                    if rows:
                        raise
                    msg = str(e).strip().splitlines()
                    raise PipelineMismatch(f"{name}: {type(e).__name__}: {msg[0] if msg else ''}") from e
        ref = greedy[upstream][:, prompt_length:]
        agreement = {name: float((ref == out[:, prompt_length:]).float().mean()) for name, out in greedy.items()}
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
                             greedy_agreement=agreement[name]))
        stock = next(r for r in rows if r["batch_size"] == b and r["impl"] == upstream)
        for r in rows:
            if r["batch_size"] == b:
                r["speedup"] = stock["median_ms"] / r["median_ms"]
    return rows


def n_impls(pipeline: str, prefix_cache: bool = False) -> int:
    """How many implementations ``run`` times per batch size (the progress bar's phases)."""
    return 3 if pipeline == "llada2" and prefix_cache else 2
