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
