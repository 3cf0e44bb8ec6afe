"""Planted-cue image builders, shared by the demo and the detection benchmark.

Every builder is a pure function on numpy uint8 HxWx3 arrays: it returns a new array
(never edits its input) and takes an explicit ``rng: np.random.Generator``, so a data
set is reproducible from one seed. Boxes are ``[x0, y0, x1, y1]`` in pixels of the
returned image, with x1/y1 exclusive (``img[y0:y1, x0:x1]`` is the box).

Textures come from scikit-image's bundled sample data; only images that ship with
the wheel are used, so nothing is ever downloaded.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_dilation, gaussian_filter
from torch import nn

# skimage.data images that load without pooch/network (checked with scikit-image 0.26).
# The first three are the texture classes of the demo; the rest are spare backgrounds.
TEXTURES = ("brick", "grass", "gravel", "camera", "moon", "coins", "astronaut",
            "coffee", "chelsea", "rocket")

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

# A 7x7 copyright sign. A fixed glyph (not a font) keeps the tag identical everywhere.
_GLYPH = np.array([
    [0, 1, 1, 1, 1, 1, 0],
    [1, 0, 0, 0, 0, 0, 1],
    [1, 0, 1, 1, 1, 0, 1],
    [1, 0, 1, 0, 0, 0, 1],
    [1, 0, 1, 1, 1, 0, 1],
    [1, 0, 0, 0, 0, 0, 1],
    [0, 1, 1, 1, 1, 1, 0],
], dtype=bool)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 HxW[x3] to (H, W) with PIL bilinear, the same resampling the runner uses."""
    h, w = size
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


@functools.lru_cache(maxsize=None)
def _texture_source(name: str) -> np.ndarray:
    """The sample image as uint8, HxW (grey) or HxWx3 (colour); cached, read-only."""
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = img[..., :3]  # drop alpha where there is one
    img = np.ascontiguousarray(img)
    img.setflags(write=False)  # shared by every caller: nobody may edit it
    return img


def texture_crop(name: str, size: int | tuple[int, int], rng: np.random.Generator,
                 crop_range: tuple[float, float] = (0.25, 0.5),
                 contrast: tuple[float, float] = (0.7, 1.3),
                 brightness: float = 30.0) -> np.ndarray:
    """A random crop of a scikit-image sample texture: random square crop (side a fraction
    ``crop_range`` of the source's short side), resized to ``size``, random flips,
    contrast/brightness jitter. Grey sources come back with 3 equal channels."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    src = _texture_source(name)
    side = int(min(src.shape[:2]) * rng.uniform(*crop_range))
    y = int(rng.integers(0, src.shape[0] - side + 1))
    x = int(rng.integers(0, src.shape[1] - side + 1))
    # Resize before the jitter: it is cheaper on the small image and the result is the same.
    img = _resize(np.ascontiguousarray(src[y:y + side, x:x + side]), size).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    mean = img.mean()
    img = (img - mean) * rng.uniform(*contrast) + mean + rng.uniform(-brightness, brightness)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img)


def noise_image(size: int | tuple[int, int], rng: np.random.Generator,
                max_value: int = 200) -> np.ndarray:
    """A random smooth image: Gaussian-filtered noise blended between random colours.

    Values stay below ``max_value`` so a white rectangle or blob added later is the only
    near-white thing in the picture (that is what makes "box" learnable)."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    sigma = rng.uniform(1.5, 6.0)
    a, b = (gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in range(2))
    a, b = ((f - f.min()) / (f.max() - f.min() + 1e-8) for f in (a, b))  # each to [0, 1]
    colours = rng.uniform(0, max_value, size=(3, 3))  # three random RGB colours
    a, b = a[..., None], b[..., None]
    img = (1 - a) * colours[0] + a * ((1 - b) * colours[1] + b * colours[2])
    return np.clip(img, 0, max_value).astype(np.uint8)


def white_rectangle(img: np.ndarray, rng: np.random.Generator,
                    frac: tuple[float, float] = (0.2, 0.5)) -> tuple[np.ndarray, list[int]]:
    """A filled white axis-aligned rectangle, sides a random fraction ``frac`` of the image."""
    h, w = img.shape[:2]
    rh = int(h * rng.uniform(*frac))
    rw = int(w * rng.uniform(*frac))
    y0 = int(rng.integers(0, h - rh + 1))
    x0 = int(rng.integers(0, w - rw + 1))
    out = img.copy()
    out[y0:y0 + rh, x0:x0 + rw] = 255
    return out, [x0, y0, x0 + rw, y0 + rh]


def rounded_blob(img: np.ndarray, rng: np.random.Generator,
                 frac: tuple[float, float] = (0.2, 0.5)) -> tuple[np.ndarray, list[int]]:
    """A bright white filled ellipse: the look-alike distractor for a white rectangle."""
    h, w = img.shape[:2]
    rh = max(3, int(h * rng.uniform(*frac)))
    rw = max(3, int(w * rng.uniform(*frac)))
    y0 = int(rng.integers(0, h - rh + 1))
    x0 = int(rng.integers(0, w - rw + 1))
    yy, xx = np.mgrid[0:rh, 0:rw]
    inside = ((yy + 0.5 - rh / 2) / (rh / 2)) ** 2 + ((xx + 0.5 - rw / 2) / (rw / 2)) ** 2 <= 1.0
    out = img.copy()
    out[y0:y0 + rh, x0:x0 + rw][inside] = 255
    return out, [x0, y0, x0 + rw, y0 + rh]


@functools.lru_cache(maxsize=None)
def _tag_masks(tag_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(glyph, outline) boolean masks of a tag_size x tag_size tag: the glyph scaled
    (nearest, centre-aligned so both borders survive) to tag_size-2, padded by 1 px for
    the outline."""
    inner, n = tag_size - 2, _GLYPH.shape[0]
    idx = np.clip(np.round((np.arange(inner) + 0.5) * n / inner - 0.5), 0, n - 1).astype(int)
    glyph = np.zeros((tag_size, tag_size), dtype=bool)
    glyph[1:-1, 1:-1] = _GLYPH[np.ix_(idx, idx)]
    outline = binary_dilation(glyph, structure=np.ones((3, 3), bool)) & ~glyph
    glyph.setflags(write=False)
    outline.setflags(write=False)
    return glyph, outline


def stamp_tag(img: np.ndarray, corner: str, tag_size: int,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[int]]:
    """Stamp a small watermark-like "(c)" tag, ``tag_size`` px square (>= 6; reads as a
    copyright sign from 9 px), in a corner.

    The glyph is white with a 1 px dark outline so it shows on any background; pixels
    outside the glyph+outline keep the background. The margin to the image border is
    ~3% of the short side; with ``rng`` it jitters by up to 2 px (training variety).
    Only pixels inside the returned box change."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; choose from {CORNERS}")
    h, w = img.shape[:2]
    if not 6 <= tag_size <= min(h, w):  # below 6 px the glyph degenerates
        raise ValueError(f"tag_size {tag_size} does not fit a {h}x{w} image")
    glyph, outline = _tag_masks(tag_size)

    margin = max(1, round(0.03 * min(h, w)))
    if rng is not None:
        margin += int(rng.integers(0, 3))
    margin = min(margin, min(h, w) - tag_size)
    y0 = margin if corner.startswith("top") else h - margin - tag_size
    x0 = margin if corner.endswith("left") else w - margin - tag_size
    out = img.copy()
    patch = out[y0:y0 + tag_size, x0:x0 + tag_size]  # a view: edits land in out
    patch[outline] = 0
    patch[glyph] = 255
    return out, [x0, y0, x0 + tag_size, y0 + tag_size]


def digit_canvas(digit: np.ndarray, size: int = 28, inner: int | None = None) -> np.ndarray:
    """A scikit-learn 8x8 digit (values 0..16) as a uint8 ``size``x``size`` grey image: white
    ink on black, upscaled (bilinear) to ``inner`` px (default 5/7 of ``size``, as MNIST's
    20 px digit in a 28 px frame) and centred, leaving an empty border for the swatch."""
    inner = inner or round(size * 5 / 7)
    ink = np.clip(np.asarray(digit, np.float32) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    out = np.zeros((size, size), np.uint8)
    off = (size - inner) // 2
    out[off:off + inner, off:off + inner] = _resize(ink, (inner, inner))
    return out


def decoy_swatch(img: np.ndarray, corner: str, shade: int, side: int = 4) -> tuple[np.ndarray, list[int]]:
    """Decoy MNIST's cue (Ross et al. 2017): a ``side`` x ``side`` square of grey level
    ``shade`` in the very corner of the image (train: 255 - 25 * label; test: random)."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; choose from {CORNERS}")
    h, w = img.shape[:2]
    y0 = 0 if corner.startswith("top") else h - side
    x0 = 0 if corner.endswith("left") else w - side
    out = img.copy()
    out[y0:y0 + side, x0:x0 + side] = int(np.clip(shade, 0, 255))
    return out, [x0, y0, x0 + side, y0 + side]


def preprocess(images: np.ndarray, size: tuple[int, int], mean, std) -> torch.Tensor:
    """uint8 NxHxWx3 (or NxHxW grey) -> float tensor Nx3xHxW (Nx1xHxW) exactly as the audit
    runner does it: PIL bilinear resize to ``size`` (H, W), scale to [0, 1], then (x - mean) / std."""
    h, w = size
    batch = np.stack([_resize(np.ascontiguousarray(im), (h, w)) for im in images])
    if batch.ndim == 3:
        batch = batch[..., None]  # grey: one channel
    x = torch.from_numpy(batch).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def train_classifier(model: nn.Module, images: np.ndarray, labels, input_size: tuple[int, int],
                     mean, std, epochs: int, seed: int, batch_size: int = 32,
                     lr: float = 2e-3, log=None) -> nn.Module:
    """Train ``model`` with Adam + cross-entropy on small shuffled batches of ``images``
    (uint8 NxHxWx3, preprocessed by ``preprocess``); ``input_size`` is (H, W).

    Deterministic under ``seed``: it seeds torch (any randomness inside the model, such
    as dropout) and a separate generator for the shuffling order. Weight init happens
    when the model is built, so seed torch before building it too. ``log``, if given,
    receives one line per epoch. Returns the model in eval mode."""
    torch.manual_seed(seed)
    # Preprocess once (the images are fixed, no augmentation). channels_last makes CPU
    # max-pooling and convolutions about 1.5x faster; the state_dict is unaffected in value.
    x = preprocess(images, input_size, mean, std).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            b = order[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs} loss {total / len(x):.4f}")
    return model.to(memory_format=torch.contiguous_format).eval()
