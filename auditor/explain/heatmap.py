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


def region_mask(shape: tuple[int, int], frac_box) -> np.ndarray:
    """Boolean [h, w] mask of a fractional box, snapped to whole pixels."""
    h, w = shape
    x0, y0, x1, y1 = frac_box
    mask = np.zeros((h, w), bool)
    mask[int(round(y0 * h)):max(int(round(y1 * h)), int(round(y0 * h)) + 1),
         int(round(x0 * w)):max(int(round(x1 * w)), int(round(x0 * w)) + 1)] = True
    return mask


def region_mass(maps: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Share of each normalised map's mass inside each mask: name -> [N]."""
    maps = normalise(maps)
    return {name: maps[..., m].sum(axis=-1) for name, m in masks.items()}
