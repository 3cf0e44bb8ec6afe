"""look_alike: a misclassified image whose evidence is a thing that looks like another class's mark.

The rectangle case: a model trained to find white rectangles calls any bright compact blob a
rectangle. For a misclassified image, the highlighted region is segmented (threshold the
heatmap, keep the strongest connected component, then separate the object from its
surroundings inside that window) and described by regionprops (extent, solidity,
eccentricity, size, brightness and colour contrast). The same is done for correctly classified
images of the predicted class; the image is flagged when its evidence is a distinct object
that falls within the range of that class's own evidence objects.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from auditor.data import read_image
from auditor.evidence import Evidence, Finding, grade
from auditor.heatmap import normalise
from auditor.registry import RULES

FEATURES = ("extent", "solidity", "eccentricity", "size", "contrast", "saturation")
SEVERITY = {"low": 0.0, "medium": 0.5}


def evidence_object(img: np.ndarray, heat: np.ndarray, level: float = 0.5) -> dict | None:
    """Segment the object under the heatmap's strongest blob in ``img`` (float [h, w, 3] in [0, 1])."""
    h, w = img.shape[:2]
    heat = ndimage.zoom(heat, (h / heat.shape[0], w / heat.shape[1]), order=1)
    heat = ndimage.gaussian_filter(heat, max(h, w) / 64)
    if heat.max() <= 0:
        return None
    blobs = label(heat >= level * heat.max())
    peak = blobs[np.unravel_index(np.argmax(heat), heat.shape)]
    ys, xs = np.nonzero(blobs == peak)
    pad = max(h, w) // 16
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)
    window = img[y0:y1, x0:x1]
    grey = window.mean(axis=2)
    if grey.max() - grey.min() < 0.1:
        return None  # nothing distinct to segment
    # The object is the side of the Otsu split that the heatmap peak lies on.
    fg = grey > threshold_otsu(grey)
    py, px = np.unravel_index(np.argmax(heat[y0:y1, x0:x1]), grey.shape)
    parts = label(fg if fg[py, px] else ~fg)
    pick = parts[py, px]
    if pick == 0:
        return None
    obj = parts == pick
    props = regionprops(obj.astype(np.uint8))[0]
    inside, outside = window[obj], window[~obj]
    if len(outside) == 0:
        return None
    by0, bx0, by1, bx1 = props.bbox
    return {"extent": float(props.extent), "solidity": float(props.solidity),
            "eccentricity": float(props.eccentricity), "size": float(obj.sum() / (h * w)),
            "contrast": float(inside.mean() - outside.mean()),
            "saturation": float((inside.max(1) - inside.min(1)).mean()),
            "bbox": [(bx0 + x0) / w, (by0 + y0) / h, (bx1 + x0) / w, (by1 + y0) / h]}


def compact(f: dict) -> bool:
    """A distinct solid object (a rectangle, a disc, a blob), not a stretch of texture."""
    return f["solidity"] >= 0.85 and f["extent"] >= 0.5


def describe(f: dict, plural: bool = False) -> str:
    tone = "bright" if f["contrast"] > 0.1 else "dark" if f["contrast"] < -0.1 else "faint"
    if f["extent"] > 0.88 and f["solidity"] > 0.95:
        shape = "rectangles" if plural else "rectangle"
    elif compact(f):
        shape = "rounded blobs" if plural else "rounded blob"
    else:
        shape = "irregular patches" if plural else "irregular patch"
    return f"{tone} {shape}"


def _vector(f: dict) -> np.ndarray:
    return np.array([f[k] for k in FEATURES])


@RULES.register("look_alike", level="sample", needs="heatmaps", direction="lower distance is more suspicious")
def look_alike(ev: Evidence, min_examples: int = 5, max_distance: float = 2.5, min_contrast: float = 0.15,
               max_size: float = 0.3, severity: dict | None = None) -> list:
    """A misclassified image's evidence is an object shaped like the predicted class's usual evidence."""
    severity = severity or SEVERITY
    s = ev.samples
    images: dict[int, np.ndarray] = {}

    def pixels(i: int) -> np.ndarray:
        if i not in images:
            images[i] = np.asarray(read_image(ev.refs[i].path).convert("RGB"), np.float32) / 255.0
        return images[i]

    findings: dict[int, Finding] = {}
    for method in ev.methods:
        ids, maps = ev.explained(method)
        maps = normalise(maps)
        heat = dict(zip(ids, maps))
        wrong = [i for i in ids if not s.at[i, "correct"]]
        for cls in sorted({int(s.at[i, "prediction"]) for i in wrong}):
            refs = [i for i in ids if s.at[i, "correct"] and s.at[i, "prediction"] == cls]
            objs = [o for o in (evidence_object(pixels(i), heat[i]) for i in refs) if o is not None]
            distinct = [o for o in objs if abs(o["contrast"]) >= min_contrast and o["size"] <= max_size
                        and compact(o)]
            # The class must have a consistent evidence object to be mistaken for; texture classes don't.
            if len(distinct) < min_examples or len(distinct) < 0.6 * len(objs):
                continue
            ref = np.stack([_vector(o) for o in distinct])
            centre, spread = ref.mean(0), ref.std(0) + 0.05
            typical = describe({k: float(np.median([o[k] for o in distinct])) for k in FEATURES}, plural=True)
            for i in (i for i in wrong if s.at[i, "prediction"] == cls):
                o = evidence_object(pixels(i), heat[i])
                if o is None or abs(o["contrast"]) < min_contrast or o["size"] > max_size or not compact(o):
                    continue
                dist = float(np.sqrt((((_vector(o) - centre) / spread) ** 2).mean()))
                if dist > max_distance:
                    continue
                score = round(1 - dist / max_distance, 4)  # 1 = identical to the class's typical evidence
                if i in findings and findings[i].score >= score:
                    findings[i].details["methods_agreeing"].append(method)
                    continue
                agreeing = findings[i].details["methods_agreeing"] + [method] if i in findings else [method]
                name = ev.classes[cls]
                findings[i] = Finding(
                    sample=i, rule="look_alike", method=method, severity=grade(score, severity) or "low",
                    score=score, bbox=ev.to_file_bbox(i, o["bbox"]),
                    message=(f"The model's evidence here is a {describe(o)}, and it resembles the {typical} "
                             f"that mark class '{name}' in correctly classified images; the model may take "
                             f"anything of that shape for '{name}'."),
                    details={"distance": round(dist, 3), "features": {k: round(o[k], 3) for k in FEATURES},
                             "class_typical": {k: round(float(c), 3) for k, c in zip(FEATURES, centre)},
                             "class_examples": len(distinct), "methods_agreeing": agreeing})
    for f in findings.values():
        f.details["methods_agreeing"] = sorted(set(f.details["methods_agreeing"]))
    return list(findings.values())
