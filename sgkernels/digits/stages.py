"""The training stages of the digits model (``sgkernels train STAGE --out DIR``).

Each stage is seeded (``torch.manual_seed(seed)``, deterministic data order) and runs on the CPU in
a few minutes on 2 cores. A model directory ``DIR`` holds::

    DIR/tokenizer/   Tokenizer (config.json + weights.safetensors, fp16)          stage "tokenizer"
    DIR/generator/   MaskTransformer (+ TOAST guide after stage "guide"), fp16,   stage "generator",
                     sgkernels.save_checkpoint format                               then "guide"
    DIR/classifier/  evaluation CNN (config.json + weights.safetensors, fp16)     stage "classifier"
    DIR/logs/<stage>.jsonl   training losses

"generator" needs DIR/tokenizer; "guide" needs DIR/generator (it fine-tunes a TOAST guide with
:func:`sgkernels.train_guide`, the auxiliary task, and rewrites DIR/generator with the EMA guide).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from ..models.checkpoint import save_checkpoint
from ..models.toast import TOAST, TOASTConfig
from ..models.transformer import MaskTransformer, MaskTransformerConfig
from . import data
from .nets import Classifier, ClassifierConfig, Tokenizer, TokenizerConfig, load_generator_float, load_net, save_net

STAGES = ("tokenizer", "generator", "guide", "classifier")
DEFAULT_STEPS = {"tokenizer": 1000, "generator": 2000, "guide": 600, "classifier": 1000}

GENERATOR_CONFIG = dict(grid_size=8, width=128, depth=4, heads=4, mlp_dim=512, dropout=0.1, attention_dropout=0.1)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)


class _Log:
    def __init__(self, out: str, stage: str):
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        self.path = os.path.join(out, "logs", f"{stage}.jsonl")
        self.f = open(self.path, "w")

    def write(self, **kw):
        self.f.write(json.dumps(kw) + "\n")

    def close(self):
        self.f.close()


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y (zero fill)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _batches(n: int, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(out: str, steps: int | None = None, seed: int = 0, *, batch_size: int = 32,
                    progress: bool = True, config: TokenizerConfig = TokenizerConfig()) -> dict:
    steps = DEFAULT_STEPS["tokenizer"] if steps is None else steps
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, _ = data.load_split("train")
    tok = Tokenizer(config).train()
    params = [p for p in tok.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    vq = tok.quantizer
    with torch.no_grad():  # codebook init from encoder outputs (k-means++-free "random data points")
        z = tok.encoder(x[torch.randperm(len(x), generator=gen)[:64]] * 2 - 1).permute(0, 2, 3, 1).reshape(-1, config.code_dim)
        init = z[torch.randperm(len(z), generator=gen)[:config.codebook_size]]
        vq.embedding.weight.copy_(init)
        vq.ema_embed_sum.copy_(init)
    log = _Log(out, "tokenizer")
    bar = _bar(steps, "train tokenizer", progress)
    batches = _batches(len(x), batch_size, gen)
    rec = vql = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 2e-3, 50)
        xb = random_shift(x[next(batches)], 1, gen)
        recon, vql, idx = tok(xb)
        rec = F.mse_loss(recon, xb)
        loss = rec + vql
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 99 and step < steps * 3 // 4:  # restart dead codes on random encoder outputs
            with torch.no_grad():
                dead = vq.ema_cluster_size < 0.05
                if dead.any():
                    zb = tok.encoder(xb * 2 - 1).permute(0, 2, 3, 1).reshape(-1, config.code_dim)
                    pick = zb[torch.randint(0, len(zb), (int(dead.sum()),), generator=gen)]
                    vq.embedding.weight[dead] = pick
                    vq.ema_embed_sum[dead] = pick
                    vq.ema_cluster_size[dead] = 1.0
        bar.update(1)
        if step % 50 == 49 or step == steps - 1:
            used = int(torch.unique(idx).numel())
            bar.set_postfix(mse=f"{rec.item():.4f}", codes=used)
            log.write(step=step + 1, mse=rec.item(), vq=vql.item(), codes_in_batch=used)
    bar.close()
    tok.eval()
    xh, _ = data.load_split("heldout")
    with torch.no_grad():
        recon, _, idx = tok(xh)
        held_mse = F.mse_loss(recon, xh).item()
        codes = int(torch.unique(tok.encode(x)).numel())
    log.write(heldout_mse=held_mse, codes_used=codes)
    log.close()
    save_net(os.path.join(out, "tokenizer"), tok)
    return {"stage": "tokenizer", "steps": steps, "train_mse": rec.item(), "heldout_mse": held_mse,
            "codes_used": codes}


# ------------------------------------------------------------------------------------ generator
def _token_dataset(out: str, seed: int, copies: int = 4):
    """Training tokens ``[M, 64]`` and labels: the train split, plus ``copies - 1`` randomly shifted copies."""
    tok = load_net(os.path.join(out, "tokenizer"), "tokenizer")
    x, y = data.load_split("train")
    gen = torch.Generator().manual_seed(seed + 1)
    toks, labels = [tok.encode(x)], [y]
    for _ in range(copies - 1):
        toks.append(tok.encode(random_shift(x, 1, gen)))
        labels.append(y)
    return torch.cat(toks), torch.cat(labels), tok.config.codebook_size


def masked_token_loss(model: MaskTransformer, tokens: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                      label_smoothing: float = 0.1) -> torch.Tensor:
    """MaskGIT's loss: mask ``max(1, ceil(N cos(pi/2 u)))`` random positions, CE on them."""
    b, n = tokens.shape
    u = torch.rand(b, generator=gen)
    num = torch.ceil(n * torch.cos(0.5 * math.pi * u)).long().clamp(1, n)
    ranks = torch.rand(b, n, generator=gen).argsort(1).argsort(1)
    masked = ranks < num[:, None]
    inputs = tokens.masked_fill(masked, model.config.mask_token_id)
    logits = model(inputs, labels)
    return F.cross_entropy(logits[masked], tokens[masked], label_smoothing=label_smoothing)


def train_generator(out: str, steps: int | None = None, seed: int = 0, *, batch_size: int = 32,
                    progress: bool = True, lr: float = 5e-4, model_config: dict | None = None) -> dict:
    steps = DEFAULT_STEPS["generator"] if steps is None else steps
    tokens, labels, k = _token_dataset(out, seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = MaskTransformerConfig(codebook_size=k, num_classes=data.NUM_CLASSES,
                                **{**GENERATOR_CONFIG, **(model_config or {})})
    model = MaskTransformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.96), weight_decay=0.045)
    log = _Log(out, "generator")
    bar = _bar(steps, "train generator", progress)
    batches = _batches(len(tokens), batch_size, gen)
    loss = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, 200)
        idx = next(batches)
        loss = masked_token_loss(model, tokens[idx], labels[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update(1)
        if step % 50 == 49 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write(step=step + 1, loss=loss.item())
    bar.close()
    model.eval()
    # held-out masked-token loss (fixed corruption)
    tok = load_net(os.path.join(out, "tokenizer"), "tokenizer")
    xh, yh = data.load_split("heldout")
    with torch.no_grad():
        held = masked_token_loss(model, tok.encode(xh), yh, torch.Generator().manual_seed(1234), 0.0).item()
    log.write(heldout_masked_ce=held)
    log.close()
    save_checkpoint(os.path.join(out, "generator"), copy.deepcopy(model).half())
    return {"stage": "generator", "steps": steps, "train_loss": loss.item(), "heldout_masked_ce": held,
            "parameters": model.num_parameters()}


# ------------------------------------------------------------------------------------ guide
def train_guide_stage(out: str, steps: int | None = None, seed: int = 0, *, batch_size: int = 32,
                      progress: bool = True, lr: float = 3e-4) -> dict:
    from ..training import TokenDataset, TrainConfig, train_guide

    steps = DEFAULT_STEPS["guide"] if steps is None else steps
    gdir = os.path.join(out, "generator")
    backbone, _ = load_generator_float(gdir)
    tokens, labels, _ = _token_dataset(out, seed)
    torch.manual_seed(seed)
    guide = TOAST(TOASTConfig.for_backbone(backbone.config, 16))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps),
                         ema_decay=0.995, mixed_precision="no", save_every=steps, keep_last=1,
                         log_every=min(50, steps), seed=seed, progress=progress,
                         ce_vocab="codebook")  # the shipped digits guide was trained this way
    with tempfile.TemporaryDirectory(prefix="sgk-guide-") as tmp:
        result = train_guide(backbone, guide, TokenDataset(tokens, labels), config, tmp, device="cpu",
                             save_final=False)
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        shutil.copyfile(os.path.join(tmp, "log.jsonl"), os.path.join(out, "logs", "guide.jsonl"))
    save_checkpoint(gdir, copy.deepcopy(backbone).half(), copy.deepcopy(result.ema).half())
    return {"stage": "guide", "steps": steps, "loss": result.loss, "ce": result.ce, "recon": result.recon,
            "guide_parameters": result.ema.num_parameters()}


# ------------------------------------------------------------------------------------ classifier
def train_classifier(out: str, steps: int | None = None, seed: int = 0, *, batch_size: int = 64,
                     progress: bool = True) -> dict:
    steps = DEFAULT_STEPS["classifier"] if steps is None else steps
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.load_split("train")
    net = Classifier(ClassifierConfig()).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    log = _Log(out, "classifier")
    bar = _bar(steps, "train classifier", progress)
    batches = _batches(len(x), batch_size, gen)
    loss = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 2e-3, 50)
        idx = next(batches)
        loss = F.cross_entropy(net(random_shift(x[idx], 2, gen)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        if step % 50 == 49 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write(step=step + 1, loss=loss.item())
    bar.close()
    net.eval()
    xh, yh = data.load_split("heldout")
    with torch.no_grad():
        acc = (net(xh).argmax(1) == yh).float().mean().item()
    log.write(heldout_accuracy=acc)
    log.close()
    save_net(os.path.join(out, "classifier"), net)
    return {"stage": "classifier", "steps": steps, "train_loss": loss.item(), "heldout_accuracy": acc}


RUNNERS = {"tokenizer": train_tokenizer, "generator": train_generator, "guide": train_guide_stage,
           "classifier": train_classifier}


def run_stage(stage: str, out: str, steps: int | None = None, seed: int = 0, progress: bool = True,
              threads: int = 1) -> dict:
    """Run one stage into ``out``. ``threads``: torch intra-op threads (1 by default: these models are
    so small that OpenMP synchronisation costs more than it gains, and one thread is reproducible)."""
    if stage not in RUNNERS:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = RUNNERS[stage](out, steps, seed, progress=progress)
    finally:
        torch.set_num_threads(before)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
