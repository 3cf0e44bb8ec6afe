"""fixed_location: a group of a class's explanations that all point at one small, fixed place.

SpRAy-style (Lapuschkin et al. 2019): per predicted class, normalise each heatmap to sum 1,
downsample, build a k-nearest-neighbour affinity graph, embed with the leading eigenvectors of
its normalised Laplacian, choose the number of groups by the eigengap, and group the embedding
hierarchically. Where a person had to inspect SpRAy's clusters, this rule scores them: a tight
group whose mean heatmap piles its mass into a small window that the other classes do not
use is flagged, wherever in the image the window is (a watermark, a logo, a ruler).

Findings: one image finding per member of a flagged group that the model calls the class but
that is labelled otherwise and whose own evidence sits in the window (``member_share`` of the
group's): the error the mark may have caused, boxed tightly from that image's own heatmap at the
window and grown to the object the image shows there (``Evidence.boxes``), the window being the
interventions' last resort; each image once, by the map with the most evidence there. And the
class finding, naming the window's place in words; its region, which the intervention pastes
from the class's images onto other classes', is the median of its errors' boxes where there are
``min_group`` of them (the window is a coarse grid's square; the boxes show where the mark lies),
else the window.
"""
from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from auditor.judge.evidence import ClassFinding, Count, Evidence, Finding, Positive, Share, Thresholds, grade
from auditor.explain.heatmap import boxes_overlap, normalise, place_words
from auditor.registry import RULES

# On the group window's share of the evidence. The rule proposes and the intervention decides: low
# enough (with min_lift 4 and z_min 2.5) for the diffuse maps of a small model on noise, where a
# mark's group put 26-31 % of its evidence in a 6 % window (tune split).
SEVERITY = {"low": 0.25, "medium": 0.4, "high": 0.55}
GRID = 16


def downsample(maps: np.ndarray, side: int = GRID) -> np.ndarray:
    """[N, h, w] → [N, side, side] by summing blocks (keeps each map's total mass)."""
    n, h, w = maps.shape
    ys = np.linspace(0, h, side + 1).astype(int)
    xs = np.linspace(0, w, side + 1).astype(int)
    rows = np.add.reduceat(maps, ys[:-1], axis=1)
    return np.add.reduceat(rows, xs[:-1], axis=2)


def spectral_groups(x: np.ndarray, k_neighbours: int = 8, max_groups: int = 6) -> tuple[np.ndarray, int]:
    """Group rows of x: kNN affinity → normalised Laplacian → eigengap → hierarchical grouping."""
    n = len(x)
    k = min(k_neighbours, n - 1)
    sq = (x * x).sum(1)
    # |a-b|^2 = |a|^2 + |b|^2 - 2ab: an n x n matrix, never n x n x features.
    d = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * x @ x.T, 0, None))
    sigma = np.median(np.sort(d, axis=1)[:, k]) + 1e-12
    near = np.argsort(d, axis=1)[:, 1:k + 1]
    a = np.zeros((n, n))
    rows = np.repeat(np.arange(n), k)
    a[rows, near.ravel()] = np.exp(-(d[rows, near.ravel()] / sigma) ** 2)
    a = np.maximum(a, a.T)
    deg = a.sum(1)
    inv = 1 / np.sqrt(np.maximum(deg, 1e-12))
    lap = np.eye(n) - inv[:, None] * a * inv[None]
    vals, vecs = np.linalg.eigh(lap)
    top = min(max_groups, n - 1)
    groups = int(np.argmax(np.diff(vals[:top + 1]))) + 1 if top >= 1 else 1
    if groups == 1:
        return np.zeros(n, int), 1
    emb = vecs[:, :groups]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    labels = fcluster(linkage(emb, "average"), groups, criterion="maxclust") - 1
    return labels, groups


def best_window(mean_map: np.ndarray, sizes=(2, 3, 4)) -> tuple[float, tuple, float]:
    """The small square window holding the most mass: (mass, fractional box, area share)."""
    side = mean_map.shape[0]
    best = (0.0, (0, 0, 1, 1), 1.0)
    cum = np.pad(mean_map.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    for s in sizes:
        sums = cum[s:, s:] - cum[:-s, s:] - cum[s:, :-s] + cum[:-s, :-s]
        y, x = np.unravel_index(np.argmax(sums), sums.shape)
        # Prefer the smallest window unless a larger one holds clearly more.
        if sums[y, x] > best[0] * 1.15:
            best = (float(sums[y, x]), (x / side, y / side, (x + s) / side, (y + s) / side), s * s / side**2)
    return best


def window_mass(maps: np.ndarray, box) -> np.ndarray:
    side = maps.shape[-1]
    x0, y0, x1, y1 = (int(round(v * side)) for v in box)
    return maps[:, y0:y1, x0:x1].sum(axis=(1, 2))


def _effects(d: dict) -> list[str]:
    out = [f"{d['group_size']} of {d['class_images']} images in one tight group"] if "group_size" in d else []
    return out + ([f"evidence {d['lift']:.0f}× denser at the spot than on average"] if "lift" in d else [])


@RULES.register("fixed_location", title='Same spot in many images',
                glossary='When many images of one class are decided from the same small spot, something placed there (a logo, a ruler, a tag) is probably doing the work.',
                effects=_effects, level="sample+class", needs=("heatmaps",), direction="higher is more suspicious")
def fixed_location(ev: Evidence, min_images: Count = 8, min_group: Count = 3, min_lift: Positive = 4.0,
                   z_min: float = 2.5, min_tightness: Share = 0.5, max_images: Count = 1500,
                   member_share: Share = 0.5, severity: Thresholds = None) -> list:
    """Many images of one class decided from the same small spot (grouped as SpRAy does); and the
    group's errors whose own evidence sits there (at least ``member_share`` of the group's mean)."""
    severity = severity or SEVERITY
    out: dict[tuple, ClassFinding] = {}
    errors: dict[tuple, list[tuple]] = {}   # key -> [(window mass, sample, method)] of the group's errors
    for method in ev.methods:
        ids, maps = ev.explained(method)
        if len(ids) < min_images:
            continue
        small = downsample(normalise(maps, copy=False))
        del maps
        preds = ev.samples.loc[ids, "prediction"].to_numpy()
        wrong = preds != ev.samples.loc[ids, "label"].to_numpy()
        classes = np.unique(preds)
        for c in classes:
            members = np.flatnonzero(preds == c)
            if len(members) < min_images:
                continue
            if len(members) > max_images:  # the eigendecomposition is cubic: a seeded sample suffices
                members = np.sort(np.random.default_rng(int(c)).choice(members, max_images, replace=False))
            x = small[members].reshape(len(members), -1)
            labels, groups = spectral_groups(x)
            others = small[preds != c]
            for g in np.unique(labels):
                part = members[labels == g]
                if len(part) < min_group:
                    continue
                mean = small[part].mean(0)
                mass, box, area = best_window(mean)
                if mass / area < min_lift:
                    continue
                own = window_mass(small[part], box)
                other = window_mass(others, box) if len(others) else np.zeros(1)
                z = (own.mean() - other.mean()) / max(other.std(), 0.02)
                flat = small[part].reshape(len(part), -1)
                cos = flat @ mean.ravel() / (np.linalg.norm(flat, axis=1) * np.linalg.norm(mean) + 1e-12)
                tight = float(cos.mean())
                sev = grade(mass, severity)
                if z < z_min or tight < min_tightness or sev is None:
                    continue
                key = (int(c), tuple(np.round(box, 2)))
                there = [(float(m), int(ids[j]), method, wrong[j]) for j, m in zip(part, own) if m >= member_share * mass]
                errors.setdefault(key, []).extend(e[:3] for e in there if e[3])
                if key in out and out[key].score >= mass:
                    out[key].details["methods_agreeing"].append(method)
                    continue
                agreeing = out[key].details["methods_agreeing"] + [method] if key in out else [method]
                share = len(part) / len(members)
                exemplars = [int(ids[j]) for j in part[np.argsort(-cos)][:6]]
                out[key] = ClassFinding(
                    cls=ev.classes[c], rule="fixed_location", method=method, severity=sev,
                    score=round(mass, 4), share=round(share, 4), region=[round(float(v), 4) for v in box],
                    message=(f"For {len(part)} of the {len(members)} images the model calls '{ev.classes[c]}', "
                             f"the explanations agree on one small spot: {mass:.0%} of their evidence sits in a "
                             f"window covering {area:.0%} of the image ({place_words(box)}), a place other classes "
                             f"hardly use ({other.mean():.0%}). Something printed or placed there may be "
                             f"what the model recognises."),
                    details={"region": place_words(box), "group_size": len(part), "class_images": len(members), "groups": groups,
                             "lift": round(mass / area, 2), "z": round(float(z), 2), "tightness": round(tight, 3),
                             "exemplars": exemplars, "methods_agreeing": agreeing})
    # The errors of each group, boxed; where three or more are, the class finding's region is their
    # median box: the window is a coarse grid's square, the boxed marks show where the mark lies,
    # and that is what the intervention should paste.
    boxed = {}
    for key, f in out.items():
        boxed[key] = _image_findings(ev, f, errors[key], severity)
        if len(boxed[key]) >= min_group:
            f.details["window"] = f.region
            f.region = [round(float(v), 4) for v in np.median([g.details["candidate_boxes"][0] for g in boxed[key]], 0)]
    # One finding per class and place: overlapping regions from other groups or methods merge, and
    # each error is reported once, by the map that put the most evidence at the spot.
    kept: list[tuple[ClassFinding, dict]] = []
    for key, f in sorted(out.items(), key=lambda kv: -kv[1].score):
        twin = next((k for k in kept if k[0].cls == f.cls and boxes_overlap(k[0].region, f.region)), None)
        if twin is None:
            twin = (f, {})
            kept.append(twin)
        else:
            twin[0].details["methods_agreeing"] += f.details["methods_agreeing"]
        for g in boxed[key]:
            if g.sample not in twin[1] or g.score > twin[1][g.sample].score:
                twin[1][g.sample] = g
    images: dict[int, Finding] = {}
    for f, mine in kept:
        f.details["methods_agreeing"] = sorted(set(f.details["methods_agreeing"]))
        for g in mine.values():
            if g.sample not in images or g.score > images[g.sample].score:
                images[g.sample] = g
    for f, mine in kept:
        f.details["samples"] = sorted(i for i in mine if images[i] is mine[i])
    return [*images.values(), *(f for f, _ in kept)]


def _image_findings(ev: Evidence, f: ClassFinding, errors: list[tuple], severity: dict) -> list[Finding]:
    """One finding per error of a flagged group: the map that puts most evidence in the window,
    boxed tightly at the window from that image's own heatmap (and the object it shows there)."""
    best: dict[int, tuple] = {}
    agree: dict[int, set] = {}
    for mass, i, method in errors:
        agree.setdefault(i, set()).add(method)
        if i not in best or mass > best[i][0]:
            best[i] = (mass, method)
    window = tuple(f.region)
    area = (window[2] - window[0]) * (window[3] - window[1])
    where, s = place_words(window), ev.samples
    out = []
    for i, (mass, method) in sorted(best.items()):
        boxes = ev.boxes(i, ev.heatmaps[method][i], window)
        true = ev.classes[s.at[i, "label"]]
        out.append(Finding(
            sample=i, rule="fixed_location", method=method, severity=grade(mass, severity) or "low",
            score=round(mass, 4), bbox=ev.to_file_bbox(i, boxes[0]),
            message=(f"The model called this '{true}' image '{f.cls}'. {mass:.0%} of its evidence sits in a "
                     f"window covering {area:.0%} of the image ({where}): the spot where the explanations of "
                     f"{f.details['group_size']} images called '{f.cls}' agree, and that other classes hardly "
                     f"use. Something placed there may have made this error."),
            details={"region": where, "region_box": list(window), "candidate_boxes": [list(b) for b in boxes],
                     "mass": round(mass, 4), "lift": round(mass / area, 2), "true_class": true,
                     "group_size": f.details["group_size"], "class_images": f.details["class_images"],
                     "methods_agreeing": sorted(agree[i])}))
    return out
