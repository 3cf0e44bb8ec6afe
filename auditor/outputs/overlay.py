"""Heatmap pictures: a colour lookup table applied with numpy and PIL (no figure per image).

The colormap is inferno: perceptually uniform, readable by colour-blind readers and in greyscale
print. Each heatmap is scaled to its own maximum. Flagged regions are boxed in cyan with a dark
rim, a colour inferno never uses, so a box is never mistaken for evidence.

A heatmap covers the model input, which is the part of the file ``seen`` (fractions of the file,
``auditor.inputs.data.View.frac``): it is drawn over that part only, and the rest of the file,
which a centre crop kept from the model, is dimmed further (``UNSEEN``) with no colour on it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

LUT = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
BOX = (0, 200, 255)
RIM = (0, 0, 0)

# Printed sizes (the stylesheet uses the same millimetres) and pixels for ~150 dpi at that size.
# A gallery card's pictures are one strip per row: PANELS_PER_ROW panels, each in a slot
# PANEL_MM wide, GAP_MM apart, so a row printed at its slots' width keeps 150 dpi.
PRINT_DPI = 150
PANEL_MM, EXEMPLAR_MM, MEAN_MM, GAP_MM = 30, 20, 40, 2
# A finding's flagged region, cut out and enlarged (nearest neighbour: a small image's pixels stay
# crisp squares): INSET_MM wide in print, over 160 CSS px (42.3 mm) on screen and paper alike.
INSET_MM = 44
DARKEN = 0.6   # an overlay's image is darkened to this share of its brightness, so the evidence stands out
UNSEEN = 0.25  # the part of the file the model input does not show, darkened to this share
FULL = (0.0, 0.0, 1.0, 1.0)   # ``seen`` when the model input shows the whole file
PANELS_PER_ROW = 5   # 5 * 30 + 4 * 2 = 158 mm: fits a card on A4 (about 176 mm inside)
# Flagged images beyond the gallery: small numbered tiles, SHEET_COLUMNS x SHEET_ROWS per picture.
TILE_MM, SHEET_COLUMNS, SHEET_ROWS = 21, 7, 5   # 7 * 21 + 6 * 2 = 159 mm wide


def px(mm: float) -> int:
    return round(mm / 25.4 * PRINT_DPI)


PANEL_PX, EXEMPLAR_PX, MEAN_PX, GAP_PX = px(PANEL_MM), px(EXEMPLAR_MM), px(MEAN_MM), px(GAP_MM)
INSET_PX = px(INSET_MM)
_DARK = [int(v * DARKEN) for v in range(256)] * 3
_UNSEEN = [int(v * UNSEEN) for v in range(256)] * 3
TILE_PX = px(TILE_MM)
_PALETTE = LUT.tobytes()
_ALPHA = bytes(51 + (v * 166) // 255 for v in range(256))   # 0.2..0.85 opacity in 1/255 steps
JPEG = {"quality": 85, "subsampling": 0, "optimize": False}   # 4:4:4 keeps the thin box lines sharp


def thumbnail(img: Image.Image, side: int) -> Image.Image:
    """The image scaled so its longer side is ``side`` (nearest when enlarging a lot, to keep pixels crisp)."""
    w, h = img.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.convert("RGB")
    if scale >= 2:
        return img.resize(size, Image.NEAREST)
    return img.resize(size, Image.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)


def level(heat: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Heatmap scaled to 0..255 by its maximum (negatives and non-finite values are 0), resized to ``size`` (w, h)."""
    heat = np.asarray(heat, np.float32)
    if not np.isfinite(heat).all():
        heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.clip(heat, 0, None)
    peak = float(heat.max()) if heat.size else 0.0
    lv = (heat * (255 / peak)).astype(np.uint8) if peak > 0 else np.zeros(heat.shape, np.uint8)
    return Image.fromarray(lv, "L").resize(size, Image.BILINEAR)


def colorize(lv: Image.Image) -> Image.Image:
    """An 'L' level image through the colour table (a palette lookup in PIL)."""
    p = lv.copy()
    p.putpalette(_PALETTE)
    return p.convert("RGB")


def seen_box(seen, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The fractional box ``seen`` in whole pixels of a picture of ``size`` (w, h), never empty."""
    w, h = size
    x0, y0 = min(round(seen[0] * w), w - 1), min(round(seen[1] * h), h - 1)
    return x0, y0, max(x0 + 1, min(round(seen[2] * w), w)), max(y0 + 1, min(round(seen[3] * h), h))


def dim_unseen(img: Image.Image, seen=FULL) -> Image.Image:
    """``img`` (RGB) with the part outside the fractional box ``seen`` darkened to ``UNSEEN``: what
    the model was not shown. A new image; ``img`` itself where the model saw all of it."""
    box = seen_box(seen, img.size)
    if box == (0, 0, *img.size):
        return img
    out = img.point(_UNSEEN)
    out.paste(img.crop(box), box[:2])
    return out


def overlay(base: Image.Image, heat: np.ndarray, boxes=(), seen=FULL) -> Image.Image:
    """``base`` (an RGB thumbnail of the file) with the heatmap blended in where it is strong, over
    the part ``seen`` (the model input's box, as fractions of the file); ``boxes`` as fractions.

    Opacity = 0.2 + 0.65 * level: a faint tint everywhere the model looked, so the colour scale
    reads, and the evidence itself strong. All in PIL: about 0.5 ms for a 176-px thumbnail.
    """
    box = seen_box(seen, base.size)
    lv = level(heat, (box[2] - box[0], box[3] - box[1]))
    dark = base.convert("RGB").point(_DARK)   # the image darkened, so the colour of the evidence reads
    out = dim_unseen(base.convert("RGB"), seen)
    out.paste(Image.composite(colorize(lv), dark.crop(box), lv.point(_ALPHA)), box[:2])
    return draw_boxes(out, boxes)


def inset(img: Image.Image, box_frac, width: int = INSET_PX, height: int = PANEL_PX, seen=FULL) -> Image.Image:
    """The flagged region of ``img`` (the file at full size; ``box_frac`` as fractions of it) with a
    margin around it, enlarged to ``width`` x ``height`` px (as tall as a panel, so a card grows no
    taller; nearest neighbour, so a 64-px image's pixels stay sharp) and its box drawn in; where the
    margin reaches past the part ``seen`` by the model, that is dimmed."""
    img = dim_unseen(img.convert("RGB"), seen)
    w, h = img.size
    x0, y0, x1, y1 = (float(v) * s for v, s in zip(box_frac, (w, h, w, h)))   # in pixels
    aspect = height / width
    cw = max(x1 - x0, (y1 - y0) / aspect, 0.08 * max(w, h)) * 1.8
    cw, ch = min(cw, w), min(cw * aspect, h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    lx, ly = min(max(cx - cw / 2, 0.0), w - cw), min(max(cy - ch / 2, 0.0), h - ch)
    crop = (round(lx), round(ly), max(round(lx) + 1, round(lx + cw)), max(round(ly) + 1, round(ly + ch)))
    part = img.convert("RGB").crop(crop)
    scale = width / part.width
    big = part.resize((width, min(height, max(1, round(part.height * scale)))),
                      Image.NEAREST if scale >= 1.5 else Image.LANCZOS)
    pw, ph = crop[2] - crop[0], crop[3] - crop[1]
    inner = ((x0 - crop[0]) / pw, (y0 - crop[1]) / ph, (x1 - crop[0]) / pw, (y1 - crop[1]) / ph)
    return draw_boxes(big, [tuple(min(max(v, 0.0), 1.0) for v in inner)])


def mean_image(images: list[Image.Image], size: tuple[int, int], seen=None) -> Image.Image:
    """The pixel-wise mean of ``images``, each resized to ``size`` (w, h): what a class looks like on
    average; with ``seen`` (one fractional box per image), of the part the model input shows of each."""
    acc = np.zeros((size[1], size[0], 3), np.float32)
    for k, im in enumerate(images):
        w, h = im.size
        part = seen[k] if seen is not None else FULL
        box = (part[0] * w, part[1] * h, part[2] * w, part[3] * h)
        acc += np.asarray(im.convert("RGB").resize(size, Image.BILINEAR, box=box), np.float32)
    return Image.fromarray((acc / max(len(images), 1)).clip(0, 255).astype(np.uint8))


def heat_only(heat: np.ndarray, side: int, boxes=()) -> Image.Image:
    """A heatmap on its own (a class's mean heatmap has no single image under it)."""
    h, w = np.shape(heat)
    size = (side, max(1, round(side * h / w))) if w >= h else (max(1, round(side * w / h)), side)
    return draw_boxes(colorize(level(heat, size)), boxes)


def draw_boxes(img: Image.Image, boxes) -> Image.Image:
    """``img`` with each fractional box drawn on it (in place)."""
    for box in boxes:
        draw_box(img, box)
    return img


def draw_box(img: Image.Image, box_frac) -> None:
    """A cyan rectangle with a dark rim, inside the fractional box [x0, y0, x1, y1]."""
    w, h = img.size
    x0, y0, x1, y1 = (float(v) for v in box_frac)
    width = max(2, round(max(w, h) / 70))
    rect = [x0 * w, y0 * h, max(x0 * w, x1 * w - 1), max(y0 * h, y1 * h - 1)]
    draw = ImageDraw.Draw(img)
    draw.rectangle(rect, outline=RIM, width=width + 2)
    draw.rectangle([rect[0] + 1, rect[1] + 1, rect[2] - 1, rect[3] - 1], outline=BOX, width=width)


def strip(panels: list[Image.Image], slot: int = PANEL_PX, gap: int = GAP_PX) -> Image.Image:
    """Panels side by side on white, each at the left of a ``slot``-wide cell, ``gap`` apart.

    One picture per gallery row instead of one per panel: WeasyPrint pays per image (fetch,
    decode, a PDF object) and per box around it, and the fixed slots let one line of captions,
    with tab stops one slot apart, sit under the panels (see report.css, ``p.cap``).
    """
    height = max(p.height for p in panels)
    xs = [k * (slot + gap) for k in range(len(panels))]   # a wider last panel (an inset) takes its own width
    out = Image.new("RGB", (xs[-1] + max(slot, panels[-1].width), height), "white")
    for x, p in zip(xs, panels):
        out.paste(p, (x, 0))
    return out


def sheet(tiles: list[Image.Image], first: int) -> Image.Image:
    """Tiles in rows of ``SHEET_COLUMNS`` (each row a ``strip``) on white, each numbered (from
    ``first``) under it, where the number hides no corner.

    Hundreds of small pictures as a few big ones: WeasyPrint places one image per sheet, and the
    numbers, drawn here, cost it no text layout (the file names are listed under the sheet).
    """
    font = ImageFont.load_default(size=max(10, TILE_PX // 9))
    row_h = TILE_PX + font.getbbox("0123456789")[3] + 3 + GAP_PX
    rows = [tiles[r:r + SHEET_COLUMNS] for r in range(0, len(tiles), SHEET_COLUMNS)]
    out = Image.new("RGB", (SHEET_COLUMNS * (TILE_PX + GAP_PX) - GAP_PX, len(rows) * row_h - GAP_PX), "white")
    draw = ImageDraw.Draw(out)
    for r, row in enumerate(rows):
        out.paste(strip(row, TILE_PX), (0, r * row_h))
        for k in range(len(row)):
            draw.text((k * (TILE_PX + GAP_PX), r * row_h + TILE_PX + 1), str(first + r * SHEET_COLUMNS + k),
                      fill=RIM, font=font)
    return out


def legend(width: int = 256, height: int = 12) -> Image.Image:
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.repeat(LUT[ramp][None], height, axis=0))


def scale_bar(width: int = 420, bar: int = 16) -> Image.Image:
    """The colour scale with its words drawn in: 'no evidence' under the dark end, 'most evidence'
    under the bright end, over the darkened image colour the overlays use."""
    font = ImageFont.load_default(size=15)
    out = Image.new("RGB", (width, bar + 22), "white")
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    out.paste(Image.fromarray(np.repeat(LUT[ramp][None], bar, axis=0)), (0, 0))
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, 0, width - 1, bar - 1], outline=(120, 120, 120))
    draw.text((0, bar + 3), "no evidence", fill=RIM, font=font)
    right = "most evidence"
    draw.text((width - draw.textlength(right, font=font), bar + 3), right, fill=RIM, font=font)
    return out


def save_picture(img: Image.Image, stem: Path) -> Path:
    """Save as JPEG when the picture is photo-like, PNG when it is flat (few colours: lossless and small).

    JPEG also matters for the PDF: WeasyPrint copies a JPEG into it as is, but decodes and
    re-compresses every PNG (measured: ~4 ms per JPEG thumbnail against ~15 ms per PNG).
    """
    if img.getcolors(64) is not None:
        path = stem.with_suffix(".png")
        img.save(path, optimize=False, compress_level=6)
    else:
        path = stem.with_suffix(".jpg")
        img.save(path, "JPEG", **JPEG)
    return path
