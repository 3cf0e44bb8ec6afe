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

Only corners are swept: they are where marks sit, and a small corner square cannot bring the
object itself back, as a whole border strip of a T photo could. Costs 4 x ``donors`` forward
passes per misclassified image and 5 per donor candidate, no backward pass, batched. The
finding carries its restore test (``details.own_test``), which the intervention step counts
as confirmation.
"""
from __future__ import annotations

import numpy as np
import torch

from auditor.judge.evidence import Band, Count, Evidence, Finding, NonNegative, Positive, Share, Thresholds, grade
from auditor.explain.heatmap import bands, grow_box, region_mask
from auditor.registry import RULES

SEVERITY = {"low": 0.5, "medium": 0.75}   # on the share of donors whose corner gave T back
ROWS = 256                                # rows per forward pass


def _effects(d: dict) -> list[str]:
    rates = d.get("restore_rates") or {}
    return [f"true class back from the {k}: {v:.0%} of donors" for k, v in rates.items() if v]


@RULES.register("corner_restore", title='Answer changes when a corner is replaced',
                glossary='It asks the model directly rather than a heatmap, so it also catches a mark that works by its absence or its shade (a missing watermark, a swatch of the wrong grey), which heatmaps cannot show.',
                effects=_effects, level="sample", needs=("model",), direction="higher is more suspicious")
def corner_restore(ev: Evidence, band: Band = 0.15, donors: Count = 4, candidates: Count = 64, min_rate: Share = 0.75,
                   min_gap: NonNegative = 0.5, min_mark: Positive = 3.0, max_images: Count = 5000,
                   severity: Thresholds = None) -> list:
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
    findings = []
    for t, todo in wrong.groupby("label").groups.items():  # one true class's donors in memory at a time
        got = _donors(ev, list(members.get(t, [])), int(t), masks, donors)
        if got is None:
            continue
        d, donor_ids = got
        todo = list(todo)
        per_call = max(1, ROWS // (d.shape[0] * d.shape[1]))
        for start in range(0, len(todo), per_call):
            chunk = todo[start:start + per_call]
            x = ev.model_inputs(chunk)                                              # [n, C, h, w]
            variants = torch.where(masks[None], d[None], x[:, None, None])         # [n, 4, k, C, h, w]
            with torch.no_grad():
                pred = torch.cat([ev.model(v).argmax(1) for v in variants.flatten(0, 2).split(ROWS)])
            back = (pred == t).view(len(chunk), len(corners), -1).float().mean(2).cpu().numpy()
            for i, xi, b in zip(chunk, x, back):
                order = np.argsort(-b, kind="stable")
                best, second = float(b[order[0]]), float(b[order[1]])
                if best < min_rate:
                    continue
                alone = best - second >= min_gap
                where = int(order[0]) if alone else _own_mark(xi, masks, ring, b >= min_rate, min_mark)
                findings.append(_finding(ev, i, corners, where, alone, b >= min_rate, b, donor_ids, severity))
    return findings


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
             back: np.ndarray, donor_ids: list[list[int]], severity: dict) -> Finding:
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
    return Finding(
        sample=i, rule="corner_restore", severity=grade(rate, severity) or "low", score=round(rate, 4),
        bbox=None if where is None else ev.to_file_bbox(i, boxes[where]), message=head + text,
        details={"region": None if where is None else names[where],
                 "restore_rates": {n: round(float(b), 4) for n, b in zip(names, back)},
                 # The restore test this rule ran, in the intervention's own keys: it confirms the finding.
                 "own_test": {"true_class": true, "donors": k, "restored": round(rate * k),
                              "restore_rate": round(rate, 4),
                              "donor_ids": donor_ids[int(np.argmax(back)) if where is None else where]},
                 "located_by": (
                     None if where is None else "the model" if alone else "the image's own mark")})
