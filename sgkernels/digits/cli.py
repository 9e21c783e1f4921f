"""The digits model's commands (``sgkernels generate | evaluate | demo | train``; parsing: :mod:`sgkernels.cli`).

Each command takes the parsed arguments, prints its result and returns the exit status. A user
error (bad path, unknown class, unreadable model directory, missing extra) raises :class:`CLIError`,
which the dispatcher prints as one line.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .._cli import CLIError, check_writable, model_options, parse_classes, save_image, show_progress
from .._png import grid
from ..sampler import guidance_active
from . import data
from .evaluate import evaluate_samples, metric_line, mode_label, sweep
from .metrics import PR_NEIGHBOURS
from .plot import captioned, plot_sweep
from .pipeline import BATCH_SIZE, DEFAULTS, DigitsModel, class_balanced_labels
from .stages import run_stage


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
    classes = parse_classes(text, num_classes)
    return list(range(num_classes)) if classes is None else classes


def _defaults(args) -> None:
    """Fill the sampling options left unset with the digits model's tuned settings (:data:`DEFAULTS`)."""
    if args.steps is None:
        args.steps = DEFAULTS.steps
    if args.guidance_scale is None:
        args.guidance_scale = DEFAULTS.guidance_scale


def _batch(args) -> dict:
    return {} if getattr(args, "batch_size", None) is None else {"batch_size": args.batch_size}


def _tau(args, dm: DigitsModel) -> float:
    """``--choice-temperature``, or the default of the sampling mode (guided or plain MaskGIT)."""
    if args.choice_temperature is not None:
        return args.choice_temperature
    if guidance_active(dm.guide, args.guidance_scale):
        return DEFAULTS.choice_temperature
    return DEFAULTS.plain_choice_temperature


def _load(model_dir, need_classifier=False, args=None) -> DigitsModel:
    """The model of ``--model`` (the digits model runs on the CPU), with ``--dtype`` / ``--compile`` of ``args``."""
    dtype, compile = model_options(args, "cpu") if args is not None else (None, False)
    if model_dir is not None and not os.path.isdir(model_dir):
        raise CLIError(f"--model: directory not found: {model_dir}")
    try:
        return DigitsModel.load(model_dir, need_classifier=need_classifier, torch_dtype=dtype, compile=compile)
    except Exception as e:  # noqa: BLE001  (any failure to read a corrupt directory: safetensors, json, shapes)
        where = model_dir if model_dir is not None else "the shipped model"
        raise CLIError(f"cannot load {where}: {e}") from None


def _grid(images, cols: int):
    return grid(data.to_uint8(images), cols, pad=2, scale=2, background=128)


def _real_images():
    try:
        x, _ = data.load_split("heldout")
    except ImportError as e:
        raise CLIError(f"evaluate needs the digits data: {e}") from None
    return x


def generate(args) -> int:
    for option in ("out_npz", "out_dir", "device", "model_subfolder", "vae_subfolder"):
        if getattr(args, option, None) is not None:
            raise CLIError(f"--{option.replace('_', '-')}: needs --vae (official checkpoint folders); "
                           "the digits model writes --out only")
    _defaults(args)
    check_writable(args.out, image=True)
    dm = _load(args.model, args=args)
    classes = _parse_classes(args.classes, dm.num_classes)
    labels = class_balanced_labels(args.num, classes=classes)
    tau = _tau(args, dm)
    sampling = dict(steps=args.steps, guidance_scale=args.guidance_scale, choice_temperature=tau,
                    temperature=args.temperature)
    # Warm-up (one image, fixed seed): thread pools, allocator and first-call costs stay out of the rate.
    # Compiled passes compile once per batch shape: warm up on the first batch's.
    dm.generate(labels[:min(args.num, args.batch_size or BATCH_SIZE)] if dm.compile else labels[:1], seed=0,
                **sampling, **_batch(args))
    t0 = time.perf_counter()
    images = dm.generate(labels, seed=args.seed, progress=show_progress(args, args.num), **sampling, **_batch(args))
    dt = time.perf_counter() - t0
    save_image(args.out, _grid(images, min(args.num, len(classes))))
    mode = mode_label(args.guidance_scale, "self-guided (s={:g})")
    print(f"wrote {args.out}: {args.num} digits, {mode}, T={args.steps}, tau0={tau:g}, seed={args.seed} "
          f"({args.num / dt:.1f} images/s after warm-up)")
    return 0


def evaluate(args) -> int:
    _defaults(args)
    if args.num <= PR_NEIGHBOURS:
        raise CLIError(f"--num: evaluate needs at least {PR_NEIGHBOURS + 1} images (precision / recall use the "
                       f"{PR_NEIGHBOURS} nearest neighbours), got {args.num}")
    if args.sweep:
        check_writable(args.plot)
    dm = _load(args.model, need_classifier=True, args=args)
    real = _real_images()
    if not args.sweep:
        r = evaluate_samples(dm, real, args.num, args.seed, args.steps, args.guidance_scale, _tau(args, dm))
        print(metric_line(r))
        if args.json:
            print(json.dumps(r))
        return 0
    if dm.guide is None:
        raise CLIError("--sweep compares guided and unguided sampling: this model has no guide")
    scale = args.guidance_scale if guidance_active(dm.guide, args.guidance_scale) else 1.0
    results = []
    for r in sweep(dm, real, args.num, args.seed, args.steps, scale):
        print(metric_line(r), flush=True)
        results.append(r)
    try:
        plot_sweep(results, args.plot)
    except ImportError as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"cannot write {args.plot}: {e.strerror or e}") from None
    print(f"wrote {args.plot}")
    if args.json:
        print(json.dumps({"sweep": results}))
    return 0


def demo(args) -> int:
    if args.num_eval <= PR_NEIGHBOURS:
        raise CLIError(f"--num-eval: needs at least {PR_NEIGHBOURS + 1} images (precision / recall use the "
                       f"{PR_NEIGHBOURS} nearest neighbours), got {args.num_eval}")
    check_writable(args.out, image=True)
    dm = _load(args.model, need_classifier=True)
    modes = ((DEFAULTS.guidance_scale, DEFAULTS.choice_temperature), (0.0, DEFAULTS.plain_choice_temperature))
    labels = class_balanced_labels(20, dm.num_classes)
    grids = []
    for s, tau in modes:
        images = dm.generate(labels, seed=args.seed, steps=DEFAULTS.steps, guidance_scale=s, choice_temperature=tau)
        title = mode_label(s, "self-guided (TOAST guide, s={:g})")
        grids.append(captioned(_grid(images, 10), [title, f"tau0={tau:g}, T={DEFAULTS.steps}, seed={args.seed}"]))
    gap = np.full((grids[0].shape[0], 16, 3), 255, dtype=np.uint8)
    save_image(args.out, np.concatenate([grids[0], gap, grids[1]], axis=1))
    print(f"wrote {args.out}: left self-guided (s={DEFAULTS.guidance_scale:g}, tau0={DEFAULTS.choice_temperature:g}), "
          f"right plain MaskGIT (tau0={DEFAULTS.plain_choice_temperature:g}), T={DEFAULTS.steps}, seed {args.seed}")
    real = _real_images()
    for s, tau in modes:
        r = evaluate_samples(dm, real, args.num_eval, args.seed, DEFAULTS.steps, s, tau)
        print(metric_line(r), flush=True)
    return 0


def train(args) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out: {args.out} exists and is not a directory")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {args.out}: {e.strerror or e}") from None
    if args.stage in ("generator", "guide"):
        need = "tokenizer" if args.stage == "generator" else "generator"
        if not os.path.exists(os.path.join(args.out, need, "config.json")):
            raise CLIError(f"stage {args.stage!r} needs {os.path.join(args.out, need)}: run "
                           f"'sgkernels train {need} --out {args.out}' first")
    result = run_stage(args.stage, args.out, args.steps, args.seed, progress=not args.no_progress,
                       threads=args.threads)
    print(json.dumps(result))
    return 0
