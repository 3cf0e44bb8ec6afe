"""Heatmap pictures: a colour lookup table applied with numpy and PIL (no figure per image)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

# Perceptually uniform and readable in greyscale print; looked up, not plotted.
LUT = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
BOX = (0, 200, 255)   # cyan box: distinct from every inferno colour


def fit(img: Image.Image, side: int) -> Image.Image:
    """The image scaled so its longer side is ``side`` (nearest for tiny images, to keep pixels crisp)."""
    w, h = img.size
    scale = side / max(w, h)
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    return img.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def colorize(heat: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap scaled to [0, 1] by its maximum, resized to ``size`` (w, h): (RGB uint8, weight float)."""
    heat = np.clip(np.asarray(heat, np.float32), 0, None)
    peak = heat.max()
    level = (heat / peak * 255).astype(np.uint8) if peak > 0 else np.zeros(heat.shape, np.uint8)
    level = np.asarray(Image.fromarray(level, "L").resize(size, Image.BILINEAR))
    return LUT[level], level.astype(np.float32)[..., None] / 255.0


def overlay(img: Image.Image, heat: np.ndarray, side: int = 160, box_frac=None) -> Image.Image:
    """The image with the heatmap blended in where it is strong, and an optional box (fractions)."""
    base = fit(img, side)
    color, weight = colorize(heat, base.size)
    alpha = 0.25 + 0.6 * weight  # faint everywhere, strong where the evidence is
    out = Image.fromarray((np.asarray(base, np.float32) * (1 - alpha) + color * alpha).astype(np.uint8))
    if box_frac is not None:
        draw_box(out, box_frac)
    return out


def draw_box(img: Image.Image, box_frac, color=BOX) -> None:
    w, h = img.size
    x0, y0, x1, y1 = box_frac
    ImageDraw.Draw(img).rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=color,
                                  width=max(2, round(max(w, h) / 80)))


def heat_only(heat: np.ndarray, side: int = 160, box_frac=None) -> Image.Image:
    """A heatmap on its own (a class's mean heatmap has no single image under it)."""
    h, w = heat.shape
    size = (side, max(1, round(side * h / w)))
    out = Image.fromarray(colorize(heat, size)[0])
    if box_frac is not None:
        draw_box(out, box_frac)
    return out


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    height = max(i.height for i in images)
    out = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), height), "white")
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width + gap
    return out


def legend(width: int = 240, height: int = 14) -> Image.Image:
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.repeat(LUT[ramp][None], height, axis=0))
