"""Class ids to images with a checkpoint folder and a VQGAN folder: :class:`SelfGuidedPipeline`.

The counterpart of the official ``PipelineMuse`` (UnlockMGM ``muse/pipeline_muse_toast.py``):
``SelfGuidedSampler`` draws the token grids, :class:`sgkernels.models.MaskGitVQGAN` decodes them.
The official pipeline turns a decoded image ``x`` into 8 bits as ``uint8(255 * clip(x, 0, 1))``
(truncation, not rounding); :func:`to_uint8` does the same, so ``.npz`` files match its output.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .models.pretrained import CONFIG_NAME, CheckpointError, from_pretrained
from .models.toast import TOAST, check_model_and_guide
from .models.transformer import MaskTransformer
from .models.vqgan import MaskGitVQGAN
from .ops import _validate
from .sampler import SelfGuidedSampler

OUTPUTS = ("float", "uint8", "pil")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images ``[B, C, H, W]`` in [0, 1] -> uint8 ``[B, H, W, C]`` on the CPU, as the official pipeline."""
    return (images.clamp(0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def class_tensor(class_ids, num_classes: int) -> torch.Tensor:
    """``class_ids`` (an int, a sequence of ints or an integer tensor) as int64 ``[B]`` on the CPU, checked."""
    if isinstance(class_ids, int) and not isinstance(class_ids, bool):
        class_ids = [class_ids]
    if isinstance(class_ids, torch.Tensor):
        if class_ids.dtype.is_floating_point or class_ids.dtype == torch.bool or class_ids.dim() != 1:
            raise ValueError(f"class_ids: expected a 1-D integer tensor, got {class_ids.dtype} {tuple(class_ids.shape)}")
        labels = class_ids.detach().to("cpu", torch.int64)
    else:
        if not isinstance(class_ids, Sequence) or not all(isinstance(c, int) and not isinstance(c, bool) for c in class_ids):
            raise TypeError("class_ids: expected an int, a sequence of ints or an integer tensor")
        labels = torch.tensor(list(class_ids), dtype=torch.int64)
    if labels.numel() == 0:
        raise ValueError("class_ids: expected at least one class id")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class_ids: expected values in [0, {num_classes}), got {bad[:8].tolist()}")
    return labels


# float16 on a CPU: torch's CPU float16 convolutions and matmuls have no fast kernels (no AVX-512 FP16 /
# AMX path): on the AVX-512 BF16 test box a 6-layer backbone pass ran 6x and a VQGAN convolution 180x
# slower than in float32. Refused where the device is known (pipeline, CLI), not silently slow.
CPU_FLOAT16 = ("float16 on a CPU: torch has no fast CPU float16 matmul / convolution kernels (a VQGAN "
               "decode takes minutes); use bfloat16 or float32 on a CPU, float16 on CUDA")


def check_device_dtype(device_type: str, dtype: torch.dtype | None) -> None:
    """ValueError naming ``torch_dtype`` for float16 on a CPU (:data:`CPU_FLOAT16`)."""
    if dtype == torch.float16 and device_type == "cpu":
        raise ValueError(f"torch_dtype: {CPU_FLOAT16}")


def check_codebooks(model: MaskTransformer, vqgan: MaskGitVQGAN, vae_source: str = "vqgan") -> None:
    """CheckpointError unless the VQGAN's codebook has the transformer's ``codebook_size`` codes."""
    if vqgan.codebook_size != model.config.codebook_size:
        raise CheckpointError(f"{vae_source}: num_embeddings = {vqgan.codebook_size}, but the transformer has "
                              f"codebook_size = {model.config.codebook_size}")


class SelfGuidedPipeline:
    """Self-guided sampling + VQGAN decoding.

    ``SelfGuidedPipeline(model, guide, vqgan)`` or :meth:`from_pretrained`. ``guide`` may be None
    (plain MaskGIT: call with ``guidance_scale=0``).

    ``pipe.transformer`` and ``pipe.vae`` are diffusers' names of ``pipe.model`` and ``pipe.vqgan``:
    ``pipe.transformer = torch.compile(pipe.transformer)`` compiles the backbone's passes (the
    guide's pass 2 too runs the backbone, through its uncompiled ``forward_ids``; ``compile=True``
    in a call compiles both passes as one graph, see :class:`SelfGuidedSampler`).
    """

    def __init__(self, model: MaskTransformer, guide: TOAST | None, vqgan: MaskGitVQGAN):
        check_model_and_guide(model, guide)
        if not isinstance(vqgan, MaskGitVQGAN):
            raise TypeError(f"vqgan: expected a MaskGitVQGAN, got {type(vqgan).__name__}")
        check_codebooks(model, vqgan)
        self.model, self.guide, self.vqgan = model, guide, vqgan

    @classmethod
    def from_pretrained(cls, transformer_path: str | os.PathLike, vae_path: str | os.PathLike, *,
                        transformer_subfolder: str | None = None, vae_subfolder: str | None = None,
                        device: str | torch.device | None = None, torch_dtype=None) -> "SelfGuidedPipeline":
        """Load the transformer (+ TOAST guide) and the VQGAN from their folders.

        Both may be sgkernels or official open-muse / UnlockMGM folders (see
        :func:`sgkernels.models.from_pretrained` and :meth:`MaskGitVQGAN.from_pretrained`).
        ``device`` defaults to CUDA when available. ``torch_dtype`` (``torch.bfloat16``,
        ``"bfloat16"``, ...; None / ``"auto"``: as stored) is the dtype of every component's weights
        and activations, as in diffusers; the sampling ops compute in float32 and the images are
        float32 / uint8 whatever it is. float16 on a CPU is refused (ValueError, :data:`CPU_FLOAT16`;
        the components' own loaders and :meth:`to` allow it). A VQGAN whose codebook size differs from the
        transformer's raises :class:`~sgkernels.models.pretrained.CheckpointError` naming the VQGAN's config.
        """
        torch_dtype = _validate.check_dtype("torch_dtype", torch_dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device_dtype(torch.device(device).type, torch_dtype)
        model, guide = from_pretrained(transformer_path, transformer_subfolder, torch_dtype=torch_dtype)
        vqgan = MaskGitVQGAN.from_pretrained(vae_path, vae_subfolder, torch_dtype=torch_dtype)
        vae_dir = os.path.join(os.fspath(vae_path), vae_subfolder) if vae_subfolder else os.fspath(vae_path)
        check_codebooks(model, vqgan, os.path.join(vae_dir, CONFIG_NAME))
        return cls(model, guide, vqgan).to(device)

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | str | None = None) -> "SelfGuidedPipeline":
        """Move every component to ``device`` and / or cast it to ``dtype`` (``pipe.to(torch.bfloat16)``
        works too, as in diffusers)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        dtype = _validate.check_dtype("dtype", dtype)
        for m in (self.model, self.guide, self.vqgan):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's parameter dtype (``torch_dtype``)."""
        return next(self.model.parameters()).dtype

    @property
    def transformer(self) -> MaskTransformer:
        """diffusers' name of :attr:`model` (assignable: ``pipe.transformer = torch.compile(pipe.transformer)``)."""
        return self.model

    @transformer.setter
    def transformer(self, module) -> None:
        check_model_and_guide(module, self.guide)
        self.model = module

    @property
    def vae(self) -> MaskGitVQGAN:
        """diffusers' name of :attr:`vqgan` (assignable)."""
        return self.vqgan

    @vae.setter
    def vae(self, module) -> None:
        self.vqgan = module

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one uint8 image (``output="uint8"``): the token grid times the VQGAN's factor."""
        (h, w), f = self.model.config.grid_hw, self.vqgan.config.downsample_factor
        return h * f, w * f, self.vqgan.config.num_channels

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def __call__(self, class_ids, *, steps: int = 18, guidance_scale: float = 1.0, choice_temperature: float = 25.0,
                 temperature: float = 1.0, seed: int | None = None, output: str = "float", progress: bool = False,
                 **sampler_options):
        """Images of ``class_ids`` (one per id).

        Args:
            steps, guidance_scale, choice_temperature, temperature: as :class:`SelfGuidedSampler`
                (paper: T = 18, s = 1, tau_0 = 25 at 256px). ``guidance_scale`` must be 0 without a guide.
            seed: fixes every random number (None: drawn from torch's generator).
            output: ``"float"`` (float32 ``[B, 3, H, W]`` in [0, 1] on the pipeline's device),
                ``"uint8"`` (``[B, H, W, 3]`` on the CPU, :func:`to_uint8`) or ``"pil"`` (a list of
                ``PIL.Image``).
            progress: a tqdm bar over the steps.
            sampler_options: further :class:`SelfGuidedSampler` arguments (``temperature_decay``,
                ``cfg_scale``, ``cuda_graph``, ``compile``, ...). ``compile=True`` compiles the step's
                network passes once per batch shape; the compiled code is kept across calls.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        if self.guide is None and guidance_scale != 0:
            raise ValueError("guidance_scale: this transformer has no TOAST guide; use guidance_scale=0 (plain MaskGIT)")
        labels = class_tensor(class_ids, self.num_classes).to(self.device)
        sampler = SelfGuidedSampler(self.model, self.guide, steps=steps, guidance_scale=guidance_scale,
                                    choice_temperature=choice_temperature, temperature=temperature, **sampler_options)
        tokens = sampler(labels, seed=seed, progress=progress)
        h, w = self.model.config.grid_hw
        images = self.vqgan.decode(tokens.reshape(-1, h, w)).float()  # float32 whatever the VQGAN's dtype
        if output == "float":
            return images
        pixels = to_uint8(images)
        if output == "uint8":
            return pixels
        from PIL import Image

        return [Image.fromarray(p.numpy()) for p in pixels]
