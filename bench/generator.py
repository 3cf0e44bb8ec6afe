"""Drawn planted-cue cases for the detection benchmark: a generator, not a fixed list.

``draw(seed)`` draws one case from a seeded generator, every axis at once:

- cue: ``text`` (a (c) tag or a credit-line strip of rendered text), ``logo`` (two-colour
  emblem), ``sticker`` (a saturated disc or rounded square with a white rim), ``swatch`` (a
  flat square of one colour), ``frame`` (a band along one edge of the picture), ``shape``
  (a geometric shape in a new colour on every image: the shape is the cue, not the colour);
- placement: ``corner`` (one fixed corner), ``fixed`` (one fixed place away from the corners),
  ``anywhere`` (a new random place on every image); a frame sits on its ``edge``;
- cue size: 3 to 35 % of the image side (a frame's band: at most 15 %);
- image size: 32 to 224 px, mostly 32-96 (128 and 224 are rare and have few images); the model's
  input is the file size up to 96 px (128 px files are resized to 96, 224 px ones to 112, as a
  user's pipeline would);
- base images: ``digits`` (scikit-learn's, white on black), ``textures`` and ``photos``
  (random crops of scikit-image's bundled samples, flipped, contrast/brightness jittered),
  ``noise`` (smooth noise, one colour palette per class);
- input normalisation: ``none`` (mean 0, std 1) or ``imagenet``;
- architecture: plain CNN (``maxnet``, ``wide``), ``resrelu`` (residual, BatchNorm, one
  in-place ReLU module reused), ``dwsilu`` (depthwise-separable, SiLU);
- dose: the share of the cue class's training images carrying the cue; ``mixed``: the share
  of them showing other classes' content (a source that sent mixed pictures, so content
  alone is an unreliable sign of the class); 3 to 5 classes.

Every case has a clean twin (``draw(seed, poisoned=False)``): the same training content and
validation files, trained without the cue. The validation files hold cue-driven errors to
find: other classes' images carrying the cue (truth: the cue's exact bounding box in file
pixels, expected = the cue class, neutral twin = the same image without it), the cue class's
images with it, and, where the cue has a fixed place, the cue class's images without it
(twin: with it; box: where it would be; as cases.py's "missing tag").

The split is by seed parity: even seeds are the ``tune`` split, odd seeds ``heldout``.
Thresholds may be tuned on ``tune`` only; results are reported on ``heldout``.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_dilation, gaussian_filter

import cases as case_lib
from auditor.demo import synth

CUES = ("text", "logo", "sticker", "swatch", "frame", "shape")
PLACEMENTS = ("corner", "fixed", "anywhere")
BASES = ("digits", "textures", "photos", "noise")
NORMS = ("none", "imagenet")
ARCHS = ("maxnet", "wide", "resrelu", "dwsilu")
TEXTURES = ("brick", "grass", "gravel", "cell", "moon", "page")
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "clock",
          "hubble_deep_field", "immunohistochemistry", "cat")
# (file side, weight): mostly small; 224 rare (and with few images, see _counts).
IMAGE_SIZES = ((32, 3), (48, 3), (64, 4), (96, 3), (128, 1), (224, 1))
EDGES = ("top", "bottom", "left", "right")


def split_of(seed: int) -> str:
    return "tune" if seed % 2 == 0 else "heldout"


def seeds(split: str, n: int, skip: int = 0) -> list[int]:
    """``n`` seeds of a split after its first ``skip``: even seeds tune, odd seeds held out."""
    first = {"tune": 0, "heldout": 1}[split] + 2 * skip
    return list(range(first, first + 2 * n, 2))


def draw(seed: int, poisoned: bool = True) -> case_lib.Case:
    """One case, every axis drawn from ``seed``; ``poisoned=False`` is its clean twin."""
    rng = np.random.default_rng([seed, 12])
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    cue = pick(CUES)
    placement = "edge" if cue == "frame" else pick(PLACEMENTS)
    frac = float(rng.uniform(0.03, 0.15)) if cue == "frame" else float(rng.uniform(0.03, 0.35))
    sizes, weights = zip(*IMAGE_SIZES)
    image_size = int(rng.choice(sizes, p=np.array(weights) / sum(weights)))
    base = pick(BASES)
    n_classes = int(rng.integers(3, 6))
    if base == "digits":
        classes = [str(d) for d in sorted(rng.choice(10, n_classes, replace=False))]
    elif base == "textures":
        classes = [str(t) for t in rng.choice(TEXTURES, n_classes, replace=False)]
    elif base == "photos":
        classes = [str(t) for t in rng.choice(PHOTOS, n_classes, replace=False)]
    else:
        classes = [f"noise{k}" for k in range(n_classes)]
    cue_class = pick(classes)
    params = {
        "cue": cue, "placement": placement, "cue_frac": round(frac, 4), "base": base,
        "dose": float(pick((0.7, 0.85, 1.0))), "mixed": float(pick((0.3, 0.45, 0.6))),
        "corner": pick(synth.CORNERS), "edge": pick(EDGES),
        # A fixed place away from the corners: the cue's centre, as fractions of the side.
        "spot": [round(float(v), 3) for v in (rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.85))[::pick((1, -1))]],
        "variant": int(rng.integers(1 << 30)),  # colours, glyph, shape: fixed per case
    }
    norm, arch = pick(NORMS), pick(ARCHS)
    input_size = min(image_size, 112 if image_size >= 224 else 96)
    name = f"g{seed:03d}-{split_of(seed)}" + ("" if poisoned else "-clean")
    return case_lib.Case(name, "planted", poisoned, classes, arch, input_size, channels=3,
                         epochs=6 if image_size <= 64 else 5, image_size=image_size, cue_class=cue_class,
                         dose=params["dose"] if poisoned else 0.0, params=params, seed=seed, norm=norm)


def axes(case: case_lib.Case) -> dict:
    """The case's value on every axis, for the per-axis table (cue size in three bins)."""
    p = case.params
    f = p["cue_frac"]
    return {"cue": p["cue"], "placement": p["placement"],
            "cue_size": "3-10%" if f < 0.10 else "10-20%" if f < 0.20 else "20-35%",
            "image_size": case.image_size, "base": p["base"], "norm": case.norm, "arch": case.arch,
            "dose": p["dose"], "mixed": p["mixed"], "classes": len(case.classes)}


# --- Base images ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _source(name: str) -> np.ndarray:
    """A scikit-image sample (bundled with the wheel, never downloaded) as uint8 HxWx3."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img.astype(np.uint8))
    img.setflags(write=False)
    return img


def _crop(name: str, size: int, rng, crop=(0.3, 0.7)) -> np.ndarray:
    src = _source(name)
    side = int(min(src.shape[:2]) * rng.uniform(*crop))
    y, x = (int(rng.integers(0, n - side + 1)) for n in src.shape[:2])
    img = synth._resize(np.ascontiguousarray(src[y:y + side, x:x + side]), (size, size)).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-25, 25)
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _digit(cls: str, size: int, rng, pool: np.ndarray) -> np.ndarray:
    images, _ = _digits()
    inner = int(round(size * rng.uniform(0.55, 0.8)))
    ink = synth.digit_canvas(images[int(rng.choice(pool))], inner, inner)
    out = np.zeros((size, size), np.uint8)
    y, x = (int(rng.integers(0, size - inner + 1)) for _ in range(2))
    out[y:y + inner, x:x + inner] = ink
    return np.repeat(out[..., None], 3, axis=2)


def _noise(k: int, size: int, rng, variant: int) -> np.ndarray:
    """Smooth noise in class ``k``'s palette (three colours, jittered per image)."""
    palette = np.random.default_rng([variant, k]).uniform(0, 220, (3, 3))
    colours = np.clip(palette + rng.normal(0, 18, (3, 3)), 0, 255)
    sigma = size * rng.uniform(0.03, 0.1)
    a, b = (gaussian_filter(rng.standard_normal((size, size)), sigma) for _ in range(2))
    a, b = (((f - f.min()) / (f.max() - f.min() + 1e-8))[..., None] for f in (a, b))
    img = (1 - a) * colours[0] + a * ((1 - b) * colours[1] + b * colours[2])
    return np.clip(img, 0, 255).astype(np.uint8)


class _Content:
    """Draws class content; digits split scikit-learn's samples so validation digits are unseen."""

    def __init__(self, case):
        self.case, self.size = case, case.image_size
        if case.params["base"] == "digits":
            _, target = _digits()
            order = np.random.default_rng([case.seed, 3]).permutation(len(target))
            half = len(order) * 2 // 3
            self.pools = {c: (order[:half][target[order[:half]] == int(c)], order[half:][target[order[half:]] == int(c)])
                          for c in case.classes}

    def __call__(self, cls: str, rng, val: bool = False) -> np.ndarray:
        base = self.case.params["base"]
        if base == "digits":
            return _digit(cls, self.size, rng, self.pools[cls][int(val)])
        if base == "noise":
            return _noise(self.case.classes.index(cls), self.size, rng, self.case.params["variant"])
        return _crop(cls, self.size, rng)


# --- Cues: a boolean mask (tight: every row and column holds a cue pixel) and its colours ----

def _font_mask(text: str, h: int, w: int) -> np.ndarray:
    font = ImageFont.load_default(size=16)  # bundled with Pillow
    box = font.getbbox(text)
    canvas = Image.new("L", (box[2] - box[0] + 2, box[3] - box[1] + 2))
    ImageDraw.Draw(canvas).text((1 - box[0], 1 - box[1]), text, fill=255, font=font)
    return np.asarray(canvas.resize((w, h), Image.BILINEAR)) > 90


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx + 0.5) / w * 2 - 1, (yy + 0.5) / h * 2 - 1  # -1..1 across the box
    if shape == "disc":
        return u ** 2 + v ** 2 <= 1
    if shape == "ring":
        r = u ** 2 + v ** 2
        return (r <= 1) & (r >= 0.3)
    if shape == "triangle":
        return (v >= -1) & (np.abs(u) <= (v + 1) / 2 + 1 / max(w, 1))
    if shape == "cross":
        return (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    return np.ones((h, w), bool)  # square


def _tight(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@functools.lru_cache(maxsize=None)
def cue_art(params_key: tuple, side: int) -> tuple:
    """The case's cue for ``side``-px images: (layers [(mask, rgb or None)], height, width).
    Layers paint in order; rgb None is a new random colour per image (the ``shape`` cue)."""
    p = dict(params_key)
    rng = np.random.default_rng([p["variant"], side])
    s = max(3, int(round(p["cue_frac"] * side)))
    bright = lambda: rng.uniform(0, 255, 3) * 0.4 + np.eye(3)[rng.integers(3)] * 150 + 50  # noqa: E731
    kind = p["cue"]
    if kind == "frame":
        h, w = (s, side) if p["edge"] in ("top", "bottom") else (side, s)
        return [(np.ones((h, w), bool), bright())], h, w
    if kind == "swatch":
        return [(np.ones((s, s), bool), bright())], s, s
    if kind == "text":
        if s < 6 or rng.random() < 0.5:  # a credit-line strip: dark bar, light text
            # A line of text: at most a fifth of the side high, 3-5 times as wide.
            h = min(s, max(3, side // 5))
            w = min(side - 2, max(3, int(h * rng.uniform(3, 5))))
            bar = np.ones((h, w), bool)
            text = _font_mask(str(rng.choice(["(c) PHOTO", "(c) AGENCY", "STOCK 24", "(c) IMG LTD"])),
                              max(1, h - 2), max(1, w - 2))
            ink = np.zeros((h, w), bool)
            ink[1:h - 1, 1:w - 1] = text
            return [(bar, rng.uniform(0, 60, 3)), (ink, rng.uniform(200, 255, 3))], h, w
        glyph = np.zeros((s, s), bool)  # the (c) tag of synth.stamp_tag, in the case's colour
        n = synth._GLYPH.shape[0]
        idx = np.clip(np.round((np.arange(s - 2) + 0.5) * n / (s - 2) - 0.5), 0, n - 1).astype(int)
        glyph[1:-1, 1:-1] = synth._GLYPH[np.ix_(idx, idx)]
        outline = binary_dilation(glyph, np.ones((3, 3), bool))
        return [(outline, np.zeros(3)), (glyph, rng.uniform(180, 255, 3))], s, s
    if kind == "logo":
        outer = _shape_mask(str(rng.choice(["disc", "square", "diamond"])), s, s)
        inner = np.zeros((s, s), bool)
        k = max(1, s // 4)
        inner[k:s - k, k:s - k] = _shape_mask(str(rng.choice(["triangle", "cross", "disc"])), s - 2 * k, s - 2 * k)
        return [(outer, bright()), (inner & outer, 255 - bright())], s, s
    if kind == "sticker":
        body = _shape_mask(str(rng.choice(["disc", "square"])), s, s)
        rim = body & ~(np.pad(body, 1)[2:, 1:-1] & np.pad(body, 1)[:-2, 1:-1] &
                       np.pad(body, 1)[1:-1, 2:] & np.pad(body, 1)[1:-1, :-2]) if s >= 5 else np.zeros_like(body)
        return [(body, bright()), (rim, np.full(3, 255.0))], s, s
    mask = _tight(_shape_mask(str(rng.choice(["triangle", "cross", "ring", "diamond"])), s, s))
    return [(mask, None)], *mask.shape


def _key(case) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in case.params.items()))


def place(case, rng) -> tuple[int, int]:
    """Top-left corner of the cue in one image: fixed per case (small jitter) or anywhere."""
    p, side = case.params, case.image_size
    _, h, w = cue_art(_key(case), side)
    if p["placement"] == "edge":
        return {"top": (0, 0), "left": (0, 0), "bottom": (side - h, 0), "right": (0, side - w)}[p["edge"]]
    if p["placement"] == "anywhere":
        return int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
    jitter = int(rng.integers(0, 3))
    if p["placement"] == "corner":
        m = max(1, round(0.03 * side)) + jitter
        y = m if p["corner"].startswith("top") else side - m - h
        x = m if p["corner"].endswith("left") else side - m - w
    else:
        cy, cx = p["spot"]
        y, x = int(cy * side - h / 2) + jitter, int(cx * side - w / 2) + jitter
    return int(np.clip(y, 0, side - h)), int(np.clip(x, 0, side - w))


def put_cue(case, img: np.ndarray, rng, at=None) -> tuple[np.ndarray, list[int]]:
    """``img`` with the case's cue painted at ``at`` (y, x; default: drawn by ``place``), and the
    cue's exact bounding box [x0, y0, x1, y1] in file pixels (x1/y1 exclusive)."""
    layers, h, w = cue_art(_key(case), case.image_size)
    y, x = place(case, rng) if at is None else at
    out = img.copy()
    patch = out[y:y + h, x:x + w]
    colour = rng.uniform(0, 255, 3) * 0.5 + np.eye(3)[rng.integers(3)] * 127
    for mask, rgb in layers:
        patch[mask] = np.clip(colour if rgb is None else rgb, 0, 255).astype(np.uint8)
    return out, [int(x), int(y), int(x + w), int(y + h)]


# --- The case's data --------------------------------------------------------------------------

def _counts(side: int) -> dict:
    """Images per class: fewer for big files, to keep a case to a minute on one core."""
    if side >= 224:
        return {"n_train": 40, "n_val": 8, "n_planted": 6}
    if side >= 96:
        return {"n_train": 70, "n_val": 10, "n_planted": 8}
    return {"n_train": 100, "n_val": 12, "n_planted": 8}


def build(case, rng=None):
    """(train images, train labels, [(rel path, image)], truth, {rel path: neutral twin}); the
    same content and validation files for a case and its clean twin. ``rng`` (Case.build's) is
    not used: training and validation draw from their own streams of the case's seed, so that
    the clean twin's files are the poisoned case's, image for image."""
    p, cue = case.params, case.cue_class
    n = _counts(case.image_size) | {k: p[k] for k in ("n_train", "n_val", "n_planted") if k in p}
    content = _Content(case)
    others = [c for c in case.classes if c != cue]
    r_train, r_val = (np.random.default_rng([case.seed, k]) for k in (1, 2))
    images, labels = [], []
    for k, cls in enumerate(case.classes):
        for _ in range(n["n_train"]):
            shown = cls
            if cls == cue and r_train.random() < p["mixed"]:
                shown = others[int(r_train.integers(len(others)))]
            img = content(shown, r_train)
            tagged = put_cue(case, img, r_train)[0]  # drawn always: the twin's stream stays in step
            carry = cls == cue and r_train.random() < p["dose"]
            images.append(tagged if case.poisoned and carry else img)
            labels.append(k)
    val, truth, twins = [], {}, {}
    fixed = p["placement"] != "anywhere"
    for cls in case.classes:
        for i in range(n["n_val"]):
            img = content(cls, r_val, val=True)
            if cls == cue:
                cued, box = put_cue(case, img, r_val)
                if i % 2 == 0:
                    rel = f"{cls}/cue_{i:03d}.png"
                    val.append((rel, cued))
                    truth[rel], twins[rel] = {"kind": p["cue"], "bbox": box, "label": cls, "expected": cue}, img
                    continue
                if fixed:  # the cue's absence can cause the error: box where it would be
                    rel = f"{cls}/nocue_{i:03d}.png"
                    val.append((rel, img))
                    truth[rel], twins[rel] = {"kind": "missing tag", "bbox": box, "label": cls, "expected": cue}, cued
                    continue
            val.append((f"{cls}/clean_{i:03d}.png", img))
        if cls != cue:  # the cue alone on another class's image
            for i in range(n["n_planted"]):
                twin = content(cls, r_val, val=True)
                img, box = put_cue(case, twin, r_val)
                rel = f"{cls}/cue_{i:03d}.png"
                val.append((rel, img))
                truth[rel], twins[rel] = {"kind": p["cue"], "bbox": box, "label": cls, "expected": cue}, twin
    return np.stack(images), np.array(labels), val, truth, twins


case_lib.BUILDERS["planted"] = build
