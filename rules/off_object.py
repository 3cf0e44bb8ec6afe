"""off_object: when the data says where the object is (mask or box), is the evidence on it?

Relevance mass accuracy (mask) and the energy-based pointing game (box) are the same number:
the share of the positive attribution that lies on the object. A misclassified image whose
evidence lies mostly off the object is flagged, with the box of the strongest evidence off it;
a class whose images' evidence lies mostly off their objects is flagged at class level.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from auditor.inputs.data import input_view, to_input_mask
from auditor.judge.evidence import ClassFinding, Count, Evidence, Finding, Share, Thresholds, grade
from auditor.explain.heatmap import normalise, region_mask
from auditor.registry import RULES

SAMPLE_SEVERITY = {"low": 0.0, "medium": 0.5}


def object_mask(ev: Evidence, i: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The object's mask or box, from the file's pixels into the model input's (through its crop);
    None where there is none, or the crop kept all of it from the model."""
    ref = ev.refs[i]
    v = input_view((ev.samples.at[i, "width"], ev.samples.at[i, "height"]), ev.input_spec)
    if ref.mask is not None:
        try:
            with Image.open(ref.mask) as m:
                mask = to_input_mask(m, v, shape)
        except (OSError, ValueError):
            return None
        return mask if mask.any() else None
    if ref.bbox is not None:
        x0, y0, x1, y1 = v.to_input(ref.bbox)
        return region_mask(shape, (x0, y0, x1, y1)) if x0 < x1 and y0 < y1 else None
    return None


def strongest_off(heat: np.ndarray, mask: np.ndarray) -> list[float]:
    """Fractional box of the strongest connected evidence outside the object."""
    off = np.where(mask, 0, heat)
    blobs, _ = ndimage.label(off >= 0.5 * off.max())
    peak = blobs[np.unravel_index(np.argmax(off), off.shape)]
    ys, xs = np.nonzero(blobs == peak)
    h, w = heat.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


def _off_boxes(ev: Evidence, i: int, heat: np.ndarray, mask: np.ndarray) -> list:
    """Candidate boxes of the strongest evidence off the object, best first: the thing image i
    shows there, then the evidence region itself."""
    return ev.boxes(i, np.where(mask, 0, heat), None) or [strongest_off(heat, mask)]


def _effects(d: dict) -> list[str]:
    if "on_object" in d:
        return [f"on the object: {d['on_object']:.0%} of the evidence (the object covers "
                f"{d.get('object_area', 0):.0%} of the image)"]
    return [f"on the object: {d['on_object_mean']:.0%} of the evidence on average"] if "on_object_mean" in d else []


@RULES.register("off_object", title='Evidence off the object',
                glossary='It needs object masks or boxes in the data; evidence outside them means the model decides from the background or the context.',
                effects=_effects, level="sample+class", needs=("heatmaps", "masks"), direction="lower is more suspicious")
def off_object(ev: Evidence, min_on_object: Share = 0.4, class_min_on_object: Share = 0.5,
               min_images: Count = 5, sample_severity: Thresholds = None) -> list:
    """Evidence that lies outside the object the data marks (its mask or box)."""
    sample_severity = sample_severity or SAMPLE_SEVERITY
    if not any(r.mask is not None or r.bbox is not None for r in ev.refs):
        return []  # nothing to compare with: the rule does not apply to this data set
    out: dict = {}
    s = ev.samples
    masks: dict[int, np.ndarray | None] = {}  # read once: every method's maps share one resolution
    for method in ev.methods:
        ids, maps = ev.explained(method)
        maps = normalise(maps, copy=False)
        on = {}
        for i, heat in zip(ids, maps):
            if i not in masks:
                masks[i] = object_mask(ev, i, heat.shape)
            mask = masks[i]
            if mask is None or not mask.any() or heat.sum() <= 0:
                continue
            on[i] = float(heat[mask].sum())
            if s.at[i, "correct"] or on[i] >= min_on_object:
                continue
            score = round(1 - on[i], 4)  # share of evidence off the object
            if i in out and out[i].score >= score:
                continue
            pred = ev.classes[s.at[i, "prediction"]]
            boxes = _off_boxes(ev, i, heat, mask)
            out[i] = Finding(sample=i, rule="off_object", method=method, score=score,
                             severity=grade(1 - on[i] / min_on_object, sample_severity) or "low",
                             bbox=ev.to_file_bbox(i, boxes[0]),
                             message=(f"Only {on[i]:.0%} of the evidence for '{pred}' lies on the annotated "
                                      f"object ({mask.mean():.0%} of the image); the rest comes from around it."),
                             details={"on_object": round(on[i], 4), "object_area": round(float(mask.mean()), 4),
                                      "candidate_boxes": [list(map(float, b)) for b in boxes]})
        by_class: dict[int, list[float]] = {}
        for i, v in on.items():
            by_class.setdefault(int(s.at[i, "prediction"]), []).append(v)
        for c, values in by_class.items():
            mean = float(np.mean(values))
            if len(values) < min_images or mean >= class_min_on_object:
                continue
            key = ("class", c)
            if key in out and out[key].score >= 1 - mean:
                continue
            out[key] = ClassFinding(
                cls=ev.classes[c], rule="off_object", method=method, score=round(1 - mean, 4),
                share=round(float(np.mean(np.array(values) < min_on_object)), 4),
                severity="medium" if mean < class_min_on_object / 2 else "low",
                message=(f"When the model says '{ev.classes[c]}', on average only {mean:.0%} of its evidence lies "
                         f"on the annotated object; it may be using the background or context instead."),
                details={"on_object_mean": round(mean, 4), "images": len(values)})
    return list(out.values())
