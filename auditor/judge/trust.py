"""Trust gate for explanation methods: does a method explain the model, and is it faithful?

- Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency
  maps"): randomise the network from the top down, one group of blocks at a time (5 to 8
  steps), and compare each method's heatmaps with the trained model's (|Spearman| per test
  image; SSIM too). The decision reads the cascade at ``trust.decide_at`` of the steps (half by
  default), and the cascade stops there: any method's maps change once the first convolution
  is random, so the end says nothing. See docs/trust.md (blocks, order, BatchNorm, sMPRT/eMPRT).
- Deletion (Petsiuk et al. 2018): remove pixels from most to least relevant and follow the
  class probability, against a random order of *blobs* (a smoothed noise field, ranked;
  scattered holes are a texture no image has). What replaces a removed pixel is chosen per
  model among ROAD's noisy linear imputation (Rong et al. 2022), a heavy blur, the image mean
  and the input zero: the one under which removing random blobs alone changes the predictions
  least, so the fill is no signal of its own.
Both tests compare image by image with a 95% bootstrap interval over the test images (the deletion
test at an early look on fewer images: Student's t at 99.5%) and say
passed, failed or inconclusive; a method is dropped (rules ignore its heatmaps) only when one
fails on evidence. When every method is dropped, the audit reads a model-only method instead
(``fallback_maps``).
"""
from __future__ import annotations

import math
import time
from operator import itemgetter
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import rankdata
from torch import nn

from auditor.inputs.config import TrustSpec
from auditor.explain.engine import method_kwargs, resize
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


@contextmanager
def clock(parts: dict, name: str):
    """Add the block's wall-clock seconds to ``parts[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0


def _heat(name: str, params: dict, model, layer, x, target, seed: int) -> np.ndarray:
    kwargs = method_kwargs(name, params, layer, seed)
    return METHODS.get(name).fn(model, x, target, **kwargs).detach().float().cpu().numpy()


# --- the cascade: which parts are randomised, in which order ---------------------------------

MIN_STEPS = 5  # fewer blocks cascade steps than this: the next level, grouped (see cascade_steps)

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


def cascade_steps(model: nn.Module, x: torch.Tensor, mode: str = "blocks", max_steps: int = 8) -> list[Step]:
    """The cascade from the top (output) down to the input.

    ``modules``: every module with parameters of its own (Adebayo et al.'s layer-by-layer cascade).
    ``blocks``: the model's top-level children with parameters, each expanded into its own
    children while the whole next level still fits in ``max_steps`` (8: a ResNet-50 gives its
    stem, its four stages and its head). When the last level that fits has fewer than
    ``MIN_STEPS`` steps (a ViT's encoder is one child holding 12 layers), the next level is taken
    and its consecutive steps merged into ``max_steps`` groups: 5 to 8 steps whatever the depth,
    so the cost stays bounded (each step costs one explanation of the test images per method).
    A normalisation layer that would be a step of its own is folded into the step before it (the
    convolution it normalises), so no step resets only a BatchNorm's scale and shift. Order: the
    forward pass's, reversed; definition order (what ``named_modules`` gives) need not match the
    data flow (a residual block's shortcut, a head defined first).
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
    while len(steps) <= max_steps:
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
        if [g.names for g in grown] == [s.names for s in steps]:
            break
        if len(grown) > max_steps:
            if len(steps) < min(MIN_STEPS, max_steps):
                steps = grown  # too coarse a cascade: take the next level, merged below
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


@contextmanager
def cascade(model: nn.Module, x: torch.Tensor, steps: list[Step], seed: int, read: set[int] | None = None):
    """Randomise ``model`` in place, one of ``steps`` at a time from the top down: yields an
    iterator of (step, model) after each step. On leaving the ``with`` block the trained
    parameters and BatchNorm statistics are put back, so no copy of the whole model is made:
    only the tensors the steps run so far touched are saved (and restored even on an error).
    ``read``: the step indices whose model is used (every step by default); the BatchNorms are
    recalibrated only there, which gives the same model (each recalibration starts afresh)."""
    gen = torch.Generator().manual_seed(seed)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, its trained value)

    def keep(tensors):
        for t in tensors:
            saved.setdefault(id(t), (t, t.detach().clone()))

    def run():
        norms: list[nn.Module] = []
        for k, step in enumerate(steps):
            keep(_params(model, step))
            new = _norms(model, step)
            keep(b for m in new for b in m.buffers())
            randomise_(model, step, gen)
            norms += new
            if norms and BATCHNORM == "recalibrate" and (read is None or k in read):
                # The state after step k depends only on the parameters drawn so far: each
                # recalibration resets every randomised BatchNorm and reads this one batch.
                _recalibrate(model, norms, x)
            yield step, model
    try:
        yield run()
    finally:
        with torch.no_grad():
            for t, value in saved.values():
                t.copy_(value)


def randomisation(methods: dict[str, dict], model, layer, x, target, seed: int, heats: dict[str, np.ndarray],
                  spec: TrustSpec | None = None, parts: dict | None = None) -> dict[str, tuple | Exception]:
    """Per method of ``heats`` (its original heatmaps of ``x``), the similarity of its heatmaps
    after the decisive cascade step (after every step down to it with ``trust.curve``, every step
    with ``trust.full_cascade``): (curves, per-image |Spearman| of each step run, per-image SSIM
    of each step run), curves holding the step labels (all of them), the mean |Spearman| and mean
    SSIM per step run (None where a step was randomised but not explained); or the exception that
    stopped that method. The model is randomised once per step for every method (in place,
    restored after); ``parts`` collects the seconds of the shared model steps ("cascade_models")
    and of each method's maps ("cascade:<method>")."""
    spec, parts = spec or TrustSpec(), parts if parts is not None else {}
    steps = cascade_steps(model, x, spec.cascade, spec.cascade_steps)
    last = len(steps) - 1 if spec.full_cascade else decisive_step(len(steps), spec.decide_at)
    # The steps above the decisive one decide nothing (each step's model depends only on the draws
    # so far, not on what was explained before): explained only for the curve.
    read = set(range(last + 1)) if spec.curve or spec.full_cascade else {last}
    runs: dict[str, tuple | Exception] = {name: ([], [], [], []) for name in heats}  # rho, ssim, per image x2
    with cascade(model, x, steps, seed, read) as randomised:
        for k in range(last + 1):
            with clock(parts, "cascade_models"):
                next(randomised)
            for name, heat in heats.items():
                if isinstance(runs[name], Exception):
                    continue
                rho, sim, rho_images, sim_images = runs[name]
                if k not in read:
                    for values in runs[name]:
                        values.append(None)
                    continue
                with clock(parts, f"cascade:{name}"):
                    try:
                        reset = _resize(_heat(name, methods[name], model, layer, x, target, seed), heat.shape[-2:])
                    except Exception as e:  # noqa: BLE001  (this method untestable; the others go on)
                        runs[name] = e
                        continue
                    r = np.abs(spearman(heat.reshape(len(x), -1), reset.reshape(len(x), -1)))
                    values = ssim(heat, reset) if heat.ndim == 3 else np.full(len(x), np.nan)
                rho_images.append(r)
                sim_images.append(values)
                rho.append(round(float(r.mean()), 4))
                sim.append(round(float(np.nanmean(values)), 4) if np.isfinite(values).any() else None)  # None: too small
    labels = [s.label for s in steps]
    return {name: run if isinstance(run, Exception) else
            ({"randomisation_steps": labels, "randomisation_spearman": run[0], "randomisation_ssim": run[1]},
             run[2], run[3]) for name, run in runs.items()}


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


def mean_ci(values, seed: int, level: float = 0.95, student: bool = False) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` over images (NaNs left out), or with
    ``student`` Student's t interval (for a handful of images the percentile bootstrap is far too
    narrow: on 8 normal values its nominal 99.5% interval missed the mean 4.5% of the time);
    (nan, nan) under two values."""
    from scipy.stats import bootstrap
    from scipy.stats import t as student_t
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    if np.ptp(v) == 0:  # every image the same: nothing to resample
        return float(v[0]), float(v[0])
    if student:
        half = float(student_t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
        return float(v.mean()) - half, float(v.mean()) + half
    res = bootstrap((v,), np.mean, vectorized=True, n_resamples=2000, confidence_level=level, method="percentile",
                    rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def judge_cascade(rho: list[float], ssim_curve: list | None, spec: TrustSpec, n_steps: int | None = None,
                  rho_images: list | None = None, ssim_images: list | None = None, seed: int = 0) -> dict:
    """The randomisation test's verdict on one method's curves (``rho`` may stop at the decisive
    step of ``n_steps``): the decisive step, the first step below the thresholds, and
    ``randomisation``: passed, failed or inconclusive, with a plain-English reason.

    With the per-image values of each step, a method fails only on evidence: its mean similarity
    at the decisive step is above the threshold and so is the lower end of its 95% bootstrap
    interval over the test images. Above on average but with an interval reaching below:
    inconclusive (the method is kept, the note says why)."""
    n = n_steps or len(rho)
    if not rho:
        return {"decisive_step": None, "first_below": None, "max_spearman": spec.max_spearman,
                "max_ssim": spec.max_ssim, "randomisation": "inconclusive", "randomisation_ci": None,
                "randomisation_reason": "", "randomisation_note": "the model has no cascade step to randomise"}
    sims = list(ssim_curve or [None] * len(rho))
    d = min(decisive_step(n, spec.decide_at), len(rho) - 1)

    def similar(i: int) -> list[tuple[str, float, float, list | None]]:
        out = []
        if rho[i] is not None and rho[i] > spec.max_spearman:
            out.append(("rank correlation", rho[i], spec.max_spearman, rho_images))
        if spec.max_ssim is not None and sims[i] is not None and sims[i] > spec.max_ssim:
            out.append(("structural similarity", sims[i], spec.max_ssim, ssim_images))
        return out

    first = next((i for i in range(len(rho)) if rho[i] is not None and not similar(i)), None)
    evident, doubtful, ci = [], [], None
    for what, value, limit, images in similar(d):
        lo, hi = mean_ci(images[d], seed) if images is not None else (value, value)
        if what == "rank correlation":
            ci = [round(lo, 4), round(hi, 4)] if images is not None else None
        text = f"{what} {value:.2f}" + (f", 95% interval {lo:.2f} to {hi:.2f}" if images is not None else "")
        (evident if lo > limit else doubtful).append(text)  # NaN (one image): doubtful
    if ci is None and rho_images is not None:
        lo, hi = mean_ci(rho_images[d], seed)
        ci = [round(lo, 4), round(hi, 4)]
    where = f"after {d + 1} of {n} steps; at most {spec.max_spearman:.2f} allowed" + (
        f", and {spec.max_ssim:.2f} structural similarity" if spec.max_ssim is not None else "")
    reason = note = ""
    if evident:
        reason = (f"its heatmaps barely change when {share_words(spec.decide_at)} is randomised "
                  f"({' and '.join(evident)} {where})")
    elif doubtful:
        note = (f"randomisation inconclusive: its heatmaps stay similar on average when "
                f"{share_words(spec.decide_at)} is randomised, but not on enough of the test images to "
                f"say so ({' and '.join(doubtful)} {where})")
    return {"decisive_step": d, "first_below": first, "max_spearman": spec.max_spearman, "max_ssim": spec.max_ssim,
            "randomisation": "failed" if evident else "inconclusive" if doubtful else "passed",
            "randomisation_ci": ci, "randomisation_reason": reason, "randomisation_note": note}


# --- removal that creates no new signal -----------------------------------------------------------

FILLS = ("road", "blur", "mean", "zero")  # candidates, in the order a tie is broken
# ROAD's neighbour weights (Rong et al. 2022): direct neighbours 1/6, diagonal ones 1/12.
NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
              (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]
ROAD_SIDE = 64  # the imputation's linear system is solved on a grid of at most this side (see road_impute)
ROAD_NOISE = 0.01  # noise added to the imputed values, x each channel's standard deviation
PULL = 1e-3  # a removed pixel's weak pull to the image mean: a region with no known neighbour takes the mean


def _impute(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Noisy-free linear imputation of ``img`` [C, H, W] (float64) at ``removed`` [H, W]: every
    removed pixel the weighted mean of its eight neighbours, known or themselves removed; one
    sparse linear system, factorised once and solved for every channel."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu
    c, h, w = img.shape
    gone = removed.ravel()
    u = np.flatnonzero(gone)
    out = img.reshape(c, -1).copy()
    if not len(u):
        return out.reshape(img.shape)
    pos = np.full(h * w, -1)
    pos[u] = np.arange(len(u))
    r, col = np.divmod(u, w)
    diag = np.full(len(u), PULL)
    rhs = np.tile(PULL * out.mean(1), (len(u), 1))  # [n, C]
    rows, cols, vals = [np.arange(len(u))], [np.arange(len(u))], []
    for dr, dc, wt in NEIGHBOURS:
        rr, cc = r + dr, col + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        p, q = np.flatnonzero(ok), rr[ok] * w + cc[ok]
        diag[p] += wt
        inner = gone[q]
        rows.append(p[inner])
        cols.append(pos[q[inner]])
        vals.append(np.full(int(inner.sum()), -wt))
        rhs[p[~inner]] += wt * out[:, q[~inner]].T  # each p once per offset: no repeated index
    a = csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(len(u), len(u)))
    out[:, u] = splu(a).solve(rhs).T
    return out.reshape(img.shape)


def road_impute(img: np.ndarray, removed: np.ndarray, rng: np.random.Generator,
                noise: float = ROAD_NOISE) -> np.ndarray:
    """ROAD's noisy linear imputation (Rong et al. 2022, "A Consistent and Efficient Evaluation
    Strategy for Attribution Methods"): the removed pixels of ``img`` [C, H, W] are filled from
    their neighbours (a sparse linear system, ``_impute``) plus Gaussian noise, so the hole's
    shape leaks no signal of its own. Larger than ``ROAD_SIDE``, the system is solved on the
    image averaged over f x f cells (a cell is removed when most of it is; its value, the mean
    of its known pixels) and the solution upsampled bilinearly to the removed pixels: a smooth
    fill either way, at a 64-px solve's cost (~5 ms) instead of a 224-px one's (~0.2 s)."""
    c, h, w = img.shape
    f = math.ceil(max(h, w) / ROAD_SIDE)
    if f == 1:
        filled = _impute(img, removed)
    else:
        hc, wc = math.ceil(h / f), math.ceil(w / f)
        pad = ((0, 0), (0, hc * f - h), (0, wc * f - w))
        known = np.pad(~removed[None], pad, mode="edge").astype(np.float64)
        vals = np.pad(img, pad, mode="edge") * known
        cell = lambda a: a.reshape(a.shape[0], hc, f, wc, f).sum((2, 4))  # noqa: E731
        n_known = cell(known)[0]
        coarse = cell(vals) / np.maximum(n_known, 1)
        coarse = _impute(coarse, n_known < f * f / 2)
        up = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], scale_factor=f, mode="bilinear",
                                             align_corners=False)[0].numpy()[:, :h, :w]
        filled = np.where(removed[None], up, img)
    spread = img.reshape(c, -1).std(1)[:, None, None]
    return np.where(removed[None], filled + rng.standard_normal(img.shape) * noise * spread, img)


class Removal:
    """Replaces the removed pixels of the model inputs ``x`` [B, C, H, W] by one of ``FILLS``:
    road (noisy linear imputation), blur (the image under a heavy Gaussian blur, sigma 1/8 of
    the side), mean (each channel's mean over the image) or zero (the input space's zero: the
    dataset mean for normalised inputs, black for un-normalised ones)."""

    def __init__(self, fill: str, x: torch.Tensor, seed: int):
        self.fill, self.x, self.seed = fill, x, seed
        self.host = x.detach().double().cpu().numpy()
        b, c, h, w = x.shape
        if fill == "blur":
            sigma = max(h, w) / 8
            self.base = gaussian_filter(self.host, (0, 0, sigma, sigma), mode="reflect")
        elif fill == "mean":
            self.base = np.broadcast_to(self.host.mean((2, 3), keepdims=True), self.host.shape)
        elif fill == "zero":
            self.base = np.zeros_like(self.host)
        elif fill != "road":
            raise ValueError(f"unknown fill {fill!r}: one of {', '.join(FILLS)}")

    def __call__(self, removed: np.ndarray, rows=None) -> torch.Tensor:
        """``x[rows]`` (every image by default) with ``removed`` [len(rows), H, W] (bool) filled;
        an image may repeat in ``rows`` (several removals of it in one batch). The same removal
        of the same image gives the same result."""
        rows = np.arange(len(self.host)) if rows is None else np.asarray(rows)
        if self.fill == "road":
            out = np.stack([road_impute(self.host[i], gone, np.random.default_rng([self.seed, int(i), int(gone.sum())]))
                            for i, gone in zip(rows, removed)])
        else:
            out = np.where(removed[:, None], self.base[rows], self.host[rows])
        return torch.from_numpy(out).to(self.x.device, self.x.dtype)


def random_blobs(b: int, h: int, w: int, seed: int) -> np.ndarray:
    """[b, h*w] smooth random fields (Gaussian-filtered noise, blobs ~1/8 of the side)."""
    rng = np.random.default_rng(seed)
    sigma = max(h, w) / 16
    return np.stack([gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap").ravel() for _ in range(b)])


def _rows(x: torch.Tensor) -> int:
    """Images per forward pass of the deletion test (no gradient): 64 on a GPU; 16 on a CPU, where
    larger batches run slower per image (ResNet-50 at 224 px: 0.33 s an image at 8 or 16, 0.48 at 40)."""
    return 64 if x.device.type == "cuda" else 16


@torch.no_grad()
def _prob(model, x: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The target's probability and the predicted class of each row of ``x``."""
    rows = _rows(x)
    p, top = [], []
    for s in range(0, len(x), rows):
        out = model(x[s:s + rows]).float().softmax(1)
        p.append(out.gather(1, target[s:s + rows, None])[:, 0].cpu().numpy())
        top.append(out.argmax(1).cpu().numpy())
    return np.concatenate(p), np.concatenate(top)


def _removed_prob(model, removal: Removal, masks: np.ndarray, rows: np.ndarray, target: torch.Tensor):
    """``_prob`` of image ``rows[j]`` with ``masks[j]`` removed, for every j: the filled images
    are made a batch (``_rows``) at a time, so memory stays bounded however many removals there are."""
    p, top, n = [], [], _rows(removal.x)
    for s in range(0, len(rows), n):
        part = rows[s:s + n]
        out = _prob(model, removal(masks[s:s + n], part), target[torch.as_tensor(part, device=target.device)])
        p.append(out[0])
        top.append(out[1])
    return np.concatenate(p), np.concatenate(top)


def _first(order: np.ndarray, k: int, h: int, w: int) -> np.ndarray:
    """[B, H, W]: True at the first k pixels of each row of ``order``."""
    removed = np.zeros(order.shape, bool)
    np.put_along_axis(removed, order[:, :k], True, axis=1)
    return removed.reshape(-1, h, w)


def choose_fill(model, x, target, field: np.ndarray, share: float, seed: int,
                fills=FILLS, clean: np.ndarray | None = None, first: list[int] | None = None) -> tuple[str, dict]:
    """The fill under which removing random blobs alone (the top ``share`` of each image's random
    field) changes the predictions least: fewest flipped predictions, then the smallest mean
    change of the target's probability (either way). Returns it and every candidate's numbers:
    flip rate, mean probability drop (signed) and mean absolute change. ``clean``: the target's
    probability on ``x`` itself, when known.

    With ``first`` (indices into ``x``: the early look's images) the candidates race (Maron and
    Moore's racing): each is tried on those images first, and one that is clearly worse there
    than the leader is dropped; only the others are tried on the rest, and the choice is made
    among them on every image. "Clearly worse": the ordering above is that of the mean of a
    per-image score (``b`` for a flip, plus the absolute change; b images, so a flip outweighs any
    change), and the interval of its mean difference from the leader's lies above 0 (Student's t
    at ``EARLY_LEVEL``, as the deletion test's early look). A dropped fill's numbers are on the
    early images; each entry then says on how many images (``images``)."""
    b, _, h, w = x.shape
    removed = _first(np.argsort(-field, axis=1), round(share * h * w), h, w)
    p0 = _prob(model, x, target)[0] if clean is None else clean
    truth = target.cpu().numpy()
    race = first is not None and 0 < len(first) < b and len(fills) > 1
    early = np.array(sorted(first)) if race else np.arange(b)
    p, top = {}, {}
    for fill in fills:
        p[fill], top[fill] = np.full(b, np.nan), np.full(b, -1)
        p[fill][early], top[fill][early] = _removed_prob(model, Removal(fill, x, seed), removed[early], early, target)

    def numbers(fill: str, rows: np.ndarray) -> dict:
        change = p0[rows] - p[fill][rows]
        return {"flip_rate": round(float((top[fill][rows] != truth[rows]).mean()), 4),
                "probability_drop": round(float(change.mean()), 4),
                "probability_change": round(float(np.abs(change).mean()), 4)}

    def best(candidates, rows: np.ndarray) -> str:
        return min(candidates, key=lambda f: itemgetter("flip_rate", "probability_change")(numbers(f, rows)))
    alive = list(fills)
    if race:
        score = {f: b * (top[f][early] != truth[early]) + np.abs(p0[early] - p[f][early]) for f in fills}
        leader = best(fills, early)
        alive = [f for f in fills if f == leader or
                 not mean_ci(score[f] - score[leader], seed, EARLY_LEVEL, student=True)[0] > 0]
        rest = np.setdiff1d(np.arange(b), early)
        for fill in alive:
            p[fill][rest], top[fill][rest] = _removed_prob(model, Removal(fill, x, seed), removed[rest], rest, target)
    every = np.arange(b)
    check = {f: numbers(f, every if f in alive else early) | ({"images": b if f in alive else len(early)}
                                                              if race else {}) for f in fills}
    return best(alive, every), check


def deletion_curves(model, x, target, orders: dict[str, np.ndarray], removal: Removal, steps: int,
                    ends: tuple, rows=None) -> dict[str, np.ndarray]:
    """Per image of ``rows`` (every image by default), the target's probability as the first k
    pixels of each order [len(rows), H*W] are removed, k = 0, n/steps, ..., n: [len(rows),
    steps + 1] per order. The ends (nothing and everything removed, [len(rows)] each) are the
    same for every order and are passed in; the inner steps of all orders go in one batch."""
    b, _, h, w = x.shape
    rows = np.arange(b) if rows is None else np.asarray(rows)
    ks = np.linspace(0, h * w, steps + 1).astype(int)[1:-1]
    masks = np.concatenate([_first(order, k, h, w) for order in orders.values() for k in ks])
    p = _removed_prob(model, removal, masks, np.tile(rows, len(orders) * len(ks)), target)[0]
    p = p.reshape(len(orders), len(ks), len(rows))
    return {name: np.concatenate([ends[0][:, None], p[j].T, ends[1][:, None]], 1) for j, name in enumerate(orders)}


def area(curve: np.ndarray) -> np.ndarray:
    """Per image, the area under a [B, steps + 1] curve over [0, 1] (trapezoids)."""
    return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(1)


def relevance_order(heat: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Most relevant first; equal relevance (Grad-CAM's zeros, a constant map) in random-blob order."""
    flat = heat.reshape(len(field), -1)
    return np.stack([np.lexsort((-field[k], -flat[k])) for k in range(len(field))])


def judge_deletion(auc: np.ndarray, random_auc: np.ndarray, start: np.ndarray, spec: TrustSpec, seed: int,
                   fill_flips: float = 0.0, level: float = 0.95, student: bool = False) -> dict:
    """The deletion test's verdict by a paired comparison over images: the benefit, per image the
    area under the random order's curve minus that under the relevance order's (how much lower
    the target's probability runs when pixels go by relevance), averaged, with a 95% bootstrap
    interval over the images (``level``: 95%, or stricter at an early look, see ``deletion_test``).

    failed: the interval's upper end is below ``trust.min_benefit`` (evidence that it is no better
    than random); passed: its lower end is above 0; inconclusive otherwise, and also where
    deletion cannot tell: when the fill itself is a signal to the model (random removal alone
    flipped ``fill_flips`` of the predictions, more than ``trust.max_fill_flips``), or when removing
    pixels barely moves the prediction in either order (the mean probability falls by less than
    ``trust.min_effect``: e.g. data whose background is the fill)."""
    effect = float(max((start - auc).mean(), (start - random_auc).mean()))
    gain = random_auc - auc
    benefit = float(gain.mean())
    lo, hi = mean_ci(gain, seed, level, student)
    out = {"deletion_benefit": round(benefit, 4), "deletion_ci": [round(lo, 4), round(hi, 4)],
           "deletion_level": level, "deletion_effect": round(effect, 4), "deletion_reason": "", "deletion_note": ""}
    numbers = (f"area {auc.mean():.2f} against {random_auc.mean():.2f} in random order, a benefit of {benefit:+.3f}, "
               f"{100 * level:g}% interval {lo:+.3f} to {hi:+.3f}")
    if fill_flips > spec.max_fill_flips:
        out["deletion"] = "inconclusive"
        out["deletion_note"] = (f"deletion inconclusive: removing random blobs alone ({spec.fill_share:.0%} of each "
                                f"image) flips {fill_flips:.0%} of the predictions even with the best fill, so "
                                f"removal is itself a signal to this model ({numbers})")
    elif spec.min_effect and effect < spec.min_effect:  # (0: never)
        out["deletion"] = "inconclusive"
        out["deletion_note"] = (f"deletion inconclusive: removing pixels barely changes the prediction in either "
                                f"order (the probability falls by {effect:.3f} on average, under "
                                f"{spec.min_effect:.2f}), so the test cannot tell")
    elif hi < spec.min_benefit:
        out["deletion"] = "failed"
        out["deletion_reason"] = (f"removing the pixels it marks hurts the prediction no more than removing random "
                                  f"ones ({numbers}; at least {spec.min_benefit:.2f} needed)")
    elif lo > 0:
        out["deletion"] = "passed"
    else:
        out["deletion"] = "inconclusive"
        out["deletion_note"] = (f"deletion inconclusive: the images disagree on whether removing the pixels it "
                                f"marks hurts the prediction more than removing random ones ({numbers})")
    return out


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


def _untestable(why: str) -> dict:
    return {"reliable": False, "untestable": True, "reason": f"could not be tested: {why}"}


def _resize(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, h, w] heatmaps at ``size`` as the engine stores them."""
    return resize(torch.from_numpy(np.ascontiguousarray(heat)).float(), size).numpy()


def _stored(ev, name: str, ids: list[int]) -> np.ndarray | None:
    """The engine's heatmaps of ``ids`` for their predicted class (what the rules read), when it
    kept them all: the gate then need not explain its test images again."""
    maps = ev.heatmaps.get(name)
    if maps is None or any(i not in maps for i in ids):
        return None
    try:
        return np.stack([maps[i] for i in ids]).astype(np.float32)
    except KeyError:  # missing from the cache after all
        return None


# The early look's interval (Student's t on its few images): about O'Brien-Fleming's bound for two
# looks, so that stopping early spends ~0.5% of the error and the final look keeps near 95%. The
# early images are the cascade images, misclassified ones first: not a random half of the test images.
EARLY_LEVEL = 0.995


def decided_early(verdict: dict, spec: TrustSpec, fill_flips: float, effect_lo: float = math.inf) -> bool:
    """Whether an early look's deletion verdict stands: a fill that makes it inconclusive anyway;
    else, only when the effect is clearly above ``trust.min_effect`` (``effect_lo``, its interval's
    lower end: a smaller effect makes the full test inconclusive, not failed), failed, or passed
    with the interval above ``trust.min_benefit`` too (a benefit between 0 and min_benefit passes
    on a wide interval and fails on a narrow one, failing being read first)."""
    if fill_flips > spec.max_fill_flips:
        return True
    if spec.min_effect and not effect_lo >= spec.min_effect:
        return False
    return verdict["deletion"] == "failed" or (verdict["deletion"] == "passed"
                                               and verdict["deletion_ci"][0] > spec.min_benefit)


def deletion_test(model, x, target, clean: np.ndarray, removal: Removal, field: np.ndarray,
                  heats: dict[str, np.ndarray], spec: TrustSpec, seed: int, fill_flips: float,
                  first: list[int] | None = None, parts: dict | None = None) -> dict[str, dict | Exception]:
    """The deletion test of each method of ``heats`` (its maps of ``x``, resized to the input here), in
    up to two looks: first on the images ``first`` (indices into ``x``), then on all of them.

    A method stops at the first look when that look already decides: its benefit's interval at
    ``EARLY_LEVEL`` (stricter than the final 95%, so that looking twice keeps the overall error
    near 5%) lies above ``trust.min_benefit`` (passed) or below it (failed), or the fill check
    already makes the test inconclusive. Otherwise the rest of the images are added and it is judged on all at
    95%. The random order's curve is shared and made only for the images some method needs.
    Per method: judge_deletion's keys, deletion_auc, random_deletion_auc, deletion_images; or the
    exception that stopped that method. ``parts`` collects the seconds of the random order's
    curves ("random_order") and of each method's ("deletion:<method>")."""
    parts = parts if parts is not None else {}
    b, _, h, w = x.shape
    looks = [sorted(first), list(range(b))] if first and spec.early_stop and len(first) < b else [list(range(b))]
    random = np.full((b, spec.steps + 1), np.nan)
    curves: dict[str, np.ndarray] = {name: np.full((b, spec.steps + 1), np.nan) for name in heats}
    orders: dict[str, np.ndarray] = {}
    out: dict[str, dict | Exception] = {}
    for j, look in enumerate(looks):
        final = j == len(looks) - 1
        new = np.array([i for i in look if np.isnan(random[i, 0])])
        with clock(parts, "random_order"):  # an error here reaches the caller: every method untested
            ends = (clean[new], _removed_prob(model, removal, np.ones((len(new), h, w), bool), new, target)[0])
            random[new] = deletion_curves(model, x, target, {"random": np.argsort(-field[new], axis=1)}, removal,
                                          spec.steps, ends, new)["random"]
        for name in [n for n in heats if n not in out]:
            with clock(parts, f"deletion:{name}"):
                try:
                    if name not in orders:
                        orders[name] = relevance_order(_resize(heats[name], (h, w)), field)
                    curves[name][new] = deletion_curves(model, x, target, {name: orders[name][new]}, removal,
                                                        spec.steps, ends, new)[name]
                except Exception as e:  # noqa: BLE001  (this method untestable; the others go on)
                    out[name] = e
                    continue
                auc, random_auc = area(curves[name][look]), area(random[look])
                verdict = judge_deletion(auc, random_auc, clean[look], spec, seed, fill_flips,
                                         0.95 if final else EARLY_LEVEL, student=not final)
                effect_lo = math.inf if final else max(
                    mean_ci(clean[look] - auc, seed, EARLY_LEVEL, student=True)[0],
                    mean_ci(clean[look] - random_auc, seed, EARLY_LEVEL, student=True)[0])
            if final or decided_early(verdict, spec, fill_flips, effect_lo):
                out[name] = {**verdict, "deletion_auc": round(float(auc.mean()), 4),
                             "random_deletion_auc": round(float(random_auc.mean()), 4), "deletion_images": len(look)}
        if len(out) == len(heats):
            break
    return out


def trust_gate(ev, methods: dict[str, dict], layer, spec: TrustSpec, seed: int) -> dict[str, dict]:
    """Run both tests on a few explained images; return per-method results with ``reliable``.

    A method is dropped (``reliable`` false) only on evidence that it is wrong: a test that
    fails. An inconclusive test keeps it, with the reason in ``note``.

    Keys per method: reliable, reason, note, images, cascade_images, seconds; the cascade's
    randomisation_steps (every step's label, top first), randomisation_spearman and
    randomisation_ssim (one value per step run: up to the decisive one unless
    ``trust.full_cascade``; None for a step randomised but not explained, every step above the
    decisive one unless ``trust.curve``), decisive_step (0-based), first_below (or None), max_spearman,
    max_ssim, randomisation (passed/failed/inconclusive), randomisation_ci (the decisive step's
    95% interval); the deletion test's fill and fill_check (the chosen fill, and each
    candidate's flip rate and probability change under random removal), deletion_auc,
    random_deletion_auc (mean areas), deletion (passed/failed/inconclusive),
    deletion_benefit, deletion_ci, deletion_effect, deletion_images (the images it was decided
    on: the cascade images when they already decided, see ``deletion_test``); ``timing``: the
    seconds of the gate's parts, its own (maps, deletion, cascade) and the shared ones, the
    same in every entry (clean probabilities, fill check, random order, cascade models).
    ``seconds`` is the method's own time plus an equal share of the shared parts.
    """
    s = ev.samples
    ids = test_images(s, spec.images, seed)
    if not ids:
        return {}
    # The cascade on the first few of them (the same round robin over the classes, cut shorter).
    sub = [ids.index(i) for i in test_images(s, min(spec.cascade_images, spec.images), seed)]
    parts: dict[str, float] = {}
    x = ev.model_inputs(ids)
    b, _, h, w = x.shape
    target = torch.tensor(s.loc[ids, "prediction"].to_numpy(), device=ev.device)
    field = random_blobs(b, h, w, seed)
    heats, out = {}, {}
    for name, params in methods.items():  # the maps the rules read, when the engine kept them; else explained
        with clock(parts, f"maps:{name}"):
            try:
                heats[name] = _stored(ev, name, ids)
                if heats[name] is None:
                    heats[name] = _heat(name, params, ev.model, layer, x, target, seed)
            except Exception as e:  # noqa: BLE001
                out[name] = _untestable(f"{type(e).__name__}: {e}")
                heats.pop(name, None)
    if not heats:
        return out
    try:
        with clock(parts, "clean"):
            clean = _prob(ev.model, x, target)[0]  # once: the fill check's reference and every curve's start
        with clock(parts, "fill_check"):
            fill, check = choose_fill(ev.model, x, target, field, spec.fill_share, seed,
                                      FILLS if spec.fill == "auto" else (spec.fill,), clean,
                                      sub if spec.early_stop else None)
        removal = Removal(fill, x, seed)
        deleted = deletion_test(ev.model, x, target, clean, removal, field, heats, spec, seed,
                                check[fill]["flip_rate"], sub, parts)
    except Exception as e:  # noqa: BLE001  (recorded: every method untested, none passed)
        why = _untestable(f"the deletion test could not run: {type(e).__name__}: {e}")
        return {name: out.get(name, why) for name in methods}   # a method's own failure keeps its reason
    try:
        runs = randomisation(methods, ev.model, layer, x[sub], target[sub], seed,
                             {n: heat[sub] for n, heat in heats.items()}, spec, parts)
    except Exception as e:  # noqa: BLE001  (a shared cascade step failed: every method untested)
        runs = {name: e for name in heats}
    shared = {k: round(v, 2) for k, v in parts.items() if ":" not in k}
    for name in methods:
        if name in out:
            continue
        failed = next((r for r in (deleted.get(name), runs.get(name)) if isinstance(r, Exception)), None)
        if failed is not None:
            out[name] = _untestable(f"{type(failed).__name__}: {failed}")
            continue
        curves, rho_images, ssim_images = runs[name]
        verdict = judge_cascade(curves["randomisation_spearman"], curves["randomisation_ssim"], spec,
                                len(curves["randomisation_steps"]), rho_images, ssim_images, seed)
        dl = dict(deleted[name])
        reasons = [r for r in (verdict.pop("randomisation_reason"), dl.pop("deletion_reason")) if r]
        notes = [r for r in (verdict.pop("randomisation_note"), dl.pop("deletion_note")) if r]
        own = {part: round(parts.get(f"{part}:{name}", 0.0), 2) for part in ("maps", "deletion", "cascade")}
        out[name] = {"reliable": not reasons, "reason": "; ".join(reasons), "note": "; ".join(notes), **curves,
                     **verdict, "fill": fill, "fill_check": check, **dl, "images": len(ids),
                     "cascade_images": len(sub), "timing": {**own, **shared},
                     "seconds": round(sum(own.values()) + sum(shared.values()) / len(methods), 2)}
    return {name: out[name] for name in methods}


# --- when every method fails: a model-only method's evidence ---------------------------------------

FALLBACK_SIDE = 128  # larger inputs: the fallback's occlusion windows side by side (see fallback_params)


def fallback_params(name: str, size: tuple[int, int]) -> dict:
    """The fallback's parameters, bounded on large inputs: occlusion's window is 1/8 of the
    side whatever the size (225 windows at the default half-window stride), but each forward
    pass of a large input costs more, so beyond ``FALLBACK_SIDE`` px the windows are laid side
    by side (stride 1: 64 windows, 65 forward passes per image instead of 226; 28-px cells at
    224 px, still under a quarter of the image for the evidence boxes)."""
    return {"stride": 1.0} if name == "occlusion" and max(size) > FALLBACK_SIDE else {}


def fallback_maps(ctx, ev, store, name: str, quiet: bool = True) -> dict:
    """Explain the explained images with the model-only method ``name`` (occlusion: it hides
    patches and measures the model's own response, so there is no propagation rule to distrust)
    through the explain engine, and add its heatmaps to ``ev`` as reliable. Returns its trust
    entry: ``fallback`` true, ``reliable`` whether it produced maps, ``note`` or ``reason``,
    ``params`` (see ``fallback_params``) and ``seconds``."""
    from auditor.explain.engine import Context, run_local
    from auditor.explain.store import LazyMaps

    t0 = time.perf_counter()
    ids = [int(i) for i in ev.samples.index[ev.samples["explained"]]]
    cfg = ctx.cfg.model_copy(update={"explain": ctx.cfg.explain.model_copy(update={"samples": "all"})})
    params = METHODS.get(name).validate(fallback_params(name, tuple(ev.input_spec.size)))
    sub = Context(cfg, ctx.model, ctx.device, ctx.layer, {name: params}, ctx.support,
                  [ctx.refs[i] for i in ids], ctx.model_key)  # the engine numbers images by position in refs
    rec = None
    try:
        if cfg.run.engine == "ray":
            from auditor.explain.ray_engine import run_ray
            rec = run_ray(sub, store, quiet=quiet)
        else:
            rec = run_local(sub, store, quiet=quiet)
    except Exception as e:  # noqa: BLE001  (recorded: the fallback could not run)
        sub.disabled.setdefault(name, f"{type(e).__name__}: {e}")
    if rec is None or name in sub.disabled or not rec.heatmaps.get(name):
        why = sub.disabled.get(name, "it produced no heatmaps").splitlines()[0]
        return {"reliable": False, "fallback": True, "reason": f"could not run: {why}", "note": "", "images": 0,
                "params": params, "seconds": round(time.perf_counter() - t0, 2)}
    ev.heatmaps[name] = LazyMaps(store, {ids[j]: key for j, key in rec.heatmaps[name].items()})
    ev.contrast[name] = LazyMaps(store, {ids[j]: key for j, key in rec.contrast.get(name, {}).items()})
    ev.reliable[name] = True
    return {"reliable": True, "fallback": True, "reason": "", "images": len(ev.heatmaps[name]), "params": params,
            "seconds": round(time.perf_counter() - t0, 2),
            "note": f"fallback: no configured explanation method passed the trust gate, so the rules read {name}, "
                    f"a model-only method, on the {len(ev.heatmaps[name])} explained images"
                    + (f" (windows side by side on inputs over {FALLBACK_SIDE} px, to bound its cost)"
                       if params.get("stride") == 1.0 else "")}
