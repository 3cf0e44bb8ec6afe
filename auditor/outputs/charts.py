"""Small charts for the report, drawn with matplotlib's Agg canvas (no display, no network).

Readable in grey print: every series has its own marker and line style as well as its
Okabe-Ito colour (Okabe & Ito 2008, a palette that colour-blind readers can tell apart).
"""
from __future__ import annotations

from pathlib import Path

# Okabe-Ito, darkest first so that the first series stay apart in grey; yellow last.
OKABE_ITO = ("#000000", "#E69F00", "#0072B2", "#D55E00", "#009E73", "#56B4E9", "#CC79A7", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
MM = 1 / 25.4


def cascade_chart(trust: dict[str, dict], path: Path) -> Path | None:
    """Mean |Spearman| with the original heatmaps against the cascade step, one line per method
    of the trust gate's results that has a curve; the threshold as a dashed line and the
    decisive step as a vertical line. Writes a PNG (150 dpi, about 120 x 60 mm) at ``path`` and
    returns it; None (and no file) when no method has a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {m: t for m, t in trust.items() if t.get("randomisation_spearman")}
    if not curves:
        return None
    fig = Figure(figsize=(120 * MM, 60 * MM), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.14, 0.2, 0.54, 0.74))
    longest = max(len(t["randomisation_spearman"]) for t in curves.values())
    for k, (name, t) in enumerate(curves.items()):
        y = t["randomisation_spearman"]
        ax.plot(range(1, len(y) + 1), y, color=OKABE_ITO[k % 8], marker=MARKERS[k % 8],
                linestyle=LINESTYLES[k % 4], linewidth=1.2, markersize=3.5,
                label=name + ("" if t.get("reliable") else "\n(not trusted)"))
    for thr in sorted({t["max_spearman"] for t in curves.values() if t.get("max_spearman") is not None}):
        ax.axhline(thr, color="#555555", linestyle=(0, (4, 2)), linewidth=0.9)
        ax.annotate(f"threshold {thr:.2f}", (longest + 0.5, thr), xytext=(-2, 2), textcoords="offset points",
                    fontsize=6, color="#333333", ha="right")
    for d in sorted({t["decisive_step"] for t in curves.values() if t.get("decisive_step") is not None}):
        ax.axvline(d + 1, color="#555555", linestyle="-", linewidth=0.8, alpha=0.8)
        ax.annotate("decided here", (d + 1, 1.0), xytext=(2, -8), textcoords="offset points",
                    fontsize=6, color="#333333")
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(1, longest + 1, max(1, round(longest / 10))))
    ax.set_xlabel("parts of the model randomised, from the top (mean |Spearman|)", fontsize=7)
    ax.set_ylabel("similarity to the\noriginal heatmaps", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=6, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, format="png")
    return path
