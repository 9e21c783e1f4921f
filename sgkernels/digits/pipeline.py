"""Load a digits model directory and generate images with :class:`sgkernels.SelfGuidedSampler`."""
from __future__ import annotations

import dataclasses
import os

import torch

from .._rng import derived_seed
from ..ops import _validate
from ..sampler import SelfGuidedSampler, guidance_requested
from . import data
from .nets import load_generator_float, load_net

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits")


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """The embedded model's defaults: the paper's self-guided recipe scaled to 64 tokens.

    Self-guidance at T = 12 steps with s = 0.5 and MaskGIT's tau_0 = 4.5: at this scale the paper's
    pairing (s = 1.0, tau_0 = 10 for T = 12 at 256px) loses to plain MaskGIT on FID, while s = 0.5
    at tau_0 = 4.5 beats it (docs/images.md, "The paper's claim at toy scale"). Plain MaskGIT (the baseline)
    is guidance 0 with tau_0 = 4.5.
    """

    steps: int = 12
    guidance_scale: float = 0.5
    choice_temperature: float = 4.5
    plain_choice_temperature: float = 4.5


DEFAULTS = SamplingDefaults()
BATCH_SIZE = 250  # images per sampler call of DigitsModel.generate


class DigitsModel:
    """Tokenizer + MaskTransformer (+ TOAST guide) (+ evaluation classifier) of a model directory.

    ``DigitsModel.load(directory=None)`` reads ``directory`` (default: the shipped
    ``sgkernels/assets/digits``); ``need_classifier`` makes ``classifier/`` mandatory;
    ``torch_dtype`` is the transformer's and guide's dtype (default float32; the tokenizer and the
    evaluation classifier stay float32, so metrics compare samplers, not classifiers);
    ``compile=True`` compiles the sampler's network passes (:class:`SelfGuidedSampler`).
    """

    def __init__(self, tokenizer, model, guide=None, classifier=None, directory: str | None = None, *,
                 compile=False):
        self.tokenizer, self.model, self.guide, self.classifier = tokenizer, model, guide, classifier
        self.directory = directory
        self.compile = compile

    @classmethod
    def load(cls, directory: str | None = None, *, need_classifier: bool = False, torch_dtype=None,
             compile=False) -> "DigitsModel":
        torch_dtype = _validate.check_dtype("torch_dtype", torch_dtype)
        directory = DEFAULT_MODEL_DIR if directory is None else os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"model directory not found: {directory}")
        tokenizer = load_net(os.path.join(directory, "tokenizer"), "tokenizer")
        model, guide = load_generator_float(os.path.join(directory, "generator"))
        if torch_dtype is not None:
            model, guide = model.to(torch_dtype), (guide.to(torch_dtype) if guide is not None else None)
        if model.config.codebook_size != tokenizer.config.codebook_size:
            raise ValueError(f"{directory}: generator codebook ({model.config.codebook_size}) does not match the "
                             f"tokenizer's ({tokenizer.config.codebook_size})")
        classifier = None
        if need_classifier or os.path.exists(os.path.join(directory, "classifier", "config.json")):
            classifier = load_net(os.path.join(directory, "classifier"), "classifier")
        return cls(tokenizer, model, guide, classifier, directory, compile=compile)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def sampler(self, *, steps: int = DEFAULTS.steps, guidance_scale: float = DEFAULTS.guidance_scale,
                choice_temperature: float = DEFAULTS.choice_temperature, temperature: float = 1.0) -> SelfGuidedSampler:
        if guidance_requested(guidance_scale) and self.guide is None:
            raise ValueError("this model has no guide: use guidance scale 0 (or train the 'guide' stage)")
        # preset "maskgit": the rules the digits models' sampling settings were tuned with
        return SelfGuidedSampler(self.model, self.guide, steps=steps, guidance_scale=guidance_scale,
                                 choice_temperature=choice_temperature, temperature=temperature,
                                 preset="maskgit", compile=self.compile)

    @torch.no_grad()
    def generate(self, labels, *, seed: int = 0, batch_size: int = BATCH_SIZE, progress: bool = False, **sampling):
        """Images ``[B, 1, 32, 32]`` in [0, 1] for class ``labels`` (int list / tensor); ``sampling``: see :meth:`sampler`.

        Batch ``i`` is sampled with seed :func:`sgkernels._rng.derived_seed` ``(seed, i)``; ``progress``
        shows a tqdm bar over the images (on stderr).
        """
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        sampler = self.sampler(**sampling)
        out = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(labels), unit="img", desc="sampling", dynamic_ncols=True)
        try:
            for i, start in enumerate(range(0, len(labels), batch_size)):
                tokens = sampler(labels[start:start + batch_size], seed=derived_seed(seed, i))
                out.append(self.tokenizer.decode(tokens))  # float32 images whatever the transformer's dtype
                if bar is not None:
                    bar.update(len(tokens))
        finally:
            if bar is not None:
                bar.close()
        return torch.cat(out)


def class_balanced_labels(num: int, num_classes: int = data.NUM_CLASSES, classes=None) -> torch.Tensor:
    """``num`` labels cycling through ``classes`` (default all): 0, 1, .., 9, 0, 1, ..."""
    classes = list(range(num_classes)) if classes is None else list(classes)
    return torch.tensor([classes[i % len(classes)] for i in range(num)], dtype=torch.int64)
