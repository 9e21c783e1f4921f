"""Score generated digits: class-balanced samples of a :class:`DigitsModel` against the held-out set.

* :func:`evaluate_samples` samples ``num`` images and returns FID, IS, precision, recall, throughput and the
  configuration (the ``sgkernels evaluate --json`` object);
* :func:`sweep` does it over :data:`SWEEP_TEMPERATURES`, plain MaskGIT then self-guided;
* :func:`metric_line` is the one-line summary the CLI prints.
"""
from __future__ import annotations

import time

from ..sampler import guidance_requested
from .metrics import evaluate_images
from .pipeline import DigitsModel, class_balanced_labels

SWEEP_TEMPERATURES = (1.0, 2.0, 4.5, 10.0, 20.0, 40.0)


def evaluate_samples(dm: DigitsModel, real, num: int, seed: int, steps: int, guidance_scale: float,
                     tau: float) -> dict:
    """Metrics of ``num`` class-balanced samples (``tau``: the choice temperature) against ``real`` images."""
    labels = class_balanced_labels(num, dm.num_classes)
    t0 = time.perf_counter()
    images = dm.generate(labels, seed=seed, steps=steps, guidance_scale=guidance_scale, choice_temperature=tau)
    dt = time.perf_counter() - t0
    result = evaluate_images(dm.classifier, images, real)
    result["images_per_second"] = num / dt
    result["config"] = {"num": num, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                        "choice_temperature": tau, "model": dm.directory}
    return result


def sweep(dm: DigitsModel, real, num: int, seed: int, steps: int, guidance_scale: float):
    """:func:`evaluate_samples` over :data:`SWEEP_TEMPERATURES`, at guidance 0 then ``guidance_scale`` (a generator)."""
    for s in (0.0, guidance_scale):
        for tau in SWEEP_TEMPERATURES:
            yield evaluate_samples(dm, real, num, seed, steps, s, tau)


def mode_label(guidance_scale: float, guided: str = "self-guided s={:g}") -> str:
    """``guided`` formatted with the scale (``"self-guided s=0.5"``), or ``"plain MaskGIT"`` at s = 0."""
    return guided.format(guidance_scale) if guidance_requested(guidance_scale) else "plain MaskGIT"


def metric_line(r: dict) -> str:
    """One line of an :func:`evaluate_samples` result: configuration, FID, IS, precision, recall, images/s."""
    c = r["config"]
    return (f"{mode_label(c['guidance_scale']):<18} T={c['steps']} tau0={c['choice_temperature']:<5g} "
            f"seed={c['seed']} n={c['num']}: FID {r['fid']:.3f}  IS {r['inception_score']:.3f}  "
            f"precision {r['precision']:.3f}  recall {r['recall']:.3f}  {r['images_per_second']:.1f} images/s")
