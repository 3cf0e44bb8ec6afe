"""Confirm suspicions by intervention, so a finding is evidence and not a picture.

Every finding that names a region is put to a test on the model:

- a sample finding (the region decided this image's prediction P): (a) remove the region
  (biharmonic inpainting, blur or mean fill) and re-predict; (b) transplant it onto correctly
  classified images of other classes, at the same place, and re-predict; (c) for a
  misclassified image, restore the region from correctly classified images of the true class
  T (those whose own T evidence lies most in it) and re-predict. Confirmed when removal changes
  the decision, the region carries P to other images, or restoring it gives T back: the
  region, and what the model expects to see in it, decided the error. (c) is what confirms a
  cue that works by its absence or by taking evidence away from T (a missing tag, a decoy's
  wrong shade), which removing it cannot show.
- a class finding: transplant the region from the class's correctly classified images onto
  other classes' images. Confirmed when it carries the class to them (the tag-on-another-photo
  test) beyond random regions of its size and beyond the class's own content of its size moved
  to that place (else it is the class's look: a texture, the object). Removal from the class's
  own images is reported, but does not confirm: the model needs the object's own parts too, and
  that is no spurious cue.
- a class finding without a region that lists its sample findings (details.samples):
  confirmed when most of their regions carried the class to other images.
- a confirmed class cue's instances: the images the model wrongly calls the cue's class are
  tested as sample findings at the cue's region (a cue at no fixed place: at their own strongest
  evidence), and those confirmed become image findings of the rule that found the cue
  (``instances``).

A sample finding with candidate boxes (``details.candidate_boxes``: the evidence region and
the object the image shows there; ``details.region_box``: the rule's own region) whose own box
does not confirm falls back to the smallest other candidate that does, the rule's region last;
the refined box is also kept in ``details.intervention.bbox``.

A confirmed finding's severity rises to at least 'high' ('critical' for a class finding whose
region turns at least ``critical_rate`` of other images) when its region carries the class to
other images beyond random regions of its size and beyond the predicted class's own content of
its size at that place (a class finding whose placebo of content could not run: medium at most);
confirmed otherwise (removal or restoration alone), 'medium'; a class finding with room for
neither placebo beside its region, 'low'.
A suspicion that fails its test, or that could not be tested, is capped at 'low'. See
docs/severity.md.
"""
from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from auditor.inputs.config import InterventionSpec
from auditor.judge.evidence import ClassFinding, Evidence, Finding, severity_rank
from auditor.explain.heatmap import box_area, boxes_overlap, grow_box, place_words, region_mask
from auditor.record import beats, pastes


def fill(x: torch.Tensor, mask: np.ndarray, how: str) -> torch.Tensor:
    """Images [B, C, H, W] with the masked pixels [H, W] replaced by plausible surroundings."""
    m = torch.from_numpy(mask).to(x.device)
    if how == "mean":
        keep = (~m).float()
        mean = (x * keep).sum(dim=(2, 3), keepdim=True) / keep.sum().clamp_min(1)
        return torch.where(m, mean.expand_as(x), x)
    if how == "blur":
        side = max(3, int(2 * round(max(mask.sum(0).max(), mask.sum(1).max()) / 2) + 1))
        blurred = F.avg_pool2d(F.pad(x, [side // 2] * 4, mode="replicate"), side, stride=1)
        return torch.where(m, blurred, x)
    from skimage.restoration import inpaint_biharmonic
    arr = x.detach().cpu().numpy().copy()  # numpy() shares memory with a CPU tensor
    for b in range(len(arr)):
        arr[b] = inpaint_biharmonic(arr[b], mask, channel_axis=0)
    return torch.from_numpy(arr).to(x.device, x.dtype)


class Intervener:
    """Holds the model and a small pool of correctly classified images to paste onto."""

    def __init__(self, ev: Evidence, spec: InterventionSpec, seed: int):
        self.ev, self.spec = ev, spec
        self.rng = np.random.default_rng(seed)
        self._donors: dict[tuple, list[int]] = {}
        s = ev.samples
        self.correct = s.index[s["correct"]].to_numpy()
        self.correct_labels = s.loc[self.correct, "label"].to_numpy()

    def reseed(self, seed: int, *finding) -> None:
        """A finding's own random stream (targets, placebo regions, bootstraps): its outcome does
        not depend on which other findings were tested before it, or how many boxes they tried."""
        self.rng = np.random.default_rng([seed, *(zlib.crc32(str(p).encode()) for p in finding)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ev.model(chunk).float().softmax(1) for chunk in x.split(64)]).cpu()

    def others(self, cls: int, n: int) -> list[int]:
        """Up to n correctly classified images whose class is not ``cls``, spread over classes."""
        pool = self.correct[self.correct_labels != cls]
        if len(pool) > n:
            pool = np.sort(self.rng.choice(pool, n, replace=False))
        return pool.tolist()

    def mask(self, box) -> np.ndarray:
        return region_mask(tuple(self.ev.input_spec.size), grow_box(box, self.spec.pad))

    def test(self, sources: list[int], cls: int, box, versus_class: bool = False) -> dict:
        """Remove ``box`` from the source images and paste it onto other classes' images; and the
        same with ``spec.controls`` placebo regions (random boxes of the same size elsewhere), and
        the paste set against ``cls``'s own content of its size moved to the box's place
        (``versus_content``). ``versus_class``: the sources are not images of ``cls`` (a sample
        finding's misclassified image), so they are no donors of that content."""
        controls = [self.mask(c) for c in control_boxes(box, self.spec.controls, self.rng)]
        mask = self.mask(box)
        x = self.ev.model_inputs(sources)
        before = self.predict(x)
        keep = before.argmax(1) == cls

        def removed(m: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            after = self.predict(fill(x, m, self.spec.fill))
            return after, (after.argmax(1) != cls) & keep

        after, changed = removed(mask)
        placebo = torch.stack([removed(m)[1] for m in controls]).float().mean(0) if controls else None
        result = {"removed_from": len(sources),
                  "decision_changed": int(changed.sum()),
                  "confidence_drop": round(float((before[:, cls] - after[:, cls]).mean()), 4),
                  "new_predictions": [self.ev.classes[int(c)] for c in after.argmax(1)[changed].tolist()][:5]}
        result["removal_rate"] = round(result["decision_changed"] / max(len(sources), 1), 4)
        if placebo is not None:
            result |= against_control(changed.float().numpy(), placebo.numpy(), "removal", self.rng)
        targets = self.others(cls, self.spec.transplant_images)
        if targets:
            y = self.ev.model_inputs(targets)
            hit = self.pasted(x, y, mask, cls)  # each target gets the sources' regions in turn
            result |= {"pasted_onto": len(targets), "turned": int(hit.sum())}
            if controls:
                placebo = torch.stack([self.pasted(x, y, m, cls) for m in controls]).float().mean(0)
                result |= against_control(hit.float().numpy(), placebo.numpy(), "transfer", self.rng)
            # A class finding's random regions are the class's content, but at other places: a model
            # that reads the place (a max-pooled net, a corner) needs the content moved to it too.
            result |= self.versus_content(cls, box, y, hit, exclude=sources if versus_class else [])
        else:
            result |= {"pasted_onto": 0, "turned": 0}
        result["transfer_rate"] = round(result["turned"] / max(result["pasted_onto"], 1), 4)
        return result

    def pasted(self, x: torch.Tensor, y: torch.Tensor, mask: np.ndarray, cls: int) -> torch.Tensor:
        """Per image of ``y``, whether pasting ``mask``'s pixels of the sources ``x`` (cycled through,
        one per target) makes the model call it ``cls``."""
        m = torch.from_numpy(mask).to(y.device)
        src = x[torch.arange(len(y)) % len(x)].to(y.device)
        return self.predict(torch.where(m, src, y)).argmax(1) == cls

    def versus_content(self, cls: int, box, y: torch.Tensor, hit: torch.Tensor, exclude: list[int]) -> dict:
        """The paste's second placebo: regions of the box's size from ``cls``'s own images (its most
        confident correct ones; those the model calls ``cls`` when it gets none right), taken at
        random places away from the box and pasted at the box's place onto the same images ``y``.

        A region from an image of another class that turns images into ``cls`` may be a cue, or
        just look like ``cls`` to the model: a max-pooled network calls anything ``cls`` that
        holds a patch of ``cls``'s texture (measured on the benchmark's clean twins: a large logo
        turned every image, and so did ``cls``'s own texture of its size). A learned cue carries
        ``cls`` beyond what the class's own content of its size does."""
        s = self.ev.samples
        donors = [i for i in self.donors_of(cls) if i not in exclude]
        if not donors:  # none right: the images the model calls cls
            pool = s[(s["prediction"] == cls) & ~s.index.isin(exclude)]
            donors = pool.sort_values("confidence", ascending=False).index[: self.spec.restore_images].tolist()
        places = control_boxes(box, self.spec.controls, self.rng)
        if not donors or not places:
            return {}
        d = self.ev.model_inputs(donors)
        h, w = d.shape[-2:]
        m = torch.from_numpy(self.mask(box)).to(y.device)
        turned = []
        for k, b in enumerate(places):  # each place's patch moved onto the box (donors in turn)
            shift = (round((box[1] - b[1]) * h), round((box[0] - b[0]) * w))
            src = torch.roll(d, shift, dims=(2, 3))[(torch.arange(len(y)) + k) % len(d)]
            turned.append(self.predict(torch.where(m, src, y)).argmax(1) == cls)
        placebo = torch.stack(turned).float().mean(0)
        return against_control(hit.float().numpy(), placebo.numpy(), "content", self.rng)

    def restore(self, i: int, true: int, box, method: str | None) -> dict:
        """Paste ``box`` from correctly classified images of ``true`` into image i: does ``true`` come back?

        Donors are the true class's images whose own heatmap (``method``) puts the most evidence
        in the box: what the model expects to see there for that class."""
        return self.restore_from(i, true, box, self.donors_for(true, box, method))

    def donors_for(self, true: int, box, method: str | None) -> list[int]:
        """``true``'s correctly classified images whose own heatmap (``method``) puts the most
        evidence in ``box`` (``spec.restore_images`` of them): what the model expects to see there."""
        key = (true, method, tuple(np.round(box, 3)))
        if key not in self._donors:
            pool = self.correct[self.correct_labels == true].tolist()
            maps = self.ev.heatmaps.get(method, {}) if method else {}
            have = [j for j in pool if j in maps]
            if have:  # the donors whose own evidence for the true class lies most in the box
                share = np.concatenate([_box_share(np.stack([maps[j] for j in have[s:s + 1024]]), box)
                                        for s in range(0, len(have), 1024)])  # bounded memory
                pool = [have[k] for k in np.lexsort((-np.array(have), -share))]  # ties: higher id first
            self._donors[key] = pool[: self.spec.restore_images]
        return self._donors[key]

    def restore_from(self, i: int, true: int, box, donors: list[int]) -> dict:
        """Paste ``box`` from ``donors`` into image i, and random boxes of its size (the placebo)."""
        result = {"true_class": self.ev.classes[true], "donors": len(donors), "restored": 0, "restore_rate": 0.0}
        if not donors:
            return result
        x = self.ev.model_inputs([i])
        d = self.ev.model_inputs(donors)

        def back(m: np.ndarray) -> torch.Tensor:
            m = torch.from_numpy(m).to(d.device)
            return self.predict(torch.where(m, d, x.expand_as(d))).argmax(1) == true

        hit = back(self.mask(box))
        result["restored"] = int(hit.sum())
        result["restore_rate"] = round(result["restored"] / len(donors), 4)
        controls = control_boxes(box, self.spec.controls, self.rng)
        if controls:
            placebo = torch.stack([back(self.mask(c)) for c in controls]).float().mean(0)
            result |= against_control(hit.float().numpy(), placebo.numpy(), "restore", self.rng)
        return result

    def donors_of(self, true: int) -> list[int]:
        """The class's most confident correctly classified images (restore donors; the content placebo's)."""
        s = self.ev.samples
        pool = s.loc[self.correct[self.correct_labels == true]]
        return pool.sort_values("confidence", ascending=False).index[: self.spec.restore_images].tolist()


def _box_share(maps: np.ndarray, box) -> np.ndarray:
    """Share of each map's positive mass inside ``box`` (fractions): [N, h, w] -> [N]."""
    heat = np.clip(np.asarray(maps, np.float32), 0, None)
    return heat[:, region_mask(heat.shape[1:], box)].sum(1) / np.maximum(heat.sum((1, 2)), 1e-12)


def control_boxes(box, n: int, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Up to ``n`` placebo regions: boxes of ``box``'s size at random places that do not overlap
    it (fewer, or none, when the box leaves no room)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = []
    for _ in range(50 * n):
        if len(out) == n or (w >= 1 and h >= 1):
            break
        cx, cy = rng.uniform(0, max(0.0, 1 - w)), rng.uniform(0, max(0.0, 1 - h))  # a full-width strip moves up or down
        if cx >= x1 or cx + w <= x0 or cy >= y1 or cy + h <= y0:
            out.append((float(cx), float(cy), float(cx + w), float(cy + h)))
    return out


RESAMPLES = 1000


def against_control(effect: np.ndarray, placebo: np.ndarray, name: str, rng: np.random.Generator) -> dict:
    """The effect per image (0/1) against its placebo (the share of control regions with the same
    effect): the placebo's rate, and the difference with its 95% bootstrap interval. Paired when
    the two are the same images; otherwise (a placebo on other images, as many as can be had)
    each side is resampled on its own."""
    effect, placebo = np.asarray(effect, float), np.asarray(placebo, float)
    if len(effect) == len(placebo):
        d = effect - placebo
        if len(d) > 1:
            means = d[rng.integers(0, len(d), (RESAMPLES, len(d)))].mean(1)
            lo, hi = np.percentile(means, [2.5, 97.5])
        else:
            lo = hi = float(d.mean())
        diff = float(d.mean())
    else:
        diff = float(effect.mean() - placebo.mean())
        means = (effect[rng.integers(0, len(effect), (RESAMPLES, len(effect)))].mean(1)
                 - placebo[rng.integers(0, len(placebo), (RESAMPLES, len(placebo)))].mean(1))
        lo, hi = np.percentile(means, [2.5, 97.5])
    return {f"control_{name}_rate": round(float(placebo.mean()), 4),
            f"{name}_vs_control": [round(diff, 4), round(float(lo), 4), round(float(hi), 4)]}


def beats_control(effect: dict, name: str, rate: float, spec: InterventionSpec) -> bool:
    """``rate`` reaches its threshold and beats its placebo by ``spec.control_margin``, with a
    95% interval of the difference above zero. Without a placebo (no room for one), the rate alone."""
    return beats(effect, name, rate, spec.control_margin)


def _sentence(effect: dict, cls_name: str, confirmed: bool) -> str:
    parts = []
    if "restore_rate" in effect and not effect.get("own_test"):  # the rule's own sentence says it
        parts.append(f"putting back what {effect['donors']} correctly classified '{effect['true_class']}' images "
                     f"show there gave '{effect['true_class']}' back in {effect['restored']} of them")
    if "control_restore_rate" in effect and effect.get("donors"):
        parts.append(f"random regions of the same size from those images gave it back "
                     f"{effect['control_restore_rate']:.0%} of the time")
    if effect["removed_from"] == 1:
        if effect["decision_changed"]:
            parts.append(f"hiding this region changed the prediction to '{effect['new_predictions'][0]}'"
                         + (f" (hiding random regions of the same size: {effect['control_removal_rate']:.0%} "
                            f"of the time)" if "control_removal_rate" in effect else ""))
        else:
            drop = 100 * effect["confidence_drop"]
            moved = "lowered" if drop >= 0 else "raised"
            parts.append(f"hiding this region {moved} the confidence in '{cls_name}' by "
                         f"{abs(drop):.0f} points but did not change the prediction")
    else:
        parts.append(f"hiding this region in {effect['removed_from']} such images changed "
                     f"{effect['decision_changed']} of the decisions"
                     + (f" (random regions of the same size: {effect['control_removal_rate']:.0%})"
                        if "control_removal_rate" in effect else ""))
    if effect["pasted_onto"]:
        parts.append(f"pasting it onto {effect['pasted_onto']} images of other classes turned "
                     f"{effect['turned']} of them into '{cls_name}'"
                     + (f"; pasting a random region of the same size turned "
                        f"{round(effect['control_transfer_rate'] * effect['pasted_onto'])}"
                        if "control_transfer_rate" in effect else "")
                     + (f"; the same place pasted from '{cls_name}' images' own content of that size turned "
                        f"{round(effect['control_content_rate'] * effect['pasted_onto'])}"
                        if "control_content_rate" in effect else ""))
    verdict = "Confirmed by intervention" if confirmed else "Not confirmed by intervention"
    return f" {verdict}: " + "; ".join(parts) + "."


def confirm(ev: Evidence, findings: list[Finding], class_findings: list[ClassFinding],
            spec: InterventionSpec, seed: int) -> list[Finding]:
    """Test every finding that names a region; update severity, details and message in place. The
    confirmed class cues' instances (``instances``) are added to ``findings``, and returned."""
    if not spec.enabled or ev.model is None:
        return []
    tester = Intervener(ev, spec, seed)
    s = ev.samples
    for f in findings:
        tester.reseed(seed, 0, int(f.sample), f.rule)
        _confirm_sample(ev, tester, f, spec)
    by_sample = {}
    for f in findings:
        by_sample.setdefault(f.sample, []).append(f)
    for f in class_findings:
        tester.reseed(seed, 1, ev.classes.index(f.cls) if f.cls in ev.classes else -1, f.rule)
        if not f.region:
            members = [g for i in f.details.get("samples", []) for g in by_sample.get(i, []) if g.rule == f.rule]
            if members:
                _aggregate(f, members, spec)
            continue
        cls = ev.classes.index(f.cls)
        members = tester.correct[tester.correct_labels == cls].tolist()  # correct: label == prediction
        source = f"images the model correctly classified '{f.cls}'"
        if not members:  # a model that gets none right still reads its cue in the images it calls cls
            members = s.index[s["prediction"] == cls].tolist()
            source = f"images the model called (none of them rightly) '{f.cls}'"
        if len(members) > spec.class_images:
            members = sorted(tester.rng.choice(members, spec.class_images, replace=False).tolist())
        if not members:
            _untested(f, f"the model calls no image '{f.cls}', so there is nothing to take the region from")
            continue
        try:
            effect = tester.test(members, cls, tuple(f.region)) | {"sources": source}
        except Exception as e:
            _untested(f, f"the test failed: {type(e).__name__}: {e}".splitlines()[0])
            continue
        # The claim is "this region is a cue for the class": refuted when the class's own content
        # of its size, moved to that place, carries the class as well (it is the class's look).
        moved = effect["transfer_rate"] >= spec.transplant_rate
        look = beats_control(effect, "transfer", moved, spec) and not pastes(effect, moved, spec.control_margin)
        _apply(f, effect, f.cls, spec, pastes(effect, moved, spec.control_margin))
        if look:
            f.message += (f" The '{f.cls}' images' own content of its size, moved to that place, carries the class "
                          f"as well: it is the class's look, not a cue.")
    added = instances(ev, tester, findings, class_findings, spec, seed)
    findings.extend(added)
    lacking = absences(ev, tester, findings, class_findings, spec, seed)
    findings[:] = [f for f in findings if not f.details.get("superseded_by")] + lacking
    _isolated(findings, class_findings, ev)  # first: an isolated error counts for no other finding's high
    _lone_cues(findings, ev)
    return [f for f in added if not f.details.get("superseded_by")] + lacking


def _confirm_sample(ev: Evidence, tester: Intervener, f: Finding, spec: InterventionSpec) -> None:
    """Test one sample finding along its candidate boxes; update it in place."""
    s = ev.samples
    own = f.details.get("own_test")  # a restore test the rule ran itself, in Intervener.restore's keys
    if not f.bbox:
        if own:
            _own_restore(f, own, spec)
        return
    box = ev.to_input_frac(f.sample, f.bbox)
    cls = int(s.at[f.sample, "prediction"])
    # The finding's box first, then the rule's other tight candidates (the evidence region,
    # the object the image shows there) smallest first, then the rule's own region: the first
    # whose test confirms becomes the box; when none does, the finding's box and its test stay.
    # (Smallest first from the start would shrink a box to any sliver of a mark whose
    # removal alone flips a sensitive model.)
    region = [tuple(f.details["region_box"])] if f.details.get("region_box") else []
    tight = [tuple(b) for b in f.details.get("candidate_boxes") or [] if not _same(b, *region)]
    order = []
    for b in [box, *sorted(tight, key=box_area), *region]:
        if not any(_same(b, o) for o in order):
            order.append(b)
    try:  # a test that fails (an unreadable image, out of memory) leaves an untested suspicion
        tried = {}
        for b in order:
            tried[b] = _test_sample(tester, f, b, cls, own, spec)
            if tried[b][1]:
                break
        chosen = next((b for b, (_, ok) in tried.items() if ok), box)  # (the finding's own box is tried first)
        effect, confirmed = tried[chosen]
    except Exception as e:
        _untested(f, f"the test failed: {type(e).__name__}: {e}".splitlines()[0])
        return
    if len(order) > 1:
        effect["boxes_tried"] = len(tried)
    if not _same(chosen, box):
        f.bbox = ev.to_file_bbox(f.sample, chosen)
        effect["bbox"] = f.bbox  # the refined box, kept with the outcome (a cached re-run restores it)
    _apply(f, effect, ev.classes[cls], spec, confirmed)


# Errors per confirmed class cue tested as its instances, the most confident first: each costs a
# sample finding's test (a few hundred forward passes).
INSTANCES = 32


def instances(ev: Evidence, tester: Intervener, findings: list[Finding], class_findings: list[ClassFinding],
              spec: InterventionSpec, seed: int) -> list[Finding]:
    """The image findings a confirmed class cue stands for. A class finding confirmed at high or
    critical (it carries its class onto other images beyond both placebos) says the model reads a
    cue for its class; each image the model wrongly calls that class, and that no confirmed finding
    boxes yet, is tested as a sample finding: remove, transplant and restore, beside their placebos.

    - A cue at one place (the class finding has a region): tested at that region (the object or
      evidence region the image shows inside it first); the confirmed ones are kept. A rule that
      sees only a class's images as a whole, such as class_visualisation, has no other way to name
      the errors its cue decided.
    - A cue at no fixed place (no region: "this patch, anywhere, is P"): tested at the image's own
      strongest evidence (its object, then its evidence region); kept only when that region carries
      the class onto other images beyond random regions of its size, as the cue does
      (``_carries_beyond_random``). Any error's evidence decided it, so removal alone shows nothing
      of the cue. (Held-out case g021: the cue's group held the tags on one class's photos, and 8
      cue-driven errors on the other class's photos went unboxed.)

    The kept ones are returned as findings of the rule that found the cue."""
    s = ev.samples
    out: list[Finding] = []
    cues = _confirmed_cues(ev, class_findings)
    boxed: dict[int, list] = {}  # sample -> its confirmed findings' boxes, as fractions of the input
    for g in findings:
        if g.bbox and g.details.get("confirmed"):
            boxed.setdefault(int(g.sample), []).append(ev.to_input_frac(g.sample, g.bbox))
    for cf in cues:
        cls = ev.classes.index(cf.cls)
        region = tuple(cf.region) if cf.region else None
        wrong = s[(s["prediction"] == cls) & (s["label"] != cls)].sort_values("confidence", ascending=False)
        for i in wrong.index[:INSTANCES]:
            i = int(i)
            if region is not None and any(boxes_overlap(b, region) for b in boxed.get(i, [])):
                continue  # already boxed there, confirmed
            order = [cf.method] if cf.method in ev.methods else []
            method = next((m for m in [*order, *ev.methods] if i in ev.heatmaps.get(m, {})), None)
            if method is None and region is None:
                continue  # no evidence says where to look
            cands = ev.boxes(i, ev.heatmaps[method][i], region) if method else [region]
            if region is None and (not cands or any(boxes_overlap(b, cands[0]) for b in boxed.get(i, []))):
                continue  # nothing to test, or already boxed there, confirmed
            label = ev.classes[int(s.at[i, "label"])]
            where = (f"at one place ({place_words(region)}); this image was tested there" if region else
                     f"at no fixed place; this image's strongest evidence was tested")
            g = Finding(sample=i, rule=cf.rule, method=method, severity="low", score=cf.score,
                        bbox=ev.to_file_bbox(i, cands[0]),
                        message=(f"The model called this '{label}' image '{cf.cls}'. A class-level check found, "
                                 f"and confirmed, that the model reads '{cf.cls}' from a cue {where}."),
                        details={"region": place_words(region) if region else "anywhere", "instance_of": cf.rule,
                                 **({"region_box": [float(v) for v in region]} if region else {}),
                                 "candidate_boxes": [list(b) for b in cands]})
            tester.reseed(seed, 2, i, cf.rule)
            _confirm_sample(ev, tester, g, spec)
            if g.details.get("confirmed") and (region is not None or _carries_beyond_random(g, spec)):
                out.append(g)
                boxed.setdefault(i, []).append(ev.to_input_frac(i, g.bbox))
    return out


def absences(ev: Evidence, tester: Intervener, findings: list[Finding], class_findings: list[ClassFinding],
              spec: InterventionSpec, seed: int) -> list[Finding]:
    """The errors a confirmed class cue made by its absence. A class finding with a region, confirmed
    at high or critical, says the model reads its class T from a mark at one place; an image of T
    that the model calls something else may lack that mark (a photo of the tagged class without
    its tag, or with one unlike the class's). Each such image (the ``INSTANCES`` most confident
    errors) gets back, at the place, what T's images show there (``Intervener.restore``: the
    donors whose own evidence lies most there), beside the same donors' random regions of its
    size; where T comes back beyond them, the image is flagged at that place, medium (the error is
    explained; the class finding shows the behaviour). The box is where T's images show their
    mark: the median of the donors' own tight boxes inside the region (a mark is not in the image
    that lacks it, so its own evidence cannot box it), the region where they have no heatmap.

    The image's other findings below high at that place, or with no place, say the same thing less
    well (the evidence for the wrong class next to an empty spot, "some corner lacks its mark"):
    they are folded into it (``details.superseded_by`` on them, their rule and severity in the
    absence's ``details.same_place``): one finding per image and place. Seen on the tune split
    (g018, g024, g028): 23 of its 38 false findings were such images, boxed at the evidence for the
    wrong class beside the empty place, or not at all."""
    s = ev.samples
    out: list[Finding] = []
    cues = sorted((f for f in _confirmed_cues(ev, class_findings) if f.region),
                  key=lambda f: (-severity_rank(f.severity), -f.score))  # the strongest cue of a class speaks
    by_sample: dict[int, list[Finding]] = {}
    for f in findings:
        by_sample.setdefault(int(f.sample), []).append(f)
    done: set[int] = set()
    for cf in cues:
        true = ev.classes.index(cf.cls)
        region = tuple(cf.region)
        wrong = s[(s["label"] == true) & (s["prediction"] != true)].sort_values("confidence", ascending=False)
        method = cf.method if cf.method in ev.methods else next(iter(ev.methods), None)
        box = None
        for i in (int(i) for i in wrong.index[:INSTANCES]):
            if i in done:
                continue
            if box is None:
                box = _mark_box(ev, tester, true, region, method)
            tester.reseed(seed, 3, i, cf.rule)
            try:
                effect = tester.restore(i, true, box, method)
            except Exception:  # an unreadable image: no absence claimed
                continue
            if not beats_control(effect, "restore", effect["restore_rate"] >= spec.transplant_rate, spec):
                continue
            done.add(i)
            pred = ev.classes[int(s.at[i, "prediction"])]
            # (A finding there that carries its own class beyond both placebos, high, claims a cue
            # for that class, not this absence: it stays.)
            same = [f for f in by_sample.get(i, []) if severity_rank(f.severity) < severity_rank("high")
                    and (not f.bbox or boxes_overlap(ev.to_input_frac(i, f.bbox), box))]
            g = Finding(sample=i, rule=cf.rule, method=method, severity="low", score=cf.score,
                        bbox=ev.to_file_bbox(i, box),
                        message=(f"The model called this '{cf.cls}' image '{pred}'. A class-level check found, and "
                                 f"confirmed, that the model reads '{cf.cls}' from what its images show at one place "
                                 f"({place_words(region)}); putting back what {effect['donors']} correctly classified "
                                 f"'{cf.cls}' images show there gave '{cf.cls}' back in {effect['restored']} of them "
                                 f"(random regions of the same size from those images: "
                                 f"{effect.get('control_restore_rate', 0):.0%}). This image does not show there what "
                                 f"the model looks for: the mark is missing, or unlike the class's."
                                 + (f" ({', '.join(sorted({f.rule for f in same}))} also flagged this image at that "
                                    f"place or at none; folded in here.)" if same else "")),
                        details={"region": place_words(region), "instance_of": cf.rule, "absence": True,
                                 "region_box": [float(v) for v in region],
                                 "intervention": effect | {"fill": spec.fill},
                                 "same_place": [{"rule": f.rule, "severity": f.severity} for f in same]})
            _verdict(g, True, "medium")
            g.details["carries_class"] = None  # nothing of this image was pasted anywhere
            for f in same:
                f.details["superseded_by"] = cf.rule
            out.append(g)
    return out


def _confirmed_cues(ev: Evidence, class_findings: list[ClassFinding], least: str = "high") -> list[ClassFinding]:
    """The class findings confirmed at ``least`` or above, on a class the audit knows: at high, the
    cues whose instances and absences are sought; at medium, those that back an image finding
    (``_isolated``)."""
    return [f for f in class_findings if f.details.get("confirmed")
            and severity_rank(f.severity) >= severity_rank(least) and f.cls in ev.classes]


def _mark_box(ev: Evidence, tester: Intervener, true: int, region, method: str | None) -> tuple:
    """Where ``true``'s images show their mark inside ``region``: the median of the restore donors'
    first tight boxes there (``Evidence.boxes``), ``region`` when they have no heatmap."""
    if method is None:
        return region
    maps = ev.heatmaps.get(method, {})
    boxes = [ev.boxes(j, maps[j], region)[0] for j in tester.donors_for(true, region, method) if j in maps][:8]
    if not boxes:
        return region
    x0, y0, x1, y1 = (float(v) for v in np.median(np.array(boxes), axis=0))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else region


def _carries_beyond_random(f: Finding, spec: InterventionSpec) -> bool:
    """A tested finding's region, pasted onto other classes' images, turned them into its class
    beyond random regions of its size. (The class's own content of its size, the second placebo,
    is what a cue at one place must beat; a region-less cue's class finding has beaten its own
    second placebo already: recurring_patch's group the class's other strongest evidence pasted at
    the same places, look_alike's members both placebos.)"""
    e = f.details.get("intervention") or {}
    return beats_control(e, "transfer", e.get("transfer_rate", 0) >= spec.transplant_rate, spec)


def _same(a, b=None, tol: float = 0.01) -> bool:
    """Two fractional boxes alike within ``tol`` (a box's round trip through file pixels)."""
    return b is not None and all(abs(float(u) - float(v)) <= tol for u, v in zip(a, b))


def _test_sample(tester: Intervener, f: Finding, box, cls: int, own: dict | None,
                 spec: InterventionSpec) -> tuple[dict, bool]:
    """Remove, transplant and (for a misclassified image) restore ``box`` of a sample finding:
    (the effect, whether it confirms the finding)."""
    s = tester.ev.samples
    effect = tester.test([f.sample], cls, box, versus_class=True)
    confirmed = (beats_control(effect, "removal", effect["removal_rate"] >= spec.remove_drop, spec)
                 or beats_control(effect, "transfer", effect["transfer_rate"] >= spec.transplant_rate, spec))
    true = int(s.at[f.sample, "label"])
    if true != cls:  # a misclassified image: does what the true class shows there give it back?
        if own:  # the rule's restore test again, with its own donors, beside its placebo
            donors = own.get("donor_ids") or tester.donors_of(true)
            effect |= tester.restore_from(f.sample, true, box, donors) | {"own_test": True}
        else:
            effect |= tester.restore(f.sample, true, box, f.method)
        restored = beats_control(effect, "restore", effect["restore_rate"] >= spec.transplant_rate, spec)
        # A rule's own restore test had its own placebo (its donors pasted elsewhere): both must be beaten.
        confirmed = confirmed or (restored and (not own or beats_control(own, "restore", True, spec)))
    return effect, confirmed


def _aggregate(f: ClassFinding, members: list[Finding], spec: InterventionSpec) -> None:
    """A class finding made of sample findings ("anything of this shape is P") is confirmed when
    most of their regions, and at least ``RECUR`` of them, carried P to other classes' images
    beyond both placebos (removal alone shows that the model needs the region, which holds for any
    evidence, not that the region is a cue; and a behaviour is not shown by one or two pictures,
    as for an image finding's high, ``_lone_cues``)."""
    tested = [g for g in members if "transfer_rate" in g.details.get("intervention", {})]
    # Carried beyond both placebos, as a class finding with a region must: a region that turns other
    # images no more than the class's own content moved there is the class's look, not a cue.
    n_ok = sum(pastes(g.details["intervention"], g.details["intervention"]["transfer_rate"] >= spec.transplant_rate,
                      spec.control_margin) for g in tested)
    # A rule that measured its class claim on its own and found it does not hold (look_alike:
    # the model calls few of the look-alikes it is shown that class) is not confirmed by its
    # members: each of them may be a near miss that carries its shape.
    refuted = f.details.get("generalises") is False
    few = n_ok < RECUR
    confirmed = bool(tested) and n_ok >= 0.5 * len(tested) and not refuted and not few
    effects = [g.details["intervention"] for g in tested]
    total = lambda k: int(sum(e[k] for e in effects))  # noqa: E731
    f.details["intervention"] = {  # the members' effects, summed: the same keys as a region's test
        "removed_from": total("removed_from"), "decision_changed": total("decision_changed"),
        "confidence_drop": round(float(np.mean([e["confidence_drop"] for e in effects])), 4) if effects else 0.0,
        "new_predictions": [], "pasted_onto": total("pasted_onto"), "turned": total("turned"),
        "removal_rate": round(total("decision_changed") / max(total("removed_from"), 1), 4),
        "transfer_rate": round(total("turned") / max(total("pasted_onto"), 1), 4),
        "samples_tested": len(tested), "samples_transferring": n_ok}
    _verdict(f, confirmed if tested else None)
    f.message += (f" {'Confirmed' if confirmed else 'Not confirmed'} by intervention: pasted onto other "
                  f"classes' images, {n_ok} of the {len(tested)} regions turned at least half of them into "
                  f"'{f.cls}', beyond random regions and '{f.cls}' images' own content of their size"
                  + (", but the model does not do so for most such shapes (above)." if refuted else
                     f"; fewer than {RECUR}: nothing shows the model does this as a rule." if few and n_ok
                     else "."))


def _verdict(f, confirmed: bool | None, floor: str = "high") -> None:
    """Record the test's outcome: confirmed rises to at least ``floor``; refuted or untested (None)
    is capped at 'low'."""
    f.details["confirmed"] = confirmed
    f.details["severity_before_intervention"] = f.severity
    if confirmed:
        if severity_rank(f.severity) < severity_rank(floor):
            f.severity = floor
    elif severity_rank(f.severity) > severity_rank("low"):
        f.severity = "low"


def _own_restore(f: Finding, own: dict, spec: InterventionSpec) -> None:
    """Confirm a finding that names no region by the restore test its rule ran and described."""
    # Beside the rule's placebo: the same donors pasted at random places of the region's size.
    confirmed = beats_control(own, "restore", own["restore_rate"] >= spec.transplant_rate, spec)
    f.details["intervention"] = {**own, "own_test": True}
    # Restoring decided this error, but a finding with no single region has nothing to paste onto
    # other images, so nothing shows a cue learned for the prediction: like a boxed finding
    # confirmed by restoration alone, medium at most (a clean twin's borderline error came back
    # from any corner of the true class's images, and failed its gate).
    _verdict(f, confirmed, "medium")
    if confirmed:
        f.details["carries_class"] = None
        if severity_rank(f.severity) > severity_rank("medium"):
            f.severity = "medium"
    f.message += f" {'Confirmed' if confirmed else 'Not confirmed'} by intervention (the restore test above)" + (
        ": it decided this error, but names no region that could be pasted elsewhere to show a cue the model "
        "learned (graded medium)." if confirmed else ".")


# Images (in practice errors) whose region carries one class before any of them may be high: two
# were not enough on the tune split's clean twins (a clean digits model read a sticker at the bottom
# as a '9' in two errors; a clean texture model took a frame for 'gravel' twice), and the
# class-level rules ask five.
RECUR = 3


def _lone_cues(findings: list[Finding], ev: Evidence) -> None:
    """A shortcut is a behaviour, not one picture: an image finding whose region carries the class
    it caused stays high only when at least ``RECUR`` errors the model called that class have a
    region that carries it. Fewer are medium: those errors are explained, but nothing shows a
    behaviour of the model (measured on the benchmark's clean twins, see ``RECUR``)."""
    carrying: dict[int, set] = {}
    high = [f for f in findings if f.details.get("confirmed") and f.details.get("carries_class") is not False
            and severity_rank(f.severity) >= severity_rank("high")]
    for f in high:
        carrying.setdefault(int(ev.samples.at[f.sample, "prediction"]), set()).add(f.sample)
    for f in high:
        cls = int(ev.samples.at[f.sample, "prediction"])
        if len(carrying[cls]) < RECUR:
            f.details["recurs"] = False
            f.severity = "medium"
            n = len(carrying[cls])
            f.message += (f" {'It is the only image' if n == 1 else f'Only {n} images'} called '{ev.classes[cls]}' "
                          f"whose region carries that class, fewer than {RECUR}: nothing shows the model does this "
                          f"as a rule (graded medium).")


def _each_image_rules() -> set[str]:
    """The rules registered with ``each_image``: they judge each image on its own evidence."""
    import auditor.rules  # noqa: F401  (registers the rules; they import this module)
    from auditor.registry import RULES
    return {e.name for e in RULES if e.meta.get("each_image")}


def _isolated(findings: list[Finding], class_findings: list[ClassFinding], ev: Evidence) -> None:
    """A rule that judges each image on its own evidence (``each_image``: corner_border, corner_restore)
    finds what decided one error, and a clean model's borderline errors are decided by something too.
    A shortcut is what decides many: its confirmed finding stands when the class it caused has a
    confirmed class cue (medium and above), or when at least ``RECUR`` errors called that class share
    it (the rule's findings at the same place). Otherwise the error is explained, but nothing points
    to a cue: low, listed apart as a minor suspicion (on the tune split's cases, 8 of the 9 such
    findings were on errors no planted cue decided)."""
    cued = {f.cls for f in _confirmed_cues(ev, class_findings, "medium")}
    each = _each_image_rules()
    mine = [f for f in findings if f.details.get("confirmed") and not f.details.get("absence") and f.rule in each]
    # The same place: the region the rule named (one naming none shares it with no other image).
    keys = [(int(ev.samples.at[f.sample, "prediction"]), f.rule,
             str(f.details["region"]) if f.details.get("region") is not None else f"image {f.sample}") for f in mine]
    shared = Counter(keys)
    for f, k in zip(mine, keys):
        cls, n = ev.classes[k[0]], shared[k]
        if cls in cued or n >= RECUR:
            continue
        f.details["isolated"] = True
        f.details["shared_by"] = n  # errors called that class with this finding (it included)
        f.severity = "low"
        f.message += (f" {'No other error' if n == 1 else f'Only {n} errors'} called '{cls}' "
                      f"{'shows' if n == 1 else 'show'} this, and no cue of '{cls}' is confirmed for the class: the error "
                      f"is explained, but nothing shows a shortcut (graded low, a minor suspicion).")


def _untested(f, why: str) -> None:
    """A suspicion with a region that could not be put to the test stays a suspicion: at most 'low'."""
    f.details["intervention"] = {"skipped": why, "removed_from": 0, "decision_changed": 0, "confidence_drop": 0.0,
                                 "new_predictions": [], "pasted_onto": 0, "turned": 0, "removal_rate": 0.0,
                                 "transfer_rate": 0.0}
    _verdict(f, None)
    f.message += f" Not tested by intervention: {why}."


def _apply(f, effect: dict, cls_name: str, spec: InterventionSpec, confirmed: bool) -> None:
    f.details["intervention"] = effect | {"fill": spec.fill}
    strong = effect["transfer_rate"] >= spec.critical_rate and isinstance(f, ClassFinding)
    # A learned cue carries its class: pasted onto other images it turns them, beyond random
    # regions of its size and beyond the class's own content of its size. A region whose removal
    # or replacement alone changed this one decision decided this error (a large patch hides the
    # object from any model, a clean one too: measured on the benchmark's clean twins), and one
    # that carries the class no better than the class's own look does is that look; neither is
    # evidence of a shortcut, so they stay medium: shown, and not failing a high gate. (A class
    # finding that does not beat both is refuted, see confirm.) Both placebos must have run: a
    # region with no room for one beside it (over half the image each way) is no local cue that
    # could show it.
    moved = effect["transfer_rate"] >= spec.transplant_rate
    placebos = ("transfer", "content")
    missing = [n for n in placebos if f"{n}_vs_control" not in effect]
    carries = not missing and all(beats_control(effect, n, moved, spec) for n in placebos)
    strong = strong and carries
    _verdict(f, confirmed, "critical" if strong else "high" if carries else "medium")
    # A class finding claims a class-wide shortcut: with neither placebo beside its region (no box of
    # its size fits there: the central quarter), pasting it is pasting the class's object, which turns a clean model's
    # images too (held-out g029's clean twin: the central quarter of its digits, 9 of 10 turned).
    # Nothing is refuted, and nothing shows a cue either: a suspicion, low.
    bare = confirmed and not carries and len(missing) == len(placebos) and isinstance(f, ClassFinding)
    if confirmed and not carries:
        f.details["carries_class"] = None if missing else False  # None: no placebo could run, nothing refuted
        cap = "low" if bare else "medium"
        if severity_rank(f.severity) > severity_rank(cap):
            f.severity = cap
    f.message += _sentence(effect, cls_name, confirmed)
    if confirmed and not carries and missing:
        which = ("Neither placebo" if len(missing) == 2 else
                 "The random-region placebo" if missing == ["transfer"] else "The class's-own-content placebo")
        grade_words = "low: the region may hold the class's object itself" if bare else "medium"
        f.message += (f" {which} could {'' if len(missing) == 2 else 'not '}run beside it, so nothing shows a cue "
                      f"the model learned (graded {grade_words}).")
    elif confirmed and not carries:
        f.message += (f" Pasted elsewhere it did not carry '{cls_name}' beyond random regions and '{cls_name}' "
                      f"images' own content of its size: it decided this error, but shows no sign of being a cue "
                      f"the model learned for '{cls_name}' (graded medium).")
