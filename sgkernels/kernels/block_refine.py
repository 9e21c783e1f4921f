"""Triton kernels of ``block_refine_step`` / ``block_commit`` (spec: sgkernels/ops/block_refine.py) and
of ``entropy_bound_step`` (spec: sgkernels/ops/entropy_bound.py).

``block_refine_step`` = guided_sample's row kernel (:func:`sampling._sample_rows_kernel`, confidence
"prob" and ``filter_order``; greedy: "logp") + :func:`_block_commit_kernel`: two launches, no host
sync, no ``[B, L, V]`` probability tensor (the row kernel writes a token and a probability per row).

:func:`_block_commit_kernel`, one program per batch row: the rank of each candidate among the
candidates by decreasing probability (ties to the lower position) is a count over ``[BLOCK_I,
BLOCK_J]`` comparison tiles (``L^2`` compares: L is a block, 32 in LLaDA2), then
``transfer = cand & (p > threshold | rank < need)``, the editing transfer and the new tokens.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._launch import launch as _launch
from .sampling import _launch_sampler, _prep_logits

# positions per tile of the commit kernel (tests shrink it: several tiles on small L)
_COMMIT_TILE = 64


def _f32(x: float) -> float:
    """``x`` rounded to float32, inf kept (the threshold is compared in float32, as torch does)."""
    if abs(x) > 3.4028234663852886e38:
        return x
    return struct.unpack("f", struct.pack("f", float(x)))[0]


@triton.jit
def _block_commit_kernel(
    tokens_ptr, conf_ptr, sample_ptr, committed_ptr, prompt_ptr, noise_ptr,  # inputs [B, L] ([L] prompt)
    prev_ptr, transfer_ptr, edit_ptr, probs_ptr,  # outputs [B, L]
    L, mask_id, quota, threshold, edit_threshold,
    MASK_MODE: tl.constexpr, HAS_PROMPT: tl.constexpr, EDIT: tl.constexpr, EXP_CONF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The commit of one batch row (program ``b``), contiguous ``[B, L]`` buffers.

    Reads ``tokens`` (int64), ``conf`` (float32: the probability, or EXP_CONF: the log-probability,
    whose exp is written to ``probs``), ``sample`` (int64), uniform mode: ``committed`` (bool) and
    ``noise`` (int64); mask mode: ``prompt`` (bool [L]) when HAS_PROMPT. Writes ``prev`` (int64),
    ``transfer`` / ``edit`` (bool). Bytes per position: ~30 read, 10 written; ``L^2`` compares.
    """
    b = tl.program_id(0).to(tl.int64)
    base = b * L
    offs = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    if MASK_MODE:
        need = quota
    else:
        n_comm = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, L, BLOCK):
            j = j0 + offs
            n_comm += tl.load(committed_ptr + base + j, mask=j < L, other=0).to(tl.int32)
        need = tl.maximum(quota - tl.sum(n_comm, axis=0), 0)
    for i0 in range(0, L, BLOCK):
        i = i0 + offs
        mi = i < L
        c_i = tl.load(conf_ptr + base + i, mask=mi, other=0.0)
        if EXP_CONF:
            c_i = tl.exp(c_i)
            tl.store(probs_ptr + base + i, c_i, mask=mi)
        s_i = tl.load(sample_ptr + base + i, mask=mi, other=0)
        t_i = tl.load(tokens_ptr + base + i, mask=mi, other=0)
        if MASK_MODE:
            cand_i = mi & (s_i == mask_id)
        else:
            comm_i = tl.load(committed_ptr + base + i, mask=mi, other=0) != 0
            cand_i = mi & ~comm_i
        key_i = tl.where(cand_i, c_i, NEG_INF)
        rank = tl.zeros([BLOCK], tl.int32)
        for j0 in range(0, L, BLOCK):
            j = j0 + offs
            mj = j < L
            c_j = tl.load(conf_ptr + base + j, mask=mj, other=0.0)
            if EXP_CONF:
                c_j = tl.exp(c_j)
            if MASK_MODE:
                cand_j = mj & (tl.load(sample_ptr + base + j, mask=mj, other=0) == mask_id)
            else:
                cand_j = mj & (tl.load(committed_ptr + base + j, mask=mj, other=1) == 0)
            key_j = tl.where(cand_j, c_j, NEG_INF)
            ahead = cand_j[None, :] & ((key_j[None, :] > key_i[:, None]) |
                                       ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None])))
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        transfer = cand_i & ((c_i > threshold) | (rank < need))
        if MASK_MODE:
            transfer = transfer & (quota >= 0)
        edit = tl.zeros([BLOCK], tl.int1)
        if EDIT:
            if MASK_MODE:
                editable = mi & (s_i != mask_id)
                if HAS_PROMPT:
                    editable = editable & (tl.load(prompt_ptr + i, mask=mi, other=0) == 0)
            else:
                editable = mi & comm_i
            edit = editable & (t_i != s_i) & (c_i > edit_threshold)
        prev = tl.where(transfer | edit, t_i, s_i)
        if not MASK_MODE:
            noise = tl.load(noise_ptr + base + i, mask=mi, other=0)
            prev = tl.where(comm_i | transfer, prev, noise)
        tl.store(prev_ptr + base + i, prev, mask=mi)
        tl.store(transfer_ptr + base + i, transfer.to(tl.int8), mask=mi)
        tl.store(edit_ptr + base + i, edit.to(tl.int8), mask=mi)


def _launch_commit(tokens, conf, sample, committed, prompt_mask, noise, mask_token_id, quota, threshold,
                   editing_threshold, exp_conf=False):
    """(prev, transfer, edit, probs) of the commit; ``probs`` is ``conf`` unless ``exp_conf`` (then exp(conf))."""
    batch, length = sample.shape
    device = sample.device
    prev = torch.empty((batch, length), dtype=torch.int64, device=device)
    transfer = torch.empty((batch, length), dtype=torch.bool, device=device)
    edit = torch.empty((batch, length), dtype=torch.bool, device=device)
    probs = torch.empty((batch, length), dtype=torch.float32, device=device) if exp_conf else conf
    if batch == 0 or length == 0:
        return prev, transfer, edit, probs
    mask_mode = mask_token_id is not None
    block = min(triton.next_power_of_2(length), _COMMIT_TILE)
    sample = sample.contiguous()
    # views as uint8 for the bool buffers (the interpreter and the compiler both take *i8)
    committed_u8 = committed.contiguous().view(torch.uint8) if committed is not None else sample
    prompt_u8 = prompt_mask.contiguous().view(torch.uint8) if prompt_mask is not None else sample
    _launch(_block_commit_kernel)[(batch,)](
        tokens.contiguous(), conf.reshape(batch, length).contiguous(), sample, committed_u8, prompt_u8,
        noise.contiguous() if noise is not None else sample,
        prev, transfer.view(torch.uint8), edit.view(torch.uint8), probs,
        length, int(mask_token_id) if mask_mode else 0, int(quota), _f32(threshold),
        _f32(0.0 if editing_threshold is None else editing_threshold),
        MASK_MODE=mask_mode, HAS_PROMPT=mask_mode and prompt_mask is not None, EDIT=editing_threshold is not None,
        EXP_CONF=bool(exp_conf), BLOCK=block, num_warps=max(1, min(4, block // 32)),
    )
    return prev, transfer, edit, probs


def block_commit_triton(tokens, probs, sample, committed, prompt_mask, noise, mask_token_id, quota, threshold,
                        editing_threshold):
    """CUDA kernel of ``torch.ops.sgkernels.block_commit`` (see the op for the arguments)."""
    prev, transfer, edit, _ = _launch_commit(tokens, probs.float(), sample, committed, prompt_mask, noise,
                                             mask_token_id, quota, float(threshold),
                                             None if editing_threshold is None else float(editing_threshold))
    return prev, transfer, edit


def block_refine_step_triton(logits, sample, committed, prompt_mask, noise, mask_token_id, quota, threshold,
                             editing_threshold, temperature, top_k, top_p, filter_order, seed, offset, status,
                             seed_tensor=None):
    """CUDA kernels of ``torch.ops.sgkernels.block_refine_step``: the row sampler, then the commit."""
    batch, length, vocab = logits.shape
    device = logits.device
    n_rows = batch * length
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    greedy = float(temperature) == 0.0
    conf = logp if greedy else torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows > 0:
        _launch_sampler(_prep_logits(logits, vocab), None, None, tokens, logp, status, 0.0, float(temperature),
                        int(seed), int(offset), conf=conf, confidence="logp" if greedy else "prob",
                        top_k=0 if greedy else int(top_k), top_p=1.0 if greedy else float(top_p),
                        seed_t=seed_tensor, filter_order=filter_order)
    tokens = tokens.reshape(batch, length)
    prev, transfer, edit, probs = _launch_commit(
        tokens, conf, sample, committed, prompt_mask, noise, mask_token_id, quota, float(threshold),
        None if editing_threshold is None else float(editing_threshold), exp_conf=greedy)
    return prev, transfer, edit, tokens, probs.reshape(batch, length)


# ----------------------------------------------------------------------------------------------
# entropy_bound_step (spec: sgkernels/ops/entropy_bound.py)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _entropy_accept_kernel(negh_ptr, tokens_ptr, noise_ptr, entropy_ptr, prev_ptr, accepted_ptr, L, bound,
                           BLOCK: tl.constexpr):
    """The entropy-bound accept set of one batch row (program ``b``), contiguous ``[B, L]`` buffers.

    Reads ``negh`` (float32, the rows' negative entropies), ``tokens`` and ``noise`` (int64). Writes
    ``entropy`` (float32), ``prev`` (int64: the token where accepted, the noise elsewhere) and
    ``accepted`` (bool): position i is accepted when the float64 sum of the entropies ordered before it
    (by entropy, ties to the lower position) is <= ``bound``. ``L^2`` compares in [BLOCK, BLOCK] tiles.
    """
    b = tl.program_id(0).to(tl.int64)
    base = b * L
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, L, BLOCK):
        i = i0 + offs
        mi = i < L
        h_i = -tl.load(negh_ptr + base + i, mask=mi, other=0.0)
        before = tl.zeros([BLOCK], tl.float64)
        for j0 in range(0, L, BLOCK):
            j = j0 + offs
            mj = j < L
            h_j = -tl.load(negh_ptr + base + j, mask=mj, other=0.0)
            ahead = mj[None, :] & ((h_j[None, :] < h_i[:, None]) | ((h_j[None, :] == h_i[:, None]) &
                                                                   (j[None, :] < i[:, None])))
            before += tl.sum(tl.where(ahead, h_j[None, :].to(tl.float64), 0.0), axis=1)
        accepted = before <= bound
        tok = tl.load(tokens_ptr + base + i, mask=mi, other=0)
        noise = tl.load(noise_ptr + base + i, mask=mi, other=0)
        tl.store(entropy_ptr + base + i, h_i, mask=mi)
        tl.store(prev_ptr + base + i, tl.where(accepted, tok, noise), mask=mi)
        tl.store(accepted_ptr + base + i, accepted.to(tl.int8), mask=mi)


def entropy_bound_step_triton(logits, noise, entropy_bound, seed, offset, status, seed_tensor=None):
    """CUDA kernels of ``torch.ops.sgkernels.entropy_bound_step``: the row sampler (temperature 1,
    confidence "neg_entropy"), then the accept kernel. Two launches, no host sync."""
    batch, length, vocab = logits.shape
    device = logits.device
    n_rows = batch * length
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    negh = torch.empty(n_rows, dtype=torch.float32, device=device)
    prev = torch.empty((batch, length), dtype=torch.int64, device=device)
    accepted = torch.empty((batch, length), dtype=torch.bool, device=device)
    entropy = torch.empty((batch, length), dtype=torch.float32, device=device)
    if n_rows > 0:
        _launch_sampler(_prep_logits(logits, vocab), None, None, tokens, logp, status, 0.0, 1.0, int(seed),
                        int(offset), conf=negh, confidence="neg_entropy", seed_t=seed_tensor)
        block = min(triton.next_power_of_2(length), _COMMIT_TILE)
        _launch(_entropy_accept_kernel)[(batch,)](
            negh, tokens, noise.contiguous(), entropy, prev, accepted.view(torch.uint8), length, _f32(entropy_bound),
            BLOCK=block, num_warps=max(1, min(4, block // 32)),
        )
    return prev, accepted, tokens.reshape(batch, length), logp.exp().reshape(batch, length), entropy
