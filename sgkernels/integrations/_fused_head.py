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
   ``LLaDAModel``): the model is run until it calls its head, where a forward pre-hook takes the
   head's input (the last hidden states) and stops the forward, before the ``[B, L, V]`` logits.
   Nothing of the model is swapped or changed: the hook, registered for the call, acts on the
   calling thread's forward only, so threads may share one model (issue 22: swapping the head for
   ``nn.Identity`` during a call broke concurrent calls).

Refused (fallback) when the config scales or caps the logits after the head (``scale_logits``,
``final_logit_softcapping``, ``logit_scale``): then the logits are not a linear map of the hidden
states. The head must be the model's last operation on the logits.
"""
from __future__ import annotations

import dataclasses
import threading

import torch

_NONLINEAR_LOGIT_FLAGS = ("scale_logits", "final_logit_softcapping", "logit_scale", "attn_logit_softcapping_final")


@dataclasses.dataclass
class FusedHead:
    """How to get a model's last hidden states and its head: ``hidden(x, *args, **kw)`` -> ``[B, L, d]``."""

    run: object  # callable(x, *args, **kw) -> output (tensor / .last_hidden_state), or the whole model (shape 3)
    weight: torch.Tensor
    bias: torch.Tensor | None
    capture: torch.nn.Module | None = None  # shape 3: the head module whose input is taken

    def hidden(self, x, *args, **kw) -> torch.Tensor:
        """The backbone's last hidden states ``[B, L, d]`` for ``x`` (``args``/``kw``: the model's other inputs)."""
        if self.capture is not None:
            h = _head_input(self.capture, self.run, x, args, kw)
        else:
            out = self.run(x, *args, **kw)
            if isinstance(out, torch.Tensor):
                h = out
            elif getattr(out, "last_hidden_state", None) is not None:
                h = out.last_hidden_state
            else:
                h = out[0]
        if h.dim() != 3 or h.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"head: the backbone gave hidden states of shape {tuple(h.shape)}, expected "
                             f"[B, L, {self.weight.shape[1]}] (the head's input size)")
        return h


class _HeadInput(Exception):
    """Raised by :func:`_head_input`'s hook: carries the head's input, stops the forward before the head."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("the head's input (sgkernels fused head)")
        self.hidden = hidden


def _head_input(head: torch.nn.Module, run, x, args, kw) -> torch.Tensor:
    """The input of ``head`` during ``run(x, *args, **kw)`` in this thread; the forward stops there.

    A forward pre-hook on ``head`` for the duration of the call: it ignores other threads' calls
    (they run the head as usual), and is removed afterwards whatever happens.
    """
    owner = threading.get_ident()

    def hook(module, inputs):
        if threading.get_ident() == owner:
            raise _HeadInput(inputs[0])

    handle = head.register_forward_pre_hook(hook)
    try:
        run(x, *args, **kw)
    except _HeadInput as stop:
        return stop.hidden
    finally:
        handle.remove()
    raise ValueError("head: the model returned without calling its output embeddings (get_output_embeddings()); "
                     "pass head= and the backbone, or fused_head=False")


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
    # LLaDA: the head is inside the base model (its input is taken by a hook, nothing is swapped)
    return FusedHead(model, lin.weight, lin.bias, capture=lin)
