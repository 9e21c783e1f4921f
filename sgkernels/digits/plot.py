"""The IS-FID trade-off plot of a choice-temperature sweep (``sgkernels evaluate --sweep``); needs matplotlib."""
from __future__ import annotations

from ..sampler import guidance_requested
from .evaluate import mode_label


def plot_sweep(results: list[dict], path: str) -> None:
    """Plot FID against IS for :func:`.evaluate.sweep` results, one curve per mode, to ``path``.

    Raises ImportError without matplotlib and OSError when ``path`` cannot be written.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--sweep needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for guided, style in ((False, "o-"), (True, "s-")):
        rs = [r for r in results if guidance_requested(r["config"]["guidance_scale"]) == guided]
        if not rs:
            continue
        label = mode_label(rs[0]["config"]["guidance_scale"], "self-guided (s={:g})")
        ax.plot([r["inception_score"] for r in rs], [r["fid"] for r in rs], style, label=label)
        for r in rs:
            ax.annotate(f"{r['config']['choice_temperature']:g}", (r["inception_score"], r["fid"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    c = results[0]["config"]
    ax.set_xlabel("Inception Score (digits classifier)")
    ax.set_ylabel("FID (digits classifier features)")
    ax.set_title(f"IS-FID trade-off over choice temperature tau0\nT={c['steps']}, n={c['num']}, seed={c['seed']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def captioned(image, lines: list[str], height: int = 40):
    """``image`` (uint8 ``[H, W, 3]``) with a white band of ``height`` pixels above it holding ``lines``
    of text; the image's own pixels are unchanged (they are the band's lower neighbours). Needs matplotlib."""
    import numpy as np

    try:
        import matplotlib
    except ImportError:
        raise ImportError("labelled images need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    width = image.shape[1]
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=9, family="DejaVu Sans")
    canvas.draw()
    band = np.asarray(canvas.buffer_rgba())[:height, :width, :3]
    return np.concatenate([band, image], axis=0)
