"""Tree surrogates: how simple each class's decision is, in features a person can read.

Per class (one against the rest), a depth-limited decision tree (scikit-learn) is fitted to the
model's own decisions on the explained images, from interpretable features: per region of the
image (a 4 x 4 grid and the four corner squares) the mean of each colour channel and its
brightest and darkest values (5th and 95th percentiles: a small mark shows in them), how
colourful it is (the mean, and the 95th percentile, of each pixel's largest minus smallest
channel: a mark whose colour varies from image to image still shows in it), the mean
intensity, its spread and the edge density; and, after intervention, how much each confirmed
cue region looks like the cue. Its fidelity is the balanced agreement with the model (the mean
of the share of the class's decisions and of the other decisions it reproduces; plain agreement
would reward "never the class"), held out by stratified cross-validation. Tree regularisation's
measure (Wu et al., AAAI 2018) is the average decision-path length (APL) over the images of
the shallowest tree that reaches ``FIDELITY``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.model_selection import StratifiedKFold
from sklearn.tree import DecisionTreeClassifier, export_text

from auditor.explain.heatmap import pixel_box

FIDELITY = 0.9
GRID = 4
CORNER = 0.15      # side of a corner square, of the image's: where marks sit (see rules/corner_restore.py)
EXTREME = 5        # percentile of a region's brightest and darkest pixels (per colour)
EDGE = 0.1         # an edge: a Sobel magnitude above this (intensities in [0, 1])
MAX_DEPTH = 6
FOLDS = 5
MIN_DECISIONS = 5  # a class the model chose fewer times than this has no tree


def regions(shifted: bool = False) -> dict[str, list[float]]:
    """Region name -> [x0, y0, x1, y1] as fractions: the grid cells and the corner squares; with
    ``shifted``, also the cells of the grid moved by half a cell (across, down or both), so that a
    mark that straddles two cells' border lies whole in one region, and the quarters of the image
    (half its side, moved by a quarter side), which hold whole a mark too large or too unsteady
    for any cell (a tag of a third of the side; a swatch of a fifth that moves by a few pixels)."""
    rows = ["top", "upper middle", "lower middle", "bottom"]
    cols = ["left", "centre-left", "centre-right", "right"]
    step = 2 if not shifted else 1  # in half cells
    at = lambda words, k: words[k // 2] if k % 2 == 0 else f"{words[k // 2]}/{words[k // 2 + 1]}"  # noqa: E731
    out = {f"{at(rows, r)} {at(cols, c)} cell": [c / (2 * GRID), r / (2 * GRID), (c + 2) / (2 * GRID), (r + 2) / (2 * GRID)]
           for r in range(0, 2 * GRID - 1, step) for c in range(0, 2 * GRID - 1, step)}
    if shifted:
        rows3, cols3 = ["top", "middle", "bottom"], ["left", "centre", "right"]
        out |= {("central" if (r, c) == (1, 1) else f"{rows3[r]} {cols3[c]}") + " quarter":
                [c / 4, r / 4, c / 4 + 0.5, r / 4 + 0.5] for r in range(3) for c in range(3)}
    s = CORNER
    out |= {"top-left corner": [0, 0, s, s], "top-right corner": [1 - s, 0, 1, s],
            "bottom-left corner": [0, 1 - s, s, 1], "bottom-right corner": [1 - s, 1 - s, 1, 1]}
    return out


def features(images: np.ndarray, shifted: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
    """images [N, C, H, W] in [0, 1] -> (features [N, F], feature names, the region of each feature);
    ``shifted``: of ``regions(shifted)``."""
    n, c, h, w = images.shape
    grey = images.mean(1)
    edges = np.hypot(ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=2)) / 8 > EDGE
    cols, names, where = [], [], []
    channels = ["red", "green", "blue"] if c == 3 else []
    colour = images.max(1) - images.min(1) if channels else None  # per pixel: its colour's distance from grey
    for name, box in regions(shifted).items():
        x0, y0, x1, y1 = pixel_box(box, (h, w))
        ys, xs = slice(y0, y1), slice(x0, x1)
        part, start = grey[:, ys, xs].reshape(n, -1), len(cols)
        for k, ch in enumerate(channels or ["grey"]):
            values = images[:, k, ys, xs].reshape(n, -1)
            # The brightest and darkest of a colour: a small mark shifts a cell's mean little, its extremes much.
            high, low = np.percentile(values, [100 - EXTREME, EXTREME], axis=1)
            if channels:
                cols.append(values.mean(1))
                names.append(f"{ch} of the {name}")
            cols += [high, low]
            names += [f"brightest {ch} of the {name}", f"darkest {ch} of the {name}"]
        if channels:  # how far from grey: a coloured mark on a grey or dull image (a mark's colour may vary)
            vivid = colour[:, ys, xs].reshape(n, -1)
            cols += [vivid.mean(1), np.percentile(vivid, 100 - EXTREME, axis=1)]
            names += [f"colourfulness of the {name}", f"most colourful of the {name}"]
        cols += [part.mean(1), part.std(1), edges[:, ys, xs].reshape(n, -1).mean(1)]
        names += [f"brightness of the {name}", f"contrast of the {name}", f"edge density of the {name}"]
        where += [name] * (len(cols) - start)
    return np.stack(cols, 1).astype(np.float32), names, where


def path_length(tree: DecisionTreeClassifier, x: np.ndarray) -> float:
    """Average number of decisions (internal nodes) on the path of each input: Wu et al.'s APL."""
    return float((np.asarray(tree.decision_path(x).sum(1)).ravel() - 1).mean())


def fidelity(depth: int, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Held-out balanced agreement of a tree of ``depth`` with the decisions y (0/1), by
    stratified cross-validation (a plain loop: scikit-learn's helpers cost more than these fits)."""
    folds = StratifiedKFold(int(min(FOLDS, np.bincount(y).min())), shuffle=True, random_state=seed)
    guess = np.empty_like(y)
    for train, test in folds.split(x, y):
        tree = DecisionTreeClassifier(max_depth=depth, random_state=seed, class_weight="balanced")
        guess[test] = tree.fit(x[train], y[train]).predict(x[test])
    return balanced(guess, y)


@dataclass
class Surrogate:
    fidelity: float        # held out
    depth: int
    path_length: float     # APL over the images, of the tree fitted on all of them
    reached: bool          # fidelity >= FIDELITY at some depth <= max_depth
    rules: str             # the tree as text rules
    decisions: int         # images the model gave the class


def surrogate(x: np.ndarray, y: np.ndarray, names: list[str], seed: int = 0,
              max_depth: int = MAX_DEPTH, goal: float = FIDELITY) -> Surrogate | None:
    """The shallowest tree (depth 1..max_depth) whose held-out fidelity reaches ``goal``, else the
    most faithful one; None when the class has too few (or too many) of the decisions to fit."""
    y = np.asarray(y, int)
    if min(y.sum(), len(y) - y.sum()) < MIN_DECISIONS:
        return None
    best = None
    for depth in range(1, max_depth + 1):
        fid = fidelity(depth, x, y, seed)
        if best is None or fid > best[0] + 1e-9:
            best = (fid, depth)
        if fid >= goal:
            break
    fid, depth = best
    tree = DecisionTreeClassifier(max_depth=depth, random_state=seed, class_weight="balanced").fit(x, y)
    text = export_text(tree, feature_names=list(names), class_names=["other", "the class"], decimals=2)
    return Surrogate(round(fid, 4), depth, round(path_length(tree, x), 3), fid >= goal, text, int(y.sum()))


def balanced(guess: np.ndarray, y: np.ndarray) -> float:
    """Balanced agreement of 0/1 guesses with 0/1 decisions: the mean of the two classes' hit rates."""
    return float(np.mean([(guess[y == v] == v).mean() for v in (0, 1)]))


def fitted_fidelity(depth: int, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Balanced agreement of a tree of ``depth`` fitted on all of (x, y), on the same images."""
    tree = DecisionTreeClassifier(max_depth=depth, random_state=seed, class_weight="balanced").fit(x, y)
    guess = tree.predict(x)
    return balanced(guess, y)


def one_region(x: np.ndarray, y: np.ndarray, where: list[str], seed: int = 0,
               depth: int = 2) -> dict[str, float]:
    """Per region, the fidelity of a tree of ``depth`` on that region's features alone, fitted
    and scored on all the images (held-out fidelity is ``fidelity``: too dear for every region)."""
    y = np.asarray(y, int)
    where = np.asarray(where)
    return {r: round(fitted_fidelity(depth, x[:, where == r], y, seed), 4) for r in dict.fromkeys(where)}
