"""Command line of guide training::

    python -m sgkernels.training CKPT_DIR DATA --out OUT --steps 50000 --batch-size 32
    torchrun --nproc_per_node 8 -m sgkernels.training CKPT_DIR DATA --out OUT ...
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..models.checkpoint import load_checkpoint
from ..models.toast import TOAST, TOASTConfig
from .config import ERROR_TOKEN_MODES, MIXED_PRECISIONS, TrainConfig
from .data import TokenDataset
from .loop import train_guide


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m sgkernels.training",
        description="Fine-tune a TOAST guide with the self-guidance auxiliary task. Reads a checkpoint "
                    "directory written by sgkernels.save_checkpoint (its guide is fine-tuned; a new one is "
                    "created if it has none) and a token dataset; writes checkpoints under OUT/checkpoints and "
                    "the backbone + EMA guide to OUT/final. Multi-GPU: torchrun --nproc_per_node G -m "
                    "sgkernels.training ...",
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model weights [+ guide])")
    p.add_argument("data", help="token dataset: .pt or .npz with 'tokens' [M, H, W] or [M, N] and 'labels' [M]; "
                                "or .npy [M, 1 + N] int array, column 0 the class label")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--error-token-mode", choices=ERROR_TOKEN_MODES, default=d.error_token_mode,
                   help="'sample': error tokens ~ softmax(base logits) (paper); 'official': softmax of probabilities")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=d.mixed_precision)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--num-factors", type=int, default=16, help="TOAST factors of a new guide")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay, max_grad_norm=args.max_grad_norm, error_token_mode=args.error_token_mode,
        mixed_precision=args.mixed_precision, save_every=args.save_every, log_every=args.log_every, seed=args.seed,
        num_workers=args.num_workers, progress=not args.no_progress,
    )
    backbone, guide = load_checkpoint(args.checkpoint)
    if guide is None:
        torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        guide = TOAST(TOASTConfig.for_backbone(backbone.config, args.num_factors))
    dataset = TokenDataset.load(args.data)
    result = train_guide(backbone, guide, dataset, config, args.out, resume=args.resume, device=args.device)
    if result.final_dir is not None:
        print(f"trained {result.step} steps; backbone + EMA guide saved to {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
