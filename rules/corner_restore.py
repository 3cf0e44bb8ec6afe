"""corner_restore: a misclassified image gets its true class back when a corner is restored.

Some cues work by what is missing or wrong in a corner, not by evidence anyone can see there:
a Decoy-style shade that is too dark, or a photo of the tagged class without its tag. Heatmaps
are blind to both: a dark patch on a dark background passes no gradient, and there is nothing
to attribute in an empty corner (measured on the Decoy digits case: the swatch held no more of
the saliency or Grad-CAM evidence than its area, for the predicted class, the true class or
their margin, in every error that corner_border missed). So this rule asks the model directly,
for each misclassified image with prediction P and true class T: paste each corner square from
correctly classified images of T and re-predict. Each corner has its own donors: of T's most
confident images, those whose confidence falls most when that corner is blanked, i.e. the
images in which the model reads something there.

- One corner gives T back for most donors and no other corner does: what T's images show in
  that corner decided the error. The finding boxes that corner.
- Several corners give T back alike: the model wants T's corner mark and does not mind where
  (a Decoy model reads its swatch in any corner). If one corner of the image holds a mark of
  its own (a patch that stands out from its surroundings far more than the other corners do),
  that is the wrong mark and is boxed; otherwise the finding names no corner.

Either way the corner must beat a placebo: the same donors pasted at random places of the
corner's size away from it (``control_margin``). A borderline error of a model with no shortcut
comes back to T from T's content anywhere, so it is no finding; the same corner from images of
the other classes is recorded too (as good as T's own: what this image shows there decided).
A boxed finding boxes the mark the image shows in the corner, when one stands out there.

Only corners are swept: they are where marks sit, and a small corner square cannot bring the
object itself back, as a whole border strip of a T photo could. Costs 4 x ``donors`` forward
passes per misclassified image (and 3 x as many for each placebo), and 5 per donor candidate,
no backward pass. The
finding carries its restore test (``details.own_test``), which the intervention step counts
as confirmation.
"""
from __future__ import annotations

import numpy as np
import torch

from auditor.judge.evidence import Band, Count, Evidence, Finding, NonNegative, Positive, Share, Thresholds, grade
from auditor.explain.heatmap import bands, grow_box, object_box, region_mask
from auditor.judge.intervene import against_control, control_boxes
from auditor.registry import RULES

SEVERITY = {"low": 0.5, "medium": 0.75}   # on the share of donors whose corner gave T back
ROWS = 256                                # rows per forward pass
THIRD = 3                                 # other classes' donors per true-class donor, for the placebo
ELSEWHERE = 3                             # random places each donor's corner is pasted at, for the placebo


def _effects(d: dict) -> list[str]:
    rates = d.get("restore_rates") or {}
    return [f"true class back from the {k}: {v:.0%} of donors" for k, v in rates.items() if v]


@RULES.register("corner_restore", title='Answer changes when a corner is replaced',
                glossary='It asks the model directly rather than a heatmap, so it also catches a mark that works by its absence or its shade (a missing watermark, a swatch of the wrong grey), which heatmaps cannot show.',
                effects=_effects, each_image=True, level="sample", needs=("model",), direction="higher is more suspicious")
def corner_restore(ev: Evidence, band: Band = 0.15, donors: Count = 4, candidates: Count = 64, min_rate: Share = 0.75,
                   min_gap: NonNegative = 0.5, min_mark: Positive = 3.0, control_margin: NonNegative = 0.25,
                   max_images: Count = 5000, severity: Thresholds = None) -> list:
    """Misclassified images whose true class comes back when one corner is taken from images of that class."""
    if ev.model is None or ev.input_spec is None:
        return []
    severity = severity or SEVERITY
    s = ev.samples
    corners = {name: box for name, box in bands(band).items() if name.endswith("corner")}
    h, w = ev.input_spec.size
    masks = torch.from_numpy(np.stack([region_mask((h, w), box) for box in corners.values()]))
    masks = masks.to(ev.device)[:, None, None]                                    # [4, 1, 1, h, w]
    ring = torch.from_numpy(np.stack([region_mask((h, w), grow_box(box, band)) for box in corners.values()]))
    ring = ring.to(ev.device) & ~masks[:, 0, 0]                                    # [4, h, w]
    # The most confident errors first, so a capped sweep keeps the clearest cases.
    wrong = s[~s["correct"]].sort_values("confidence", ascending=False).head(max_images)
    best_correct = s[s["correct"]].sort_values("confidence", ascending=False).groupby("label").head(candidates)
    members = best_correct.groupby("label").groups
    cache: dict[int, tuple | None] = {}

    def donors_of(c: int):
        if c not in cache:
            cache[c] = _donors(ev, list(members.get(c, [])), c, masks, donors)
        return cache[c]

    findings = []
    for t, todo in wrong.groupby("label").groups.items():
        donated = donors_of(int(t))
        if donated is None:
            continue
        d, donor_ids = donated
        # The placebo: the same corners pasted from correctly classified images of the other
        # classes (neither the prediction nor the true class). A borderline error of a model
        # with no shortcut gives T back as readily from them; a corner cue of T does not.
        controls: dict[int, torch.Tensor | None] = {}   # per prediction: they depend on it and T alone
        for pred in sorted({int(s.at[i, "prediction"]) for i in todo}):
            others = [g for c in sorted(members) if c not in (pred, t) and (g := donors_of(int(c))) is not None]
            controls[pred] = _interleave([g[0] for g in others], THIRD * d.shape[1]) if others else None
        # Several images per forward pass: about ROWS variants each (a pass per image is slow on a GPU).
        todo = list(todo)
        per_call = max(1, ROWS // (masks.shape[0] * d.shape[1] * (1 + THIRD)))
        for first in range(0, len(todo), per_call):
            chunk = todo[first:first + per_call]
            x = ev.model_inputs(chunk)                                               # [n, C, h, w]
            ctrl = [controls[int(s.at[i, "prediction"])] for i in chunk]
            preds = _predict(ev, [torch.where(masks, d, xi[None, None]).flatten(0, 1) for xi in x]
                             + [torch.where(masks, third, xi[None, None]).flatten(0, 1)
                                for xi, third in zip(x, ctrl) if third is not None])
            backs = [(p == int(t)).view(d.shape[0], -1).float().cpu().numpy() for p in preds]  # each [4, k]
            thirds = iter(backs[len(chunk):])
            pending = []
            for i, xi, b, has_ctrl in zip(chunk, x, backs, [third is not None for third in ctrl]):
                third_back = next(thirds) if has_ctrl else None   # [4, k]: T back from the third classes' corners
                rate = b.mean(1)
                order = np.argsort(-rate, kind="stable")
                best, second = float(rate[order[0]]), float(rate[order[1]])
                if best < min_rate:
                    continue
                alone = best - second >= min_gap
                where = int(order[0]) if alone else _own_mark(xi, masks, ring, rate >= min_rate, min_mark)
                at = int(order[0]) if where is None else where
                # The placebo that decides: the same donors pasted at random places of the corner's
                # size away from it. A borderline error of a model with no shortcut comes back to T
                # from T's content anywhere; a corner cue only from that corner. The same corner from
                # other classes' images tells what kind of cue it is: as good as T's, the error came
                # from what this image shows there (a wrong mark); much worse, from what T's show.
                rng = np.random.default_rng(int(i))
                control = {} if third_back is None else against_control(b[at], third_back[at], "third_class", rng)
                boxes = control_boxes(list(corners.values())[at], ELSEWHERE, rng)
                pending.append((i, b, rate, where, alone, at, rng, control, boxes,
                                _elsewhere(xi, d[at], boxes, (h, w))))
            moved = iter(_predict(ev, [v for *_, v in pending if v is not None]))
            for i, b, rate, where, alone, at, rng, control, boxes, v in pending:
                if v is not None:   # [k] per donor, the share of the random boxes that gave T back
                    elsewhere = (next(moved) == int(t)).view(len(boxes), -1).float().mean(0).cpu().numpy()
                    control |= against_control(b[at], elsewhere, "restore", rng)
                    if control["restore_vs_control"][0] < control_margin:
                        continue
                findings.append(_finding(ev, i, corners, where, alone, rate >= min_rate, rate, donor_ids,
                                         severity, control))
    return findings


@torch.no_grad()
def _predict(ev: Evidence, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The model's predicted class for each of ``batches`` ([m_j, C, h, w]), ROWS rows per forward pass."""
    if not batches:
        return []
    rows = torch.cat(batches)
    pred = torch.cat([ev.model(v).argmax(1) for v in rows.split(ROWS)])
    return list(pred.split([len(b) for b in batches]))


def _interleave(sets: list[torch.Tensor], k: int) -> torch.Tensor:
    """[corners, k, C, h, w] donors taken in turn from each of ``sets`` ([corners, k_j, C, h, w])."""
    slots = [(j, n) for n in range(max(s.shape[1] for s in sets)) for j in range(len(sets)) if n < sets[j].shape[1]]
    return torch.stack([sets[j][:, n] for j, n in slots[:k]], dim=1)


def _elsewhere(x: torch.Tensor, d: torch.Tensor, boxes: list, size: tuple[int, int]) -> torch.Tensor | None:
    """[len(boxes) * k, C, h, w]: x ([C, h, w]) with each of ``boxes`` (random boxes of the corner's
    size, away from it) pasted from each donor ([k, C, h, w]); None without room for one."""
    if not boxes:
        return None
    m = torch.from_numpy(np.stack([region_mask(size, b) for b in boxes])).to(d.device)[:, None, None]
    return torch.where(m, d[None], x[None, None]).flatten(0, 1)                      # [n * k, C, h, w]


def _donors(ev: Evidence, members: list[int], t: int, masks: torch.Tensor,
            k: int) -> tuple[torch.Tensor, list[list[int]]] | None:
    """[corners, k, C, h, w]: correctly classified images of class t to take each corner from,
    and their sample ids per corner.

    What a class's images show in a corner differs from image to image (a Decoy swatch sits in a
    random corner), so each corner gets its own donors: of the class's most confident correct
    images (``members``), those whose confidence falls most when that corner is blanked (filled
    with the image's mean), i.e. the images for which the model reads something there."""
    if len(members) < 2:  # one donor's word is no test
        return None
    x = ev.model_inputs(members)                                                 # [n, C, h, w]
    blank = torch.where(masks, x.mean(dim=(2, 3), keepdim=True)[None], x[None])  # [4, n, C, h, w]
    with torch.no_grad():
        p = torch.cat([ev.model(v).softmax(1)[:, t] for v in torch.cat([x, blank.flatten(0, 1)]).split(ROWS)])
    reliance = p[: len(x)][None] - p[len(x):].view(len(masks), len(x))            # [4, n]
    top = reliance.argsort(dim=1, descending=True, stable=True)[:, :min(k, len(x))]
    return x[top], [[int(members[j]) for j in row] for row in top.tolist()]


def _own_mark(x: torch.Tensor, masks: torch.Tensor, ring: torch.Tensor, candidates: np.ndarray,
              min_mark: float) -> int | None:
    """The corner (among ``candidates``) holding a patch unlike its surroundings, if exactly one stands out.

    Stand-out: the corner's mean differs from the ring around it by ``min_mark`` times the
    ring's spread (plus a small floor, so flat black borders do not divide by zero), and by
    ``min_mark`` times as much as any other corner."""
    score = []                                                                     # x: [C, h, w]
    for m, r in zip(masks[:, 0, 0], ring):
        inside, around = x[:, m].mean(1), x[:, r]
        score.append(float(((inside - around.mean(1)).abs() / (around.std(1) + 0.05)).max()))
    score = np.array(score)
    order = np.argsort(-score, kind="stable")
    first, rest = int(order[0]), score[order[1]]
    if candidates[first] and score[first] >= min_mark and score[first] >= min_mark * rest:
        return first
    return None


def _finding(ev: Evidence, i: int, corners: dict, where: int | None, alone: bool, restoring: np.ndarray,
             back: np.ndarray, donor_ids: list[list[int]], severity: dict, control: dict) -> Finding:
    s = ev.samples
    pred, true = ev.classes[s.at[i, "prediction"]], ev.classes[s.at[i, "label"]]
    names, boxes = list(corners), list(corners.values())
    restoring = [n for n, r in zip(names, restoring) if r]
    rate = float(back.max()) if where is None else float(back[where])
    k = len(donor_ids[0])
    head = f"The model called this '{true}' image '{pred}'. "
    if alone:
        text = (f"Putting back the {names[where]} as it looks in {k} correctly recognised '{true}' images gave "
                f"'{true}' back {round(rate * k)} times; no other corner did. The model expects something in "
                f"that corner, such as a mark or a shade, and decides by it rather than by the object.")
    else:
        text = (f"Putting back any of the {', '.join(restoring)} as they look in correctly recognised '{true}' images "
                f"gave '{true}' back: the model expects a mark in a corner of '{true}' images and does not "
                f"mind which corner. "
                + (f"This image has a mark of its own in the {names[where]}, the wrong one for '{true}'."
                   if where is not None else "This image lacks that mark."))
    if "control_restore_rate" in control:
        text += (f" Pasted at random places of the same size from the same images, it came back "
                 f"{control['control_restore_rate']:.0%} of the time")
        if "control_third_class_rate" in control:
            third = control["control_third_class_rate"]
            text += (f"; the same corner from other classes' images gave '{true}' back {third:.0%} of the time"
                     + (", so what this image shows there, not what '{true}' images show, decided the error"
                        .format(true=true) if third >= rate - 0.25 else ""))
        text += "."
    # The box: the mark the image shows in that corner (found from its pixels), else the corner.
    cand = [] if where is None else _mark_boxes(ev, i, boxes[where])
    return Finding(
        sample=i, rule="corner_restore", severity=grade(rate, severity) or "low", score=round(rate, 4),
        bbox=None if where is None else ev.to_file_bbox(i, cand[0]), message=head + text,
        details={"region": None if where is None else names[where],
                 **({"region_box": list(boxes[where]), "candidate_boxes": [list(b) for b in cand]} if cand else {}),
                 "restore_rates": {n: round(float(b), 4) for n, b in zip(names, back)},
                 # The restore test this rule ran, in the intervention's own keys, with its placebo
                 # (other classes' corners): it confirms the finding when it beats the placebo.
                 "own_test": {"true_class": true, "donors": k, "restored": round(rate * k),
                              "restore_rate": round(rate, 4), **control,
                              "donor_ids": donor_ids[int(np.argmax(back)) if where is None else where]},
                 "located_by": (
                     None if where is None else "the model" if alone else "the image's own mark")})


def _mark_boxes(ev: Evidence, i: int, corner) -> list:
    """Candidate boxes in a corner, best first: the mark image i's pixels show there (the thing
    that stands out from its surroundings, grown to its whole), then the corner square."""
    try:
        img = ev.seen_pixels(i)
    except (OSError, ValueError):
        return [tuple(corner)]
    found = object_box(img, corner)
    return ([tuple(round(float(v), 4) for v in found)] if found is not None else []) + [tuple(corner)]
