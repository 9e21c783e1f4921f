"""dLLM fine-tuning losses on the fused linear cross-entropy (:func:`sgkernels.linear_cross_entropy`).

:func:`confidence_aware_loss` is diffusers' ``training_utils.compute_confidence_aware_loss`` (the loss
of ``examples/discrete_diffusion/train_llada2.py``) computed from the head's input and weight instead
of the logits: the same values and gradients, no ``[rows, V]`` tensor, and the rows whose label is
``ignore_index`` (the unmasked positions) never projected.
"""
from __future__ import annotations

import torch

from ..ops.linear_cross_entropy import check_temperature, linear_cross_entropy_terms


def confidence_aware_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lambda_conf: float = 0.0,
    temperature: float = 1.0,
    per_token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    linear_bias: torch.Tensor | None = None,
    suppress_ids=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compute_confidence_aware_loss(F.linear(input, linear_weight, linear_bias), labels, ...)`` fused.

    ``loss_sft = sum w * nll / max(sum w, 1)`` over the rows whose label is not ``ignore_index``
    (``w = per_token_weights``, or 1), and, with ``lambda_conf != 0``, ``loss_conf = sum w * H /
    max(sum w, 1)`` over the rows whose logits' argmax is the label, ``H`` the entropy of
    ``softmax(logits / temperature)``; ``loss = loss_sft + lambda_conf * loss_conf``. The entropy, the
    argmax test and the temperature are computed in the cross-entropy's sweep over the logits' chunks.

    Cost: ``lambda_conf == 0``: the unfused loss's three GEMMs on the labelled rows (gradients made in
    the forward). Otherwise the forward also makes the entropy and the argmax test, and the backward
    recomputes the logits of the rows predicted correctly (those the entropy term reaches) for its
    gradient: three more GEMMs on those rows.

    Args:
        input: ``[..., d]`` the head's input (the backbone's last hidden states), float32/bf16/fp16.
        linear_weight: ``[V, d]`` the LM head's weight, same dtype. linear_bias: ``[V]`` or None.
        labels: ``[...]`` integer, ``ignore_index`` where there is no loss (the unmasked positions).
        lambda_conf: weight of the confidence term (a float). temperature: > 0, of the entropy only.
        per_token_weights: ``[...]`` weights >= 0 (e.g. ``1 / p_mask``), no gradient.
        suppress_ids: token ids whose logits count as ``finfo(float32).min`` (train_llada2's mask id).
    Returns:
        ``(loss, loss_sft, loss_conf)``, 0-d in ``input``'s dtype (``loss is loss_sft`` and
        ``loss_conf`` a zero when ``lambda_conf == 0``, as diffusers).
    """
    temperature = check_temperature(temperature)
    if isinstance(lambda_conf, bool) or not isinstance(lambda_conf, (int, float)):
        raise TypeError(f"lambda_conf: expected a float, got {type(lambda_conf).__name__}")
    lambda_conf = float(lambda_conf)
    dtype = input.dtype
    conf = lambda_conf != 0.0
    loss_sft, rows = linear_cross_entropy_terms(
        input, linear_weight, labels, linear_bias=linear_bias, token_weight=per_token_weights,
        suppress_ids=suppress_ids, ignore_index=ignore_index, temperature=temperature, entropy=conf, denom_min=1.0)
    loss_sft = loss_sft.to(dtype)
    if not conf:
        return loss_sft, loss_sft, torch.zeros((), device=input.device, dtype=dtype)
    weights = (torch.ones(labels.shape, device=input.device, dtype=dtype) if per_token_weights is None
               else per_token_weights.to(dtype))
    correct = rows[..., 2].detach().to(dtype)  # 0 on the ignored rows
    entropy = rows[..., 1].to(dtype)
    denom_conf = (weights * correct).sum().clamp_min(1)
    loss_conf = (entropy * weights * correct).sum() / denom_conf
    return loss_sft + lambda_conf * loss_conf, loss_sft, loss_conf
