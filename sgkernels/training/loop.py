"""The training loop: :func:`train_guide` fine-tunes a TOAST guide on the auxiliary task.

Optimiser: AdamW (fused where available), lr 1e-4, betas (0.9, 0.96), weight decay 0, linear warmup
(5k steps) then constant; an EMA of the guide (decay 0.9999) is kept and is what gets saved for
sampling. Everything is in :class:`~sgkernels.training.config.TrainConfig`.

:func:`train_guide` runs single-process or under ``torchrun`` (DistributedDataParallel; the process
group is initialised from the environment when ``WORLD_SIZE > 1``: gloo on CPU, nccl on CUDA), bf16
autocast on CUDA only, a tqdm bar on rank 0.

Output directory::

    <out_dir>/checkpoints/step_XXXXXXXX/   see :mod:`sgkernels.training.checkpoints`
    <out_dir>/final/                       save_checkpoint(backbone, EMA guide): load_checkpoint() it
    <out_dir>/log.jsonl                    {"step", "loss", "ce", "recon", "lr"} every log_every steps

A run killed at any point resumes (``resume=True``) from its newest step directory. The corruption's
random numbers are a function of ``(seed, rank, step)``, and a Dataset's sampling order of
``(seed, epoch)``, so a resumed run continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import torch
from torch import nn

from .._io import atomic_write
from ..models.checkpoint import save_checkpoint
from ..models.toast import TOAST
from ..models.transformer import MaskTransformer
from .checkpoints import (
    checkpoint_root,
    latest_checkpoint,
    load_train_checkpoint,
    remove_stale_temps,
    rng_state,
    save_train_checkpoint,
    set_rng_state,
)
from .config import TrainConfig
from .data import check_batch, dataset_batches, is_map_dataset, iterable_batches
from .distributed import init_distributed, step_seed
from .task import aux_loss, corrupt


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_guide` returns: the trained guide, its EMA (for sampling), the final step,
    the last step's losses (local to this rank), and the final checkpoint directory (rank 0; else None)."""

    guide: TOAST
    ema: TOAST
    step: int
    loss: float | None
    ce: float | None
    recon: float | None
    final_dir: str | None


def _make_optimizer(params, config: TrainConfig, device: torch.device):
    kw = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps)
    if config.fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(params, **kw)


def train_guide(backbone: MaskTransformer, guide: TOAST, data, config: TrainConfig | None = None,
                out_dir: str | os.PathLike = "out", resume: bool = False, *, device=None,
                ignore_index: int = -100, save_final: bool = True) -> TrainResult:
    """Fine-tune ``guide`` on the auxiliary task over the frozen ``backbone``; see the module docstring.

    Args:
        backbone: the frozen MaskGIT model (moved to ``device``, eval mode; ``requires_grad`` is off
            during training and restored afterwards).
        guide: the :class:`TOAST` guide to train (moved to ``device``), built for ``backbone``.
        data: a map-style ``Dataset`` of ``(tokens, label)`` items (batched per process with a
            DistributedSampler, ``config.batch_size``), or an iterable of per-process batches
            ``(tokens [B, N] or [B, H, W], labels [B])`` / dicts with those keys (restarted when
            exhausted if re-iterable; on resume it starts from its beginning).
        config: :class:`TrainConfig` (defaults if None).
        out_dir: where checkpoints, ``final/`` and ``log.jsonl`` go.
        resume: continue from the newest checkpoint in ``out_dir`` (from scratch if there is none).
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        save_final: write ``<out_dir>/final`` (backbone + EMA guide, :func:`save_checkpoint`) at the end.
    Returns:
        :class:`TrainResult`.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(backbone, MaskTransformer):
        raise TypeError(f"backbone: expected a MaskTransformer, got {type(backbone).__name__}")
    if not isinstance(guide, TOAST):
        raise TypeError(f"guide: expected a TOAST guide, got {type(guide).__name__}")
    guide.check_backbone(backbone)
    out_dir = os.fspath(out_dir)

    dist_info = init_distributed(torch.device(device) if device is not None else None)
    rank, world = dist_info.rank, dist_info.world
    if device is None:
        device = torch.device(f"cuda:{dist_info.local_rank % torch.cuda.device_count()}") \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    flags = [p.requires_grad for p in backbone.parameters()]
    try:
        return _train(backbone, guide, data, config, out_dir, resume, device, rank, world, ignore_index, save_final)
    finally:
        for p, flag in zip(backbone.parameters(), flags):
            p.requires_grad_(flag)
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(backbone, guide, data, config, out_dir, resume, device, rank, world, ignore_index, save_final):
    import torch.distributed as dist

    is_main = rank == 0
    bcfg = backbone.config
    backbone.to(device).eval().requires_grad_(False)
    guide.to(device).train()
    params = list(guide.parameters())
    optimizer = _make_optimizer(params, config, device)

    start_step = 0
    ema_state = None
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_train_checkpoint(ckpt, map_location="cpu")
        if state["guide_config"] != guide.config.to_dict():
            raise ValueError(f"{ckpt}: the checkpoint's guide config {state['guide_config']} differs from the "
                             f"guide's {guide.config.to_dict()}")
        if state["backbone_config"] != bcfg.to_dict():
            raise ValueError(f"{ckpt}: the checkpoint was trained for another backbone config")
        guide.load_state_dict(state["guide"])
        ema_state = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[rank])
    model: nn.Module = _GuideLoss(guide, backbone, config, ignore_index)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # broadcasts rank 0's
    ema = copy.deepcopy(guide).eval().requires_grad_(False)  # after the broadcast: the same on every rank
    if ema_state is not None:
        ema.load_state_dict(ema_state)
    ema_params = list(ema.parameters())

    if is_map_dataset(data):
        batches = dataset_batches(data, config, rank, world, start_step)
    else:
        batches = iterable_batches(data)

    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and config.mixed_precision == "bf16")
    bar = None
    if is_main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="train guide", dynamic_ncols=True)
    log_path = os.path.join(out_dir, "log.jsonl")
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temps(checkpoint_root(out_dir))
        truncate_log(log_path, start_step)

    step = start_step
    loss = ce = recon = None
    try:
        while step < config.steps:
            tokens, labels = check_batch(next(batches), bcfg)
            tokens = tokens.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = torch.Generator(device=device).manual_seed(step_seed(config.seed, rank, step, "mask"))
            with autocast:
                c = corrupt(backbone, tokens, labels, error_ratio=config.error_ratio,
                            error_token_mode=config.error_token_mode,
                            error_token_conditional=config.error_token_conditional, ignore_index=ignore_index,
                            generator=gen, sample_seed=step_seed(config.seed, rank, step, "error"))
                loss, ce, recon = model(c.inputs, labels, c.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - config.ema_decay)
            step += 1

            if bar is not None:
                bar.update(1)
            if is_main and (step % config.log_every == 0 or step == config.steps):  # (a host sync on CUDA)
                values = {"loss": float(loss.detach()), "ce": float(ce.detach()), "recon": float(recon.detach())}
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, **values, "lr": lr}) + "\n")
            if step % config.save_every == 0 or step == config.steps:
                rng = [rng_state()]
                if world > 1:
                    gathered = [None] * world
                    dist.all_gather_object(gathered, rng[0])
                    rng = gathered
                if is_main:
                    save_train_checkpoint(out_dir, step, guide, ema, optimizer, config, bcfg, rng, config.keep_last)
                if world > 1:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()

    final_dir = None
    if save_final and is_main:
        final_dir = save_checkpoint(os.path.join(out_dir, "final"), backbone, ema)
    if world > 1:
        dist.barrier()
    as_float = (lambda t: None if t is None else float(t.detach()))
    return TrainResult(guide, ema, step, as_float(loss), as_float(ce), as_float(recon), final_dir)


def truncate_log(path: str, step: int) -> None:
    """Drop the ``log.jsonl`` lines after ``step`` (the step a run resumes from; 0 for a fresh run).

    A run killed after logging steps past its newest checkpoint logs them again when it resumes:
    without this the log would hold them twice. The file is replaced atomically; a torn last line
    (killed mid-write) is dropped too.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if line.endswith(b"\n") and isinstance(entry, dict) and isinstance(entry.get("step"), int) \
                and entry["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write(path, b"".join(kept))


class _GuideLoss(nn.Module):
    """The guide plus the auxiliary loss, as one module for DistributedDataParallel.

    The backbone is held outside the module tree (not a parameter of DDP's model).
    """

    def __init__(self, guide: TOAST, backbone: MaskTransformer, config: TrainConfig, ignore_index: int):
        super().__init__()
        self.guide = guide
        self._backbone = (backbone,)
        self._config = config
        self._ignore_index = ignore_index

    def forward(self, inputs, class_labels, targets):
        cfg = self._config
        return aux_loss(self._backbone[0], self.guide, inputs, class_labels, targets, label_smoothing=cfg.label_smoothing,
                        recon_weight=cfg.recon_weight, ignore_index=self._ignore_index, ce_vocab=cfg.ce_vocab)
