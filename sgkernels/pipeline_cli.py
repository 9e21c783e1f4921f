"""``sgkernels generate --vae DIR``: images from official open-muse / UnlockMGM folders (parsing: :mod:`sgkernels.cli`).

One process, or one per GPU under ``torchrun`` (``--out-npz`` / ``--out-dir``; each rank takes a
disjoint set of batches, see :mod:`sgkernels.generate_sharded`)::

    sgkernels generate --model TRANSFORMER_DIR --vae VQGAN_DIR --classes 1,2,3 --out grid.png
    torchrun --standalone --nproc_per_node=8 -m sgkernels generate --model M --vae V --count 50000 --out-npz s.npz

Image ``i`` has the class ``--classes`` cycled (default: ``i % num_classes``) and belongs to
global batch ``i // --batch-size``, sampled with seed ``batch_seed(--seed, batch)``: ``--out``,
``--out-npz`` and ``--out-dir`` give the same images for the same settings, whatever the number of
processes. A folder that cannot be read raises one line naming the file (exit 2).
"""
from __future__ import annotations

import math
import os
import time

import torch

from ._cli import CLIError, check_writable, model_options, parse_classes, save_image, show_progress
from ._io import first_line
from ._png import grid
from .generate_sharded import MAX_IMAGES, batch_seed, generate_to_dir, generate_to_npz, image_labels, init_distributed
from .models.pretrained import CheckpointError
from .pipeline import SelfGuidedPipeline

# The paper's ImageNet 256 settings (UnlockMGM): T = 18, s = 1, tau_0 = 25.
STEPS, GUIDANCE_SCALE, CHOICE_TEMPERATURE, BATCH_SIZE = 18, 1.0, 25.0, 64
# --out tiles every image into one grid held in memory; --out-npz / --out-dir stream (MAX_IMAGES).
MAX_GRID_IMAGES = 4096
# Devices the sampler runs on (its kernels: C++ on CPU, Triton on CUDA).
DEVICE_TYPES = ("cpu", "cuda")


def _load(args, device, dtype=None) -> SelfGuidedPipeline:
    try:
        return SelfGuidedPipeline.from_pretrained(args.model, args.vae, transformer_subfolder=args.model_subfolder,
                                                  vae_subfolder=args.vae_subfolder, device=device, torch_dtype=dtype)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    except (OSError, RuntimeError, TypeError, ValueError) as e:  # e.g. an unreadable file, a device out of memory
        raise CLIError(f"cannot load --model {args.model} / --vae {args.vae}: {first_line(e)}") from None


def _device(args):
    if args.device is None:
        return None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CLIError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {args.device!r}") from None
    if device.type not in DEVICE_TYPES:  # meta, mps, ...: the sampler has no kernels there (or no data at all)
        raise CLIError(f"--device: {args.device!r} cannot sample; expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(f"--device: {args.device!r}, but no CUDA device is available")
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device: {args.device!r}, but there {'is' if count == 1 else 'are'} only {count} "
                           f"CUDA device{'s' if count > 1 else ''}")
    return device


def generate(args) -> int:
    if args.model is None:
        raise CLIError("--vae: needs --model (the transformer folder)")
    limit = MAX_GRID_IMAGES if args.out is not None else MAX_IMAGES
    if args.num > limit:
        where = "--out (one grid in memory)" if args.out is not None else "--out-npz / --out-dir"
        raise CLIError(f"--count: at most {limit} images with {where}, got {args.num}")
    steps = STEPS if args.steps is None else args.steps
    scale = GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
    tau = CHOICE_TEMPERATURE if args.choice_temperature is None else args.choice_temperature
    batch_size = BATCH_SIZE if args.batch_size is None else args.batch_size
    sampling = dict(steps=steps, guidance_scale=scale, choice_temperature=tau, temperature=args.temperature)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.out is not None:
        if distributed:
            raise CLIError("--out: writes one grid from one process; under torchrun use --out-npz or --out-dir")
        check_writable(args.out, image=True)
    elif args.out_npz is not None:
        check_writable(args.out_npz)
        if os.path.exists(args.out_npz):
            raise CLIError(f"--out-npz: {args.out_npz} exists; remove it or choose another path")
    else:
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise CLIError(f"--out-dir: {args.out_dir} exists and is not a folder")
        parent = os.path.dirname(os.path.abspath(args.out_dir))
        if not os.path.isdir(parent):
            raise CLIError(f"--out-dir: cannot create {args.out_dir}: directory {parent} does not exist")
    device = _device(args)
    rank, world, default_device = init_distributed() if distributed else (0, 1, None)
    device = device if device is not None else default_device
    target = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype, compile = model_options(args, target.type)
    if compile:
        sampling["compile"] = True
    pipe = _load(args, device, dtype)
    if pipe.guide is None and scale != 0:
        raise CLIError(f"--guidance-scale: {args.model} has no TOAST guide; use --guidance-scale 0 (plain MaskGIT)")
    classes = parse_classes(args.classes, pipe.num_classes)
    progress = show_progress(args, args.num)
    t0 = time.perf_counter()
    try:
        if args.out is not None:
            labels = image_labels(classes, args.num, pipe.num_classes)
            pixels = []
            for j, start in enumerate(range(0, args.num, batch_size)):
                pixels.append(pipe(labels[start:start + batch_size], seed=batch_seed(args.seed, j), output="uint8",
                                   progress=progress, **sampling))
            pixels = torch.cat(pixels).numpy()
            cols = min(args.num, len(classes)) if classes is not None else math.ceil(math.sqrt(args.num))
            save_image(args.out, grid(pixels, cols, pad=2))
            where = args.out
        else:
            run = generate_to_npz if args.out_npz is not None else generate_to_dir
            where = run(pipe, args.out_npz or args.out_dir, num_images=args.num, batch_size=batch_size,
                        seed=args.seed, class_ids=classes, progress=progress, rank=rank, world_size=world,
                        **sampling)
    except (ValueError, FileExistsError, NotADirectoryError) as e:  # a resumed run with other settings, ...
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"cannot write {args.out or args.out_npz or args.out_dir}: {e.strerror or e}") from None
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank == 0:
        dt = time.perf_counter() - t0
        extra = f", {str(pipe.dtype).removeprefix('torch.')}" + (", compiled" if compile else "")
        print(f"wrote {where}: {args.num} images, T={steps}, s={scale:g}, tau0={tau:g}, seed={args.seed}, "
              f"{world} process{'es' if world > 1 else ''}{extra}, {dt:.1f} s (the first batch includes warm-up"
              f"{' and compilation' if compile else ''})")
    return 0
