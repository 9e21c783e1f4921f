"""``sgkernels`` command line: the embedded digits model (:mod:`sgkernels.digits.cli`) and official
open-muse / UnlockMGM checkpoint folders (``generate --vae``, :mod:`sgkernels.pipeline_cli`).

    sgkernels generate --out grid.png [--num 16] [--classes 0,1,..] [--seed 0] [--steps N]
                       [--guidance-scale S] [--choice-temperature T] [--temperature T] [--model DIR]
                       [--no-progress]
    sgkernels generate --model DIR --vae DIR (--out grid.png | --out-npz samples.npz | --out-dir DIR)
                       [--count N] [--classes ..] [--batch-size 64] [--seed 0] [--steps 18]
                       [--guidance-scale 1.0] [--choice-temperature 25.0] [--temperature 1.0]
                       [--model-subfolder S] [--vae-subfolder S] [--device D] [--no-progress]
    torchrun --standalone --nproc_per_node=N -m sgkernels generate --model DIR --vae DIR --count 50000 --out-npz s.npz
    sgkernels evaluate [--num 1000] [--seed 0] [--guidance-scale S] [--choice-temperature T] [--steps N]
                       [--json] [--sweep [--plot PATH]] [--model DIR] [--no-progress]
    sgkernels demo [--out digits_demo.png] [--num-eval 500]
    sgkernels train tokenizer|generator|guide|classifier --out DIR [--steps N] [--seed S]
    sgkernels bench sampler [--model DIR [--vae DIR]] [--batch-sizes 1,8,64] [--steps N] [--guidance-scale S]
    sgkernels bench dllm --model DIR [--pipeline llada|fast-dllm|dream|llada2] [--mask-id N] [--gen-length ..]
                         [--block-length ..] [--steps ..] [--prefix-cache] [--trust-remote-code]
    sgkernels bench ops [--device cpu|cuda] [--quick] [--only OP ..]
    (every bench: [--json FILE] [--plot FILE.png] [--no-progress]; see sgkernels.bench)

Without ``--vae``, ``--model`` is a digits model directory (default: the shipped
``sgkernels/assets/digits``) and the sampling options default to its tuned settings; with ``--vae``
they default to the paper's (T = 18, s = 1, tau_0 = 25). ``--count`` is another name of ``--num``.
Bad input prints one ``sgkernels: error: ...`` line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import pipeline_cli
from ._cli import CLIError
from .bench import cli as bench_cli
from .digits import cli as commands
from .digits.evaluate import SWEEP_TEMPERATURES
from .digits.pipeline import DEFAULTS
from .digits.stages import DEFAULT_STEPS, STAGES
from .ops import _validate


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(message)


def _checked(parse, check, expected: str):
    """An argparse ``type=``: ``parse`` the text, then ``check`` the value with a :mod:`sgkernels.ops._validate`
    check (unnamed: argparse names the option, "argument --steps: expected an int >= 1, got 0")."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


_positive_int = _checked(int, lambda v: _validate.check_positive_int(None, v), "an integer")
_guidance_scale = _checked(float, lambda v: _validate.check_guidance_scale(v, name=None), "a number")
_seed = _checked(int, lambda v: _validate.check_seed(None, v), "an integer")
_nonneg_float = _checked(float, lambda v: _validate.check_float(None, v), "a number")


def _sampling_args(p) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the shipped sgkernels/assets/digits)")
    p.add_argument("--seed", type=_seed, default=0, help="an int in [0, 2**63) (default 0)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"sampling steps T (default {DEFAULTS.steps}; {pipeline_cli.STEPS} with --vae)")
    p.add_argument("--guidance-scale", type=_guidance_scale, default=None,
                   help=f"self-guidance scale s (default {DEFAULTS.guidance_scale}; {pipeline_cli.GUIDANCE_SCALE} "
                        "with --vae; 0 = plain MaskGIT)")
    p.add_argument("--choice-temperature", type=_nonneg_float, default=None,
                   help=f"tau_0 (default {DEFAULTS.choice_temperature} with guidance, "
                        f"{DEFAULTS.plain_choice_temperature} without: MaskGIT's; "
                        f"{pipeline_cli.CHOICE_TEMPERATURE} with --vae)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar on stderr when it is a terminal, or for long runs)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sgkernels", description="Self-guided sampling of the embedded digits MaskGIT model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="write generated images: a grid (digits, or official folders with --vae), "
                                         "or a sample set (.npz / one PNG per image) for FID")
    out = g.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="an image grid: .png, or .jpg / .jpeg (needs Pillow)")
    out.add_argument("--out-npz", default=None, help="with --vae: ADM-style .npz (arr_0 uint8 [N, H, W, 3], "
                                                     "arr_1 labels); resumable, shardable with torchrun")
    out.add_argument("--out-dir", default=None, help="with --vae: one PNG per image (000000.png ..) + labels.txt; "
                                                     "resumable, shardable with torchrun")
    g.add_argument("--num", "--count", dest="num", type=_positive_int, default=16, help="number of images (default 16)")
    g.add_argument("--classes", default=None,
                   help="comma-separated class ids, cycled (default: 0..9 for digits, i %% num_classes with --vae)")
    _sampling_args(g)
    g.add_argument("--temperature", type=_nonneg_float, default=1.0, help="token temperature (default 1.0)")
    g.add_argument("--vae", default=None, help="VQGAN folder (open-muse MaskGitVQGAN): --model is then an official "
                                               "open-muse / UnlockMGM (or sgkernels) transformer folder")
    g.add_argument("--model-subfolder", default=None, help="with --vae: the transformer's subfolder of --model")
    g.add_argument("--vae-subfolder", default=None, help="with --vae: the VQGAN's subfolder of --vae")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"images per batch (default 250 for digits, {pipeline_cli.BATCH_SIZE} with --vae; "
                        "the images depend on it)")
    g.add_argument("--device", default=None, help="with --vae: torch device (default: cuda[:LOCAL_RANK] if available)")
    g.set_defaults(func=_generate)

    e = sub.add_parser("evaluate", help="FID / IS / precision / recall of class-balanced samples")
    e.add_argument("--num", type=_positive_int, default=1000)
    _sampling_args(e)
    e.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    e.add_argument("--sweep", action="store_true",
                   help=f"sweep tau0 over {SWEEP_TEMPERATURES}, guided and unguided, and plot IS vs FID")
    e.add_argument("--plot", default="digits_tradeoff.png", help="the --sweep plot (PNG)")
    e.set_defaults(func=commands.evaluate)

    d = sub.add_parser("demo", help="guided vs unguided grids side by side, and both metric lines")
    d.add_argument("--out", default="digits_demo.png")
    d.add_argument("--num-eval", type=_positive_int, default=500)
    d.add_argument("--seed", type=_seed, default=0)
    d.add_argument("--model", default=None)
    d.set_defaults(func=commands.demo)

    t = sub.add_parser("train", help="train one stage of the digits model")
    t.add_argument("stage", choices=STAGES)
    t.add_argument("--out", required=True, help="model directory (stages read and write their subfolders)")
    t.add_argument("--steps", type=_positive_int, default=None,
                   help="optimiser steps (default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--threads", type=_positive_int, default=1)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=commands.train)

    bench_cli.add_parser(sub)
    return p


def _generate(args) -> int:
    return (pipeline_cli.generate if args.vae is not None else commands.generate)(args)


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
