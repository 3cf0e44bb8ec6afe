"""corner_border: evidence piled into a corner or along an edge, where watermarks and tags live.

Per misclassified image, two questions (see REFERENCES, "Which output to explain"): why the
predicted class (its heatmap), and why not the true class (the contrast heatmap, for the true
class). A cue can act either way: a tag that adds evidence for the wrong class, or a decoy
whose shade takes evidence away from the right one. For each map, each corner square and
border strip is scored by its lift (its share of the evidence over its share of the image)
and by how much it stands out from the rest of the image's frame (its evidence density over
the density of the other corners and borders); a region must pass both, so a texture that
fills the whole frame does not fire, nor does a corner that holds a little evidence in an
otherwise empty frame. One finding per image: the region that stands out most in the
predicted class's maps, or, when those show nothing in the frame, in the true class's. Its box
is the evidence, not the region: the connected evidence region holding the map's peak there,
grown to the object the image shows (a tag wider than the corner square is boxed whole); the
region names where it sits, and is the interventions' last resort.
Per predicted class: the class's mean normalised heatmap, whose mass
in each region is compared as a z-score with the same region in the other classes, so a
padding artefact that every class shares does not fire.
"""
from __future__ import annotations

import numpy as np

from auditor.judge.evidence import Band, ClassFinding, Count, Evidence, Finding, NonNegative, Positive, Share, Thresholds, grade
from auditor.explain.heatmap import bands, normalise, region_mask
from auditor.registry import RULES

SAMPLE_SEVERITY = {"low": 2.0, "medium": 4.0, "high": 8.0}   # on the region's lift
CLASS_SEVERITY = {"low": 0.12, "medium": 0.2, "high": 0.35}


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _frame_scores(maps: np.ndarray, masks: dict[str, np.ndarray], floor: float) -> dict[str, tuple]:
    """Per region: (mass [N], lift [N], standout [N]) for normalised maps [N, h, w]."""
    frame = np.zeros(maps.shape[1:], bool)
    for m in masks.values():
        frame |= m
    out = {}
    for name, m in masks.items():
        mass = maps[:, m].sum(axis=1)
        rest = frame & ~m
        rest_density = maps[:, rest].sum(axis=1) / rest.mean() if rest.any() else np.zeros(len(maps))
        lift = mass / m.mean()
        out[name] = (mass, lift, lift / (rest_density + floor))
    return out


def _effects(d: dict) -> list[str]:
    return [f"evidence {d['lift']:.0f}× denser in the region than on average"] if "lift" in d else []


@RULES.register("corner_border", title='Mark in a corner or along an edge',
                glossary='Watermarks, scanner frames and printed tags live there; a model that looks there has probably learned the mark rather than the object.',
                effects=_effects, each_image=True, level="sample+class", needs=("heatmaps",), direction="higher is more suspicious")
def corner_border(ev: Evidence, band: Band = 0.15, min_lift: NonNegative = 2.0, min_standout: Positive | None = None,
                  min_mass: Share | None = None, standout_floor: NonNegative = 0.3, class_min_lift: Positive = 4.0,
                  z_min: float = 3.0, min_images: Count = 5, sample_severity: Thresholds = None,
                  class_severity: Thresholds = None) -> list:
    """Evidence piled into a corner of the image or along an edge, where watermarks, tags and frames sit."""
    # One knob for the per-image test: unless given, the region must also stand out from the
    # rest of the frame 2x min_lift times and hold min_lift/40 of the evidence (4 and 5 % at 2).
    min_standout = 2 * min_lift if min_standout is None else min_standout
    min_mass = min_lift / 40 if min_mass is None else min_mass
    sample_severity = sample_severity or SAMPLE_SEVERITY
    class_severity = class_severity or CLASS_SEVERITY
    regions = bands(band)
    findings: dict[tuple, ClassFinding] = {}
    agree: dict[tuple, list[str]] = {}
    candidates: dict[int, list[tuple]] = {}   # sample -> (standout, lift, mass, region, method, target)
    for method in ev.methods:
        ids, maps = ev.explained(method)
        if not ids:
            continue
        maps = normalise(maps, copy=False)
        masks = {name: region_mask(maps.shape[1:], box) for name, box in regions.items()}
        area = {name: m.mean() for name, m in masks.items()}
        mass = {name: maps[:, m].sum(axis=1) for name, m in masks.items()}        # name -> [N]
        rows = ev.samples.loc[ids]

        # Per image: misclassified images whose evidence for P (or against T) sits in one band.
        wrong = [k for k, i in enumerate(ids) if not rows.at[i, "correct"]]
        maps_by_target = {"pred": (wrong, maps[wrong])}
        if method in ev.contrast:
            c_ids, c_maps = ev.explained(method, "contrast")
            pos = {i: k for k, i in enumerate(ids)}
            keep = [j for j, i in enumerate(c_ids) if i in pos]
            maps_by_target["true"] = ([pos[c_ids[j]] for j in keep], normalise(c_maps[keep], copy=False))
        for target, (ks, tmaps) in maps_by_target.items():
            if not ks:
                continue
            scores = _frame_scores(tmaps, masks, standout_floor)
            for n, k in enumerate(ks):
                i = ids[k]
                ok = [r for r in regions if scores[r][1][n] >= min_lift and scores[r][2][n] >= min_standout
                      and scores[r][0][n] >= min_mass]
                if not ok:
                    continue
                name = max(ok, key=lambda r: scores[r][2][n])
                m_, lift, standout = (float(v[n]) for v in scores[name])
                candidates.setdefault(i, []).append((standout, lift, m_, name, method, target))

        # Per class: the class-mean heatmap against the other classes, region by region.
        preds = rows["prediction"].to_numpy()
        classes = [c for c in np.unique(preds) if (preds == c).sum() >= min_images]
        if len(classes) < 3:
            continue  # a z-score against one other class says nothing
        means = {c: {name: float(mass[name][preds == c].mean()) for name in regions} for c in classes}
        for c in classes:
            best = None
            for name in regions:
                others = np.array([means[o][name] for o in classes if o != c])
                # The floor keeps a near-constant background from turning noise into a large z.
                z = (means[c][name] - others.mean()) / max(others.std(ddof=1) if len(others) > 1 else 0, 0.02)
                if z < z_min or means[c][name] / area[name] < class_min_lift:
                    continue
                if best is None or means[c][name] / area[name] > best[1]:
                    best = (name, means[c][name] / area[name], z, float(others.mean()))
            if best is None:
                continue
            name, class_lift, z, other_mass = best
            sev = grade(means[c][name], class_severity)
            if sev is None:
                continue
            in_class = preds == c
            share = float(((mass[name] >= 0.5 * means[c][name]) & in_class).sum() / in_class.sum())
            key = ("class", int(c), name)
            agree.setdefault(key, []).append(method)
            if key in findings and findings[key].score >= means[c][name]:
                continue
            n = int(in_class.sum())
            findings[key] = ClassFinding(
                cls=ev.classes[c], rule="corner_border", method=method, severity=sev,
                score=round(means[c][name], 4), share=round(share, 4), region=list(regions[name]),
                message=(f"When the model says '{ev.classes[c]}', {_pct(means[c][name])} of its evidence on average "
                         f"comes from the {name}, which is {_pct(area[name])} of the image "
                         f"(other classes: {_pct(other_mass)}); {round(share * n)} of {n} such images show this. "
                         f"The model may be reading a mark printed there, such as a watermark, "
                         f"instead of the object."),
                details={"region": name, "lift": round(class_lift, 2), "z": round(float(z), 2),
                         "other_classes_mass": round(other_mass, 4), "images": n})
    for key, f in findings.items():
        f.details["methods_agreeing"] = sorted(set(agree[key]))
    return [*(_sample_finding(ev, i, c, regions, sample_severity) for i, c in candidates.items()),
            *findings.values()]


def _sample_finding(ev: Evidence, i: int, found: list[tuple], regions: dict, severity: dict) -> Finding:
    """One finding per image: the region that stands out most, with every map that agrees on it.

    The predicted class's maps come first: "why not the true class?" is asked only of images
    whose evidence for the predicted class shows nothing in the frame (a decoy that works by
    taking evidence away). On a max-pooled network a class map is a single point wherever the
    class's strongest detector fires, so the true class's point in a corner means little when
    the prediction's own evidence sits elsewhere in the frame."""
    own = [c for c in found if c[5] == "pred"]
    standout, lift, mass, name, method, target = max(own or found)
    rows = ev.samples
    pred, true = ev.classes[rows.at[i, "prediction"]], ev.classes[rows.at[i, "label"]]
    what = (f"of the evidence for '{pred}'" if target == "pred" else
            f"of what decides against the true class '{true}'")
    area = (regions[name][2] - regions[name][0]) * (regions[name][3] - regions[name][1])
    # The box is the evidence (and the object the image shows there), not the band: the band
    # only says where it sits.
    heat = (ev.heatmaps if target == "pred" else ev.contrast)[method][i]
    boxes = ev.boxes(i, heat, regions[name])
    return Finding(
        sample=i, rule="corner_border", method=method, severity=grade(lift, severity) or "low",
        score=round(lift, 4), bbox=ev.to_file_bbox(i, boxes[0]),
        message=(f"{_pct(mass)} {what} sits in the {name}, which is only {_pct(area)} of the image "
                 f"({lift:.1f} times its share, {standout:.1f} times as dense as the rest of the image's edges)."),
        details={"region": name, "region_box": list(regions[name]), "candidate_boxes": [list(b) for b in boxes],
                 "target": target, "mass": round(mass, 4), "lift": round(lift, 2),
                 "standout": round(standout, 2), "true_class": true,
                 "methods_agreeing": sorted({f"{m} ({'predicted' if t == 'pred' else 'true'} class)"
                                             for _, _, _, r, m, t in found if r == name})})
