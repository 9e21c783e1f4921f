"""Self-guided MaskGIT sampling: :class:`SelfGuidedSampler`.

Per step ``k = 0 .. T-1``:

1. base pass of the backbone on ``[class] + grid`` (its last hidden states kept) -> ``l_base``;
2. with a guide and ``guidance_scale != 0``: the guide's pass 2 from pass 1's hidden states ->
   ``l_smooth`` (so a step costs 2 backbone passes; 1 without guidance: plain MaskGIT);
3. ONE fused :func:`sgkernels.self_guided_step` call (``offset=k``): sample every masked position
   from ``l_smooth + (1+s)(l_base - l_smooth)`` and re-mask the ``mask_len(k)`` least confident
   (cosine schedule :func:`sgkernels.mask_len`, choice temperature
   :func:`sgkernels.choice_temperature`).

Presets (:data:`PRESETS`), the rules in which the official UnlockMGM code and MaskGIT JAX differ:

=====================  ==============================  ==================================
rule                   ``"unlockmgm"`` (default)        ``"maskgit"``
=====================  ==============================  ==================================
schedule rounding      float32 (``mask_rounding``)      float64
re-masks per step      at least 1 (``at_least_one``)    0 once one position is left
decoded positions      compete, conf. log(FLT_MAX)      never re-masked
                       + tau G (``decoded_confidence``)
ties at the cut        strictly below (``tie_rule``)    exactly k, lower index first
choice temperature     compounded (``temperature_decay``) tau0 (1 - (k+1)/T)
=====================  ==============================  ==================================

(The official code's sixth difference, the auxiliary loss's vocabulary, is training's:
:func:`sgkernels.training.aux_loss`.)

Classifier-free guidance (``cfg_scale = w > 0``) replaces ``l_base`` with
``l_u + (1 + w)(l_c - l_u)``; the unconditional pass puts the **[MASK] id** in the class slot
(``class_labels = -1``; MaskGIT has no dedicated null class, and [MASK] is also what TOAST's blank
canvas puts there). It only makes sense for a backbone trained with class dropout to [MASK]. The
conditional and unconditional passes run as one batch of 2B; the guide still steers from the
conditional pass's hidden states, so a CFG + self-guidance step costs 3 backbone passes.

The loop has no host sync: mask counts stay on the device (``mask_len`` takes tensors), the
choice temperature is a Python float of the step index, and errors flagged by the kernels on CUDA
are raised by one :func:`sgkernels.check_errors` at the end. With ``cuda_graph=True`` the whole
step, sampling op included, is captured once per step index and replayed (the seed is a device
tensor the kernels read): a sample is T graph launches.

``compile=True`` runs the step's network passes (the backbone's pass, the CFG pass, the guide's pass 2;
everything before the sampling op) through ``torch.compile``: one graph, shape-specialised, compiled
once per batch shape and reused by every step, seed and sampler with the same settings (the step
index, mask counts and temperatures stay outside it). With ``cuda_graph=True`` the compiled passes
are warmed up, then captured inside the whole-step graphs.
"""
from __future__ import annotations

import torch

from . import _rng
from .models.toast import TOAST, check_model_and_guide
from .models.transformer import MaskTransformer
from .ops import _validate, check_errors, head_sample, remask_lowest_confidence, self_guided_step
from .ops._dispatch import choose_impl
from .ops.remask import TIE_RULES
from .schedule import ROUNDINGS, TEMPERATURE_DECAYS, choice_temperature, mask_len
from .step_graphs import StepGraphCache, check_graph_device

# log(float32 max) as the official code computes it (float32): decoded positions' confidence.
LOG_FLOAT32_MAX = float(torch.log(torch.tensor(torch.finfo(torch.float32).max)))
PRESETS = {
    "unlockmgm": dict(temperature_decay="compound", mask_rounding="float32", at_least_one=True,
                      decoded_confidence=LOG_FLOAT32_MAX, tie_rule="strict_below"),
    "maskgit": dict(temperature_decay="maskgit", mask_rounding="float64", at_least_one=False,
                    decoded_confidence=None, tie_rule="exact_k"),
}


# torch.compile arguments ``compile=`` may set (a dict); ``dynamic`` defaults to False: a graph per batch shape.
COMPILE_ARGS = ("backend", "mode", "fullgraph", "dynamic", "options")
# torch.compile modes that record CUDA graphs of their own: they cannot run inside cuda_graph=True's capture.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_options(compile, *, cuda_graph: bool = False) -> dict | None:
    """``compile=`` checked: None (off) or the ``torch.compile`` keyword arguments of the network passes.

    ``compile`` is a bool or a dict of :data:`COMPILE_ARGS` (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``,
    ``{"backend": "aot_eager"}``). ValueError naming ``compile`` where torch.compile is unavailable
    (``torch._dynamo.is_dynamo_supported()`` false: an unsupported Python or platform), or for a mode
    that records its own CUDA graphs together with ``cuda_graph=True``.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        options = {}
    elif isinstance(compile, dict):
        unknown = sorted(str(k) for k in compile if k not in COMPILE_ARGS)
        if unknown:
            raise ValueError(f"compile: unknown torch.compile argument {unknown[0]!r} (expected {', '.join(COMPILE_ARGS)})")
        options = dict(compile)
    else:
        raise TypeError(f"compile: expected a bool or a dict of torch.compile arguments, got {type(compile).__name__}")
    if not dynamo_supported():
        import sys

        raise ValueError(f"compile: torch.compile is not available with torch {torch.__version__} on Python "
                         f"{sys.version.split()[0]} ({sys.platform}); run without compile")
    if cuda_graph and options.get("mode") in _CUDAGRAPH_MODES:
        raise ValueError(f"compile: mode {options['mode']!r} records its own CUDA graphs, which cannot run inside "
                         "cuda_graph=True's capture; use the default mode or 'max-autotune-no-cudagraphs'")
    options.setdefault("dynamic", False)
    return options


def dynamo_supported() -> bool:
    """Whether ``torch.compile`` can run here (torch's own check: Python version and platform)."""
    try:
        import torch._dynamo

        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # noqa: BLE001  (an install whose dynamo does not import)
        return False


# The compiled network passes, shared by every sampler: one torch.compile per (passes, options), so
# a new sampler (the pipeline builds one per call) reuses the graphs dynamo cached for earlier ones.
_COMPILED: dict = {}


def _compiled(fn, options: dict):
    key = (fn, repr(sorted(options.items())))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = torch.compile(fn, **options)
    return compiled


def _logits_passes(model, guide, tokens, labels, cfg_scale: float):
    """The step's network passes up to the logits: ``(logits [B, N, K], guide logits or None)``;
    CFG (``cfg_scale > 0``) blended in float32 (the sampling op reads any float dtype)."""
    guided = guide is not None
    if cfg_scale > 0:
        b = tokens.shape[0]
        out = model(torch.cat([tokens, tokens]), torch.cat([labels, torch.full_like(labels, -1)]),
                    return_hidden=guided, dropout=False)
        logits_all = (out.logits if guided else out).float()
        cond, uncond = logits_all[:b], logits_all[b:]
        logits = uncond + (1.0 + cfg_scale) * (cond - uncond)
        hidden = out.hidden_states[:b] if guided else None
    elif guided:
        out = model(tokens, labels, return_hidden=True, dropout=False)
        logits, hidden = out.logits, out.hidden_states
    else:
        logits, hidden = model(tokens, labels, dropout=False), None
    guide_logits = guide(model, hidden, labels, dropout=False) if guided else None
    return logits, guide_logits


def _feature_passes(model, guide, tokens, labels, cfg_scale: float):
    """The step's passes stopped before the head's last linear: the base features ``[B, N, d]``
    (CFG blended in float32) and the guide's features (or None)."""
    if cfg_scale > 0:
        b = tokens.shape[0]
        hidden_all = model(torch.cat([tokens, tokens]), torch.cat([labels, torch.full_like(labels, -1)]),
                           with_head=False, dropout=False).hidden_states
        feats = model.head_features(hidden_all).float()
        cond, uncond = feats[:b], feats[b:]
        base, hidden = uncond + (1.0 + cfg_scale) * (cond - uncond), hidden_all[:b]
    else:
        hidden = model(tokens, labels, with_head=False, dropout=False).hidden_states
        base = model.head_features(hidden)
    guide_features = (model.head_features(guide(model, hidden, labels, with_head=False, dropout=False))
                      if guide is not None else None)
    return base, guide_features


class _FromPreset:
    def __repr__(self) -> str:
        return "FROM_PRESET"


FROM_PRESET = _FromPreset()  # an argument's default: its preset's value


def guidance_requested(guidance_scale: float) -> bool:
    """Whether a guidance scale asks for self-guidance: s = 0 is plain MaskGIT."""
    return guidance_scale != 0.0


def guidance_active(guide: TOAST | None, guidance_scale: float) -> bool:
    """Whether a step runs the guide: there is one and the scale asks for it.

    With :func:`guidance_requested`, the one place that decides whether guidance is on; the ops
    only see the guide's logits or None.
    """
    return guide is not None and guidance_requested(guidance_scale)


class SelfGuidedSampler:
    """Samples token grids from a :class:`MaskTransformer`, optionally self-guided by a :class:`TOAST` guide.

    Args:
        model: the backbone. Sampling runs it as in eval mode (no dropout) whatever its mode, without
            changing the mode: its forward takes ``dropout=False`` (so threads may share one model,
            and a model in training mode stays in it).
        guide: a :class:`TOAST` built for ``model``'s config, or None (plain MaskGIT).
        steps: T >= 1.
        guidance_scale: s (paper default 1.0); 0 = plain MaskGIT (one pass per step).
        choice_temperature: tau_0 (25 for T = 18 at 256px with guidance; MaskGIT alone: 4.5).
        preset: ``"unlockmgm"`` (default: the official UnlockMGM code's rules) or ``"maskgit"``
            (MaskGIT JAX's); the table in the module docstring. The five arguments below default to
            their preset's value; an explicit value overrides it.
        temperature_decay: ``"maskgit"`` (tau_0 (1 - (k+1)/T)) or ``"compound"`` (the official code).
        mask_rounding: ``"float32"`` or ``"float64"``: :func:`sgkernels.schedule.schedule_count`.
        at_least_one: re-mask at least one position every step but the last (:func:`sgkernels.mask_len`).
        decoded_confidence: None (decoded positions are never re-masked) or the confidence with
            which they compete (:func:`sgkernels.self_guided_step`).
        tie_rule: ``"strict_below"`` or ``"exact_k"`` (:func:`sgkernels.remask_lowest_confidence`).
        temperature: token temperature t_tok (1 in the paper).
        cfg_scale: classifier-free guidance weight w (0 = off); see the module docstring.
        cuda_graph: run the whole loop as CUDA graph replays (CUDA only): one graph per step index,
            each the whole of :meth:`step` (model passes and the sampling op, its step's choice
            temperature, mask count rule and stream offset baked in) on static token / mask / label
            buffers, the seed read by the kernels from a 0-dim int64 device tensor. So a call costs
            ``steps`` graph launches and no other host work per step, and a new ``seed`` is an
            in-place fill, not a recapture. Captured on the first call per batch size and device
            (and settings: changing an attribute such as ``guidance_scale`` captures a new set), after
            warming every step up on a side stream; the graphs share one memory pool. They read the
            parameters' memory: call :meth:`reset_graphs` after moving the model or replacing (not
            updating in place) its parameters. Same tokens as ``cuda_graph=False, fused_head=False``.
            Calls sharing a set of graphs run one at a time (any thread, any stream); errors the
            kernels flag are raised after the loop, as without graphs.
        fused_head: project only the masked positions, once, with :func:`sgkernels.head_sample`:
            the passes stop before the head's last linear, CFG and the guide are blended on its input
            features (the blend commutes with a linear map: one GEMM for guide + base), and the
            ``[B, N, K]`` logits never exist. Same tokens as the logits path up to float rounding.
            On CUDA every row is projected (selecting the masked ones would sync the host). Off with
            ``cuda_graph=True``, under ``torch.compile`` and with a tensor seed passed to
            :meth:`step` (it selects rows on CPU, a data-dependent shape, and takes int seeds).
        compile: ``torch.compile`` the step's network passes (see the module docstring): True, or a
            dict of torch.compile arguments (:data:`COMPILE_ARGS`; ``dynamic`` defaults to False).
            Compiled on the first call per batch shape (dtype, device and settings), then reused by
            every step, seed and later sampler; the sampling op stays eager (on CPU the fused head
            keeps projecting only the masked rows). Same tokens as without, up to the compiled
            passes' float rounding. Works on CPU (inductor: a C++ compiler is needed) and CUDA; with
            ``cuda_graph=True`` the compiled passes are captured in the step graphs (a mode that
            records its own CUDA graphs is refused). ValueError where torch.compile is unavailable.

    ``sampler(class_labels, *, seed=None, progress=False, callback=None)`` returns int64 tokens
    ``[B, N]`` (codebook ids). ``seed`` fixes every random number (``None``: drawn from torch's
    default generator); ``progress`` shows a tqdm bar; ``callback(step, tokens, is_masked)`` is called
    after each step (it must not sync if you care about speed; with ``cuda_graph`` it gets copies of
    the static buffers).
    """

    def __init__(
        self,
        model: MaskTransformer,
        guide: TOAST | None = None,
        *,
        steps: int = 18,
        guidance_scale: float = 1.0,
        choice_temperature: float = 25.0,
        preset: str = "unlockmgm",
        temperature_decay=FROM_PRESET,
        mask_rounding=FROM_PRESET,
        at_least_one=FROM_PRESET,
        decoded_confidence=FROM_PRESET,
        tie_rule=FROM_PRESET,
        temperature: float = 1.0,
        cfg_scale: float = 0.0,
        cuda_graph: bool = False,
        fused_head: bool = True,
        compile=False,
    ):
        check_model_and_guide(model, guide)
        steps = _validate.check_positive_int("steps", steps)
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
        rules = dict(PRESETS[preset])
        given = dict(temperature_decay=temperature_decay, mask_rounding=mask_rounding, at_least_one=at_least_one,
                     decoded_confidence=decoded_confidence, tie_rule=tie_rule)
        rules.update({k: v for k, v in given.items() if v is not FROM_PRESET})
        temperature_decay = rules["temperature_decay"]
        if temperature_decay not in TEMPERATURE_DECAYS:
            raise ValueError(f"temperature_decay: expected one of {TEMPERATURE_DECAYS}, got {temperature_decay!r}")
        if rules["mask_rounding"] not in ROUNDINGS:
            raise ValueError(f"mask_rounding: expected one of {ROUNDINGS}, got {rules['mask_rounding']!r}")
        if not isinstance(rules["at_least_one"], bool):
            raise TypeError(f"at_least_one: expected a bool, got {type(rules['at_least_one']).__name__}")
        if rules["tie_rule"] not in TIE_RULES:
            raise ValueError(f"tie_rule: expected one of {TIE_RULES}, got {rules['tie_rule']!r}")
        if rules["decoded_confidence"] is not None:
            rules["decoded_confidence"] = _validate.check_float("decoded_confidence", rules["decoded_confidence"],
                                                                nonneg=False)
        self.preset = preset
        self.mask_rounding = rules["mask_rounding"]
        self.at_least_one = rules["at_least_one"]
        self.decoded_confidence = rules["decoded_confidence"]
        self.tie_rule = rules["tie_rule"]
        self.model = model
        self.guide = guide
        self.steps = steps
        self.guidance_scale = _validate.check_guidance_scale(guidance_scale)
        self.choice_temperature = _validate.check_float("choice_temperature", choice_temperature)
        self.temperature_decay = temperature_decay
        self.temperature = _validate.check_float("temperature", temperature)
        self.cfg_scale = _validate.check_float("cfg_scale", cfg_scale)
        self.cuda_graph = bool(cuda_graph)
        self.fused_head = bool(fused_head)
        self.compile = compile_options(compile, cuda_graph=self.cuda_graph)
        self._graphs = StepGraphCache()

    def _step_rules(self, mask_token_id: int) -> dict:
        """The preset's options of :func:`self_guided_step` (only the non-default ones are passed)."""
        rules = {}
        if self.decoded_confidence is not None:
            rules.update(decoded_confidence=self.decoded_confidence, mask_token_id=mask_token_id)
        if self.tie_rule != "exact_k":
            rules["tie_rule"] = self.tie_rule
        return rules

    def reset_graphs(self) -> None:
        """Drop the captured CUDA graphs, every batch size's (they are captured again on the next call)."""
        self._graphs.clear()

    @property
    def guided(self) -> bool:
        """Whether a step runs the guide (see :func:`guidance_active`)."""
        return guidance_active(self.guide, self.guidance_scale)

    @property
    def passes_per_step(self) -> int:
        """Backbone passes per step (the batched CFG pass counts as 2)."""
        return 1 + (self.cfg_scale > 0) + self.guided

    # -- one step's network passes --------------------------------------------------------------
    def _passes(self, fn, tokens: torch.Tensor, labels: torch.Tensor):
        """``fn`` (:func:`_logits_passes` or :func:`_feature_passes`) on this step, compiled with ``compile``."""
        if self.compile is not None:
            fn = _compiled(fn, self.compile)
        return fn(self.model, self.guide if self.guided else None, tokens, labels, self.cfg_scale)

    def _logits(self, tokens: torch.Tensor, labels: torch.Tensor):
        return self._passes(_logits_passes, tokens, labels)

    def _features(self, tokens: torch.Tensor, labels: torch.Tensor):
        """The step's passes stopped before the head's last linear: blended base features ``[B, N, d]``
        (CFG applied) and the guide's features (or None)."""
        return self._passes(_feature_passes, tokens, labels)

    def _fused_step(self, tokens, is_masked, labels, num_to_mask, tau: float, seed: int, step: int):
        """One step through :func:`sgkernels.head_sample` + remask: the same streams as
        :func:`sgkernels.self_guided_step` (row ``b * N + n``, ``offset = step``).

        On CPU only the masked rows are projected. On CUDA every row is (a bool ``rows`` mask costs a
        host sync, which the loop must not have); known rows' outputs are discarded below."""
        base, guide = self._features(tokens, labels)
        weight, bias = self.model.head_projection()
        rows = is_masked if tokens.device.type == "cpu" else None
        sampled, logp = head_sample(base, weight, bias, guide, guidance_scale=self.guidance_scale,
                                    temperature=self.temperature, seed=seed, offset=step, rows=rows)
        rules = self._step_rules(self.model.config.mask_token_id)
        mask_token_id = rules.pop("mask_token_id", None)
        remask = remask_lowest_confidence(logp, is_masked, num_to_mask, choice_temperature=tau, seed=seed,
                                          offset=step, **rules)
        new_tokens = torch.where(is_masked, sampled, tokens)
        reset = tokens if mask_token_id is None else torch.full_like(tokens, mask_token_id)
        return torch.where(remask, reset, new_tokens), remask

    # -- sampling -----------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, is_masked: torch.Tensor, labels: torch.Tensor, step: int, seed):
        """Step ``step`` of the loop: the network passes and one fused :func:`self_guided_step`
        (or, with ``fused_head`` and an int ``seed``, :func:`head_sample` on the masked rows + the remask).

        ``tokens`` int64 ``[B, N]``, ``is_masked`` bool ``[B, N]``, ``labels`` int64 ``[B]`` (checked),
        ``step`` an int in ``[0, steps)`` (the stream offset; it fixes the step's mask count and choice
        temperature), ``seed`` an int or a 0-dim int64 tensor on the tokens' device (read by the
        kernels: a graph replays with the value it holds). Returns the new ``(tokens, is_masked)``;
        it never syncs the host (on CUDA). Traceable by ``torch.compile(fullgraph=True)``: a tensor
        ``seed`` is an input, so a new seed does not recompile; ``step`` is specialised on (its
        choice temperature is a Python float the kernels take), so each step index compiles once
        (raise ``torch._dynamo.config.recompile_limit``, 8 by default, to at least ``steps``).
        With ``cuda_graph=True`` this is the function :meth:`__call__` captures, once per step index.
        Runs without autograd (its outputs are integer and bool) and without dropout, whatever the
        modules' modes (which it never changes), with or without an enclosing ``torch.no_grad()``.
        """
        with torch.no_grad():
            return self._step(tokens, is_masked, labels, step, seed)

    def _step(self, tokens, is_masked, labels, step: int, seed):
        num_to_mask = mask_len(step, self.steps, tokens.shape[1], is_masked.sum(dim=1), rounding=self.mask_rounding,
                               at_least_one=self.at_least_one)
        tau = choice_temperature(step, self.steps, self.choice_temperature, self.temperature_decay)
        # The fused head selects the masked rows on CPU (a data-dependent shape) and takes int seeds:
        # eager only. Under torch.compile, in a CUDA graph and with a tensor seed the step projects
        # every position through the model's head (same streams, same tokens up to float rounding).
        if (self.fused_head and not self.cuda_graph and not torch.compiler.is_compiling()
                and not isinstance(seed, torch.Tensor)):
            return self._fused_step(tokens, is_masked, labels, num_to_mask, tau, seed, step)
        logits, guide_logits = self._logits(tokens, labels)
        return self_guided_step(
            tokens, is_masked, logits, guide_logits, num_to_mask,
            guidance_scale=self.guidance_scale,
            temperature=self.temperature, choice_temperature=tau, seed=seed, offset=step,
            **self._step_rules(self.model.config.mask_token_id),
        )

    def _check_labels(self, class_labels, device: torch.device) -> torch.Tensor:
        if not isinstance(class_labels, torch.Tensor) or class_labels.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError("class_labels: expected an integer (int64) tensor [B]")
        if class_labels.dim() != 1 or class_labels.numel() == 0:
            raise ValueError(f"class_labels: expected a non-empty 1-D tensor [B], got shape {tuple(class_labels.shape)}")
        c = self.model.config.num_classes
        # One check before the loop (a sync on CUDA, never inside the loop).
        if bool(((class_labels < 0) | (class_labels >= c)).any()):
            bad = class_labels[(class_labels < 0) | (class_labels >= c)][:8].tolist()
            raise ValueError(f"class_labels: expected values in [0, {c}), got {bad}")
        return class_labels.to(device=device, dtype=torch.int64)

    def __call__(self, class_labels: torch.Tensor, *, seed: int | None = None, progress: bool = False, callback=None):
        model, guide, cfg = self.model, self.guide, self.model.config
        if guide is not None:
            guide.check_backbone(model)
        device = next(model.parameters()).device
        if self.cuda_graph:
            check_graph_device(device)
        if self.cuda_graph and device.type == "cuda" and choose_impl(device) == "torch":
            raise ValueError("cuda_graph=True needs the sampling op's CUDA kernels (Triton), not the torch "
                             "backend: the reference reads the seed tensor on the host, which a capture forbids")
        if self.guided:
            gdev = next(guide.parameters()).device
            if gdev != device:
                raise ValueError(f"guide is on {gdev} but the model is on {device}")
        labels = self._check_labels(class_labels, device)
        seed = _rng.resolve_seed(seed)

        # The modules' train/eval modes are left alone (the passes take dropout=False): another thread
        # may be sampling with, or training, the same model.
        steps = range(self.steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="self-guided sampling" if self.guided else "MaskGIT sampling", unit="step")
        with torch.no_grad():
            graphs = None
            if self.cuda_graph:
                tokens, graphs = self._graphs.loop(self, labels, seed, steps, callback)
            else:
                b, n = labels.shape[0], cfg.num_tokens
                tokens = torch.full((b, n), cfg.mask_token_id, dtype=torch.int64, device=device)
                is_masked = torch.ones((b, n), dtype=torch.bool, device=device)
                for step in steps:
                    tokens, is_masked = self.step(tokens, is_masked, labels, step, seed)
                    if callback is not None:
                        callback(step, tokens, is_masked)
        check_errors(device)
        if graphs is not None:
            graphs.raise_flagged()
        return tokens

