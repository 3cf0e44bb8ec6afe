"""The report's "How the model sees each class" section: the record's global views (``record.views``)
as pictures in images/ (written once, with the run) and as what the template lays out.

``view_pictures`` writes, per class, its visualisation enlarged and the same with its own
saliency laid over it (the evidence window boxed), and one chart of the probes' curves; the
section itself (``views_context``) reads only the record and those file names, so a run folder
renders again without the model.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from auditor.outputs.overlay import PANEL_PX, overlay, save_picture, thumbnail
from auditor.record import RunRecord, Views

READABLE = 0.9   # a probe's accuracy from which a property counts as readable at a layer group


def _decode(picture: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(picture))).convert("RGB")


def view_pictures(record: RunRecord, images: Path) -> dict:
    """Write the views' pictures into ``images`` (the run's images/ folder); their names, relative
    to the run folder: {"classes": {position: {"picture", "saliency"}}, "probes": {"file", "width_mm"}}."""
    views = record.views
    out: dict = {"classes": {}}
    if views is None or views.state != "ran":
        return out
    for n, v in enumerate(views.classes):
        if not v.picture:
            continue
        base = thumbnail(_decode(v.picture), PANEL_PX)
        heat = np.asarray(v.saliency, np.float32) if v.saliency else np.zeros((1, 1), np.float32)
        out["classes"][n] = {
            "picture": f"images/{save_picture(base, images / f'v{n:03d}-pic').name}",
            "saliency": f"images/{save_picture(overlay(base, heat, [v.region] if v.region else []), images / f'v{n:03d}-sal').name}"}
    if chart := probe_chart(views, images / "probes.png"):
        from auditor.outputs.plots import width_mm
        out["probes"] = {"file": f"images/{chart.name}", "width_mm": width_mm(chart)}
    return out


def _label(p) -> str:
    return "the class" if p.what == "class" else f"the '{p.cls}' cue ({p.rule})"


def probe_chart(views: Views, path: Path) -> Path | None:
    """The probes' held-out accuracy against the layer group, one line per probe; chance dotted."""
    if not views.probes or not views.layers:
        return None
    from auditor.outputs.charts import LINESTYLES, MARKERS, OKABE_ITO
    from auditor.outputs.plots import _figure, _plain, _save
    fig = _figure(120, 55)
    ax = fig.add_axes((0.1, 0.3, 0.55, 0.62))
    xs = range(1, len(views.layers) + 1)
    for k, p in enumerate(views.probes):
        ax.plot(xs, p.accuracy, color=OKABE_ITO[k % 8], marker=MARKERS[k % 8], linestyle=LINESTYLES[k % 4],
                linewidth=1, markersize=3, label=_label(p))
    ax.axhline(READABLE, color="#999999", linestyle=":", linewidth=0.7)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(xs), [f"{k}" for k in xs], fontsize=6)
    ax.set_yticks([0, .25, .5, .75, 1], ["0%", "25%", "50%", "75%", "100%"], fontsize=6)
    ax.set_xlabel("layer group (input side first)", fontsize=6.5)
    ax.set_ylabel("held-out accuracy", fontsize=6.5)
    ax.spines[["top", "right"]].set_visible(False)
    leg = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=6, frameon=False)
    _plain(leg.get_texts())
    return _save(fig, path)


def readable_from(accuracy: list[float], layers: list[str]) -> str:
    """'readable from layer group 2 (features.4) on, with 98% accuracy' or why not."""
    ok = [k for k, a in enumerate(accuracy) if a == a and a >= READABLE]
    best = max((a for a in accuracy if a == a), default=None)
    if best is None:
        return "could not be probed"
    first = next((k for k in ok if all(a >= READABLE for a in accuracy[k:])), None)
    if first is None:
        return f"not readable at {READABLE:.0%} at any layer group (at best {best:.0%})"
    where = "from the first layer group" if first == 0 else f"from layer group {first + 1} ({layers[first]}) on"
    return f"readable {where}, with up to {max(accuracy[first:]):.0%} accuracy"


def _tree_words(name: str, t) -> str:
    if t.reached and t.path_length <= 2:
        return (f"A rule of at most two questions (on average {t.path_length:.1f}) reproduces {t.fidelity:.0%} of "
                f"the model's '{name}' decisions: a very simple decision.")
    if t.reached:
        return (f"A tree of depth {t.depth} reproduces {t.fidelity:.0%} of the model's '{name}' decisions, "
                f"with {t.path_length:.1f} questions per image on average.")
    return (f"No tree tried reproduces 90% of the model's '{name}' decisions (the best, of depth {t.depth}, "
            f"{t.fidelity:.0%}): not a simple rule in these features.")


def views_context(record: RunRecord, pictures: dict) -> dict | None:
    """What the template's views section shows, or None when the run has no views record."""
    views = record.views
    if views is None:
        return None
    if views.state != "ran":
        return {"state": views.state, "reason": views.reason, "classes": [], "probes": []}
    pics = (pictures.get("views") or {}).get("classes", {})
    classes = []
    for n, v in enumerate(views.classes):
        pic = pics.get(n) or pics.get(str(n)) or {}
        classes.append({
            "class": v.cls, "picture": pic.get("picture"), "saliency": pic.get("saliency"),
            "evidence": (f"{v.evidence_share:.0%} of its evidence lies in its strongest small window (boxed); pasted "
                         f"alone onto the other classes' pictures and onto noise, that window made "
                         f"{v.carry_rate:.0%} of them '{v.cls}'." if v.evidence_share is not None else ""),
            "tree": None if v.tree is None else {
                "words": _tree_words(v.cls, v.tree), "fidelity": f"{v.tree.fidelity:.0%}", "depth": v.tree.depth,
                "path_length": f"{v.tree.path_length:.2f}", "decisions": v.tree.decisions, "rules": v.tree.rules}})
    probes = [{"label": _label(p), "images": p.images, "chance": f"{p.chance:.0%}",
               "words": f"{_label(p).capitalize()} is {readable_from(p.accuracy, views.layers)}.",
               "accuracy": [f"{a:.0%}" if a == a else "n/a" for a in p.accuracy]} for p in views.probes]
    return {"state": "ran", "reason": "", "classes": classes, "probes": probes, "layers": views.layers,
            "probe_chart": (pictures.get("views") or {}).get("probes"),
            "apl": None if views.average_path_length is None else f"{views.average_path_length:.2f}",
            "goal": f"{views.fidelity_goal:.0%}", "features": views.features, "seconds": views.seconds}


def key_number(record: RunRecord) -> tuple | None:
    """The global metric for the report's key numbers."""
    v = record.views
    if v is None or v.state != "ran":
        return None
    return ("Decision simplicity", "n/a" if v.average_path_length is None else f"{v.average_path_length:.2f}",
            f"questions per image of a tree that mimics the model ({v.fidelity_goal:.0%} agreement), average over classes")
