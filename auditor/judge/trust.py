"""Trust gate for explanation methods: does a method explain the model, and is it faithful?

- Cascading model-parameter randomisation (Adebayo et al. 2018): re-initialise the layers
  from the top down; a method whose heatmaps keep their rank order (Spearman) once the whole
  model is random explains the input's edges, not the model, and fails.
- Deletion (Petsiuk et al. 2018): remove pixels from most to least relevant and follow the
  class probability; the area under that curve must be clearly below that of a random order.
  The random order removes random *blobs* (a smoothed noise field, ranked), not scattered
  pixels: scattered holes are a texture no image has, which breaks a CNN's prediction at
  once and made every method look worse than chance (ROAD, Rong et al. 2022, on why the
  shape of what is removed matters). Ties in a heatmap (Grad-CAM's zeros) go in the same
  random-blob order.
A failing method is marked unreliable; rules then ignore its heatmaps.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata

from auditor.inputs.config import TrustSpec
from auditor.explain.engine import method_kwargs
from auditor.registry import METHODS


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rank correlation of [N, D] arrays."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return np.divide((ra * rb).sum(1), den, out=np.zeros(len(a)), where=den > 0)


def _heat(name: str, params: dict, model, layer, x, target, seed: int) -> np.ndarray:
    kwargs = method_kwargs(name, params, layer, seed)
    return METHODS.get(name).fn(model, x, target, **kwargs).detach().float().cpu().numpy()


def randomisation(name, params, model, layer, x, target, seed: int, heat: np.ndarray) -> list[float]:
    """Mean Spearman correlation with the original heatmaps ``heat`` after each top-down layer reset."""
    original = heat.reshape(len(x), -1)
    rand = copy.deepcopy(model)
    layer_name = next((n for n, m in model.named_modules() if m is layer), None)
    rand_layer = rand.get_submodule(layer_name) if layer_name is not None else None
    with_params = [m for m in rand.modules() if any(True for _ in m.parameters(recurse=False))]
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for module in reversed(with_params):
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * (p.std() if p.numel() > 1 else 1.0) + p.mean())
        reset = _heat(name, params, rand, rand_layer, x, target, seed).reshape(len(x), -1)
        curve.append(round(float(np.abs(spearman(original, reset)).mean()), 4))
    return curve


def random_blobs(b: int, h: int, w: int, seed: int) -> np.ndarray:
    """[b, h*w] smooth random fields (Gaussian-filtered noise, blobs ~1/8 of the side)."""
    rng = np.random.default_rng(seed)
    sigma = max(h, w) / 16
    return np.stack([gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap").ravel() for _ in range(b)])


@torch.no_grad()
def deletion(model, x, target, heat: np.ndarray, steps: int, seed: int) -> tuple[float, float]:
    """Area under the probability curve as pixels are removed by relevance, and in a random order."""
    b, c, h, w = x.shape
    field = random_blobs(b, h, w, seed)
    flat = heat.reshape(b, -1)
    # Most relevant first; equal relevance (e.g. Grad-CAM's zeros) in random-blob order.
    order = np.stack([np.lexsort((-field[k], -flat[k])) for k in range(b)])
    rand_order = np.argsort(-field, axis=1)
    aucs = []
    for o in (order, rand_order):
        curve = []
        for k in np.linspace(0, h * w, steps + 1).astype(int):
            keep = np.ones((b, h * w), np.float32)
            np.put_along_axis(keep, o[:, :k], 0.0, axis=1)
            m = torch.from_numpy(keep).view(b, 1, h, w).to(x.device)
            p = model(x * m).float().softmax(1).gather(1, target[:, None])[:, 0]   # 0 = the mean in input space
            curve.append(p.cpu().numpy())
        curve = np.stack(curve, 1)
        aucs.append(float(((curve[:, 1:] + curve[:, :-1]) / 2).mean()))
    return aucs[0], aucs[1]


def test_images(samples, n: int, seed: int) -> list[int]:
    """Up to n explained images spread over the predicted classes, misclassified ones first in
    each class (they are what the sample-level rules read), in a seeded order."""
    rng = np.random.default_rng(seed)
    pools = []
    for _, rows in samples[samples["explained"]].groupby("prediction"):
        ids = rows.index.to_numpy()
        wrong = ids[~rows["correct"].to_numpy()]
        right = ids[rows["correct"].to_numpy()]
        pools.append([int(i) for i in (*rng.permutation(wrong), *rng.permutation(right))])
    out = []
    while len(out) < n and any(pools):  # round robin over the classes
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return sorted(out)


def trust_gate(ev, methods: dict[str, dict], layer, spec: TrustSpec, seed: int) -> dict[str, dict]:
    """Run both tests on a few explained images; return per-method results with ``reliable``."""
    s = ev.samples
    ids = test_images(s, spec.images, seed)
    if not ids:
        return {}
    x = ev.model_inputs(ids)
    target = torch.tensor(s.loc[ids, "prediction"].to_numpy(), device=ev.device)
    out = {}
    for name, params in methods.items():
        try:
            heat = _heat(name, params, ev.model, layer, x, target, seed)
            curve = randomisation(name, params, ev.model, layer, x, target, seed, heat)
            deleted, random = deletion(ev.model, x, target, heat, spec.steps, seed)
        except Exception as e:
            out[name] = {"reliable": False, "reason": f"could not be tested: {type(e).__name__}: {e}"}
            continue
        reasons = []
        if curve and curve[-1] > spec.max_spearman:
            reasons.append(f"its heatmaps barely change when the model's weights are randomised "
                           f"(rank correlation {curve[-1]:.2f})")
        if deleted > random * spec.max_deletion_ratio:
            reasons.append(f"removing the pixels it marks hurts the prediction no more than removing random ones "
                           f"(area {deleted:.2f} vs {random:.2f})")
        out[name] = {"reliable": not reasons, "reason": "; ".join(reasons),
                     "randomisation_spearman": curve, "deletion_auc": round(deleted, 4),
                     "random_deletion_auc": round(random, 4), "images": len(ids)}
    return out
