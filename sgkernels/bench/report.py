"""The outputs of ``sgkernels bench``: the table on stdout, ``--json FILE`` and ``--plot FILE.png``."""
from __future__ import annotations

from .._io import write_json

SAMPLER_COLUMNS = ("impl", "batch", "images/s", "ms / batch", "spread", "backbone ms/step", "guide ms/step",
                   "sampling ms/step", "decode ms", "peak extra MB", "speed-up")
DLLM_COLUMNS = ("impl", "batch", "tokens/s", "ms / generation", "spread", "NFE", "forward ms/step",
                "sampling ms/step", "peak extra MB", "speed-up", "greedy agreement")


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _md(columns, cells) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    out = ["| " + " | ".join(columns) + " |", rule]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    return out


def sampler_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        p = r["parts"] or {}
        cells.append([r["impl"], str(r["batch_size"]), f"{r['images_per_s']:.2f}", f"{r['median_ms']:.1f}",
                      f"{100 * r['spread']:.0f}%", _f(p.get("backbone"), ".2f"), _f(p.get("guide"), ".2f"),
                      _f(p.get("sampling"), ".2f"), _f(p.get("decode"), ".1f"), _f(r["peak_mb"], ".0f"),
                      f"{r['speedup']:.2f}x"])
    return "\n".join(_md(SAMPLER_COLUMNS, cells))


def dllm_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        p = r["parts"]
        cells.append([r["impl"], str(r["batch_size"]), f"{r['tokens_per_s']:.1f}", f"{r['median_ms']:.1f}",
                      f"{100 * r['spread']:.0f}%", str(r["nfe"]), f"{p['forward']:.2f}", f"{p['sampling']:.2f}",
                      _f(r["peak_mb"], ".0f"), f"{r['speedup']:.2f}x", f"{100 * r['greedy_agreement']:.1f}%"])
    return "\n".join(_md(DLLM_COLUMNS, cells))


def save_json(path: str, command: str, machine: dict, settings: dict, rows: list[dict], **extra) -> None:
    """``{"command", "machine", "settings", "rows", ...extra}``, written atomically."""
    write_json(path, dict(command=command, machine=machine, settings=settings, rows=rows, **extra))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {"backbone": "#4C72B0", "guide": "#55A868", "sampling": "#C44E52", "decode": "#8172B2",
           "forward": "#4C72B0"}


def _stacked(path, groups, parts, unit, title, note):
    """``groups``: [(group label, [(bar label, {part: value})])]: one stacked bar per implementation, grouped."""
    plt = _pyplot()
    n = sum(len(bars) for _, bars in groups)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * n + 2.2), 4.6), dpi=100)
    x, xticks, xlabels = 0.0, [], []
    for glabel, bars in groups:
        for blabel, values in bars:
            bottom = 0.0
            for part in parts:
                v = values.get(part) or 0.0
                ax.bar(x, v, 0.7, bottom=bottom, color=_COLORS[part], label=part if not xticks else None)
                bottom += v
            label = f"{bottom:.0f}" if bottom >= 100 else f"{bottom:.3g}"
            ax.text(x, bottom, label, ha="center", va="bottom", fontsize=7)
            xticks.append(x)
            xlabels.append(f"{blabel}\n{glabel}")
            x += 1.0
        x += 0.5
    ax.set_xticks(xticks, xlabels, fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, note, fontsize=6, color="#555555", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)


_SHORT = {"official loop (eager step)": "official loop", "sgkernels + CUDA graph": "sgkernels\n+ CUDA graph"}


def sampler_plot(path: str, rows: list[dict], machine_line: str) -> None:
    """Stacked bars: ms per image in backbone / guide / sampling / decode, stock against fused, per batch size."""
    groups = {}
    for r in rows:
        if r["parts"] is None:
            continue
        p, b, t = r["parts"], r["batch_size"], r["steps"]
        values = {"backbone": p["backbone"] * t / b, "guide": p["guide"] * t / b, "sampling": p["sampling"] * t / b,
                  "decode": p["decode"] / b}
        groups.setdefault(f"batch {b}", []).append((_SHORT.get(r["impl"], r["impl"]), values))
    _stacked(path, list(groups.items()), ("backbone", "guide", "sampling", "decode"), "ms per image",
             "sgkernels bench sampler: where the time goes", machine_line)


def dllm_plot(path: str, rows: list[dict], gen_length: int, machine_line: str) -> None:
    """Stacked bars: ms per generated token in model forward / sampling, upstream against drop-in, per batch size."""
    groups = {}
    for r in rows:
        p, n = r["parts"], r["batch_size"] * gen_length
        values = {"forward": p["forward"] * r["nfe"] / n, "sampling": p["sampling"] * r["nfe"] / n}
        groups.setdefault(f"batch {r['batch_size']}", []).append((r["impl"].replace(" (", "\n("), values))
    _stacked(path, list(groups.items()), ("forward", "sampling"), "ms per generated token",
             "sgkernels bench dllm: where the time goes", machine_line)


def ops_plot(path: str, rows: list[dict], machine_line: str) -> None:
    """Horizontal bars: each anchor's time over sgkernels' (log scale), per op and shape."""
    plt = _pyplot()
    ours = {(r["op"], r["shape"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "sgkernels"}
    bars = [(f"{r['op']} {r['shape']}\nvs {r['impl']}", r["ms"] / ours[(r["op"], r["shape"], r["dtype"])])
            for r in rows if r["impl"] != "sgkernels" and (r["op"], r["shape"], r["dtype"]) in ours]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.32 * max(len(bars), 1)), dpi=100)
    ax.barh(range(len(bars)), [v for _, v in bars], color=["#C44E52" if v >= 1 else "#8C8C8C" for _, v in bars])
    ax.set_yticks(range(len(bars)), [k for k, _ in bars], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("anchor time / sgkernels time (> 1: sgkernels faster)")
    ax.set_title("sgkernels bench ops", fontsize=10)
    fig.text(0.01, 0.005, machine_line, fontsize=6, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
