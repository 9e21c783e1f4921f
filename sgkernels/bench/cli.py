"""``sgkernels bench sampler | dllm | ops``: argument parsing and one-line errors (see :mod:`sgkernels.bench`)."""
from __future__ import annotations

import argparse
import os
import sys

from .._cli import CLIError, check_writable


def _batch_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            b = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes such as 1,8,64, got {text!r}") \
                from None
        if b < 1:
            raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {b}")
        out.append(b)
    return out


def _common(p, top, batch_default: str) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=_batch_sizes(batch_default),
                   help=f"comma-separated batch sizes (default {batch_default})")
    p.add_argument("--repeats", type=top._positive_int, default=3,
                   help="timed rounds at least (default 3); more until the spread is within 5%% or --max-time")
    p.add_argument("--max-time", type=top._nonneg_float, default=30.0,
                   help="seconds of timed rounds per batch size, at most (default 30)")
    _outputs(p)


def _outputs(p) -> None:
    p.add_argument("--json", default=None, metavar="FILE", help="write the results, with the machine, as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a plot of where the time goes (matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_parser(sub) -> None:
    """Add ``bench`` and its subcommands to the ``sgkernels`` parser's subparsers ``sub``."""
    from .. import cli as top

    b = sub.add_parser("bench", help="throughput on your model and device, stock against fused, where the time goes")
    bsub = b.add_subparsers(dest="bench_command", required=True, parser_class=top._Parser)

    s = bsub.add_parser("sampler", help="images/s of a self-guided MaskGIT model (paper folders or digits)")
    s.add_argument("--model", default=None, help="transformer folder (with --vae), or a digits model folder "
                                                 "(default: the embedded digits model)")
    s.add_argument("--vae", default=None, help="VQGAN folder: --model is then an official or sgkernels transformer")
    s.add_argument("--model-subfolder", default=None)
    s.add_argument("--vae-subfolder", default=None)
    s.add_argument("--steps", type=top._positive_int, default=None, help="sampling steps (default: the model's: 18 "
                                                                           "with --vae, 12 for digits)")
    s.add_argument("--guidance-scale", type=top._guidance_scale, default=None)
    s.add_argument("--choice-temperature", type=top._nonneg_float, default=None)
    _common(s, top, "1,8,64")
    s.set_defaults(func=bench_sampler)

    d = bsub.add_parser("dllm", help="tokens/s of a diffusion LM folder: upstream algorithm against the drop-in")
    d.add_argument("--model", required=True, help="a local transformers folder (config.json + weights)")
    from .dllm import PIPELINES

    d.add_argument("--pipeline", default="llada", choices=PIPELINES,
                   help="the drop-in and its reference (default llada; llada2: diffusers' LLaDA2Pipeline)")
    d.add_argument("--mask-id", type=int, default=None, help="the mask token id (default: the config's mask_token_id)")
    d.add_argument("--prompt-length", type=top._positive_int, default=32, help="random prompt tokens (default 32)")
    d.add_argument("--gen-length", type=top._positive_int, default=128, help="generated tokens (default 128)")
    d.add_argument("--block-length", type=top._positive_int, default=32,
                   help="llada / fast-dllm / llada2 blocks (default 32)")
    d.add_argument("--steps", type=top._positive_int, default=None,
                   help="sampling steps: in all (llada, fast-dllm, dream; default 128), or per block, the pipeline's "
                        "num_inference_steps (llada2; default 32)")
    d.add_argument("--temperature", type=top._nonneg_float, default=0.0,
                   help="of the timed runs (default 0: greedy); the agreement is always of greedy runs")
    d.add_argument("--threshold", type=top._nonneg_float, default=None,
                   help="confidence threshold of fast-dllm (default 0.9) and llada2 (default 0.7, the pipeline's)")
    d.add_argument("--editing-threshold", type=top._nonneg_float, default=None,
                   help="llada2: re-edit committed tokens above this confidence (default 0.5, the pipeline's; "
                        "0: no editing)")
    d.add_argument("--prefix-cache", action="store_true",
                   help="llada2: also time the fused pipeline with prefix_cache=True (a KV cache of the finished "
                        "blocks; exact for block-causal models)")
    d.add_argument("--alg", default="maskgit_plus", choices=("maskgit_plus", "topk_margin", "entropy"),
                   help="dream's confidence (default maskgit_plus)")
    d.add_argument("--top-p", type=top._nonneg_float, default=None, help="dream's top_p filter (default off)")
    d.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="load the weights in this dtype (default: as saved)")
    d.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code a folder ships (auto_map in its config.json, as LLaDA's, Dream's "
                        "and LLaDA2's); needed, as by from_pretrained, when transformers lacks the model_type")
    _common(d, top, "1")
    d.set_defaults(func=bench_dllm)

    o = bsub.add_parser("ops", help="each op against the code users run today (python -m benchmarks' rows)")
    from .ops import OPS

    o.add_argument("--device", default=None, choices=("cpu", "cuda"))
    o.add_argument("--quick", action="store_true", help="fewer repeats (smoke runs)")
    o.add_argument("--only", nargs="+", choices=OPS, metavar="OP", help="op names: " + ", ".join(OPS))
    _outputs(o)
    o.set_defaults(func=bench_ops)


def _device(text):
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise CLIError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device: expected cpu or cuda, got {text!r}")
    return str(dev)


def _check_outputs(args) -> None:
    if args.json:
        check_writable(args.json)
    if args.plot:
        check_writable(args.plot)
        if not args.plot.lower().endswith(".png"):
            raise CLIError(f"--plot: expected a .png path, got {args.plot!r}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None


class _Progress:
    """A tqdm bar on stderr over ``total`` phases; ``bar(text)`` starts the next phase."""

    def __init__(self, total: int, disable: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=disable, desc=desc, file=sys.stderr, unit="phase", dynamic_ncols=True)
        self.started = False

    def __call__(self, text: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()


def _emit(args, command, table, machine, settings, rows, plot, **extra) -> None:
    from .machine import header_lines
    from .report import save_json

    head = header_lines(machine)
    print("\n".join(head) + "\n\n" + table)
    if args.json:
        try:
            save_json(args.json, command, machine, settings, rows, **extra)
        except OSError as e:
            raise CLIError(f"cannot write {args.json}: {e.strerror or e}") from None
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            plot(args.plot, head[0])
        except OSError as e:
            raise CLIError(f"cannot write {args.plot}: {e.strerror or e}") from None
        print(f"wrote {args.plot}", file=sys.stderr)


def bench_sampler(args) -> int:
    from ..models.pretrained import CheckpointError
    from . import report, sampler
    from .machine import machine_info

    _check_outputs(args)
    device = _device(args.device)
    for flag, path in (("--model", args.model), ("--vae", args.vae)):
        if path is not None and not os.path.isdir(path):
            raise CLIError(f"{flag}: {path} is not a folder")
    if args.vae is not None and args.model is None:
        raise CLIError("--vae: needs --model (the transformer folder)")
    try:
        im = sampler.load_image_model(args.model, args.vae, device=device, steps=args.steps,
                                      guidance_scale=args.guidance_scale, choice_temperature=args.choice_temperature,
                                      model_subfolder=args.model_subfolder, vae_subfolder=args.vae_subfolder)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        hint = "" if args.vae else " (without --vae, --model is a digits model folder; a paper transformer needs --vae)"
        raise CLIError(f"cannot load --model {args.model}" + (f" / --vae {args.vae}" if args.vae else "")
                       + f": {str(e).splitlines()[0]}{hint}") from None
    if im.guide is None and im.sampler_kw["guidance_scale"] != 0:
        raise CLIError(f"--guidance-scale: {args.model} has no TOAST guide; use --guidance-scale 0 (plain MaskGIT)")
    n_impls = 3 if device.startswith("cuda") else 2
    bar = _Progress(len(args.batch_sizes) * (2 + n_impls), args.no_progress, "bench sampler")
    try:
        rows = sampler.run(im, args.batch_sizes, device, repeats=args.repeats, max_time=args.max_time, progress=bar)
    finally:
        bar.close()
    settings = dict(model=args.model, vae=args.vae, model_name=im.name, device=device, batch_sizes=args.batch_sizes,
                    **{k: v for k, v in im.sampler_kw.items()})
    _emit(args, "sampler", report.sampler_table(rows), machine_info(device), settings, rows,
          lambda path, note: report.sampler_plot(path, rows, note))
    return 0


def _pipeline_options(args) -> tuple:
    """``(steps, threshold, editing_threshold)`` for ``args.pipeline`` (its defaults where not given); options
    the pipeline has not are refused, and llada2 needs diffusers' block diffusion classes."""
    from .dllm import DEFAULTS

    p = args.pipeline
    for flag, key, given in (("--threshold", "threshold", args.threshold),
                             ("--editing-threshold", "editing_threshold", args.editing_threshold)):
        if given is not None and DEFAULTS[key][p] is None:
            users = " and ".join(q for q, v in DEFAULTS[key].items() if v is not None)
            raise CLIError(f"{flag}: only for --pipeline {users}, not {p}")
    if args.prefix_cache and p != "llada2":
        raise CLIError(f"--prefix-cache: only for --pipeline llada2, not {p}")
    if p == "llada2":
        try:
            from ..integrations.diffusers import FusedLLaDA2Pipeline  # noqa: F401
        except ImportError as e:
            raise CLIError(f"--pipeline llada2 needs diffusers >= 0.39 (LLaDA2Pipeline): pip install -U diffusers "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    pick = lambda key, given: DEFAULTS[key][p] if given is None else given  # noqa: E731
    return pick("steps", args.steps), pick("threshold", args.threshold), pick("editing_threshold",
                                                                              args.editing_threshold)


def bench_dllm(args) -> int:
    from . import dllm, report
    from .machine import machine_info

    _check_outputs(args)
    device = _device(args.device)
    if args.no_progress:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its "Loading weights" bar
        except ImportError:
            pass
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    steps, threshold, editing_threshold = _pipeline_options(args)
    try:
        model = dllm.load_lm(args.model, device=device, dtype=dllm.DTYPES.get(args.dtype),
                             trust_remote_code=args.trust_remote_code)
    except dllm.ModelFolderError as e:
        raise CLIError(str(e)) from None
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise CLIError(f"--model: {args.model}'s config has no vocab_size")
    mask_id = args.mask_id if args.mask_id is not None else dllm.mask_id_of(model)
    if mask_id is None:
        raise CLIError(f"--mask-id: {args.model}'s config has no mask_token_id; pass the mask token's id")
    if not 0 <= mask_id < vocab:
        raise CLIError(f"--mask-id: {mask_id} is outside the model's vocabulary (V = {vocab})")
    bar = _Progress(len(args.batch_sizes) * (3 + dllm.n_impls(args.pipeline, args.prefix_cache)), args.no_progress,
                    f"bench dllm ({args.pipeline})")
    kw = dict(mask_id=mask_id, prompt_length=args.prompt_length, gen_length=args.gen_length,
              block_length=args.block_length, steps=steps, temperature=args.temperature, threshold=threshold,
              top_p=args.top_p, alg=args.alg, editing_threshold=editing_threshold, prefix_cache=args.prefix_cache)
    try:
        rows = dllm.run(model, args.pipeline, args.batch_sizes, device, repeats=args.repeats, max_time=args.max_time,
                        progress=bar, **kw)
    except dllm.PipelineMismatch as e:
        raise CLIError(f"--model {args.model} does not fit --pipeline {args.pipeline}: {e}") from None
    finally:
        bar.close()
    settings = dict(model=args.model, pipeline=args.pipeline, device=device, batch_sizes=args.batch_sizes,
                    dtype=str(next(model.parameters()).dtype).replace("torch.", ""), **kw)
    _emit(args, "dllm", report.dllm_table(rows), machine_info(device), settings, rows,
          lambda path, note: report.dllm_plot(path, rows, args.gen_length, note))
    return 0


def bench_ops(args) -> int:
    from . import ops, report
    from .machine import machine_info

    _check_outputs(args)
    device = _device(args.device)
    modules = ops.modules(args.only)
    bar = _Progress(len(modules) + 1, args.no_progress, "bench ops")
    try:
        bar("roofline")
        ops.peaks([], device, args.quick)  # measured before the rows, cached for the run
        rows = ops.run(device, args.quick, args.only, progress=bar)
    finally:
        bar.close()
    peak = ops.peaks(rows, device, args.quick)
    _emit(args, "ops", ops.table(rows, peak), machine_info(device), dict(device=device, quick=args.quick,
                                                                          only=args.only), rows,
          lambda path, note: report.ops_plot(path, rows, note), roofline=peak)
    return 0
