"""Trust gate for explanation methods: does a method explain the model, and is it faithful?

- Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency
  maps"): randomise the network from the top down, one block at a time, and compare each
  method's heatmaps with the trained model's (mean |Spearman| over the test images; SSIM too).
  The decision reads the cascade, not its end: a method fails when its heatmaps are still
  similar once the top part of the network (``trust.decide_at`` of the steps, half by
  default) is random, since any method's maps change once the first convolution is random.
  See docs/trust.md for the choices (blocks, their order, BatchNorm, why not sMPRT/eMPRT).
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
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata
from torch import nn

from auditor.inputs.config import TrustSpec
from auditor.explain.engine import method_kwargs
from auditor.registry import METHODS

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# After each step: "recalibrate" the randomised BatchNorms' running statistics on the test
# images (see _recalibrate), or "keep" the trained ones (bench/trust.py --compare measures both).
BATCHNORM = "recalibrate"


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rank correlation of [N, D] arrays."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return np.divide((ra * rb).sum(1), den, out=np.zeros(len(a)), where=den > 0)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM of [N, H, W] heatmaps, each scaled to [0, 1] by its maximum (as Adebayo et al.)."""
    from skimage.metrics import structural_similarity

    def unit(m):
        top = m.max()
        return m / top if top > 0 else m
    side = min(a.shape[1:])
    win = min(7, side - (1 - side % 2))  # odd, at most the side
    if win < 3:
        return np.full(len(a), np.nan)
    return np.array([structural_similarity(unit(p), unit(q), data_range=1.0, win_size=win)
                     for p, q in zip(a.astype(np.float64), b.astype(np.float64))])


def _heat(name: str, params: dict, model, layer, x, target, seed: int) -> np.ndarray:
    kwargs = method_kwargs(name, params, layer, seed)
    return METHODS.get(name).fn(model, x, target, **kwargs).detach().float().cpu().numpy()


# --- the cascade: which parts are randomised, in which order ---------------------------------

@dataclass
class Step:
    """One cascade step: the modules (by name) whose parameters it randomises."""
    label: str
    names: list[str]
    own_only: bool = False  # a module's own parameters only (its children are other steps)


def _has_params(m: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in m.parameters(recurse=recurse))


def forward_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Module name -> the rank of its first call in one forward pass of one image. A module
    never called (its parameters used some other way) takes its nearest called parent's rank."""
    seen: dict[str, int] = {}

    def hook(name):
        def note(module, inputs):  # returns None: the inputs pass unchanged
            seen.setdefault(name, len(seen))
        return note
    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    order = {}
    for n, _ in model.named_modules():
        parent = n
        while parent not in seen and parent:
            parent = parent.rpartition(".")[0]
        order[n] = seen.get(parent, 0)
    return order


def cascade_steps(model: nn.Module, x: torch.Tensor, mode: str = "blocks", max_steps: int = 24) -> list[Step]:
    """The cascade from the top (output) down to the input.

    ``modules``: every module with parameters of its own (Adebayo et al.'s layer-by-layer cascade).
    ``blocks``: the model's top-level children with parameters, each expanded into its own
    children while the whole next level still fits in ``max_steps`` (a ResNet-50 gives its 16
    bottlenecks plus stem and head: 18 steps, against 107 modules with parameters); consecutive
    steps are merged when even the top level has more than ``max_steps``. A normalisation layer
    that would be a step of its own is folded into the step before it (the convolution it
    normalises), so no step resets only a BatchNorm's scale and shift. Order: the forward
    pass's, reversed; definition order (what ``named_modules`` gives) need not match the data
    flow (a residual block's shortcut, a head defined first).
    """
    order = forward_order(model, x)
    mods = dict(model.named_modules())

    def children(name: str) -> list[Step]:
        m = mods[name]
        out = [Step(c, [c]) for c in (f"{name}.{k}" if name else k for k, v in m.named_children())
               if _has_params(mods[c])]
        if _has_params(m, recurse=False):
            out.append(Step(name or "(model)", [name], own_only=True))
        return out

    def in_order(steps: list[Step]) -> list[Step]:
        return sorted(steps, key=lambda s: order[s.names[0]])

    if mode == "modules":
        return in_order([Step(n or "(model)", [n], own_only=True)
                         for n, m in mods.items() if _has_params(m, recurse=False)])[::-1]
    steps = _fold_norms(in_order(children("")), mods)
    while True:
        grown = []
        for s in steps:
            parts = []
            for n in ([] if s.own_only else s.names):
                inner = children(n)
                parts += inner if any(not c.own_only for c in inner) else [Step(n, [n])]  # a leaf stays
            # More parts, or one container's only child (an HF encoder's ``stages``): descend.
            deeper = len(parts) > len(s.names) or (len(parts) == 1 == len(s.names) and parts[0].names != s.names)
            grown += parts if deeper else [s]
        grown = _fold_norms(in_order(grown), mods)
        if [g.names for g in grown] == [s.names for s in steps] or len(grown) > max_steps:
            break
        steps = grown
    if len(steps) > max_steps:
        steps = _merge(steps, max_steps)
    return steps[::-1]


def _fold_norms(steps: list[Step], mods: dict[str, nn.Module]) -> list[Step]:
    out: list[Step] = []
    for s in steps:
        if out and len(s.names) == 1 and isinstance(mods[s.names[0]], NORMS) and not out[-1].own_only:
            out[-1] = Step(f"{out[-1].label}+{s.label}", out[-1].names + s.names)
        else:
            out.append(s)
    return out


def _merge(steps: list[Step], k: int) -> list[Step]:
    """``steps`` (forward order) in k runs of consecutive steps."""
    out = []
    for run in np.array_split(np.arange(len(steps)), k):
        part = [steps[i] for i in run]
        label = part[0].label if len(part) == 1 else f"{part[0].label} to {part[-1].label}"
        if any(p.own_only for p in part):  # keep a module's own-only step apart from its children
            out.extend(part)
        else:
            out.append(Step(label, [n for p in part for n in p.names]))
    return out


def _params(model: nn.Module, step: Step):
    for n in step.names:
        yield from model.get_submodule(n).parameters(recurse=not step.own_only)


def _norms(model: nn.Module, step: Step) -> list[nn.Module]:
    mods = [model.get_submodule(n) for n in step.names]
    if step.own_only:
        return [m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [m for top in mods for m in top.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _recalibrate(model: nn.Module, norms: list[nn.Module], x: torch.Tensor) -> None:
    """Re-estimate the running statistics of the randomised BatchNorms on ``x``: a random
    convolution's output has other statistics than the trained one's, and normalising it with
    the old ones leaves a residual branch far too small or too large (then the block is barely
    randomised, or the random part drowns the rest)."""
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: this one batch's statistics
        m.train()
    try:
        model(x)
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum


def randomise_(model: nn.Module, step: Step, gen: torch.Generator) -> None:
    """Redraw the step's parameters from a normal distribution with each tensor's own mean and
    standard deviation (the layer keeps its scale, loses what it learned)."""
    with torch.no_grad():
        for p in _params(model, step):
            spread = p.std() if p.numel() > 1 else torch.ones((), device=p.device)
            p.copy_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * spread + p.mean())


def cascade(model: nn.Module, x: torch.Tensor, spec: TrustSpec, seed: int):
    """Yield (step, randomised copy) after each step, from the top down; the copy is the same
    object each time, randomised one step further."""
    rand = copy.deepcopy(model)
    steps = cascade_steps(rand, x, spec.cascade, spec.cascade_steps)
    gen = torch.Generator().manual_seed(seed)
    norms: list[nn.Module] = []
    for step in steps:
        randomise_(rand, step, gen)
        norms += _norms(rand, step)
        if norms and BATCHNORM == "recalibrate":
            _recalibrate(rand, norms, x)
        yield step, rand


def randomisation(name, params, model, layer, x, target, seed: int, heat: np.ndarray,
                  spec: TrustSpec | None = None) -> dict:
    """Similarity to the original heatmaps ``heat`` after each cascade step: step labels,
    mean |Spearman| and mean SSIM per step."""
    spec = spec or TrustSpec()
    layer_name = next((n for n, m in model.named_modules() if m is layer), None)
    labels, rho, sim = [], [], []
    for step, rand in cascade(model, x, spec, seed):
        rand_layer = rand.get_submodule(layer_name) if layer_name is not None else None
        reset = _heat(name, params, rand, rand_layer, x, target, seed)
        labels.append(step.label)
        rho.append(round(float(np.abs(spearman(heat.reshape(len(x), -1), reset.reshape(len(x), -1))).mean()), 4))
        values = ssim(heat, reset) if heat.ndim == 3 else np.array([np.nan])
        sim.append(round(float(np.nanmean(values)), 4) if np.isfinite(values).any() else None)  # None: maps too small
    return {"randomisation_steps": labels, "randomisation_spearman": rho, "randomisation_ssim": sim}


# --- the decision ------------------------------------------------------------------------------

def decisive_step(n: int, decide_at: float) -> int:
    """0-based index of the step whose similarity decides: once ``decide_at`` of the n steps
    (from the top) are randomised, rounded up; the last step at most."""
    return min(n, max(1, math.ceil(decide_at * n - 1e-9))) - 1


def share_words(p: float) -> str:
    """``trust.decide_at`` in words: 0.5 -> "the top half of the model"."""
    named = {1.0: "the whole model", 0.5: "the top half of the model", 0.25: "the top quarter of the model",
             0.75: "the top three quarters of the model"}
    return named.get(round(p, 4), f"the top {p:.0%} of the model")


def judge_cascade(rho: list[float], ssim_curve: list | None, spec: TrustSpec) -> dict:
    """The randomisation test's verdict on one method's curves: the decisive step, the first
    step below the thresholds, and a plain-English reason when it fails (else "")."""
    n = len(rho)
    if not n:
        return {"decisive_step": None, "first_below": None, "max_spearman": spec.max_spearman,
                "max_ssim": spec.max_ssim, "randomisation_reason": ""}
    sims = list(ssim_curve or [None] * n)

    def similar(i: int) -> list[str]:
        why = []
        if rho[i] > spec.max_spearman:
            why.append(f"rank correlation {rho[i]:.2f}")
        if spec.max_ssim is not None and sims[i] is not None and sims[i] > spec.max_ssim:
            why.append(f"structural similarity {sims[i]:.2f}")
        return why

    d = decisive_step(n, spec.decide_at)
    first = next((i for i in range(n) if not similar(i)), None)
    why = similar(d)
    reason = ""
    if why:
        reason = (f"its heatmaps barely change when {share_words(spec.decide_at)} is randomised "
                  f"({' and '.join(why)} after {d + 1} of {n} steps; at most {spec.max_spearman:.2f} allowed"
                  + (f", and {spec.max_ssim:.2f} structural similarity" if spec.max_ssim is not None else "") + ")")
    return {"decisive_step": d, "first_below": first, "max_spearman": spec.max_spearman, "max_ssim": spec.max_ssim,
            "randomisation_reason": reason}


# --- deletion ------------------------------------------------------------------------------------

def random_blobs(b: int, h: int, w: int, seed: int) -> np.ndarray:
    """[b, h*w] smooth random fields (Gaussian-filtered noise, blobs ~1/8 of the side)."""
    rng = np.random.default_rng(seed)
    sigma = max(h, w) / 16
    return np.stack([gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap").ravel() for _ in range(b)])


@torch.no_grad()
def deletion(model, x, target, heat: np.ndarray, steps: int, seed: int,
             random_auc: float | None = None) -> tuple[float, float]:
    """Area under the probability curve as pixels are removed by relevance, and in a random order
    (the same for every method on the same images: pass it back as ``random_auc`` to skip it)."""
    b, c, h, w = x.shape
    field = random_blobs(b, h, w, seed)
    flat = heat.reshape(b, -1)
    # Most relevant first; equal relevance (e.g. Grad-CAM's zeros) in random-blob order.
    order = np.stack([np.lexsort((-field[k], -flat[k])) for k in range(b)])
    relevant = _deletion_auc(model, x, target, order, steps)
    if random_auc is None:
        random_auc = _deletion_auc(model, x, target, np.argsort(-field, axis=1), steps)
    return relevant, random_auc


@torch.no_grad()
def _deletion_auc(model, x, target, order: np.ndarray, steps: int) -> float:
    b, c, h, w = x.shape
    curve = []
    for k in np.linspace(0, h * w, steps + 1).astype(int):
        keep = np.ones((b, h * w), np.float32)
        np.put_along_axis(keep, order[:, :k], 0.0, axis=1)
        m = torch.from_numpy(keep).view(b, 1, h, w).to(x.device)
        p = model(x * m).float().softmax(1).gather(1, target[:, None])[:, 0]   # 0 = the mean in input space
        curve.append(p.cpu().numpy())
    curve = np.stack(curve, 1)
    return float(((curve[:, 1:] + curve[:, :-1]) / 2).mean())


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
    """Run both tests on a few explained images; return per-method results with ``reliable``.

    Keys per method: reliable, reason, images, deletion_auc, random_deletion_auc, and the
    cascade's randomisation_steps (labels, top first), randomisation_spearman and
    randomisation_ssim (one value per step), decisive_step (0-based index of the step that
    decides), first_below (first step under the thresholds, or None), max_spearman, max_ssim.
    """
    s = ev.samples
    ids = test_images(s, spec.images, seed)
    if not ids:
        return {}
    x = ev.model_inputs(ids)
    target = torch.tensor(s.loc[ids, "prediction"].to_numpy(), device=ev.device)
    out = {}
    random = None  # the random-order deletion curve: computed once, shared by every method
    for name, params in methods.items():
        try:
            heat = _heat(name, params, ev.model, layer, x, target, seed)
            curves = randomisation(name, params, ev.model, layer, x, target, seed, heat, spec)
            deleted, random = deletion(ev.model, x, target, heat, spec.steps, seed, random)
        except Exception as e:
            out[name] = {"reliable": False, "untestable": True,
                         "reason": f"could not be tested: {type(e).__name__}: {e}"}
            continue
        verdict = judge_cascade(curves["randomisation_spearman"], curves["randomisation_ssim"], spec)
        reasons = [r for r in [verdict.pop("randomisation_reason")] if r]
        if deleted > random * spec.max_deletion_ratio:
            reasons.append(f"removing the pixels it marks hurts the prediction no more than removing random ones "
                           f"(area {deleted:.2f} vs {random:.2f})")
        out[name] = {"reliable": not reasons, "reason": "; ".join(reasons), **curves, **verdict,
                     "deletion_auc": round(deleted, 4), "random_deletion_auc": round(random, 4), "images": len(ids)}
    return out
