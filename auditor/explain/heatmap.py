"""Small shared steps on heatmaps: normalising, region masses, named corner and border bands."""
from __future__ import annotations

import numpy as np

EPS = 1e-12


def normalise(maps: np.ndarray, copy: bool = True) -> np.ndarray:
    """Each map [.., h, w] scaled to sum 1 (a map of zeros stays zeros). ``copy=False`` works in
    place on a float32 array the caller owns (as ``Evidence.explained`` returns): with N maps of a
    large validation set, one copy fewer."""
    maps = np.asarray(maps, dtype=np.float32)
    maps = np.clip(maps, 0, None, out=None if copy else maps)
    total = maps.sum(axis=(-2, -1), keepdims=True)
    np.divide(maps, total, out=maps, where=total > EPS)
    maps[~(total > EPS)[..., 0, 0]] = 0  # all-zero maps, and NaN ones, come out as zeros
    return maps


def bands(width: float) -> dict[str, tuple[float, float, float, float]]:
    """Corner squares and border strips as fractions [x0, y0, x1, y1] of the image."""
    b, e = width, 1.0 - width
    return {
        "top-left corner": (0, 0, b, b), "top-right corner": (e, 0, 1, b),
        "bottom-left corner": (0, e, b, 1), "bottom-right corner": (e, e, 1, 1),
        "top border": (0, 0, 1, b), "bottom border": (0, e, 1, 1),
        "left border": (0, 0, b, 1), "right border": (e, 0, 1, 1),
    }


def grow_box(box, by: float) -> tuple[float, float, float, float]:
    """A fractional box [x0, y0, x1, y1] widened by ``by`` on every side, clipped to the image."""
    x0, y0, x1, y1 = box
    return (max(0.0, x0 - by), max(0.0, y0 - by), min(1.0, x1 + by), min(1.0, y1 + by))


def pixel_box(frac_box, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A fractional box [x0, y0, x1, y1] as whole pixels of an [h, w] image, at least one pixel each way."""
    h, w = shape
    x0, y0 = int(round(frac_box[0] * w)), int(round(frac_box[1] * h))
    return x0, y0, max(int(round(frac_box[2] * w)), x0 + 1), max(int(round(frac_box[3] * h)), y0 + 1)


def region_mask(shape: tuple[int, int], frac_box) -> np.ndarray:
    """Boolean [h, w] mask of a fractional box, snapped to whole pixels."""
    x0, y0, x1, y1 = pixel_box(frac_box, shape)
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def region_mass(maps: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Share of each normalised map's mass inside each mask: name -> [N]."""
    maps = normalise(maps)
    return {name: maps[..., m].sum(axis=-1) for name, m in masks.items()}


# --- Tight boxes: from a rule's region to the evidence, and to the object the image shows there ---

def box_area(box) -> float:
    """Area of a fractional box [x0, y0, x1, y1], as a share of the image."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def boxes_overlap(a, b) -> bool:
    """Whether two boxes [x0, y0, x1, y1] (in the same units) share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_words(box) -> str:
    """Where a fractional box's centre lies, in words: 'top left', 'bottom', 'centre', ..."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if (v, h) == ("middle", "centre") else f"{v} {h}".replace("middle ", "").replace(" centre", "")


def evidence_box(heat: np.ndarray, region=None, level: float = 0.5) -> tuple[float, float, float, float] | None:
    """Fractional bounding box of a heatmap's connected evidence region.

    The map's peak inside ``region`` (a fractional box; the whole map when None), the map
    thresholded at ``level`` times that peak, and the connected part (8-neighbours) holding the
    peak: it may run out of the region (a tag wider than a corner square). None for a map with
    no positive evidence in the region."""
    from skimage.measure import label

    heat = np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0, None)
    h, w = heat.shape
    inside = np.where(region_mask((h, w), region), heat, 0) if region is not None else heat
    if inside.max() <= EPS:
        return None
    peak = np.unravel_index(np.argmax(inside), heat.shape)
    parts = label(heat >= level * heat[peak], connectivity=2)
    ys, xs = np.nonzero(parts == parts[peak])
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def _stand_out(win: np.ndarray, ring: np.ndarray, k: float, min_diff: float) -> np.ndarray:
    """Pixels of ``win`` [h, w, C] that differ from the median colour of ``ring`` [n, C] by ``k``
    robust spreads and at least ``min_diff`` on some channel."""
    bg = np.median(ring, axis=0)
    # The spread from the quarter of the ring nearest the median (a normal's 25% quantile of
    # |deviation| is 0.3186 sigma): robust to an object that covers much of the ring too.
    spread = np.quantile(np.abs(ring - bg), 0.25, axis=0) / 0.3186
    return (np.abs(win - bg) > np.maximum(k * spread, min_diff)).any(axis=2)


def object_box(img: np.ndarray, box, max_area: float = 0.25, k: float = 3.0, min_diff: float = 0.1,
               min_fill: float = 0.03) -> tuple[float, float, float, float] | None:
    """Fractional bounding box of the object the image shows at ``box`` (a fractional box).

    ``img``: the file's pixels, float [H, W, C] in [0, 1]. The object is the connected parts
    (8-neighbours, 3 px or more) of the pixels that stand out from the local background (the
    median colour of a window around the box, by ``k`` robust spreads and at least
    ``min_diff``) and reach into the box. A mark on a texture as contrasted as itself does not
    stand out this way (then None, and the evidence region is the box). The window is the box grown by its own size on every
    side; an object cut by the window, or not told from a ring that is much of it, is looked for
    again in windows 3, 7 and 15 times as large (a strip runs on along the edge). None when too little stands out in the box (under
    ``min_fill`` of it: a texture's stray pixels), or the object is still cut, or larger than
    ``max_area`` of the image (a texture or the photo's subject, not a mark)."""
    from skimage.measure import label

    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    H, W = img.shape[:2]
    x0, y0 = int(np.floor(box[0] * W)), int(np.floor(box[1] * H))
    x1, y1 = max(int(np.ceil(box[2] * W)), x0 + 1), max(int(np.ceil(box[3] * H)), y0 + 1)
    for grow in (1, 3, 7, 15):
        bw, bh = x1 - x0, y1 - y0
        wx0, wy0 = max(0, x0 - grow * bw), max(0, y0 - grow * bh)
        wx1, wy1 = min(W, x1 + grow * bw), min(H, y1 + grow * bh)
        win = img[wy0:wy1, wx0:wx1]
        core = np.zeros(win.shape[:2], bool)
        core[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = True
        ring = win[~core]
        if len(ring) < 8:
            return None  # the box is the whole image: no background to tell an object from
        differ = _stand_out(win, ring, k, min_diff)
        parts = label(differ, connectivity=2)
        sizes = np.bincount(parts.ravel())
        differ &= sizes[parts] >= 3  # single stray pixels are noise, not an object
        if (differ & core).sum() < min_fill * core.sum():
            continue  # a close ring may be much of the object itself: judge against a wider one
        obj = np.isin(parts, np.unique(parts[core & differ]))
        ys, xs = np.nonzero(obj)
        cut = ((ys.min() == 0 and wy0 > 0) or (xs.min() == 0 and wx0 > 0) or
               (ys.max() == win.shape[0] - 1 and wy1 < H) or (xs.max() == win.shape[1] - 1 and wx1 < W))
        if not cut:
            break
        if (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1) > max_area * H * W:
            return None  # already too large to be a mark
    else:
        return None
    found = ((xs.min() + wx0) / W, (ys.min() + wy0) / H, (xs.max() + 1 + wx0) / W, (ys.max() + 1 + wy0) / H)
    return found if box_area(found) <= max_area else None


def outlined(img: np.ndarray, box, most: int = 3, tol: float = 0.05, min_diff: float = 0.1,
             flat: float = 0.9) -> tuple[float, float, float, float]:
    """``box`` (fractional) grown by the outline drawn around it: a sticker's rim, a ring's dark line.
    An object told by its inside alone (the inside stands out, the rim is as bright as the
    background) leaves the rim out, and a box of the inside covers under half a small mark (the
    tune split's g018: a 6 px sticker's 4 px inside).

    Grown a pixel at a time, at most ``most`` times, while the ring of pixels just outside the box
    (its corner pixels left out: outlines are often rounded) is one colour (``flat`` of it within
    ``tol`` of its median on every channel), differs from the box's inside, and differs from the
    ring beyond it, by ``min_diff`` (a drawn line, not a flat background running on)."""
    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    H, W = img.shape[:2]
    x0, y0, x1, y1 = pixel_box(box, (H, W))

    def ring(a0, b0, a1, b1):  # the pixels just outside [a0, a1) x [b0, b1), corners left out
        if a0 < 1 or b0 < 1 or a1 > W - 1 or b1 > H - 1:
            return None
        return np.concatenate([img[b0 - 1, a0:a1], img[b1, a0:a1], img[b0:b1, a0 - 1], img[b0:b1, a1]])

    grown = 0
    while grown < most:
        line, beyond = ring(x0, y0, x1, y1), ring(x0 - 1, y0 - 1, x1 + 1, y1 + 1)
        if line is None or beyond is None:
            break
        colour = np.median(line, axis=0)
        inside = np.median(img[y0:y1, x0:x1].reshape(-1, img.shape[2]), axis=0)
        one = (np.abs(line - colour) <= tol).all(axis=1).mean() >= flat
        if not (one and np.abs(colour - inside).max() >= min_diff
                and np.abs(colour - np.median(beyond, axis=0)).max() >= min_diff):
            break
        x0, y0, x1, y1, grown = x0 - 1, y0 - 1, x1 + 1, y1 + 1, grown + 1
    if not grown:
        return tuple(float(v) for v in box)
    return (x0 / W, y0 / H, x1 / W, y1 / H)


def inner_object_box(img: np.ndarray, blob, heat: np.ndarray, max_area: float = 0.25, k: float = 3.0,
                     min_diff: float = 0.1) -> tuple[float, float, float, float] | None:
    """Fractional bounding box of the object inside a coarse evidence ``blob`` (a fractional box
    larger than ``max_area``: a Grad-CAM of a small strided network at 32 px is a 4 x 4 grid,
    whose blob holds the mark and much else) that the heatmap covers most densely.

    The objects are the connected parts (8-neighbours, 3 px or more) of the blob's pixels that
    stand out from the blob's own median colour (as in ``object_box``), at most ``max_area`` of
    the image; the one with the highest mean of ``heat`` (resized to the image) over its pixels.
    None when none stands out."""
    from scipy import ndimage
    from skimage.measure import label
    from skimage.transform import resize

    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    H, W = img.shape[:2]
    x0, y0, x1, y1 = pixel_box(blob, (H, W))
    win = img[y0:y1, x0:x1]
    parts = label(_stand_out(win, win.reshape(-1, win.shape[2]), k, min_diff), connectivity=2)
    dense = resize(np.asarray(heat, np.float32), (H, W), order=1)[y0:y1, x0:x1]
    if parts.max() == 0:
        return None
    index = np.arange(1, parts.max() + 1)
    sizes = np.bincount(parts.ravel())[1:]
    means = ndimage.mean(dense, parts, index)   # one pass over the window, whatever the parts' number
    best, found = -np.inf, None
    for p, (ys, xs) in enumerate(ndimage.find_objects(parts)):
        b = ((xs.start + x0) / W, (ys.start + y0) / H, (xs.stop + x0) / W, (ys.stop + y0) / H)
        if sizes[p] >= 3 and box_area(b) <= max_area and means[p] > best:
            best, found = means[p], b
    return found


def flat_box(img: np.ndarray, box, max_area: float = 0.25, tol: float = 0.01,
             min_share: float = 0.5) -> tuple[float, float, float, float] | None:
    """Fractional bounding box of the flat patch of one colour that fills most of ``box``.

    ``img``: float [H, W, C] in [0, 1]. A frame, a padding bar or a printed tag is drawn in one
    colour; on a texture as contrasted as itself it does not stand out by contrast
    (``object_box``), but it is told by being flat. The colour is the median of ``box``'s
    pixels; the patch is the 4-connected pixels within ``tol`` of it on every channel (2 px
    thick or more) that reach into the box. None when that colour is under ``min_share`` of the
    box (the box is not on a flat patch), or the patch is larger than ``max_area`` of the image
    (a flat background, the black around a digit, a sky: not a mark)."""
    from scipy import ndimage
    from skimage.measure import label

    img = np.asarray(img, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    H, W = img.shape[:2]
    x0, y0, x1, y1 = pixel_box(box, (H, W))
    core = img[y0:y1, x0:x1].reshape(-1, img.shape[2])
    colour = np.median(core, axis=0)
    # Opened with a 2 x 2 square: texture pixels of that colour that touch the patch one by one
    # are not part of it.
    same = ndimage.binary_opening((np.abs(img - colour) <= tol).all(axis=2), np.ones((2, 2), bool))
    if same[y0:y1, x0:x1].sum() < min_share * (y1 - y0) * (x1 - x0):
        return None
    parts = label(same, connectivity=1)
    mine = np.unique(parts[y0:y1, x0:x1][same[y0:y1, x0:x1]])
    ys, xs = np.nonzero(np.isin(parts, mine))
    found = (xs.min() / W, ys.min() / H, (xs.max() + 1) / W, (ys.max() + 1) / H)
    return found if box_area(found) <= max_area else None


def covered(a, b) -> float:
    """Share of box ``b``'s area that box ``a`` covers."""
    inter = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box_area(inter) / max(box_area(b), EPS)


def tight_boxes(heat: np.ndarray | None, img: np.ndarray | None, region, max_area: float = 0.25,
                level: float = 0.3) -> list[tuple[float, float, float, float]]:
    """Candidate boxes for a finding, best first: where the heatmap's connected evidence region
    is larger than ``max_area`` (a coarse map's blob), the object inside it that the map covers
    most densely (``inner_object_box``); the object the image shows at the evidence region
    (``object_box`` of ``evidence_box``: the whole mark, where a coarse map's blob is larger than
    it or a map's peak covers only part of it; or ``flat_box``, the flat patch it lies on, where
    that holds more of the evidence region; grown by an outline drawn around it, ``outlined``),
    that evidence region
    (at ``level`` of the peak: low enough to hold most of a mark when no object is told from
    its background), and the rule's own ``region`` (a fractional box: a corner square, a border
    strip). Boxes over ``max_area`` of the image are dropped, except the rule's region, which is
    always last.

    The first is the finding's box; the interventions fall back to the others, smallest first
    and the region last, when its test does not confirm (``auditor.judge.intervene``)."""
    out = []
    ebox = evidence_box(heat, region, level) if heat is not None else None
    if ebox is not None and box_area(ebox) > max_area and img is not None:
        inner = inner_object_box(img, ebox, heat, max_area)  # a coarse map's blob: the object it covers most
        if inner is not None:
            out.append(inner)
    if ebox is not None and box_area(ebox) > max_area and region is not None:
        ebox = evidence_box(np.where(region_mask(np.shape(heat), region), heat, 0), region, level)  # kept in the region
    if ebox is not None and img is not None:
        # The object that stands out there; the flat patch the evidence lies on (a frame on a
        # texture as contrasted as itself) first where it holds more of the evidence region and
        # the object not half of it (a speck of the texture next to the frame).
        obj, flat = object_box(img, ebox, max_area), flat_box(img, ebox, max_area)
        if flat is not None and (obj is None or covered(obj, ebox) < 0.5 <= covered(flat, ebox)):
            obj, flat = flat, obj
        if obj is not None:
            obj = outlined(img, obj)
        out += [b for b in (obj, flat) if b is not None]
    if ebox is not None and box_area(ebox) <= max_area:
        out.append(ebox)
    if region is not None:
        out.append(tuple(float(v) for v in region))
    kept = []
    for b in out:  # one of each, to 3 decimals
        b = tuple(round(float(v), 4) for v in b)
        if b not in kept:
            kept.append(b)
    return kept
