"""recurring_patch: the same small patch, at any place in the image, decides one class.

A sticker stuck anywhere on one class's photos (the band-aid in dermoscopy, a hospital's token
on chest X-rays) sits at no fixed place, so no rule that looks at one region sees it. This rule
looks at what the evidence shows instead of where it is:

1. Regions: each explained image's heatmap (smoothed a little, so a saliency map's speckle
   joins up) is thresholded at ``level`` of its peak; the connected components covering
   ``min_area`` to ``max_area`` of the image are its compact evidence regions (at most
   ``per_image``, the heaviest).
2. Appearance: the object inside each region (the pixels that stand out from the region's
   surroundings) is described by its colour, its shape (size, aspect, extent, solidity) and by
   the model's own view of it: the crop pasted alone on a neutral canvas (the images' mean),
   read at the Grad-CAM layer (max-pooled, minus the empty canvas's reading).
3. Clusters: the descriptors (each block standardised and weighted alike) are grouped by
   average-linkage clustering, and again by shape alone (a shape inked in a new colour on every
   image agrees in nothing else). A group is suspect when it holds ``min_images`` or more images
   that the model calls one class C, at least ``min_share`` of C's explained images, at places
   that differ (their centres lie on average ``min_spread`` of the side or more from their mean:
   places drawn at random over the image give 0.38, over 45% of its side 0.18; a piece of the
   class's own object, a digit's stroke, stays where the object is: pasted elsewhere, a whole digit
   turned a clean digits model's other digits into its class beyond its placebo, 75% against 31%),
   and is rare among the other classes' explained images (their rate at most ``max_elsewhere``
   times C's).
4. The test: the group's patches are pasted at random places onto images of other classes, and
   beside them, at the same places, two placebos: a patch of the same size from a random place of
   the same images, and one of the same size about another of the class's high-evidence regions
   (of images the model calls C, outside the group). The group's patches were chosen for their
   evidence, and evidence chosen so carries its class more than a random patch does on any model
   (the tune split's clean texture twin g028: its 'cell' patches turned 93% of other images,
   random patches 54%). A group is reported when its patch turns more of them into C than the
   stronger placebo, by ``severity["low"]`` or more with a 95% interval above zero; severity
   follows that difference (a group that recurs but moves the model no more than its placebos is
   no finding). A class whose every high-evidence region is in the group has the first placebo only.

Findings: one finding per member image the model calls C but that is labelled otherwise, boxing
the patch, and one class finding without a region (those images' ids in ``details.samples``: the
intervention confirms it when most of their boxes carry C to other images). A patch that only
sits in images labelled C may be what C is (the rectangle of a 'box' class, measured: the clean
rectangle model's own rectangles moved it as much as a sticker does): the class finding then stays
low, for a person to look at, and no image is flagged. Costs one forward pass per region, three per
target image and group; no backward pass but one (finding the layer).
"""
from __future__ import annotations

import colorsys

import numpy as np
import torch
from scipy import ndimage
from skimage.measure import label, regionprops
from sklearn.cluster import AgglomerativeClustering

from auditor.explain.heatmap import normalise, pixel_box
from auditor.explain.layers import default_layer, feature_map, reading_of
from auditor.inputs.data import input_view
from auditor.judge.evidence import (ClassFinding, Count, Evidence, Finding, NonNegative, Positive, Share,
                                    Thresholds, grade)
from auditor.judge.intervene import against_control
from auditor.registry import RULES

# On the patch's transfer rate minus its placebo's; below "low", no finding.
SEVERITY = {"low": 0.25, "medium": 0.4, "high": 0.6}
ROWS = 256                                              # rows per forward pass
RARE = 0.15                                             # RGB distance at which two colours are alike
UNSEEN = 0.02                                           # a colour this rare around a patch is the patch's


# --- 1. Regions ----------------------------------------------------------------------------

def regions(heat: np.ndarray, level: float = 0.5, min_area: float = 0.001, max_area: float = 0.2,
            most: int = 3) -> list[tuple[float, float, float, float]]:
    """The compact high-evidence regions of one heatmap [h, w], as fractional boxes [x0, y0, x1, y1]:
    connected components of ``heat >= level * max`` (after a light Gaussian smoothing) whose area is
    ``min_area`` to ``max_area`` of the map, the ``most`` heaviest (by summed heat) first."""
    h, w = heat.shape
    heat = ndimage.gaussian_filter(np.clip(np.asarray(heat, np.float32), 0, None), max(h, w) / 96)
    if not heat.max() > 0:
        return []
    parts = label(heat >= level * heat.max())
    found = []
    for p in regionprops(parts, intensity_image=heat):
        if min_area <= p.area / (h * w) <= max_area:
            y0, x0, y1, x1 = p.bbox
            found.append((float(p.image_intensity.sum()), (x0 / w, y0 / h, x1 / w, y1 / h)))
    found.sort(key=lambda t: -t[0])
    return [box for _, box in found[:most]]


# --- 2. Appearance -------------------------------------------------------------------------

def patch_object(img: np.ndarray, box) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(tight box, colour descriptor, shape descriptor) of the object inside ``box`` of ``img``
    (RGB [H, W, 3] in [0, 1]).

    The window is the box grown by its side on every side (a heatmap's box may cut the object);
    its border is the surroundings. A patch is what its surroundings do not show (a busy
    background's own bright parts, a brick wall's mortar, they do show): each pixel's colour is
    scored by the share of border pixels within ``RARE`` of it, the box's rarest pixel (ties: the
    farthest from the border's median) is the seed, and the object is the connected set of
    pixels holding it whose colours the border shows at most ``UNSEEN`` (a sticker's rim and its
    inside alike), holes filled. Where even the seed is common around (a texture), the object is
    the seed's connected pixels of its colour (nearer to it than half its distance from the
    median). Colour: the object's mean RGB, its spread and its contrast with the surroundings;
    shape: log area (of the image), log aspect (w / h), extent, solidity.
    A flat window (nothing stands out) keeps the box as the object."""
    hh, ww = img.shape[:2]
    x0, y0, x1, y1 = box
    px0, py0 = int(np.floor(x0 * ww)), int(np.floor(y0 * hh))
    px1, py1 = max(int(np.ceil(x1 * ww)), px0 + 1), max(int(np.ceil(y1 * hh)), py0 + 1)
    gx, gy = max(2, px1 - px0), max(2, py1 - py0)
    wx0, wy0, wx1, wy1 = max(px0 - gx, 0), max(py0 - gy, 0), min(px1 + gx, ww), min(py1 + gy, hh)
    win = img[wy0:wy1, wx0:wx1]
    edge = np.concatenate([win[0], win[-1], win[:, 0], win[:, -1]])
    around = np.median(edge, axis=0)
    dist = np.linalg.norm(win - around, axis=2)
    inner = np.zeros(dist.shape, bool)
    inner[py0 - wy0:py1 - wy0, px0 - wx0:px1 - wx0] = True
    obj = inner
    if dist[inner].max() >= 0.1:
        ring = edge[:: max(1, len(edge) // 512)]
        flat = win.reshape(-1, 3)
        seen = np.concatenate([(np.linalg.norm(c[:, None] - ring[None], axis=2) < RARE).mean(1)
                               for c in np.array_split(flat, max(1, len(flat) // 4096))]).reshape(dist.shape)
        k = np.lexsort((-dist[inner], seen[inner]))[0]
        sy, sx = np.nonzero(inner)[0][k], np.nonzero(inner)[1][k]
        if seen[sy, sx] <= UNSEEN:   # colours the surroundings do not show: the patch, rim and all
            part = seen <= UNSEEN
        else:                        # nothing new here: the pixels of the most distinct pixel's colour
            part = np.linalg.norm(win - win[sy, sx], axis=2) < 0.5 * dist[sy, sx]
        part = label(part)
        obj = ndimage.binary_fill_holes(part == part[sy, sx])
    props = regionprops(obj.astype(np.uint8))[0]
    by0, bx0, by1, bx1 = props.bbox
    tight = ((bx0 + wx0) / ww, (by0 + wy0) / hh, (bx1 + wx0) / ww, (by1 + wy0) / hh)
    pixels = win[obj]
    colour = np.concatenate([pixels.mean(0), [pixels.std(0).mean(), np.linalg.norm(pixels.mean(0) - around)]])
    shape = np.array([np.log(obj.sum() / (hh * ww)), np.log((bx1 - bx0) / (by1 - by0)),
                      props.extent, props.solidity])
    return tight, colour.astype(np.float32), shape.astype(np.float32)


def colour_name(rgb) -> str:
    """A plain colour word for an RGB triple in [0, 1]."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if v < 0.2:
        return "black"
    if s < 0.25:
        return "white" if v > 0.8 else "grey"
    hue = h * 360
    for top, name in ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"),
                      (255, "blue"), (290, "purple"), (345, "pink"), (361, "red")):
        if hue < top:
            return name
    return "red"


def shape_name(extent: float, solidity: float, aspect: float) -> str:
    """'square', 'round', 'elongated' or 'irregular', from the object's extent, solidity and w / h."""
    if abs(np.log(aspect)) > np.log(2.5):
        return "elongated"
    if extent >= 0.88:
        return "square"
    if extent >= 0.6 and solidity >= 0.9:
        return "round"
    return "irregular"


@torch.no_grad()
def model_view(ev: Evidence, crops: list[torch.Tensor], colour: torch.Tensor) -> np.ndarray:
    """The model's own description of each crop [C, h, w] (model input space): pasted alone at the
    centre of a canvas of one ``colour`` [C] (the images' mean: neutral for this model), read at the
    Grad-CAM layer (max over places, minus the empty canvas's reading); the logits where the model
    has no such layer."""
    hh, ww = ev.input_spec.size
    c = len(colour)
    canvas = colour.to(ev.device, torch.float32)[:, None, None].expand(c, hh, ww)
    # The layer the audit explains at, where Evidence carries it; else the same default it picks.
    layer = getattr(ev, "layer", None) or default_layer(ev.model, (c, hh, ww), ev.device)
    reading = reading_of(ev.model, layer)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o)) if layer is not None else None

    def read(x: torch.Tensor) -> torch.Tensor:
        seen.clear()
        out = ev.model(x)
        try:
            return feature_map(seen[0], (hh, ww), reading=reading).float().amax(dim=(2, 3))
        except (IndexError, ValueError):  # no layer, or none that reads as a map: the logits
            return out.float()

    try:
        rows = []
        for start in range(0, len(crops), ROWS):
            x = canvas.expand(min(ROWS, len(crops) - start), -1, -1, -1).clone()
            for k, crop in enumerate(crops[start:start + ROWS]):
                ph, pw = crop.shape[1:]
                top, left = (hh - ph) // 2, (ww - pw) // 2
                x[k, :, top:top + ph, left:left + pw] = crop
            rows.append(read(x))
        empty = read(canvas[None])
    finally:
        if handle is not None:
            handle.remove()
    return (torch.cat(rows) - empty).cpu().numpy()


# --- 3. Clusters ---------------------------------------------------------------------------

def standardised(blocks: list[np.ndarray]) -> np.ndarray:
    """Descriptor blocks [n, d_k] side by side, each column standardised and each block weighted by
    1 / sqrt(d_k), so every block (the model's view, colour, shape) counts alike in a distance."""
    out = []
    for b in blocks:
        b = np.asarray(b, np.float64)
        z = (b - b.mean(0)) / (b.std(0) + 1e-6)
        out.append(z / np.sqrt(b.shape[1]))
    return np.concatenate(out, axis=1)


def clusters(x: np.ndarray, tightness: float = 0.5) -> np.ndarray:
    """Group labels for the rows of ``x``: average-linkage clustering cut at ``tightness`` times
    the median distance between rows (a scale of the data's own spread)."""
    if len(x) < 2:
        return np.zeros(len(x), int)
    sq = (x * x).sum(1)
    d = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * x @ x.T, 0, None))
    cut = tightness * float(np.median(d[np.triu_indices(len(x), 1)]))
    if cut <= 0:
        return np.zeros(len(x), int)
    return AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                   distance_threshold=cut).fit_predict(d)


def spread(boxes: list) -> float:
    """Mean distance of the boxes' centres from their mean centre (fractions of the side)."""
    c = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes])
    return float(np.linalg.norm(c - c.mean(0), axis=1).mean()) if len(c) else 0.0


# --- 4. The test ---------------------------------------------------------------------------

@torch.no_grad()
def paste_test(ev: Evidence, sources: list[tuple[int, tuple]], cls: int, targets: list[int],
               rng: np.random.Generator, rivals: list[tuple[int, tuple]] = ()) -> dict:
    """Paste each source patch (sample id, fractional box) at a random place onto the target images,
    cycling through the sources, and beside it two placebos at the same place: a box of the same
    size from a random place of the same source image, and one of the same size about another
    high-evidence region of an image the model calls ``cls`` (``rivals``: the class's evidence
    that is not the group's). The share turned into ``cls``, each placebo's, and the paired
    differences with their 95% bootstrap intervals (the second only with rivals)."""
    size = tuple(ev.input_spec.size)
    h, w = size
    hit, placebo, evidence = [], [], []
    for start in range(0, len(targets), ROWS // 3):
        chunk = targets[start:start + ROWS // 3]
        y = ev.model_inputs(chunk)
        picked = [sources[(start + k) % len(sources)] for k in range(len(chunk))]
        x = ev.model_inputs([i for i, _ in picked])
        other = [rivals[(start + k) % len(rivals)] for k in range(len(chunk))] if rivals else []
        r = ev.model_inputs([i for i, _ in other]) if other else None
        real, fake = y.clone(), y.clone()
        rival = y.clone() if other else None
        for k, (_, box) in enumerate(picked):
            x0, y0, x1, y1 = pixel_box(box, size)
            ph, pw = y1 - y0, x1 - x0
            ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))  # where it goes
            fy, fx = _elsewhere((x0, y0, x1, y1), size, rng)                           # the placebo's source
            real[k, :, ty:ty + ph, tx:tx + pw] = x[k, :, y0:y1, x0:x1]
            fake[k, :, ty:ty + ph, tx:tx + pw] = x[k, :, fy:fy + ph, fx:fx + pw]
            if other:  # the patch's size about the rival region's centre, inside the image
                a0, b0, a1, b1 = pixel_box(other[k][1], size)
                ry = min(max((b0 + b1 - ph) // 2, 0), h - ph)
                rx = min(max((a0 + a1 - pw) // 2, 0), w - pw)
                rival[k, :, ty:ty + ph, tx:tx + pw] = r[k, :, ry:ry + ph, rx:rx + pw]
        batch = torch.cat([real, fake, rival] if other else [real, fake])
        pred = torch.cat([ev.model(b).argmax(1) for b in batch.split(ROWS)]).cpu().numpy()
        n = len(chunk)
        hit.append(pred[:n] == cls)
        placebo.append(pred[n:2 * n] == cls)
        evidence.append(pred[2 * n:] == cls)
    hit, placebo, evidence = (np.concatenate(v).astype(float) for v in (hit, placebo, evidence))
    paired = against_control(hit, placebo, "transfer", rng)  # the intervention's own paired bootstrap
    out = {"pasted_onto": len(targets), "turned": int(hit.sum()), "transfer_rate": round(float(hit.mean()), 4),
           "control_turned": int(placebo.sum()), "control_rate": paired["control_transfer_rate"],
           "transfer_vs_control": paired["transfer_vs_control"]}
    if rivals:
        vs = against_control(hit, evidence, "evidence", rng)
        out |= {"evidence_turned": int(evidence.sum()), "evidence_rate": vs["control_evidence_rate"],
                "transfer_vs_evidence": vs["evidence_vs_control"]}
    return out


def beyond_placebos(test: dict) -> tuple[float, float]:
    """The paste's lead over its stronger placebo: (difference, low end of its 95% interval)."""
    leads = [test[k] for k in ("transfer_vs_control", "transfer_vs_evidence") if k in test]
    return min(v[0] for v in leads), min(v[1] for v in leads)


def _elsewhere(box, size, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a same-size box at a random place that does not overlap ``box`` (any
    place when the image leaves no room)."""
    x0, y0, x1, y1 = box
    h, w = size
    ph, pw = y1 - y0, x1 - x0
    for _ in range(50):
        fy, fx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if fx >= x1 or fx + pw <= x0 or fy >= y1 or fy + ph <= y0:
            return fy, fx
    return fy, fx


# --- The rule ------------------------------------------------------------------------------

def _effects(d: dict) -> list[str]:
    if "transfer_rate" not in d:
        return []
    return [f"pasted at random places: {d['transfer_rate']:.0%} turned into the class "
            f"(a random patch of the same size: {d['control_rate']:.0%}"
            + (f"; the class's other strongest evidence: {d['evidence_rate']:.0%})" if "evidence_rate" in d else ")")]


@RULES.register("recurring_patch", title="The same small patch, anywhere, decides a class",
                glossary="It finds a small mark that recurs at different places in one class's images, such as a sticker or a token, by what it looks like rather than where it is, and pastes it onto other images to see whether it alone makes the model say that class.",
                effects=_effects, level="sample+class", needs=("heatmaps", "model"),
                direction="higher is more suspicious")
def recurring_patch(ev: Evidence, level: Share = 0.5, min_area: Share = 0.001, max_area: Share = 0.2,
                    per_image: Count = 3, tightness: Positive = 0.5, min_images: Count = 5,
                    min_share: Share = 0.2, max_elsewhere: NonNegative = 0.5, min_spread: NonNegative = 0.18,
                    targets: Count = 64, min_targets: Count = 5, max_regions: Count = 4000,
                    severity: Thresholds = None) -> list:
    """A small patch at different places in many images of one class, rare in other classes, that
    turns other classes' images into that class wherever it is pasted."""
    if ev.model is None or ev.input_spec is None or not ev.methods:
        return []
    if min_area >= max_area:
        raise ValueError(f"min_area ({min_area}) must be below max_area ({max_area})")
    severity = severity or SEVERITY
    rng = np.random.default_rng(0)
    tested: dict[int, list] = {}  # class -> [(gap, its low end, images, method, members, test)]: its tested groups
    for method in ev.methods:
        ids, maps = ev.explained(method)
        if not ids:
            continue
        maps = normalise(maps, copy=False)
        found = capped([[(i, box) for box in regions(m, level, min_area, max_area, per_image)]
                        for i, m in zip(ids, maps)], max_regions)
        if len(found) < min_images:
            continue
        for cls, members, rivals, counts in _suspect_groups(ev, ids, found, tightness, min_images, min_share,
                                                    max_elsewhere, min_spread):
            pool = _targets(ev, cls, targets, rng)
            if len(pool) < min_targets:
                continue  # nothing to paste onto: no test, so no claim
            test = paste_test(ev, list(first_per_image(members).items()), cls, pool, rng, rivals) | counts
            tested.setdefault(cls, []).append((*beyond_placebos(test), counts["images"], method, members, test))
    out = []
    for cls, groups in sorted(tested.items()):
        # Groups that move the model (each method may see the same patch): the clearest one speaks,
        # the images of all of them are boxed.
        moving = sorted((g for g in groups if grade(g[0], severity) and g[1] > 0), key=lambda g: (-g[0], -g[2]))
        if not moving:
            continue  # it recurs, but it moves the model no more than its placebos: no shortcut
        gap, _, _, method, _, test = moving[0]
        sev = grade(gap, severity)
        boxes = first_per_image([(i, (box, g[3])) for g in moving for i, box in g[4]])
        out += _findings(ev, cls, method, boxes, test, sev)
    return out


def capped(per_image: list[list], n: int) -> list:
    """At most ``n`` regions in all: every image's heaviest first, then every image's second, ...
    (the clustering's memory grows with the square of their number)."""
    out: list = []
    for rank in range(max(map(len, per_image), default=0)):
        out += [rs[rank] for rs in per_image if rank < len(rs)]
    return out[:n]


def _object_in_input(ev: Evidence, i: int, box) -> tuple:
    """``patch_object`` on image i's file pixels for a box in fractions of the model input; its
    tight box back in fractions of the model input (the file may be resized and cropped)."""
    w, h = int(ev.samples.at[i, "width"]), int(ev.samples.at[i, "height"])
    v = input_view((w, h), ev.input_spec)
    tight, colour, shape = patch_object(ev.pixels(i), v.to_file_frac(box))
    inside = v.to_input((tight[0] * w, tight[1] * h, tight[2] * w, tight[3] * h))
    if inside[2] <= inside[0] or inside[3] <= inside[1]:
        inside = tuple(box)  # the object lies where the model does not see: keep the evidence's box
    return inside, colour, shape


def _suspect_groups(ev: Evidence, ids: list[int], found: list[tuple[int, tuple]], tightness: float,
                    min_images: int, min_share: float, max_elsewhere: float, min_spread: float) -> list:
    """[(class, [(sample, tight box)], rivals, counts)] for the groups of look-alike regions that recur
    in one predicted class at different places and are rare in the others; ``rivals``: the class's
    other high-evidence regions (of images it calls the class, outside the group).

    Regions are grouped twice: by every block of their descriptor, and by their shape alone. A
    shape in a new colour on every image (a stamp inked anew) agrees in nothing else: its colour,
    and the model's view of it that follows the colour, split it (measured on such a cue: its
    regions lay as far apart in those blocks as any two regions, at zero distance in shape)."""
    s = ev.samples
    objs = [_object_in_input(ev, i, box) for i, box in found]
    size = tuple(ev.input_spec.size)
    crops = []
    for (i, _), (tight, _, _) in zip(found, objs):
        x0, y0, x1, y1 = pixel_box(tight, size)
        crops.append(ev.model_input(i)[:, y0:y1, x0:x1].to(ev.device))
    mean = torch.stack([ev.model_input(i).mean(dim=(1, 2)) for i in ids]).mean(0)
    view = model_view(ev, crops, mean)
    colour, form = np.stack([o[1] for o in objs]), np.stack([o[2] for o in objs])
    pred = s.loc[ids, "prediction"]
    explained = pred.value_counts()
    called = s.loc[[i for i, _ in found], "prediction"].to_numpy()  # per region, its image's predicted class
    out, seen = [], set()
    by_all, by_shape = (clusters(standardised(blocks), tightness) for blocks in ([view, colour, form], [form]))
    for labels in (by_all, by_shape):
        for g in np.unique(labels):
            rows = np.nonzero(labels == g)[0]
            samples = {found[r][0] for r in rows}
            by_class = pd_counts(s, samples)
            cls = max(by_class, key=lambda c: (by_class[c], -c))
            n = by_class[cls]
            share = n / explained[cls]
            others = sum(v for c, v in by_class.items() if c != cls)
            rest = max(int(explained.sum() - explained[cls]), 1)
            elsewhere = others / rest
            mine = [r for r in rows if called[r] == cls]
            where = spread([objs[r][0] for r in mine])
            key = frozenset(found[r] for r in mine)
            if n < min_images or share < min_share or elsewhere > max_elsewhere * share or where < min_spread \
                    or key in seen:
                continue
            seen.add(key)
            look = colour[mine], np.median(form[mine], 0)
            hue = colour_name(look[0][:, :3].mean(0)) if look[0][:, :3].std(0).max() < RARE else None
            what = shape_name(look[1][2], look[1][3], float(np.exp(look[1][1])))
            counts = {"images": n, "class_explained": int(explained[cls]), "elsewhere": others,
                      "others_explained": rest, "spread": round(where, 4),
                      "description": f"small {hue} {what} patch" if hue else f"small {what} patch in many colours"}
            # The class's other evidence: its images' high-evidence regions outside the group (the
            # second placebo: a patch chosen for its evidence carries the class more than a random one).
            others_of_cls = np.setdiff1d(np.nonzero(called == cls)[0], rows)
            rivals = [(found[r][0], objs[r][0]) for r in others_of_cls]
            out.append((int(cls), [(found[r][0], objs[r][0]) for r in mine], rivals, counts))
    return out


def pd_counts(s, samples) -> dict[int, int]:
    """Distinct images per predicted class among ``samples``."""
    return {int(c): int(v) for c, v in s.loc[sorted(samples), "prediction"].value_counts().items()}


def _targets(ev: Evidence, cls: int, n: int, rng: np.random.Generator) -> list[int]:
    """Up to n images neither labelled nor called ``cls``, correctly classified first, spread over
    classes: what the patch is pasted onto."""
    s = ev.samples
    pool = s[(s["label"] != cls) & (s["prediction"] != cls)]
    right, wrong = (np.array(pool.index[pool["correct"] == ok]) for ok in (True, False))
    pick = [*right[rng.permutation(len(right))[:n]], *wrong[rng.permutation(len(wrong))[:max(0, n - len(right))]]]
    return sorted(int(i) for i in pick)


def first_per_image(members: list[tuple[int, object]]) -> dict[int, object]:
    """Sample id -> its first entry in ``members`` (an image may hold several look-alike regions)."""
    out: dict[int, object] = {}
    for i, v in members:
        out.setdefault(int(i), v)
    return out


def _findings(ev: Evidence, cls: int, method: str, boxes: dict[int, tuple], test: dict, sev: str) -> list:
    """One finding per image boxing its patch (``boxes``: sample -> (box, method)), and the class finding."""
    s = ev.samples
    name = ev.classes[cls]
    what, gap = test["description"], beyond_placebos(test)[0]
    outcome = (f"pasting it at random places onto {test['pasted_onto']} images of other classes turned "
               f"{test['transfer_rate']:.0%} of them into '{name}' (a random patch of the same size from the same "
               f"images: {test['control_rate']:.0%}" + (
                   f"; a patch of its size about another of the strongest evidence in images called '{name}': "
                   f"{test['evidence_rate']:.0%}" if "evidence_rate" in test else "") + ")")
    n = len(boxes)
    # A patch that only ever sits in images that really are the class may be what the class is (the
    # rectangle of 'box'): the model reading it is no error. It is a shortcut in evidence when it also
    # made the model call images of other classes the class; then those errors are the image findings.
    errors = {i: v for i, v in boxes.items() if int(s.at[i, "label"]) != cls}
    details = {k: test[k] for k in ("class_explained", "elsewhere", "others_explained", "spread", "description",
                                    "pasted_onto", "turned", "transfer_rate", "control_turned", "control_rate",
                                    "transfer_vs_control", "evidence_turned", "evidence_rate", "transfer_vs_evidence")
               if k in test} | {"images": n}
    findings = []
    for i, (box, by) in errors.items():
        head = f"The model called this '{ev.classes[int(s.at[i, 'label'])]}' image '{name}'. "
        # Boxed as every rule boxes (the object or flat mark at the evidence there, grown along a
        # band that runs on), the patch's own box last: the intervention falls back along them.
        maps = ev.heatmaps.get(by, {})
        cands = ev.boxes(i, maps[i], box) if i in maps else [tuple(box)]
        findings.append(Finding(
            sample=i, rule="recurring_patch", method=by, severity=sev, score=round(float(gap), 4),
            bbox=ev.to_file_bbox(i, cands[0]),
            message=(f"{head}The model's evidence here is a {what}; the same patch recurs, at different places, in "
                     f"{n} images called '{name}', and {outcome}."),
            details=details | {"region": "anywhere", "region_box": [float(v) for v in box],
                               "candidate_boxes": [list(b) for b in cands]}))
    elsewhere = (f"; it appears in {test['elsewhere']} of the {test['others_explained']} explained images of "
                 f"other classes" if test["elsewhere"] else "; it appears in no explained image of another class")
    caused = (f"; the model called {len(errors)} images of other classes '{name}' with it" if errors else
              f"; every image that holds it is labelled '{name}', so it may be what '{name}' is: look at the examples")
    cf = ClassFinding(
        cls=name, rule="recurring_patch", method=method, severity=sev if errors else "low", score=round(float(gap), 4),
        share=round(min(n / test["class_explained"], 1.0), 4),
        message=f"{n} images called '{name}' hold a {what}, in different places{elsewhere}; {outcome}{caused}.",
        details=details | {"samples": sorted(errors), "errors_caused": len(errors), "generalises": bool(errors)})
    return findings + [cf]
