"""Process-group setup for ``torchrun`` (gloo on CPU, nccl on CUDA) and the per-rank step seeds."""
from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import torch


class DistInfo(NamedTuple):
    """Where this process runs: rank, world size, local rank."""

    rank: int
    world: int
    local_rank: int
    created: bool  # this call initialised the process group (and destroys it)


def init_distributed(device: torch.device | None) -> DistInfo:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    if world <= 1:
        return DistInfo(0, 1, 0, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def step_seed(seed: int, rank: int, step: int, tag: str) -> int:
    """A seed in [0, 2**62) for ``(seed, rank, step, tag)``.

    The key keeps its historical ``sgkernels.train/`` prefix: changing it would change every run's corruption.
    """
    digest = hashlib.blake2b(f"sgkernels.train/{tag}/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # in [0, 2**62)
