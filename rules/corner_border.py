"""corner_border: evidence piled into a corner or along an edge, where watermarks and tags live.

Per image: the share of positive attribution inside each corner square and border strip,
against the share of the image that region covers (its lift). Per predicted class: the class's
mean normalised heatmap, whose mass in each region is compared as a z-score with the same
region in the other classes, so a padding artefact that every class shares does not fire.
"""
from __future__ import annotations

import numpy as np

from auditor.evidence import ClassFinding, Evidence, Finding, grade
from auditor.heatmap import bands, normalise, region_mask
from auditor.registry import RULES

SAMPLE_SEVERITY = {"low": 0.25, "medium": 0.4, "high": 0.6}
CLASS_SEVERITY = {"low": 0.12, "medium": 0.2, "high": 0.35}


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


@RULES.register("corner_border", level="sample+class", needs="heatmaps", direction="higher is more suspicious")
def corner_border(ev: Evidence, band: float = 0.15, min_lift: float = 4.0, z_min: float = 3.0,
                  min_images: int = 5, sample_severity: dict | None = None,
                  class_severity: dict | None = None) -> list:
    """Attribution concentrated in an image corner or border band (watermarks, tags, frames)."""
    sample_severity = sample_severity or SAMPLE_SEVERITY
    class_severity = class_severity or CLASS_SEVERITY
    regions = bands(band)
    findings: dict[tuple, Finding | ClassFinding] = {}
    agree: dict[tuple, list[str]] = {}
    for method in ev.methods:
        ids, maps = ev.explained(method)
        if not ids:
            continue
        maps = normalise(maps)
        masks = {name: region_mask(maps.shape[1:], box) for name, box in regions.items()}
        area = {name: m.mean() for name, m in masks.items()}
        mass = {name: maps[:, m].sum(axis=1) for name, m in masks.items()}        # name -> [N]
        lift = {name: mass[name] / area[name] for name in regions}
        rows = ev.samples.loc[ids]

        # Per image: misclassified images whose evidence sits in one band.
        for k, i in enumerate(ids):
            if rows.at[i, "correct"]:
                continue
            name = max(regions, key=lambda r: lift[r][k])
            sev = grade(float(mass[name][k]), sample_severity) if lift[name][k] >= min_lift else None
            if sev is None:
                continue
            key = ("sample", i, name)
            agree.setdefault(key, []).append(method)
            if key in findings and findings[key].score >= mass[name][k]:
                continue
            findings[key] = Finding(
                sample=i, rule="corner_border", method=method, severity=sev, score=round(float(mass[name][k]), 4),
                bbox=ev.to_file_bbox(i, regions[name]),
                message=(f"{_pct(mass[name][k])} of the evidence for '{ev.classes[rows.at[i, 'prediction']]}' "
                         f"sits in the {name}, which is only {_pct(area[name])} of the image."),
                details={"region": name, "lift": round(float(lift[name][k]), 2)})

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
                if z < z_min or means[c][name] / area[name] < min_lift:
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
    return list(findings.values())
