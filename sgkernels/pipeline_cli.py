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

from ._cli import CLIError, check_writable, parse_classes, save_image, show_progress
from ._png import grid
from .generate_sharded import batch_seed, generate_to_dir, generate_to_npz, image_labels, init_distributed
from .models.pretrained import CheckpointError
from .pipeline import SelfGuidedPipeline

# The paper's ImageNet 256 settings (UnlockMGM): T = 18, s = 1, tau_0 = 25.
STEPS, GUIDANCE_SCALE, CHOICE_TEMPERATURE, BATCH_SIZE = 18, 1.0, 25.0, 64


def _load(args, device) -> SelfGuidedPipeline:
    try:
        return SelfGuidedPipeline.from_pretrained(args.model, args.vae, transformer_subfolder=args.model_subfolder,
                                                  vae_subfolder=args.vae_subfolder, device=device)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    except (OSError, RuntimeError) as e:  # e.g. an unreadable file, or a device that does not exist
        raise CLIError(f"cannot load --model {args.model} / --vae {args.vae}: {str(e).splitlines()[0]}") from None


def _device(args):
    if args.device is None:
        return None
    try:
        return torch.device(args.device)
    except RuntimeError:
        raise CLIError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {args.device!r}") from None


def generate(args) -> int:
    if args.model is None:
        raise CLIError("--vae: needs --model (the transformer folder)")
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
    pipe = _load(args, device if device is not None else default_device)
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
        print(f"wrote {where}: {args.num} images, T={steps}, s={scale:g}, tau0={tau:g}, seed={args.seed}, "
              f"{world} process{'es' if world > 1 else ''}, {dt:.1f} s (the first batch includes warm-up)")
    return 0
