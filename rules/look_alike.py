"""look_alike: a misclassified image whose evidence is a thing that looks like another class's mark.

The rectangle case: a model trained to find white rectangles calls any bright compact blob a
rectangle. For a misclassified image, the highlighted region is segmented (threshold the
heatmap, keep the strongest connected component, then separate the object from its
surroundings inside that window) and described by regionprops (extent, solidity,
eccentricity, size, brightness and colour contrast). The same is done for correctly classified
images of the predicted class; the image is flagged when its evidence is a distinct object
that falls within the range of that class's own evidence objects, and outside the range of
the true class's (an object that looks like both is the object itself, read as a near
neighbour: a 4 taken for a 9). A class that several look-alikes were taken for gets a class
finding listing them; the intervention confirms it when most of them were confirmed. It
reaches 'medium' only when the model calls most look-alikes that class: each image of the
other classes is searched for one where its saliency for the class points, and a clean model
that confuses a few borderline shapes (each of its errors looks alike, and carries its shape
to other images) calls most of them by their own class.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from auditor.judge.evidence import ClassFinding, Count, Evidence, Finding, NonNegative, Positive, Share, Thresholds, grade
from auditor.explain.heatmap import normalise, outlined
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
    grey = img[y0:y1, x0:x1].mean(axis=2)
    if grey.max() - grey.min() < 0.1:
        return None  # nothing distinct to segment
    # The object is the side of the Otsu split that the heatmap peak lies on.
    t = threshold_otsu(grey)
    py, px = np.unravel_index(np.argmax(heat), heat.shape)
    bright = bool(img[py, px].mean() > t)
    found = _segment(img, (y0, y1, x0, x1), t, bright, (py, px))
    if found is not None and not found[1]:
        # Cut by the window: look again in a window as large again on every side. A whole
        # object (a blob bigger than the heat's peak) ends there; a stroke or a texture runs on.
        grow = max(ys.max() - ys.min() + pad, max(h, w) // 4)
        wide = (max(y0 - grow, 0), min(y1 + grow, h), max(x0 - grow, 0), min(x1 + grow, w))
        wide_grey = img[wide[0]:wide[1], wide[2]:wide[3]].mean(axis=2)
        again = _segment(img, wide, threshold_otsu(wide_grey), bright, (py, px))
        if again is not None and again[1]:
            found = again
    if found is None:
        return None
    obj, whole, (y0, y1, x0, x1) = found
    window = img[y0:y1, x0:x1]
    props = regionprops(obj.astype(np.uint8))[0]
    inside, outside = window[obj], window[~obj]
    if len(outside) == 0:
        return None
    by0, bx0, by1, bx1 = props.bbox
    box = [(bx0 + x0) / w, (by0 + y0) / h, (bx1 + x0) / w, (by1 + y0) / h]
    # The box is the whole mark: the side of the split the peak lies on may be a drawn outline's
    # inside (a ring's bright inside without its dark line), so it is grown by that outline.
    box = [float(v) for v in outlined(img, box)]
    return {"extent": float(props.extent), "solidity": float(props.solidity), "whole": whole,
            "eccentricity": float(props.eccentricity), "size": float(obj.sum() / (h * w)),
            "contrast": float(inside.mean() - outside.mean()),
            "saturation": float((inside.max(1) - inside.min(1)).mean()),
            "bbox": box}


def _segment(img: np.ndarray, box, t: float, bright: bool, peak) -> tuple | None:
    """(object mask in the window, whether it is whole, the window) for the connected part of the
    threshold's ``bright`` side that holds ``peak``. Whole: it ends inside the window (or at the
    image's edge); one that runs into the window's inner edges continues beyond it."""
    y0, y1, x0, x1 = box
    h, w = img.shape[:2]
    grey = img[y0:y1, x0:x1].mean(axis=2)
    parts = label(grey > t if bright else grey <= t)
    pick = parts[peak[0] - y0, peak[1] - x0]
    if pick == 0:
        return None
    obj = parts == pick
    ys, xs = np.nonzero(obj)
    cut = ((ys.min() == 0 and y0 > 0) or (xs.min() == 0 and x0 > 0) or
           (ys.max() == obj.shape[0] - 1 and y1 < h) or (xs.max() == obj.shape[1] - 1 and x1 < w))
    return obj, not cut, box


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


def _typical(objs: list[dict], min_examples: int, min_contrast: float, max_size: float):
    """(centre, spread, distinct objects) of a class's evidence objects, or None when the class has
    no consistent one (a texture class does not)."""
    distinct = [o for o in objs if abs(o["contrast"]) >= min_contrast and o["size"] <= max_size and compact(o)]
    if len(distinct) < min_examples or len(distinct) < 0.6 * len(objs):
        return None
    ref = np.stack([_vector(o) for o in distinct])
    return ref.mean(0), ref.std(0) + 0.05, distinct


def _distance(o: dict, typical) -> float:
    centre, spread, _ = typical
    return float(np.sqrt((((_vector(o) - centre) / spread) ** 2).mean()))


def _effects(d: dict) -> list[str]:
    return [f"shape {d['distance']:.1f} spreads from the class's usual evidence (0: the same)"] if "distance" in d else []


@RULES.register("look_alike", title="Looks like the class's usual evidence",
                glossary='It catches a model that takes any object of the right shape (a bright blob, a rectangle) for the mark it learned for a class.',
                effects=_effects, level="sample+class", needs=("heatmaps",), direction="lower distance is more suspicious")
def look_alike(ev: Evidence, min_examples: Count = 5, max_distance: Positive = 2.5, min_contrast: NonNegative = 0.15,
               max_size: Share = 0.3, min_class_images: Count = 5, class_min_share: Share = 0.5,
               population: Count = 512, severity: Thresholds = None) -> list:
    """A misclassified image's evidence is an object shaped like the predicted class's usual evidence."""
    severity = severity or SEVERITY
    s = ev.samples
    findings: dict[int, Finding] = {}
    for method in ev.methods:
        ids, maps = ev.explained(method)
        maps = normalise(maps, copy=False)
        heat = dict(zip(ids, maps))
        wrong = [i for i in ids if not s.at[i, "correct"]]
        typical: dict[int, tuple | None] = {}

        def class_typical(cls: int):
            if cls not in typical:
                refs = [i for i in ids if s.at[i, "correct"] and s.at[i, "prediction"] == cls]
                objs = [o for o in (evidence_object(ev.seen_pixels(i), heat[i]) for i in refs) if o is not None]
                typical[cls] = _typical(objs, min_examples, min_contrast, max_size)
            return typical[cls]

        for i in wrong:
            cls, true = int(s.at[i, "prediction"]), int(s.at[i, "label"])
            pred_typ = class_typical(cls)
            # The class must have a consistent evidence object to be mistaken for; texture classes don't.
            if pred_typ is None:
                continue
            o = evidence_object(ev.seen_pixels(i), heat[i])
            if not looks_alike(o, pred_typ, max_distance, min_contrast, max_size):
                continue
            dist = _distance(o, pred_typ)
            # A mark that also looks like the true class's own evidence is the object itself, read
            # as a near neighbour (a 4 taken for a 9), not a look-alike of another class's mark.
            true_typ = class_typical(true)
            if true_typ is not None and _distance(o, true_typ) <= max_distance:
                continue
            score = round(1 - dist / max_distance, 4)  # 1 = identical to the class's typical evidence
            if i in findings and findings[i].score >= score:
                findings[i].details["methods_agreeing"].append(method)
                continue
            agreeing = findings[i].details["methods_agreeing"] + [method] if i in findings else [method]
            name = ev.classes[cls]
            typ = describe({k: float(np.median([d[k] for d in pred_typ[2]])) for k in FEATURES}, plural=True)
            findings[i] = Finding(
                sample=i, rule="look_alike", method=method, severity=grade(score, severity) or "low",
                score=score, bbox=ev.to_file_bbox(i, o["bbox"]),
                message=(f"The model's evidence here is a {describe(o)}, and it resembles the {typ} "
                         f"that mark class '{name}' in correctly classified images; the model may take "
                         f"anything of that shape for '{name}'."),
                details={"distance": round(dist, 3), "features": {k: round(o[k], 3) for k in FEATURES},
                         "class_typical": {k: round(float(c), 3) for k, c in zip(FEATURES, pred_typ[0])},
                         "class_examples": len(pred_typ[2]), "methods_agreeing": agreeing,
                         "description": describe(o)})
    for f in findings.values():
        f.details["methods_agreeing"] = sorted(set(f.details["methods_agreeing"]))
    shapes = {}  # class -> (its typical evidence object, the thresholds a look-alike must meet)
    for method in ev.methods:
        ids, maps = ev.explained(method)
        heat = dict(zip(ids, normalise(maps, copy=False)))
        for cls in {int(s.at[f.sample, "prediction"]) for f in findings.values()} - set(shapes):
            refs = [i for i in ids if s.at[i, "correct"] and s.at[i, "prediction"] == cls]
            objs = [o for o in (evidence_object(ev.seen_pixels(i), heat[i]) for i in refs) if o is not None]
            typ = _typical(objs, min_examples, min_contrast, max_size)
            if typ is not None:
                shapes[cls] = typ
    look = dict(max_distance=max_distance, min_contrast=min_contrast, max_size=max_size)
    return [*findings.values(), *_class_findings(ev, list(findings.values()), min_class_images, shapes, look,
                                                 population, class_min_share)]


def looks_alike(o: dict | None, typical, max_distance: float, min_contrast: float, max_size: float) -> bool:
    """A whole, distinct, compact object within ``max_distance`` spreads of a class's typical evidence."""
    return (o is not None and o["whole"] and abs(o["contrast"]) >= min_contrast and o["size"] <= max_size
            and compact(o) and _distance(o, typical) <= max_distance)


def _population(ev: Evidence, cls: int, typical, look: dict, n: int) -> tuple[int, int] | None:
    """(images holding a look-alike of class ``cls``'s evidence, how many of them the model calls
    ``cls``) over up to ``n`` images of the other classes, whatever the model called them.

    Where a look-alike sits in an image is where the evidence for ``cls`` would be: each image's
    saliency map for ``cls`` (model-only: it needs no layer), segmented as the rule segments its
    own evidence. A model that takes anything of that shape for ``cls`` calls nearly all of them
    ``cls``; a model that confuses a few borderline ones (a clean model's near misses) does not,
    though each of its errors looks alike. None without the model."""
    from auditor.registry import METHODS
    if ev.model is None or "saliency" not in METHODS.names():
        return None
    s = ev.samples
    ids = s.index[s["label"] != cls].tolist()[:n]
    have = called = 0
    for start in range(0, len(ids), 64):
        chunk = ids[start:start + 64]
        x = ev.model_inputs(chunk)
        maps = METHODS.get("saliency").fn(ev.model, x, torch.full((len(chunk),), cls, device=x.device))
        maps = normalise(maps.detach().float().cpu().numpy())
        for i, heat in zip(chunk, maps):
            if looks_alike(evidence_object(ev.seen_pixels(i), heat), typical, **look):
                have += 1
                called += int(s.at[i, "prediction"] == cls)
    return have, called


def _class_findings(ev: Evidence, findings: list[Finding], min_images: int, shapes: dict, look: dict,
                    population: int, min_share: float) -> list[ClassFinding]:
    """One class finding per predicted class that several look-alikes were taken for. It reaches
    'medium' only when the model calls most images holding such a look-alike that class
    (``_population``): that is what "anything of that shape" means."""
    s = ev.samples
    out = []
    by_class: dict[int, list[Finding]] = {}
    for f in findings:
        by_class.setdefault(int(s.at[f.sample, "prediction"]), []).append(f)
    for cls, group in sorted(by_class.items()):
        if len(group) < min_images:
            continue
        name = ev.classes[cls]
        into = int(((s["prediction"] == cls) & ~s["correct"]).sum())
        share = len(group) / max(into, 1)
        kinds = sorted({f.details["description"] for f in group})
        pop = _population(ev, cls, shapes[cls], look, population) if cls in shapes else None
        general = pop is not None and pop[0] > 0 and pop[1] / pop[0] >= min_share
        message = (f"{len(group)} of the {into} images wrongly called '{name}' show a {', '.join(kinds)} "
                   f"where the model looks, shaped like the marks of real '{name}' images")
        if pop is None:
            message += (": the model may accept anything of that shape as '{name}' (how often it does could "
                        "not be measured without the model).").format(name=name)
        elif general:
            message += (f"; of the {pop[0]} images of other classes holding such a shape, it calls {pop[1]} "
                        f"'{name}': the model seems to accept anything of that shape as '{name}'.")
        else:
            message += (f", but of the {pop[0]} images of other classes holding such a shape it calls only "
                        f"{pop[1]} '{name}': near misses rather than a rule the model follows.")
        out.append(ClassFinding(
            cls=name, rule="look_alike", method=group[0].method,
            severity="medium" if share >= 0.5 and general else "low",
            score=round(float(np.mean([f.score for f in group])), 4), share=round(share, 4), message=message,
            details={"samples": [f.sample for f in group], "images": len(group), "misclassified_into": into,
                     # The class claim's own test (None: not measured); a refuted claim is not
                     # confirmed by its members' transfers (auditor.judge.intervene._aggregate).
                     "generalises": None if pop is None else bool(general),
                     **({"lookalike_images": pop[0], "lookalike_called": pop[1]} if pop is not None else {})}))
    return out
