"""FID-size sample sets, sharded over processes and resumable: :func:`generate_to_npz`.

The images are cut into global batches of ``batch_size``: batch ``j`` holds images
``j*batch_size ..`` with their class ids, and is sampled with its own seed
:func:`batch_seed` ``(seed, j)``. Rank ``r`` of ``W`` processes takes the batches ``j = r, r+W, ..``;
a batch does not depend on who draws it, so any number of processes gives the same images as one
(for the same ``batch_size``).

Each finished batch is written atomically to ``<out>.parts/batch_<j>.npz``; a rerun with the same
settings (checked against ``<out>.parts/run.json``) skips the batches already there, whatever the
number of processes. ``run.json`` records the settings and a SHA-256 of the weights that made the
parts (the transformer's, the guide's and the VQGAN's state dicts: :func:`weights_digests`), so a
rerun with other weights is refused, naming them. A part is verified before it is skipped (it
loads, holds its batch's image count, shape and dtype, and its labels); a broken one is drawn again. When every batch is there, rank 0 streams them into ``<out>`` (written to a
temporary file and moved into place) and removes the parts folder. ``<out>`` is an ADM-evaluator
``.npz``: ``arr_0`` uint8 ``[N, H, W, 3]`` and ``arr_1`` int64 class ids ``[N]``.

:func:`generate_to_dir` writes the same images as one PNG per image (``<dir>/000000.png``, ..,
``labels.txt``), resumable the same way (``<dir>/run.json``). The command line runs both:
``sgkernels generate --model M --vae V --count N (--out-npz F | --out-dir D)`` (:mod:`sgkernels.pipeline_cli`).

Under ``torchrun`` call :func:`init_distributed` first (it joins the process group the launcher
describes and picks this rank's GPU), then build the pipeline on the device it returns.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np
import torch

from . import _rng
from ._io import atomic_write
from .models.toast import compiled_inner
from .pipeline import SelfGuidedPipeline, class_tensor

MANIFEST = "run.json"
# At most this many images per run: the class ids of every image are held in memory (int64), and
# --out-dir names images by a zero-padded index. A FID set is 50 000.
MAX_IMAGES = 10**8


def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``: joins the torchrun process group when ``WORLD_SIZE > 1``.

    NCCL with one GPU per process (``LOCAL_RANK``) when CUDA is available, else gloo on the CPU.
    Without torchrun: ``(0, 1, cuda or cpu)``.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def batch_seed(seed: int, index: int) -> int:
    """The sampler seed of global batch ``index``: Philox of ``(index)`` under key ``seed``, in [0, 2**63)."""
    w0, w1, _, _ = _rng.philox4x32(_rng.resolve_seed(seed), index, 0, 0, 0x5EED)
    return ((int(w0) << 32) | int(w1)) & (_rng.MAX_SEED - 1)


def image_labels(class_ids, num_images: int, num_classes: int) -> torch.Tensor:
    """Class id of every image: ``i % num_classes`` (balanced) for None, else ``class_ids`` repeated."""
    if class_ids is None:
        return torch.arange(num_images, dtype=torch.int64) % num_classes
    ids = class_tensor(class_ids, num_classes)
    return ids.repeat((num_images + ids.numel() - 1) // ids.numel())[:num_images]


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_part_ok(path: str, labels: np.ndarray, shape: tuple) -> bool:
    """Whether ``path`` is an intact part of ``len(labels)`` uint8 images of ``shape`` with those labels."""
    try:
        with np.load(path) as p:
            images, recorded = p["images"], p["labels"]
    except Exception:  # missing, truncated, not a zip, a member missing or corrupt (CRC)
        return False
    return images.dtype == np.uint8 and images.shape == (len(labels), *shape) and np.array_equal(recorded, labels)


def _write_npz_streamed(path: str, parts: list[str], num_images: int, labels: np.ndarray, shape: tuple) -> None:
    """``arr_0`` = the concatenated ``images`` of ``parts``, ``arr_1`` = ``labels``; one batch in memory at a time.

    Each part must hold uint8 images of ``shape`` and all of them ``num_images`` in all (else
    ValueError naming the part, and ``path`` is not written): the result loads with ``numpy.load``
    and holds exactly ``num_images`` images.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:  # np.savez's layout
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": (num_images, *shape)})
                written = 0
                for part in parts:
                    with np.load(part) as p:
                        images = p["images"]
                    if images.dtype != np.uint8 or images.shape[1:] != tuple(shape):
                        raise ValueError(f"{part}: expected uint8 images of shape {tuple(shape)}, "
                                         f"got {images.dtype} {images.shape[1:]}; remove it and rerun")
                    written += len(images)
                    if written > num_images:
                        break
                    f.write(np.ascontiguousarray(images).tobytes())
                if written != num_images:
                    raise ValueError(f"{os.path.dirname(parts[0])}: the parts hold {written} images, expected "
                                     f"{num_images}; rerun to redraw the broken ones")
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_counts(num_images, batch_size) -> None:
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGES:
            raise ValueError(f"{name}: expected an int in [1, {MAX_IMAGES}], got {value!r}")


def weights_digests(pipe: SelfGuidedPipeline) -> dict[str, str]:
    """SHA-256 of each module's state dict (names, dtypes, shapes and bytes): what made the images.

    ``{"transformer": .., "guide": .. or None, "vqgan": ..}``; reads every weight once (on CPU).
    """
    def digest(module):
        if module is None:
            return None
        h = hashlib.sha256()
        for name, t in compiled_inner(module).state_dict().items():  # a torch.compile'd module: its own keys
            t = t.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    return {"transformer": digest(pipe.model), "guide": digest(pipe.guide), "vqgan": digest(pipe.vqgan)}


def _rank_world(rank, world_size) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank, world_size


def _settings(pipe, num_images, batch_size, seed, class_ids, sampling: dict, sampler_options: dict):
    labels = image_labels(class_ids, num_images, pipe.num_classes)
    settings = dict(num_images=num_images, batch_size=batch_size, seed=seed, **sampling,
                    sampler_options=sampler_options,
                    labels_sha256=hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
                    image_shape=list(pipe.image_shape), weights_sha256=weights_digests(pipe))
    return labels, settings


_WEIGHT_NAMES = {"transformer": "the transformer's (--model)", "guide": "the TOAST guide's (--model)",
                 "vqgan": "the VQGAN's (--vae)"}


def _check_manifest(directory: str, settings: dict, rank: int, world_size: int) -> None:
    """Rank 0 records ``settings`` in ``<directory>/run.json`` (first run); every rank checks them against it."""
    manifest = os.path.join(directory, MANIFEST)
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        if not os.path.exists(manifest):
            atomic_write(manifest, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
    _barrier(world_size)
    try:
        with open(manifest, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest}: cannot be read as JSON ({e}); remove the folder to start over") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{manifest}: expected a JSON object (the run's settings), got {type(recorded).__name__}; "
                         "remove the folder to start over")
    settings = json.loads(json.dumps(settings, sort_keys=True))
    if recorded != settings:
        old, new = recorded.get("weights_sha256"), settings["weights_sha256"]
        if not isinstance(old, dict):
            raise ValueError(f"{manifest}: records no digest of the weights that made its images (an older "
                             "version wrote it); remove the folder to start over")
        if old != new:
            which = [_WEIGHT_NAMES[k] for k in new if old.get(k) != new[k]]
            raise ValueError(f"{manifest}: the interrupted run's images were made with other weights "
                             f"({', '.join(which)}); rerun with those folders (and --dtype) or remove the folder")
        diff = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        raise ValueError(f"{manifest}: an interrupted run with other settings ({', '.join(diff)}); "
                         "rerun with its settings or remove the folder")


def _sample_batches(pipe, labels, batch_size: int, seed: int, sampling: dict, sampler_options: dict, done, write,
                    progress: bool, rank: int, world_size: int) -> None:
    """Sample this rank's global batches ``j = rank, rank + W, ..`` that are not ``done(j)`` and ``write(j, images,
    labels)`` each (uint8 ``[b, H, W, 3]``, int64 ``[b]``); a tqdm bar on rank 0."""
    num_images = len(labels)
    num_batches = (num_images + batch_size - 1) // batch_size
    mine = list(range(rank, num_batches, world_size))
    todo = [j for j in mine if not done(j)]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        size = lambda js: sum(min(batch_size, num_images - j * batch_size) for j in js)  # noqa: E731
        bar = tqdm(total=size(mine), initial=size(mine) - size(todo), unit="img", dynamic_ncols=True,
                   desc=f"sampling (rank 0 of {world_size})" if world_size > 1 else "sampling")
    try:
        for j in todo:
            batch = labels[j * batch_size:(j + 1) * batch_size]
            images = pipe(batch, seed=batch_seed(seed, j), output="uint8", **sampling, **sampler_options)
            write(j, images, batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def generate_to_npz(pipe: SelfGuidedPipeline, out_npz: str | os.PathLike, *, num_images: int, batch_size: int = 64,
                    seed: int = 0, class_ids=None, steps: int = 18, guidance_scale: float = 1.0,
                    choice_temperature: float = 25.0, temperature: float = 1.0, progress: bool = True,
                    rank: int | None = None, world_size: int | None = None, **sampler_options) -> str | None:
    """Sample ``num_images`` images into the ADM-style ``out_npz`` (see the module docstring).

    Args:
        pipe: the pipeline, on this rank's device.
        num_images, batch_size: N, and images per global batch (the images depend on it).
        seed: base seed (batch ``j`` uses :func:`batch_seed` ``(seed, j)``).
        class_ids: None (balanced: image ``i`` gets class ``i % num_classes``), or ids repeated to N.
        steps, guidance_scale, choice_temperature, temperature, sampler_options: as
            :meth:`SelfGuidedPipeline.__call__`; ``sampler_options`` must be JSON values (they are
            recorded in ``run.json``).
        progress: a tqdm bar on rank 0 (its own batches).
        rank, world_size: default to the initialised ``torch.distributed`` group, else ``0, 1``.
    Returns:
        ``out_npz`` on rank 0, None on the other ranks.
    """
    _check_counts(num_images, batch_size)
    rank, world_size = _rank_world(rank, world_size)
    out_npz = os.fspath(out_npz)
    if os.path.exists(out_npz):
        raise FileExistsError(f"{out_npz}: exists; remove it or choose another path")
    parts_dir = out_npz + ".parts"
    sampling = dict(steps=steps, guidance_scale=guidance_scale, choice_temperature=choice_temperature,
                    temperature=temperature)
    labels, settings = _settings(pipe, num_images, batch_size, seed, class_ids, sampling, sampler_options)
    _check_manifest(parts_dir, settings, rank, world_size)

    num_batches = (num_images + batch_size - 1) // batch_size
    part = [os.path.join(parts_dir, f"batch_{j:06d}.npz") for j in range(num_batches)]

    def write(j, images, batch):
        atomic_write(part[j], _npz_bytes(images=images.numpy(), labels=batch.numpy()))

    shape = tuple(pipe.image_shape)

    def done(j):  # a part is kept only when it is intact and holds its batch (else it is drawn again)
        return _npz_part_ok(part[j], labels[j * batch_size:(j + 1) * batch_size].numpy(), shape)

    _sample_batches(pipe, labels, batch_size, seed, sampling, sampler_options, done, write, progress, rank,
                    world_size)
    _barrier(world_size)
    if rank != 0:
        return None
    missing = [j for j in range(num_batches) if not os.path.exists(part[j])]
    if missing:
        raise RuntimeError(f"{parts_dir}: batches {missing[:8]} are missing (a rank failed?); rerun to finish them")
    _write_npz_streamed(out_npz, part, num_images, labels.numpy(), shape)
    shutil.rmtree(parts_dir)
    return out_npz


def image_name(index: int) -> str:
    """File name of image ``index`` in a :func:`generate_to_dir` folder: ``000123.png``."""
    return f"{index:06d}.png"


def generate_to_dir(pipe: SelfGuidedPipeline, out_dir: str | os.PathLike, *, num_images: int, batch_size: int = 64,
                    seed: int = 0, class_ids=None, steps: int = 18, guidance_scale: float = 1.0,
                    choice_temperature: float = 25.0, temperature: float = 1.0, progress: bool = True,
                    rank: int | None = None, world_size: int | None = None, **sampler_options) -> str | None:
    """As :func:`generate_to_npz`, but one PNG per image: ``<out_dir>/000000.png ..`` (:func:`image_name`).

    The images are those of :func:`generate_to_npz` with the same arguments. Each PNG is written
    atomically; a rerun with the same settings (``<out_dir>/run.json``) skips the batches whose
    files all exist. When every image is there, rank 0 writes ``<out_dir>/labels.txt`` (line ``i``:
    the class id of image ``i``). Returns ``out_dir`` on rank 0, None on the other ranks.
    """
    from ._png import png_shape, write_png

    _check_counts(num_images, batch_size)
    rank, world_size = _rank_world(rank, world_size)
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder")
    sampling = dict(steps=steps, guidance_scale=guidance_scale, choice_temperature=choice_temperature,
                    temperature=temperature)
    labels, settings = _settings(pipe, num_images, batch_size, seed, class_ids, sampling, sampler_options)
    _check_manifest(out_dir, settings, rank, world_size)

    def paths(j):
        return [os.path.join(out_dir, image_name(i)) for i in range(j * batch_size, min(num_images, (j + 1) * batch_size))]

    def write(j, images, batch):
        for path, image in zip(paths(j), images.numpy()):
            write_png(path, image)

    shape = tuple(pipe.image_shape)

    def done(j):  # every PNG of the batch decodes to the right size (a truncated one is drawn again)
        return all(png_shape(p) == shape for p in paths(j))

    _sample_batches(pipe, labels, batch_size, seed, sampling, sampler_options, done, write, progress, rank,
                    world_size)
    _barrier(world_size)
    if rank != 0:
        return None
    missing = [i for i in range(num_images) if not os.path.exists(os.path.join(out_dir, image_name(i)))]
    if missing:
        raise RuntimeError(f"{out_dir}: images {missing[:8]} are missing (a rank failed?); rerun to finish them")
    atomic_write(os.path.join(out_dir, "labels.txt"), "".join(f"{c}\n" for c in labels.tolist()).encode())
    return out_dir
