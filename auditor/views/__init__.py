"""Global views of the model, after intervention: what each class looks like to it (class
visualisation), how readable a confirmed cue and the class are at each depth (linear probes),
and how simple each class's decision is (tree surrogates). One entry: ``global_views``.

The class visualisations are computed once per model and settings (``class_views``): the
``class_visualisation`` rule reads them before intervention, this step again after it.
"""
from __future__ import annotations

import base64
import io
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from auditor.explain.engine import split_on_oom
from auditor.explain.heatmap import boxes_overlap, pixel_box
from auditor.judge.evidence import ClassFinding, Evidence, Finding
from auditor.inputs.config import InterventionSpec
from auditor.judge.intervene import Intervener, fill
from auditor.record import ClassView, ProbeCurve, TreeView, Views
from auditor.views import probes, tree
from auditor.views.visualise import best_window, fft_rgb, visualise, windows

# The ``views:`` config section, read with these defaults where the config has none.
DEFAULTS = {"enabled": True, "steps": 48, "max_classes": 20, "window": 0.15, "probe_images": 150, "max_cues": 4}
SALIENCY_GRID = 16


def settings(cfg) -> dict:
    got = getattr(cfg, "views", None)
    got = got.model_dump() if hasattr(got, "model_dump") else dict(got or {})
    return DEFAULTS | {k: v for k, v in got.items() if v is not None}


@dataclass
class Picture:
    image: np.ndarray      # [h, w, C] in [0, 1]
    saliency: np.ndarray   # [h, w]
    logit: float
    share: float           # of the saliency, in ``region``
    region: list[float]
    carry: float           # share of the other classes' visualisations the region turns into this class
    windows: list = None   # the WINDOWS strongest windows (the first is ``region``): [(share, box, carry)]


WINDOWS = 3       # candidate windows per visualisation
BACKGROUNDS = 16  # smooth random pictures the window is also pasted onto (data-free, seeded)


def smooth_noise(n: int, h: int, w: int, channels: int, seed: int) -> torch.Tensor:
    """n random pictures [n, C, h, w] in [0, 1] with the visualisations' own 1/f spectrum."""
    gen = torch.Generator().manual_seed(seed + 1)
    return fft_rgb(0.5 * torch.randn(n, 2, channels, h, w // 2 + 1, generator=gen), h, w, channels)


_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {settings: {class: Picture}}


def chosen_classes(ev: Evidence, most: int) -> list[int]:
    """Every class, or with more than ``most`` the ``most`` the model predicts most often."""
    counts = np.bincount(ev.samples["prediction"].to_numpy().astype(int), minlength=len(ev.classes))
    return sorted(np.argsort(-counts, kind="stable")[:most].tolist())


def _normaliser(spec, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The input's mean and std per channel as [1, C, 1, 1] float32 (one value given: every channel's)."""
    def per_channel(v):
        v = list(v) * spec.channels if len(v) == 1 else list(v)
        return torch.as_tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return per_channel(spec.mean), per_channel(spec.std)


def _visualise_in_halves(ev: Evidence, classes: list[int], size, mean, std, steps: int, seed: int):
    """``visualise`` on all classes at once; split in halves when out of memory, as the explain
    engine does (each class's picture is optimised on its own)."""
    def run(part: list[int]):
        return visualise(ev.model, part, size, ev.input_spec.channels, mean, std, ev.device, steps=steps, seed=seed)
    return split_on_oom(run, classes, lambda parts: tuple(np.concatenate(a) for a in zip(*parts)), ev.device)


def class_views(ev: Evidence, steps: int, window: float, max_classes: int, seed: int = 0) -> dict[int, Picture]:
    """Per class, its visualisation, where its evidence lies and whether that window alone
    carries the class (pasted onto the other classes' visualisations); memoised per model."""
    spec = ev.input_spec
    classes = chosen_classes(ev, max_classes)
    key = (tuple(classes), steps, window, seed, tuple(spec.size), tuple(spec.mean), tuple(spec.std))
    memo = _MEMO.setdefault(ev.model, {})
    if key in memo:
        return memo[key]
    h, w = spec.size
    m, s = _normaliser(spec, ev.device)
    imgs, sal, logits = _visualise_in_halves(ev, classes, (h, w), m.flatten().tolist(), s.flatten().tolist(),
                                             steps, seed)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(ev.device)
    backgrounds = torch.cat([x, smooth_noise(BACKGROUNDS, h, w, spec.channels, seed).to(ev.device)])
    with torch.no_grad():
        before = ev.model((backgrounds - m) / s).argmax(1).cpu().numpy()
    out = {}
    for k, c in enumerate(classes):
        keep = (np.arange(len(backgrounds)) != k) & (before != c)
        found = []
        for share, box in windows(sal[k], window, WINDOWS):
            x0, y0, x1, y1 = pixel_box(box, (h, w))
            pasted = backgrounds.clone()
            pasted[:, :, y0:y1, x0:x1] = x[k, :, y0:y1, x0:x1]
            with torch.no_grad():  # onto the other classes' pictures and the noise: not onto its own picture
                pred = ev.model((pasted - m) / s).argmax(1).cpu().numpy()
            carry = float((pred[keep] == c).mean()) if keep.any() else 0.0
            found.append((round(share, 4), [round(v, 4) for v in box], round(carry, 4)))
        share, box, carry = found[0]
        out[c] = Picture(imgs[k], sal[k], float(logits[k]), share, box, carry, found)
    memo[key] = out
    return out


LOCATE_IMAGES = 32  # images the model calls a class, searched for its drawing's windows


def layer_maps(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's feature maps [N, K, h, w] for the inputs x, or None when it gives none."""
    got: list[torch.Tensor] = []
    last: list[torch.Tensor] = []
    hook = layer.register_forward_hook(
        lambda mod, i, o: last.append(o.detach().float()) if isinstance(o, torch.Tensor) and o.dim() == 4 else None)
    try:
        with torch.no_grad():
            for chunk in x.split(64):
                last.clear()
                model(chunk)
                if not last:
                    return None
                got.append(last[-1])
    finally:
        hook.remove()
    return torch.cat(got)


@dataclass
class Place:
    region: list[float]    # where the class's images show the window, as fractions
    contrast: float | None  # mean likeness in that region minus the median likeness over the image
    drawn: list[float]     # the window of the drawing
    share: float           # of the drawing's saliency, in the window
    carry: float           # of the other drawings the window turns


def locate(ev: Evidence, c: int, pic: Picture, side: float) -> list[Place]:
    """Where the images the model calls class ``c`` show what each of its drawing's windows shows,
    read with the model's own features (``ev.layer``): the likeness of the window's features to
    those at each place of each image, averaged over the images. A network that pools over space
    draws a mark anywhere, but the images carry it at one place. One place per window, the one
    found most sharply at one place first (a drawing shows a mark beside the object's look, and
    where a layer's cell peaks is only near what it sees: the place test chooses among them);
    none without a spatial layer (a model that keeps place then draws a mark where it looks)."""
    ids = ev.samples.index[ev.samples["prediction"] == c].tolist()[:LOCATE_IMAGES]
    if ev.layer is None or not ids or not pic.windows:
        return []
    spec = ev.input_spec
    h, w = spec.size
    device = ev.device or next(ev.model.parameters()).device
    m, s = _normaliser(spec, device)
    drawing = (torch.from_numpy(pic.image).permute(2, 0, 1)[None].to(device) - m) / s
    maps = layer_maps(ev.model, ev.layer, torch.cat([drawing, ev.model_inputs(ids).to(device).float()]))
    if maps is None:
        return []
    drawn = torch.nn.functional.interpolate(maps[:1], size=(h, w), mode="bilinear", align_corners=False)[0]
    kh, kw = max(1, round(side * h)), max(1, round(side * w))
    out = []
    for share, box, carry in pic.windows:
        x0, y0, x1, y1 = pixel_box(box, (h, w))
        f = drawn[:, y0:y1, x0:x1].mean((1, 2)).view(1, -1, 1, 1)
        like = torch.nn.functional.cosine_similarity(maps[1:], f, dim=1).clamp(min=0).mean(0)
        like = torch.nn.functional.interpolate(like[None, None], size=(h, w), mode="bilinear",
                                               align_corners=False)[0, 0].cpu().numpy().astype(np.float64)
        got, place = best_window(like, side)
        typical = float(np.median(like))
        contrast = got * float(like.sum()) / (kh * kw) - typical
        out.append(Place(_extent(like, place, typical + contrast / 2), round(contrast, 4), box, share, carry))
    return sorted(out, key=lambda p: -p.contrast)


def place_test(ev: Evidence, c: int, box, seed: int = 0, spec: InterventionSpec | None = None,
               need: float = 0.0) -> dict | None:
    """Does ``box`` of class ``c``'s images carry ``c`` onto other classes' images beyond ``c``'s own
    content of its size, taken from elsewhere in those images and moved to that place
    (``Intervener.versus_content``)? A mark at one place does; an object's look, a texture the
    class shows all over (a max-pooled network calls anything holding a patch of it the class),
    does as well from anywhere. The intervention's own keys ("control_content_rate",
    "content_vs_control") and the paste's rate ("place_rate"); None when it cannot run (no
    images of the class or of others, or no room for the placebo). With ``need`` (checked first), a paste that
    turns fewer than that share cannot carry the class ``need`` beyond anything: the content's
    placebo is not run ("content_vs_control" is then the paste's rate with no interval above 0)."""
    spec = spec or InterventionSpec()
    tester = Intervener(ev, spec, seed)
    tester.reseed(seed, 2, c, *box)
    s = ev.samples
    members = (tester.correct[tester.correct_labels == c].tolist() or s.index[s["prediction"] == c].tolist())
    targets = tester.others(c, spec.transplant_images)
    if not members or not targets:
        return None
    x, y = ev.model_inputs(members[:spec.class_images]), ev.model_inputs(targets)
    hit = tester.pasted(x, y, tester.mask(box), c)
    rate = round(float(hit.float().mean()), 4)
    if rate < need:
        return {"place_rate": rate, "control_content_rate": None, "content_vs_control": [rate, 0.0, rate]}
    got = tester.versus_content(c, tuple(box), y, hit, exclude=[])
    return got | {"place_rate": rate} if got else None


def carries(t: dict | None, least: float) -> bool:
    """A place test (``place_test``) whose place carries the class at least ``least`` beyond the
    class's own content moved there, with its 95% interval above zero."""
    return t is not None and t["content_vs_control"][0] >= least and t["content_vs_control"][1] > 0


def soundest(tested: list[tuple], least: float) -> tuple | None:
    """Of tuples that end in a place test, the one whose place carries the class most beyond the
    class's own content among those that carry it at least ``least`` (``carries``); the first of
    equals, None when none does."""
    sound = [q for q in tested if carries(q[-1], least)]
    return max(sound, key=lambda q: q[-1]["content_vs_control"][0], default=None)


def place_said(t: dict, name: str, what: str) -> str:
    """The place test's outcome (``place_test``) in a sentence, of a ``what`` ("place", "region")."""
    return (f" Pasted from the '{name}' images onto other classes' images, that {what} turned {t['place_rate']:.0%} "
            f"of them into '{name}'; the '{name}' images' own content from elsewhere, moved there, turned "
            f"{t['control_content_rate']:.0%}.")


def place_details(t: dict | None) -> dict:
    """The place test's figures that a class finding keeps (read back by ``place_effects``); none
    without a test."""
    return {} if t is None else {"place_rate": t["place_rate"], "content_rate": t["control_content_rate"],
                                 "beyond_content": t["content_vs_control"]}


def place_effects(d: dict, what: str) -> list[str]:
    """A finding's place-test figures (``place_details``) as the report's effect lines."""
    return [f"that {what} of the class's images turned {d['place_rate']:.0%} of other images, the class's own "
            f"content moved there {d['content_rate']:.0%}"] if "place_rate" in d else []


def _extent(like: np.ndarray, window: list[float], level: float, grow: float = 2.0) -> list[float]:
    """The box of the blob of ``like`` above ``level`` that holds the window's centre (a mark larger
    than the window is pasted whole), at least the window and at most ``grow`` times its side
    about its centre (a small patch, not the object: and room is left for placebo regions)."""
    h, w = like.shape
    cx, cy = (window[0] + window[2]) / 2, (window[1] + window[3]) / 2
    half = [grow * (window[2] - window[0]) / 2, grow * (window[3] - window[1]) / 2]
    blobs, _ = ndimage.label(like >= level)
    blob = blobs[min(int(cy * h), h - 1), min(int(cx * w), w - 1)]
    if blob:
        ys, xs = np.nonzero(blobs == blob)
        window = [max(min(window[0], xs.min() / w), cx - half[0]), max(min(window[1], ys.min() / h), cy - half[1]),
                  min(max(window[2], (xs.max() + 1) / w), cx + half[0]), min(max(window[3], (ys.max() + 1) / h), cy + half[1])]
    return [round(float(min(max(v, 0.0), 1.0)), 4) for v in window]


def explained_images(ev: Evidence) -> tuple[list[int], np.ndarray]:
    """The explained images as the model saw them, back in [0, 1]: ids and [N, C, H, W]."""
    ids = ev.samples.index[ev.samples["explained"]].tolist()
    spec = ev.input_spec
    x = torch.stack([ev.model_input(i) for i in ids]) if ids else torch.zeros(0, spec.channels, *spec.size)
    m = torch.as_tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return ids, (x * s + m).clamp(0, 1).numpy()


PICTURE_PX = 128  # a visualisation in the record is at most this many pixels on its long side


def _png(img: np.ndarray) -> str:
    arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    pic = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if max(pic.size) > PICTURE_PX:  # findings.json stays small for a 224-px model
        pic.thumbnail((PICTURE_PX, PICTURE_PX), Image.LANCZOS)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(sal: np.ndarray, side: int = SALIENCY_GRID) -> list[list[float]]:
    h, w = sal.shape
    ys, xs = np.linspace(0, h, side + 1).astype(int), np.linspace(0, w, side + 1).astype(int)
    g = np.add.reduceat(np.add.reduceat(sal, ys[:-1], axis=0), xs[:-1], axis=1)
    return np.round(g / max(float(g.max()), 1e-12), 3).tolist()


def confirmed_cues(class_findings: list[ClassFinding], most: int) -> list[ClassFinding]:
    """Confirmed class findings with a region, one per class and place (the strongest)."""
    out: list[ClassFinding] = []
    for f in sorted(class_findings, key=lambda f: -f.score):
        if f.region and f.details.get("confirmed") and not any(
                g.cls == f.cls and boxes_overlap(g.region, f.region) for g in out):
            out.append(f)
    return out[:most]


def cue_sets(ev: Evidence, f: ClassFinding, tester: Intervener) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The intervention's own images for a cue: the class's images with the region and with it
    removed, other classes' images with it pasted and without. (inputs, 1 = cue present, image of each)."""
    cls = ev.classes.index(f.cls)
    s = ev.samples
    members = s.index[(s["label"] == cls) & s["correct"]].tolist() or s.index[s["prediction"] == cls].tolist()
    members = members[:tester.spec.class_images]
    targets = tester.others(cls, tester.spec.transplant_images)
    mask = tester.mask(tuple(f.region))
    x, y = ev.model_inputs(members), ev.model_inputs(targets) if targets else None
    parts, present, images = [x, fill(x, mask, tester.spec.fill)], [1] * len(x) + [0] * len(x), members * 2
    if y is not None:
        pasted = torch.where(torch.from_numpy(mask).to(y.device), x[torch.arange(len(y)) % len(x)], y)
        parts += [pasted, y]
        present += [1] * len(y) + [0] * len(y)
        images += targets * 2
    return torch.cat(parts), np.array(present), np.array(images)


def likeness(images: np.ndarray, template: np.ndarray, box) -> np.ndarray:
    """Per image [N, C, H, W], the correlation of its ``box`` with the cue's template crop."""
    h, w = images.shape[2:]
    x0, y0, x1, y1 = pixel_box(box, (h, w))
    crop = images[:, :, y0:y1, x0:x1].reshape(len(images), -1)
    t = template.reshape(-1)
    a, b = crop - crop.mean(1, keepdims=True), t - t.mean()
    return (a @ b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b) + 1e-8)


def trees(ev: Evidence, classes: list[int], cues: list[ClassFinding], seed: int) -> dict[int, TreeView]:
    """Per class, a tree surrogate on the region features and the likeness to each confirmed cue."""
    ids, images = explained_images(ev)
    if not ids:
        return {}
    x, names, _ = tree.features(images)
    s = ev.samples
    for f in cues:  # the cue's look: its region in the class's correctly classified explained images
        own = [k for k, i in enumerate(ids) if s.at[i, "label"] == ev.classes.index(f.cls) and s.at[i, "correct"]]
        if own:
            h, w = images.shape[2:]
            x0, y0, x1, y1 = pixel_box(f.region, (h, w))
            template = images[own][:, :, y0:y1, x0:x1].mean(0)
            x = np.concatenate([x, likeness(images, template, f.region)[:, None]], 1)
            names.append(f"likeness to the '{f.cls}' cue at {f.details.get('region') or f.region}")
    pred = s.loc[ids, "prediction"].to_numpy()
    out = {}
    for c in classes:
        got = tree.surrogate(x, pred == c, names, seed)
        if got is not None:
            out[c] = TreeView(fidelity=got.fidelity, depth=got.depth, path_length=got.path_length,
                              reached=got.reached, rules=got.rules, decisions=got.decisions)
    return out


def probe_curves(ev: Evidence, cues: list[ClassFinding], tester: Intervener, most: int,
                 seed: int) -> tuple[list[str], list[ProbeCurve]]:
    """The layer groups, and per confirmed cue and for the class label a probe's curve over them."""
    s = ev.samples
    rng = np.random.default_rng(seed)
    ids = s.index.to_numpy()
    if len(ids) > most:
        ids = np.sort(rng.choice(ids, most, replace=False))
    x = ev.model_inputs(ids.tolist())
    groups = probes.layer_groups(ev.model, x[:1])
    if not groups:
        return [], []
    labels = s.loc[ids, "label"].to_numpy()
    out = [ProbeCurve(what="class", images=len(ids), chance=round(float(np.bincount(labels).max() / len(labels)), 4),
                      accuracy=probes.curve(ev.model, groups, x, labels, seed=seed))]
    for f in cues:
        xs, present, images = cue_sets(ev, f, tester)
        out.append(ProbeCurve(what="cue", cls=f.cls, region=f.region, rule=f.rule, images=len(xs), chance=0.5,
                              accuracy=probes.curve(ev.model, groups, xs, present, images, seed)))
    return [name for name, _ in groups], out


def global_views(ev: Evidence, findings: list[Finding], class_findings: list[ClassFinding], cfg) -> Views:
    """The global views of the run (after intervention): a record, or why there is none."""
    opts = settings(cfg)
    if not opts["enabled"]:
        return Views(state="off", reason="views.enabled is false")
    if ev.model is None or ev.input_spec is None or len(ev.classes) < 2 or not len(ev.samples):
        return Views(state="not_applicable", reason="needs the model and images of at least two classes")
    t0 = time.perf_counter()
    seed = cfg.run.seed
    try:
        pics = class_views(ev, opts["steps"], opts["window"], opts["max_classes"])
        cues = confirmed_cues(class_findings, opts["max_cues"])
        tv = trees(ev, list(range(len(ev.classes))), cues, seed)
        layers, curves = probe_curves(ev, cues, Intervener(ev, cfg.intervention, seed), opts["probe_images"], seed)
    except Exception as e:  # recorded, the audit goes on
        return Views(state="error", reason=f"{type(e).__name__}: {e}".splitlines()[0],
                     seconds=round(time.perf_counter() - t0, 2))
    views = []
    for c, name in enumerate(ev.classes):
        p = pics.get(c)
        if p is None and c not in tv:
            continue
        views.append(ClassView(cls=name, tree=tv.get(c), **({} if p is None else {
            "picture": _png(p.image), "saliency": _grid(p.saliency), "logit": round(p.logit, 3),
            "region": p.region, "evidence_share": p.share, "carry_rate": p.carry})))
    reached = [t.path_length for t in tv.values() if t.reached]
    return Views(state="ran", seconds=round(time.perf_counter() - t0, 2), layers=layers, classes=views,
                 probes=curves, average_path_length=round(float(np.mean(reached)), 3) if reached else None,
                 fidelity_goal=tree.FIDELITY,
                 features=("per region of the image (a 4 x 4 grid and the four corner squares): mean colour and "
                           "its brightest and darkest values, " + ("colourfulness, " if ev.input_spec.channels == 3 else "") +
                           "brightness, contrast and edge density" + ("; and the likeness of each confirmed cue "
                                                                      "region to the cue" if cues else "")))
