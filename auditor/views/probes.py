"""Linear probes (Alain & Bengio 2016): how readable a property is at each depth of the model.

The model's layer groups are its stages: the leaf modules that give a spatial feature map
[B, C, H, W], cut where the map's resolution changes; each group is read at its last module.
A probe is a logistic regression on the group's activations, averaged over space, and its
held-out accuracy (stratified cross-validation) says how well the property can be read there.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

FOLDS = 3


def layer_groups(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the last leaf module of each run of equal feature-map resolution, in
    the order the forward pass reaches them."""
    seen: list[tuple[str, torch.nn.Module, tuple]] = []
    hooks = []
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            hooks.append(m.register_forward_hook(
                lambda mod, i, out, name=name: seen.append((name, mod, tuple(out.shape[2:])))
                if isinstance(out, torch.Tensor) and out.dim() == 4 else None))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[str, torch.nn.Module]] = []
    for k, (name, m, hw) in enumerate(seen):
        if k + 1 == len(seen) or seen[k + 1][2] != hw:
            groups.append((name, m))
    return groups


@torch.no_grad()
def pooled(model: torch.nn.Module, groups: list[tuple[str, torch.nn.Module]], x: torch.Tensor,
           batch: int = 64) -> list[np.ndarray]:
    """Per group, the activations averaged over space: [N, channels]."""
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    current: list[torch.Tensor | None] = [None] * len(groups)
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: current.__setitem__(k, o.float().mean((2, 3)).cpu()))
             for k, (_, m) in enumerate(groups)]
    try:
        for chunk in x.split(batch):
            model(chunk)
            for k, t in enumerate(current):
                out[k].append(t)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o).numpy() for o in out]


def probe(acts: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression reading y from ``acts``. Rows that share a
    group (an image and its altered copy) stay in one fold, so no image is tested on its twin."""
    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    folds = int(min(FOLDS, np.unique(y, return_counts=True)[1].min()))
    if folds < 2:
        return float("nan")
    right = 0
    cv = (StratifiedKFold(folds, shuffle=True, random_state=seed) if len(np.unique(groups)) == len(groups)
          else StratifiedGroupKFold(folds, shuffle=True, random_state=seed))
    for train, test in (cv.split(acts, y) if isinstance(cv, StratifiedKFold) else cv.split(acts, y, groups)):
        scale = StandardScaler().fit(acts[train])
        with warnings.catch_warnings():  # a probe that has not fully converged is still a held-out reading
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=100).fit(scale.transform(acts[train]), y[train])
        right += int((clf.predict(scale.transform(acts[test])) == y[test]).sum())
    return right / len(y)


def curve(model: torch.nn.Module, groups: list[tuple[str, torch.nn.Module]], x: torch.Tensor, y: np.ndarray,
          pairs: np.ndarray | None = None, seed: int = 0) -> list[float]:
    """The probe's held-out accuracy at each layer group."""
    return [round(probe(a, y, pairs, seed), 4) for a in pooled(model, groups, x)]
