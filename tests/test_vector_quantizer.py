"""sgkernels.nn.VectorQuantizer: STE gradients, losses, EMA, l2-normalised codes, codebook entries."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgkernels.nn import DiffusersVectorQuantizer, VectorQuantizer


def _z(b=2, c=8, h=5, w=3, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, h, w, generator=g)).requires_grad_(True)


def _expected(vq, z):
    """Indices and codes from a dense float64 argmin over the (normalised) codebook."""
    ze = z.detach().permute(0, 2, 3, 1).double()
    codes = vq.codebook().detach().double()
    if vq.l2_normalize:
        ze = F.normalize(ze, dim=-1)
    d = ((ze[..., None, :] - codes) ** 2).sum(-1)
    idx = d.argmin(-1)
    return idx, codes[idx], ze


def test_forward_shapes_indices_and_ste_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, beta=0.25)
    z = _z()
    z_q, loss, idx = vq(z)
    ridx, rcodes, ze = _expected(vq, z)
    assert z_q.shape == z.shape and idx.shape == (2, 5, 3) and idx.dtype == torch.int64
    assert torch.equal(idx, ridx)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).double(), rcodes, atol=1e-6)
    # loss = codebook + beta * commitment, both mean squared errors
    mse = ((rcodes - ze) ** 2).mean()
    assert torch.allclose(loss.double(), 1.25 * mse, rtol=1e-5)
    # straight-through: d(sum z_q)/dz = 1, plus the commitment gradient
    (z_q.sum()).backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    z.grad = None
    z_q, loss, _ = vq(z)
    loss.backward()
    expect = 0.25 * 2 * (ze - rcodes) / ze.numel()
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).double(), expect, atol=1e-7)
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0


def test_codebook_gradient_only_on_used_codes():
    torch.manual_seed(1)
    vq = VectorQuantizer(64, 8)
    z = _z(seed=1)
    _, loss, idx = vq(z)
    loss.backward()
    used = torch.zeros(64, dtype=torch.bool)
    used[idx.unique()] = True
    nz = vq.embedding.weight.grad.abs().sum(1) > 0
    assert torch.equal(nz, used)


def test_ema_updates_codebook_in_train_mode_only():
    torch.manual_seed(2)
    vq = VectorQuantizer(16, 8, beta=0.5, ema=True, decay=0.9)
    assert not vq.embedding.weight.requires_grad
    z = _z(seed=2)
    vq.eval()
    before = vq.embedding.weight.clone()
    z_q, loss, idx = vq(z)
    assert torch.equal(vq.embedding.weight, before)
    # with EMA the loss is only beta * commitment
    _, rcodes, ze = _expected(vq, z)
    assert torch.allclose(loss.double(), 0.5 * ((rcodes - ze) ** 2).mean(), rtol=1e-5)
    vq.train()
    z_q, loss, idx = vq(z)
    after = vq.embedding.weight.clone()
    used = idx.unique()
    assert not torch.allclose(after[used], before[used])
    # codes moved towards the mean of their assigned inputs
    ze = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    for k in used.tolist():
        target = ze[idx.reshape(-1) == k].mean(0)
        assert (after[k] - target).norm() < (before[k] - target).norm()
    loss.backward()
    assert z.grad is not None
    # repeated training steps converge the used codes to the cluster means
    for _ in range(200):
        vq(z)
    for k in vq(z)[2].unique().tolist():
        target = ze[vq(z)[2].reshape(-1) == k].mean(0)
        assert torch.allclose(vq.embedding.weight[k], target, atol=1e-3)


def test_l2_normalized_mode():
    torch.manual_seed(3)
    vq = VectorQuantizer(32, 8, l2_normalize=True)
    z = _z(seed=3, scale=3.0)
    z_q, loss, idx = vq(z)
    ridx, rcodes, ze = _expected(vq, z)
    assert torch.equal(idx, ridx)
    # cosine lookup: the same index as the max dot product with the unit codes
    cos = ze @ F.normalize(vq.embedding.weight.detach().double(), dim=-1).t()
    assert torch.equal(idx, cos.argmax(-1))
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 5, 3), atol=1e-5)
    assert torch.allclose(loss.double(), 1.25 * ((rcodes - ze) ** 2).mean(), rtol=1e-5)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_get_codebook_entry_round_trip():
    torch.manual_seed(4)
    vq = VectorQuantizer(32, 8)
    z = _z(seed=4)
    with torch.no_grad():
        z_q, _, idx = vq(z)
    b, c, h, w = z.shape
    # z_q = z + (code - z): the code up to one rounding
    assert torch.allclose(vq.get_codebook_entry(idx, (b, h, w, c)), z_q, atol=1e-7)
    assert torch.allclose(vq.get_codebook_entry(idx.reshape(-1), (b, h, w, c)), z_q, atol=1e-7)
    assert torch.allclose(vq.get_codebook_entry(idx), z_q.permute(0, 2, 3, 1), atol=1e-7)
    # quantising a quantised tensor gives the same indices
    assert torch.equal(vq(z_q)[2], idx)


def test_bf16_inputs():
    torch.manual_seed(5)
    vq = VectorQuantizer(32, 8)
    z = _z(seed=5).detach().to(torch.bfloat16).requires_grad_(True)
    z_q, loss, idx = vq(z)
    assert z_q.dtype == torch.bfloat16 and idx.shape == (2, 5, 3)
    loss.backward()
    assert z.grad is not None


def test_bad_input_shape():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="z: expected shape"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="z: expected shape"):
        vq(torch.randn(2, 4))


def test_diffusers_adapter_convention():
    torch.manual_seed(6)
    ref = VectorQuantizer(32, 8, beta=0.25)
    dq = DiffusersVectorQuantizer(32, 8, beta=0.25)
    dq.load_state_dict(ref.state_dict())
    assert dq.n_e == 32 and dq.vq_embed_dim == 8
    z = _z(seed=6)
    z_q, loss, (perplexity, min_encodings, indices) = dq(z)
    assert perplexity is None and min_encodings is None
    r_q, _, ridx = ref(z)
    assert torch.equal(z_q, r_q) and torch.equal(indices, ridx.reshape(-1))
    # legacy (diffusers default): beta on the codebook term -> same value, mean(commit) * (1 + beta)
    _, rcodes, ze = _expected(ref, z)
    assert torch.allclose(loss.double(), 1.25 * ((rcodes - ze) ** 2).mean(), rtol=1e-5)
    loss.backward()
    expect = 2 * (ze - rcodes) / ze.numel()  # commitment weight 1 in legacy mode
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).double(), expect, atol=1e-7)
    dq.sane_index_shape = True
    assert dq(z)[2][2].shape == (2, 5, 3)
    # from_diffusers copies the codebook of any module with the diffusers attributes
    src = torch.nn.Module()
    src.embedding = torch.nn.Embedding(32, 8)
    src.beta, src.legacy, src.remap, src.sane_index_shape = 0.3, False, None, False
    new = DiffusersVectorQuantizer.from_diffusers(src)
    assert torch.equal(new.embedding.weight, src.embedding.weight) and new.beta == 0.3 and not new.legacy
