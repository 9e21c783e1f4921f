"""Fine-tune a TOAST guide H with the self-guidance auxiliary task.

* :mod:`~sgkernels.training.config`: :class:`TrainConfig`;
* :mod:`~sgkernels.training.task`: the corruption (:func:`corrupt`, :func:`sample_error_tokens`)
  and the loss (:func:`aux_loss`);
* :mod:`~sgkernels.training.losses`: :func:`confidence_aware_loss` (diffusers' dLLM loss, fused);
* :mod:`~sgkernels.training.data`: :class:`TokenDataset` and the per-rank batch streams;
* :mod:`~sgkernels.training.distributed`: ``torchrun`` process-group setup;
* :mod:`~sgkernels.training.checkpoints`: resumable ``step_*`` directories;
* :mod:`~sgkernels.training.loop`: :func:`train_guide`;
* ``python -m sgkernels.training --help``: the command line (``__main__``).

``import sgkernels`` does not import this package; ``sgkernels.train_guide``, ``sgkernels.TrainConfig``
and ``sgkernels.training`` load it on first use (its one name: there is no ``sgkernels.train`` alias,
which ``from sgkernels.train import ...`` could not import).
"""
from .checkpoints import latest_checkpoint, load_train_checkpoint
from .config import ERROR_TOKEN_MODES, MIXED_PRECISIONS, TrainConfig
from .data import TokenDataset
from .losses import confidence_aware_loss
from .loop import TrainResult, train_guide
from .task import Corruption, aux_loss, corrupt, sample_error_tokens

__all__ = [
    "Corruption",
    "ERROR_TOKEN_MODES",
    "MIXED_PRECISIONS",
    "TokenDataset",
    "TrainConfig",
    "TrainResult",
    "aux_loss",
    "confidence_aware_loss",
    "corrupt",
    "latest_checkpoint",
    "load_train_checkpoint",
    "sample_error_tokens",
    "train_guide",
]
