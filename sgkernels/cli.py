"""``sgkernels`` command line: the embedded digits model (commands in :mod:`sgkernels.digits.cli`).

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
import sys

from .digits import cli as commands
from .digits.cli import CLIError
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
_nonneg_float = _checked(float, lambda v: _validate.check_float(None, v), "a number")


def _sampling_args(p) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the shipped sgkernels/assets/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=DEFAULTS.steps,
                   help=f"sampling steps T (default {DEFAULTS.steps})")
    p.add_argument("--guidance-scale", type=_guidance_scale, default=DEFAULTS.guidance_scale,
                   help=f"self-guidance scale s (default {DEFAULTS.guidance_scale}; 0 = plain MaskGIT)")
    p.add_argument("--choice-temperature", type=_nonneg_float, default=None,
                   help=f"tau_0 (default {DEFAULTS.choice_temperature} with guidance, "
                        f"{DEFAULTS.plain_choice_temperature} without: MaskGIT's)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sgkernels", description="Self-guided sampling of the embedded digits MaskGIT model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="write a PNG grid of generated digits")
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--num", type=_positive_int, default=16)
    g.add_argument("--classes", default=None, help="comma-separated class ids, cycled (default: 0..9)")
    _sampling_args(g)
    g.set_defaults(func=commands.generate)

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
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model", default=None)
    d.set_defaults(func=commands.demo)

    t = sub.add_parser("train", help="train one stage of the digits model")
    t.add_argument("stage", choices=STAGES)
    t.add_argument("--out", required=True, help="model directory (stages read and write their subfolders)")
    t.add_argument("--steps", type=_positive_int, default=None,
                   help="optimiser steps (default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=_positive_int, default=1)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=commands.train)
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
