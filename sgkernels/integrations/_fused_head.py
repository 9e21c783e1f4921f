"""The drop-ins' fused-head path: run the backbone without its LM head, project only the decoded rows.

:func:`resolve` finds, for a model, how to get its last hidden states without the ``[B, L, V]``
logits and the head's ``(weight, bias)``; the drop-ins then call :func:`sgkernels.head_sample` on the
candidate rows, with the CFG blend on the hidden states (it commutes with the linear head).

Supported model shapes (anything else falls back to the logits path):

1. ``head=`` given (an ``nn.Linear`` or a ``(weight [V, d], bias [V] or None)`` pair): ``model`` is the
   backbone; its output is the hidden states ``[B, L, d]``: a tensor, or an object with
   ``.last_hidden_state``.
2. A HF model whose ``get_output_embeddings()`` is an ``nn.Linear`` and whose base model
   (``get_decoder()``, else ``.model``) returns ``.last_hidden_state`` with logits = head(that)
   (Llama / Qwen2 / Dream style: ``logits = lm_head(hidden_states)``): the head is a child of the
   model, and the model's other children have no parameters (a BERT-style MLM head, with a dense
   transform before the projection, is refused).
3. A HF model whose base model computes the logits itself (LLaDA's remote code: ``ff_out`` inside
   ``LLaDAModel``) but that has ``set_output_embeddings``: the head is swapped for ``nn.Identity``
   during the call, so ``.logits`` holds the last hidden states.

Refused (fallback) when the config scales or caps the logits after the head (``scale_logits``,
``final_logit_softcapping``, ``logit_scale``): then the logits are not a linear map of the hidden
states. The head must be the model's last operation on the logits.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

_NONLINEAR_LOGIT_FLAGS = ("scale_logits", "final_logit_softcapping", "logit_scale", "attn_logit_softcapping_final")


@dataclasses.dataclass
class FusedHead:
    """How to get a model's last hidden states and its head: ``hidden(x, *args, **kw)`` -> ``[B, L, d]``."""

    run: object  # callable(x, *args, **kw) -> output (tensor / .last_hidden_state / .logits holding the hidden)
    weight: torch.Tensor
    bias: torch.Tensor | None
    swap: object = None  # (model, head module) for shape 3

    def hidden(self, x, *args, **kw) -> torch.Tensor:
        """The backbone's last hidden states ``[B, L, d]`` for ``x`` (``args``/``kw``: the model's other inputs)."""
        ctx = _swapped(*self.swap) if self.swap is not None else contextlib.nullcontext()
        with ctx:
            out = self.run(x, *args, **kw)
        if isinstance(out, torch.Tensor):
            h = out
        elif getattr(out, "last_hidden_state", None) is not None:
            h = out.last_hidden_state
        elif self.swap is not None:
            h = out.logits
        else:
            h = out[0]
        if h.dim() != 3 or h.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"head: the backbone gave hidden states of shape {tuple(h.shape)}, expected "
                             f"[B, L, {self.weight.shape[1]}] (the head's input size)")
        return h


@contextlib.contextmanager
def _swapped(model, head):
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def _linear(head):
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias
    if isinstance(head, (tuple, list)) and len(head) == 2 and isinstance(head[0], torch.Tensor):
        return head[0], head[1]
    raise TypeError("head: expected an nn.Linear or a (weight [V, d], bias [V] or None) pair, "
                    f"got {type(head).__name__}")


def resolve(model, head=None, fused_head: bool = True) -> FusedHead | None:
    """The fused-head plan for ``model`` (see the module docstring), or None: use the logits path."""
    if not fused_head:
        return None
    if head is not None:
        w, b = _linear(head)
        return FusedHead(model, w, b)
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, f, None) for f in _NONLINEAR_LOGIT_FLAGS):
        return None
    get = getattr(model, "get_output_embeddings", None)
    lin = get() if callable(get) else None
    if not isinstance(lin, torch.nn.Linear):
        return None
    dec = getattr(model, "get_decoder", None)
    base = dec() if callable(dec) else getattr(model, "model", None)
    if base is None or base is model:
        return None
    if lin not in set(base.modules()):  # Llama/Qwen/Dream: the head sits beside the base model
        # ... and reads the base's output: the model is base + head (+ parameter-free modules such as
        # dropout). BERT-style MLM heads (BertForMaskedLM's cls.predictions, ModernBERT's head) transform
        # the hidden states before the projection: logits path.
        others = [m for m in model.children() if m is not base and m is not lin]
        if not any(m is lin for m in model.children()) or any(True for m in others for _ in m.parameters()):
            return None
        return FusedHead(base, lin.weight, lin.bias)
    if callable(getattr(model, "set_output_embeddings", None)):  # LLaDA: the head is inside the base model
        return FusedHead(model, lin.weight, lin.bias, swap=(model, lin))
    return None
