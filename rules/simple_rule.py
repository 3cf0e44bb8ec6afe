"""simple_rule: one region's plain features reproduce a class's decisions in one or two steps.

Per class (one against the rest), a decision tree of depth 2 (at most two decisions per image)
is fitted to the model's decisions on the explained images from one region's features alone
(mean colour and its extremes, colourfulness, brightness, contrast and edge density of a cell of a 4 x 4 grid,
the grid moved by half a cell, a quarter of the image, or a corner square; ``auditor.views.tree``:
a mark that straddles two cells lies whole in a moved one, one too large for a cell in a
quarter), and scored held out by its balanced agreement with the model.
When one region does this for at least ``min_fidelity`` of the class's decisions and clearly
better than the typical region (``min_margin``), the class is decided by what lies in that
region: a shortcut stated in one line (a texture that fills the image, which every region
shows alike, does not fire). The region must then pass the place test (``auditor.views.place_test``):
pasted from the class's images onto other classes' images, it carries the class at least
``min_excess`` beyond the class's own content of its size moved there. The intervention then
tests it against random regions of its size, as any class finding.
"""
from __future__ import annotations

import numpy as np

from auditor.judge.evidence import ClassFinding, Evidence, Share, Thresholds, grade
from auditor.registry import RULES
from auditor.views import explained_images, place_details, place_effects, place_said, place_test, soundest
from auditor.views.tree import MIN_DECISIONS, DecisionTreeClassifier, export_text, features, fidelity, one_region, regions

SEVERITY = {"low": 0.9, "medium": 0.95}   # on the one-region tree's held-out fidelity
TIED = 16  # the regions (at most) whose fitted fidelity reaches min_fidelity that are scored held out
# (a mark lies in up to four of the moved cells and the tiling's, a large one in many more; and a
# neighbour of a mark's region can fit better than it, by what the other classes show there)


def _effects(d: dict) -> list[str]:
    out = [f"a two-step rule on the {d['region']} reproduces {d['fidelity']:.0%} of the decisions"] if "fidelity" in d else []
    out += [f"the typical region: {d['typical_fidelity']:.0%}"] if "typical_fidelity" in d else []
    return out + place_effects(d, "region")


def _holding(ev: Evidence, c: int, scored: dict[str, float], boxes: dict, min_fidelity: float,
             min_excess: float) -> tuple[str, dict | None] | None:
    """Of the regions whose held-out fidelity reaches ``min_fidelity``, the one (and its place
    test) that holds what decides the class. One region can tell a class apart without a mark
    there (the class's colour shows in every region; the other classes' mark, by its absence), and
    a mark lies in several regions: the region pasted from the class's images must carry the class
    at least ``min_excess`` beyond the class's own content moved there (``place_test``, as
    class_visualisation's places), and the one that carries it most is the mark's (not the one
    that fits best: a neighbour can, by what the other classes show there). A test that cannot
    run leaves the region to the intervention."""
    tested = [(r, place_test(ev, c, [round(v, 4) for v in boxes[r]], need=min_excess) if ev.model is not None else None)
              for r in scored if scored[r] >= min_fidelity]  # (in the order of their fitted fidelity)
    untested = next((r for r, t in tested if t is None), None)
    return soundest(tested, min_excess) or ((untested, None) if untested else None)


@RULES.register("simple_rule", title="One region's simple features predict the class",
                glossary="A decision tree of at most two questions about one region of the image (its colour, colourfulness, brightness, contrast or edges) reproduces almost all of the model's decisions for a class: the class hinges on that region.",
                effects=_effects, level="class", needs=("model",), direction="higher is more suspicious")
def simple_rule(ev: Evidence, min_fidelity: Share = 0.9, min_margin: Share = 0.15, severity: Thresholds = None,
                min_excess: Share = 0.25) -> list:
    """A class whose decisions a tree of depth 2 on one region's features reproduces, far better than on a typical region."""
    if ev.input_spec is None or len(ev.classes) < 2 or not len(ev.samples) or not ev.samples["explained"].any():
        return []
    severity = severity or SEVERITY
    ids, images = explained_images(ev)
    x, names, where = features(images, shifted=True)
    pred = ev.samples.loc[ids, "prediction"].to_numpy()
    boxes, tiling = regions(shifted=True), regions()  # (the moved cells overlap: a large mark is in many)
    out = []
    for c, name in enumerate(ev.classes):
        y = (pred == c).astype(int)
        if min(y.sum(), len(y) - y.sum()) < MIN_DECISIONS:
            continue
        fitted = one_region(x, y, where)  # fitted and scored on the same images: the regions to test
        typical = float(np.median([fitted[r] for r in tiling]))  # the image's parts, each once
        top = sorted(fitted, key=lambda r: -fitted[r])
        if fitted[top[0]] < min_fidelity or fitted[top[0]] - typical < min_margin:
            continue
        # Neighbouring cells that share a mark fit alike on the images they were fitted to: held out
        # (the score), and the place test (below) says which of them holds it.
        scored = {r: round(fidelity(2, x[:, [k for k, q in enumerate(where) if q == r]], y, 0), 4)
                  for r in top[:TIED] if fitted[r] >= min_fidelity}
        got = _holding(ev, c, scored, boxes, min_fidelity, min_excess)
        if got is None or (sev := grade(scored[got[0]], severity)) is None:
            continue
        best, t = got
        held, box = scored[best], [round(v, 4) for v in boxes[best]]
        cols = [k for k, r in enumerate(where) if r == best]
        tree = DecisionTreeClassifier(max_depth=2, random_state=0, class_weight="balanced").fit(x[:, cols], y)
        text = export_text(tree, feature_names=[names[k] for k in cols], class_names=["other", name], decimals=2)
        n = sum(v >= min_fidelity for v in scored.values())
        tied = f", one of {n} regions that reproduce {min_fidelity:.0%}: the one that carries the class most beyond its own content"
        out.append(ClassFinding(
            cls=name, rule="simple_rule", severity=sev, score=round(held, 4), share=round(float(y.mean()), 4),
            region=box,
            message=(f"Two questions about the {best} alone (its colour, colourfulness, brightness, contrast or edges) "
                     f"reproduce {held:.0%} of the model's decisions for '{name}' (held out"
                     f"{tied if n > 1 and t is not None else ''}), where a "
                     f"typical region reproduces {typical:.0%} even on the images it was fitted to. The model's "
                     f"'{name}' may hinge on what lies in that region."
                     + ("" if t is None else place_said(t, name, "region"))),
            details={"region": best, "fidelity": held, "typical_fidelity": round(typical, 4),
                     "candidate_regions": n,  # the place test chose among them
                     "decisions": int(y.sum()), "images": len(y), "rules": text}
            | place_details(t)))
    return out
