"""The report's and the history's charts, as PNG files drawn with matplotlib's Agg canvas (no
display, no network): the confusion matrix, per-class precision and recall with 95% intervals,
and a model family's accuracy and findings over its runs.

Readable in grey print and by colour-blind readers: Okabe-Ito colours (shared with
``auditor.outputs.charts``), and every series also has its own marker, line style or hatching.
Text from the data (class names) is drawn as plain text, never parsed as mathtext. Each function
returns the file it wrote, or None (and no file) when there is nothing to draw.
"""
from __future__ import annotations

from pathlib import Path

from auditor.outputs.charts import LINESTYLES, MARKERS, MM, OKABE_ITO

DPI = 150
BLUE, ORANGE, GREY = "#0072B2", "#E69F00", "#555555"
# One look per severity in every chart: colour, marker, line style (apart in grey print too).
SEVERITY_STYLE = {"critical": (OKABE_ITO[0], "D", "-"), "high": (OKABE_ITO[3], "s", "--"),
                  "medium": (OKABE_ITO[1], "^", "-."), "low": (OKABE_ITO[2], "o", ":"),
                  "info": (OKABE_ITO[5], "v", (0, (1, 1)))}


def _figure(width_mm: float, height_mm: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_mm * MM, height_mm * MM), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """The figure as PNG, cropped to what it draws (long class names widen it, never get cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.04)
    return path


def width_mm(path: Path) -> float:
    """The printed width of a chart written here (its pixels at ``DPI``)."""
    from PIL import Image

    with Image.open(path) as im:
        return round(im.width / DPI * 25.4, 1)


def _name(text: str, most: int = 22) -> str:
    """A class name as a label: cut to ``most`` characters, never read as mathtext."""
    text = " ".join(str(text).split())
    return (text[:most - 1] + "…" if len(text) > most else text) or "(blank)"


def _plain(texts) -> None:
    for t in texts:
        t.set_parse_math(False)


def _wilson(k: int, n: int) -> tuple[float, float]:
    from auditor.outputs.report_words import wilson
    return wilson(k, n)


# --- the run's report, section 2 ------------------------------------------------------------

def confusion_chart(classes: list[str], matrix: list[list[int]], path: Path) -> Path | None:
    """The confusion matrix, rows the true class and columns the prediction: each cell shaded by
    its share of the row (the true class's images) and labelled with its count, and with the share
    too while the cells are big enough (up to 10 classes). Labels turn and the font shrinks as the
    classes grow in number; about 170 mm wide at 20 classes."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    n = len(classes)
    m = np.asarray(matrix, dtype=float) if n else np.zeros((0, 0))
    if n == 0 or m.shape != (n, n):
        return None
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    longest = max(len(_name(c)) for c in classes)
    label_mm = min(34.0, 4 + 1.5 * longest * (7 if n <= 8 else 5.5 if n <= 14 else 4.5) / 7)
    cell = 13.0 if n <= 5 else 10.0 if n <= 10 else 7.0 if n <= 14 else 6.0
    side = cell * n
    width, height = label_mm + side + 24, label_mm + side + 14
    fig = _figure(width, height)
    ax = fig.add_axes(((label_mm + 4) / width, (label_mm + 4) / height, side / width, side / height))
    cmap = LinearSegmentedColormap.from_list("share", ["#FFFFFF", BLUE])
    ax.imshow(share, cmap=cmap, vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    fs = 7 if n <= 5 else 6 if n <= 10 else 5 if n <= 14 else 4
    both = n <= 10
    for i in range(n):
        for j in range(n):
            count = int(m[i, j])
            text = f"{count}\n{share[i, j]:.0%}" if both and rows[i, 0] else str(count)
            ax.text(j, i, text, ha="center", va="center", fontsize=fs, linespacing=1.1,
                    color="white" if share[i, j] > 0.55 else "#1a1a1a", fontweight="bold" if i == j else "normal")
    names = [_name(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=45 if n <= 8 else 90, ha="right" if n <= 8 else "center",
                  rotation_mode="anchor" if n <= 8 else "default", fontsize=fs + 1)
    ax.set_yticks(range(n), names, fontsize=fs + 1)
    _plain([*ax.get_xticklabels(), *ax.get_yticklabels()])
    ax.set_xlabel("predicted class", fontsize=7)
    ax.set_ylabel("true class", fontsize=7)
    ax.set_xticks(np.arange(-.5, n), minor=True)
    ax.set_yticks(np.arange(-.5, n), minor=True)
    ax.grid(which="minor", color="#bbbbbb", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=2)
    cax = fig.add_axes(((label_mm + side + 8) / width, (label_mm + 4) / height, 3 / width, side / height))
    bar = fig.colorbar(ax.images[0], cax=cax)
    bar.set_ticks([0, .5, 1], labels=["0%", "50%", "100%"])
    bar.ax.tick_params(labelsize=5.5)
    bar.set_label("share of the true class's images", fontsize=6)
    return _save(fig, path)


def rates(classes: list[str], matrix: list[list[int]]) -> list[dict]:
    """Per class: precision and recall as (hits, images counted), from the confusion matrix."""
    out = []
    for i, c in enumerate(classes):
        tp = int(matrix[i][i])
        out.append({"class": c, "precision": (tp, int(sum(row[i] for row in matrix))),
                    "recall": (tp, int(sum(matrix[i])))})
    return out


def class_rates_chart(classes: list[str], matrix: list[list[int]], path: Path) -> Path | None:
    """Per class, precision (solid) and recall (hatched) as horizontal bars with their 95% Wilson
    intervals; a class with no image to count gets 'n/a' instead of a bar."""
    n = len(classes)
    if n == 0 or len(matrix) != n or any(len(r) != n for r in matrix):
        return None
    longest = max(len(_name(c)) for c in classes)
    fs = 7 if n <= 10 else 6 if n <= 20 else 5
    label_mm = min(40.0, 4 + longest * 1.45 * fs / 7)
    row_mm = 8.0 if n <= 10 else 6.0 if n <= 20 else 4.5
    plot_h = row_mm * n
    width, height = label_mm + 86, plot_h + 24
    fig = _figure(width, height)
    ax = fig.add_axes(((label_mm + 2) / width, 16 / height, 82 / width, plot_h / height))
    h = 0.36
    for what, colour, hatch, off in (("precision", BLUE, None, -h / 2),
                                    ("recall", ORANGE, "////", h / 2)):
        labelled = False
        for i, r in enumerate(rates(classes, matrix)):
            hits, total = r[what]
            y = i + off
            if total == 0:
                ax.text(0.01, y, "n/a", va="center", fontsize=fs - 1, color=GREY)
                continue
            lo, hi = _wilson(hits, total)
            ax.barh(y, hits / total, height=h, color=colour, edgecolor="#1a1a1a", linewidth=0.4, hatch=hatch,
                    label=None if labelled else what)
            labelled = True
            ax.errorbar(hits / total, y, xerr=[[max(0.0, hits / total - lo)], [max(0.0, hi - hits / total)]], fmt="none",
                        ecolor="#1a1a1a", elinewidth=0.7, capsize=1.5)
    ax.set_yticks(range(n), [_name(c) for c in classes], fontsize=fs)
    _plain(ax.get_yticklabels())
    ax.invert_yaxis()
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xticks([0, .25, .5, .75, 1], ["0%", "25%", "50%", "75%", "100%"], fontsize=6)
    ax.grid(axis="x", color="#dddddd", linewidth=0.5)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlabel("share; the whisker is the 95% interval", fontsize=6.5)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=6.5, frameon=False,
              borderaxespad=0.3)
    return _save(fig, path)


# --- a model family's runs over time (auditor history) --------------------------------------

def _run_axis(ax, labels: list[str], marks: list[tuple[int, str]], top: float) -> None:
    """x: one position per run, in time order, labelled with its date; a dashed vertical line and
    a letter where the data or the settings changed."""
    n = len(labels)
    step = max(1, -(-n // 12))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=5.5, rotation=0 if n <= 6 else 45,
                  ha="center" if n <= 6 else "right", rotation_mode="anchor" if n > 6 else "default")
    ax.set_xlim(-0.5, n - 0.5)
    for x, letter in marks:
        ax.axvline(x - 0.5, color=GREY, linestyle=(0, (2, 2)), linewidth=0.9)
        ax.text(x - 0.5, top, f" {letter}", fontsize=6.5, fontweight="bold", va="top", ha="left", color="#1a1a1a")
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=6)


def accuracy_history(points: list[dict], marks: list[tuple[int, str]], path: Path) -> Path | None:
    """Accuracy per run with its 95% Wilson interval as a band; runs that did not pass their gate
    marked with a cross. ``points``: label, accuracy, lo, hi, passed."""
    if not points:
        return None
    fig = _figure(170, 62)
    ax = fig.add_axes((0.08, 0.25, 0.74, 0.68))
    xs = range(len(points))
    if len(points) > 1:
        ax.fill_between(xs, [p["lo"] for p in points], [p["hi"] for p in points], color=BLUE, alpha=0.18,
                        linewidth=0, label="95% interval")
    else:  # one run: a band needs two; a whisker shows the interval
        p = points[0]
        ax.errorbar([0], [p["accuracy"]], yerr=[[p["accuracy"] - p["lo"]], [p["hi"] - p["accuracy"]]], fmt="none",
                    ecolor=BLUE, elinewidth=6, alpha=0.3, label="95% interval")
    ax.plot(xs, [p["accuracy"] for p in points], color=BLUE, marker="o", markersize=3.5, linewidth=1.2,
            label="accuracy")
    bad = [k for k, p in enumerate(points) if not p["passed"]]
    if bad:
        ax.plot(bad, [points[k]["accuracy"] for k in bad], linestyle="none", marker="X", markersize=6,
                color=OKABE_ITO[3], markeredgecolor="#1a1a1a", markeredgewidth=0.4, label="gate not passed")
    low = min(p["lo"] for p in points)
    bottom = max(0.0, min(0.9, low - 0.05))
    ax.set_ylim(bottom, 1.0)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("accuracy", fontsize=7)
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.5)
    _run_axis(ax, [p["label"] for p in points], marks, 1.0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, frameon=False)
    return _save(fig, path)


def findings_history(labels: list[str], counts: dict[str, list[int]], marks: list[tuple[int, str]],
                     path: Path) -> Path | None:
    """Findings per run, one line per severity (worst first, each with its own colour, marker and
    line style); ``counts``: severity -> one count per run."""
    if not labels:
        return None
    fig = _figure(170, 62)
    ax = fig.add_axes((0.08, 0.25, 0.74, 0.68))
    shown = {s: c for s, c in counts.items() if any(c)} or {"none found": [0] * len(labels)}
    for k, (sev, ys) in enumerate(shown.items()):
        colour, marker, line = SEVERITY_STYLE.get(sev, (OKABE_ITO[k % 8], MARKERS[k % 8], LINESTYLES[k % 4]))
        ax.plot(range(len(ys)), ys, color=colour, marker=marker, markersize=3.5, linestyle=line, linewidth=1.2,
                label=sev)
    top = max(max(ys) for ys in shown.values())
    ax.set_ylim(0, max(1, top) * 1.15 + 0.2)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("findings", fontsize=7)
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.5)
    _run_axis(ax, labels, marks, ax.get_ylim()[1])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, frameon=False, title="severity",
              title_fontsize=6)
    return _save(fig, path)
