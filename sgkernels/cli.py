"""``sgkernels`` command line: the embedded digits model.

    sgkernels generate --out grid.png [--num 16] [--classes 0,1,..] [--seed 0] [--steps N]
                       [--guidance-scale S] [--choice-temperature T] [--model DIR]
    sgkernels evaluate [--num 1000] [--seed 0] [--guidance-scale S] [--choice-temperature T] [--steps N]
                       [--json] [--sweep [--plot PATH]] [--model DIR]
    sgkernels demo [--out digits_demo.png] [--num-eval 500]
    sgkernels train tokenizer|generator|guide|classifier --out DIR [--steps N] [--seed S]

Without ``--model`` the shipped weights (``sgkernels/assets/digits``) are used. Bad input prints one
``sgkernels: error: ...`` line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

SWEEP_TEMPERATURES = (1.0, 2.0, 4.5, 10.0, 20.0, 40.0)


class CLIError(Exception):
    """A user error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(message)


def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 1, got {v}")
        return v
    return parse


def _finite_float(name, nonneg=False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a number, got {text!r}") from None
        if not math.isfinite(v) or (nonneg and v < 0):
            raise argparse.ArgumentTypeError(f"{name}: expected a finite number{' >= 0' if nonneg else ''}, got {text}")
        return v
    return parse


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            c = int(part)
        except ValueError:
            raise CLIError(f"--classes: expected comma-separated class ids, got {part!r}") from None
        if not 0 <= c < num_classes:
            raise CLIError(f"--classes: unknown class {c} (this model has classes 0..{num_classes - 1})")
        out.append(c)
    if not out:
        raise CLIError("--classes: expected at least one class")
    return out


def _check_writable(path: str) -> None:
    if os.path.isdir(path):
        raise CLIError(f"cannot write {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write {path}: permission denied")


def _sampling_args(p, *, steps_help=True):
    from .digits.pipeline import DEFAULTS

    p.add_argument("--model", default=None, help="model directory (default: the shipped sgkernels/assets/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int("--steps"), default=DEFAULTS.steps,
                   help=f"sampling steps T (default {DEFAULTS.steps})")
    p.add_argument("--guidance-scale", type=_finite_float("--guidance-scale"), default=DEFAULTS.guidance_scale,
                   help=f"self-guidance scale s (default {DEFAULTS.guidance_scale}; 0 = plain MaskGIT)")
    p.add_argument("--choice-temperature", type=_finite_float("--choice-temperature", nonneg=True), default=None,
                   help=f"tau_0 (default {DEFAULTS.choice_temperature} with guidance, "
                        f"{DEFAULTS.plain_choice_temperature} without: MaskGIT's)")


def _tau(args) -> float:
    from .digits.pipeline import DEFAULTS

    if args.choice_temperature is not None:
        return args.choice_temperature
    return DEFAULTS.choice_temperature if args.guidance_scale != 0 else DEFAULTS.plain_choice_temperature


def _load(model_dir, need_classifier=False):
    from .digits.pipeline import DigitsModel

    if model_dir is not None and not os.path.isdir(model_dir):
        raise CLIError(f"--model: directory not found: {model_dir}")
    try:
        return DigitsModel.load(model_dir, need_classifier=need_classifier)
    except Exception as e:  # noqa: BLE001  (any failure to read a corrupt directory: safetensors, json, shapes)
        where = model_dir if model_dir is not None else "the shipped model"
        raise CLIError(f"cannot load {where}: {e}") from None


def _grid(images, cols: int, scale: int = 2):
    import numpy as np

    from ._png import tile
    from .digits.data import to_uint8

    rgb = to_uint8(images)
    rows = -(-len(rgb) // cols)
    cells = np.zeros((rows * cols,) + rgb.shape[1:], dtype=np.uint8)
    cells[: len(rgb)] = rgb
    return tile(cells.reshape(rows, cols, *rgb.shape[1:]), pad=2, scale=scale, background=128)


def _write_png(path: str, rgb) -> None:
    from ._png import write_png

    try:
        write_png(path, rgb)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------ commands
def cmd_generate(args) -> int:
    from .digits.pipeline import class_balanced_labels

    _check_writable(args.out)
    dm = _load(args.model)
    classes = _parse_classes(args.classes, dm.num_classes)
    labels = class_balanced_labels(args.num, classes=classes)
    t0 = time.perf_counter()
    images = dm.generate(labels, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                         choice_temperature=_tau(args))
    dt = time.perf_counter() - t0
    _write_png(args.out, _grid(images, min(args.num, len(classes))))
    mode = f"self-guided (s={args.guidance_scale:g})" if args.guidance_scale != 0 else "plain MaskGIT"
    print(f"wrote {args.out}: {args.num} digits, {mode}, T={args.steps}, tau0={_tau(args):g}, seed={args.seed} "
          f"({args.num / dt:.1f} images/s)")
    return 0


def _evaluate_one(dm, real, num, seed, steps, guidance_scale, tau) -> dict:
    from .digits.metrics import evaluate_images
    from .digits.pipeline import class_balanced_labels

    labels = class_balanced_labels(num, dm.num_classes)
    t0 = time.perf_counter()
    images = dm.generate(labels, seed=seed, steps=steps, guidance_scale=guidance_scale, choice_temperature=tau)
    dt = time.perf_counter() - t0
    result = evaluate_images(dm.classifier, images, real)
    result["images_per_second"] = num / dt
    result["config"] = {"num": num, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                        "choice_temperature": tau, "model": dm.directory}
    return result


def _line(r: dict) -> str:
    c = r["config"]
    mode = f"self-guided s={c['guidance_scale']:g}" if c["guidance_scale"] != 0 else "plain MaskGIT"
    return (f"{mode:<18} T={c['steps']} tau0={c['choice_temperature']:<5g} seed={c['seed']} n={c['num']}: "
            f"FID {r['fid']:.3f}  IS {r['inception_score']:.3f}  precision {r['precision']:.3f}  "
            f"recall {r['recall']:.3f}  {r['images_per_second']:.1f} images/s")


def _real_images():
    from .digits import data

    try:
        x, _ = data.load_split("heldout")
    except ImportError as e:
        raise CLIError(f"evaluate needs the digits data: {e}") from None
    return x


def cmd_evaluate(args) -> int:
    if args.sweep:
        _check_writable(args.plot)
    dm = _load(args.model, need_classifier=True)
    real = _real_images()
    if not args.sweep:
        r = _evaluate_one(dm, real, args.num, args.seed, args.steps, args.guidance_scale, _tau(args))
        print(_line(r))
        if args.json:
            print(json.dumps(r))
        return 0
    if dm.guide is None:
        raise CLIError("--sweep compares guided and unguided sampling: this model has no guide")
    scale = args.guidance_scale if args.guidance_scale != 0 else 1.0
    results = []
    for s in (0.0, scale):
        for tau in SWEEP_TEMPERATURES:
            r = _evaluate_one(dm, real, args.num, args.seed, args.steps, s, tau)
            print(_line(r), flush=True)
            results.append(r)
    _plot_sweep(results, args.plot)
    print(f"wrote {args.plot}")
    if args.json:
        print(json.dumps({"sweep": results}))
    return 0


def _plot_sweep(results, path):
    try:
        import matplotlib
    except ImportError:
        raise CLIError("--sweep needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for guided, style in ((False, "o-"), (True, "s-")):
        rs = [r for r in results if (r["config"]["guidance_scale"] != 0) == guided]
        if not rs:
            continue
        label = f"self-guided (s={rs[0]['config']['guidance_scale']:g})" if guided else "plain MaskGIT"
        ax.plot([r["inception_score"] for r in rs], [r["fid"] for r in rs], style, label=label)
        for r in rs:
            ax.annotate(f"{r['config']['choice_temperature']:g}", (r["inception_score"], r["fid"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    c = results[0]["config"]
    ax.set_xlabel("Inception Score (digits classifier)")
    ax.set_ylabel("FID (digits classifier features)")
    ax.set_title(f"IS-FID trade-off over choice temperature tau0\nT={c['steps']}, n={c['num']}, seed={c['seed']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def cmd_demo(args) -> int:
    import numpy as np

    from .digits.pipeline import DEFAULTS, class_balanced_labels

    _check_writable(args.out)
    dm = _load(args.model, need_classifier=True)
    labels = class_balanced_labels(20, dm.num_classes)
    grids = []
    for s, tau in ((DEFAULTS.guidance_scale, DEFAULTS.choice_temperature), (0.0, DEFAULTS.plain_choice_temperature)):
        images = dm.generate(labels, seed=args.seed, steps=DEFAULTS.steps, guidance_scale=s, choice_temperature=tau)
        grids.append(_grid(images, 10))
    gap = np.full((grids[0].shape[0], 16, 3), 255, dtype=np.uint8)
    _write_png(args.out, np.concatenate([grids[0], gap, grids[1]], axis=1))
    print(f"wrote {args.out}: left self-guided (s={DEFAULTS.guidance_scale:g}, tau0={DEFAULTS.choice_temperature:g}), "
          f"right plain MaskGIT (tau0={DEFAULTS.plain_choice_temperature:g}), T={DEFAULTS.steps}, seed {args.seed}")
    real = _real_images()
    for s, tau in ((DEFAULTS.guidance_scale, DEFAULTS.choice_temperature), (0.0, DEFAULTS.plain_choice_temperature)):
        print(_line(_evaluate_one(dm, real, args.num_eval, args.seed, DEFAULTS.steps, s, tau)), flush=True)
    return 0


def cmd_train(args) -> int:
    from .digits.stages import run_stage

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


def _parser() -> argparse.ArgumentParser:
    from .digits.stages import DEFAULT_STEPS, STAGES

    p = _Parser(prog="sgkernels", description="Self-guided sampling of the embedded digits MaskGIT model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="write a PNG grid of generated digits")
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--num", type=_positive_int("--num"), default=16)
    g.add_argument("--classes", default=None, help="comma-separated class ids, cycled (default: 0..9)")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="FID / IS / precision / recall of class-balanced samples")
    e.add_argument("--num", type=_positive_int("--num"), default=1000)
    _sampling_args(e)
    e.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    e.add_argument("--sweep", action="store_true",
                   help=f"sweep tau0 over {SWEEP_TEMPERATURES}, guided and unguided, and plot IS vs FID")
    e.add_argument("--plot", default="digits_tradeoff.png", help="the --sweep plot (PNG)")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", help="guided vs unguided grids side by side, and both metric lines")
    d.add_argument("--out", default="digits_demo.png")
    d.add_argument("--num-eval", type=_positive_int("--num-eval"), default=500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model", default=None)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train one stage of the digits model")
    t.add_argument("stage", choices=STAGES)
    t.add_argument("--out", required=True, help="model directory (stages read and write their subfolders)")
    t.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="optimiser steps (default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=_positive_int("--threads"), default=1)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except CLIError as e:
        print(f"sgkernels: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sgkernels: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
