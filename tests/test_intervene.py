"""Placebo controls: an intervention's effect counts only beside the same operation on random
regions of the same size."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from auditor.inputs.config import InputSpec, InterventionSpec
from auditor.inputs.data import SampleRef
from auditor.judge.evidence import ClassFinding, Evidence, Finding
from auditor.judge.intervene import beats_control, confirm, control_boxes


def test_control_boxes_have_the_size_and_never_overlap():
    rng = np.random.default_rng(0)
    box = (0.0, 0.8, 0.2, 1.0)
    boxes = control_boxes(box, 5, rng)
    assert len(boxes) == 5
    for x0, y0, x1, y1 in boxes:
        assert np.isclose(x1 - x0, 0.2) and np.isclose(y1 - y0, 0.2) and 0 <= x0 and x1 <= 1 and y1 <= 1
        assert x0 >= 0.2 or y1 <= 0.8                 # outside the box
    assert control_boxes((0.0, 0.0, 1.0, 1.0), 3, rng) == []   # no room: no placebo
    strips = control_boxes((0.0, 0.85, 1.0, 1.0), 3, rng)        # a border strip: the same strip higher up
    assert len(strips) == 3 and all(x0 == 0 and x1 == 1 and y1 <= 0.85 for x0, _, x1, y1 in strips)


def test_an_effect_must_beat_its_placebo():
    spec = InterventionSpec()
    assert beats_control({"transfer_vs_control": [0.6, 0.4, 0.8]}, "transfer", True, spec)
    assert not beats_control({"transfer_vs_control": [0.1, 0.0, 0.2]}, "transfer", True, spec)  # placebo as strong
    assert not beats_control({"transfer_vs_control": [0.3, -0.1, 0.7]}, "transfer", True, spec)  # interval spans 0
    assert not beats_control({"transfer_vs_control": [0.9, 0.8, 1.0]}, "transfer", False, spec)  # rate too low
    assert beats_control({}, "transfer", True, spec)   # no room for a placebo: the rate alone


class AnyPatch(nn.Module):
    """Class 1 whenever the image holds any bright square anywhere (a model that takes any blob for
    the cue), else class 0: a region's effect is no stronger than a random region's of its size."""

    def forward(self, x):
        bright = (x.mean(1) > 0.8).float().flatten(1).sum(1)
        return torch.stack([1 - (bright > 0).float(), (bright > 0).float()], 1) * 10


class CornerOnly(nn.Module):
    """Class 1 when the bottom-left corner is bright: the corner itself is the cue."""

    def forward(self, x):
        corner = x[:, :, 12:, :4].mean((1, 2, 3))
        return torch.stack([1 - (corner > 0.8).float(), (corner > 0.8).float()], 1) * 10


def _evidence(model, n=12):
    """n images of class 0 (dark) and n of class 1 (bright everywhere: any pasted region is bright)."""
    refs, rows = [], []
    xs = []
    for i in range(2 * n):
        label = int(i >= n)
        xs.append(torch.full((3, 16, 16), 1.0 if label else 0.0))
        refs.append(SampleRef(None, f"{label}/{i}.png", label))
        rows.append({"id": i, "path": f"{label}/{i}.png", "label": label, "prediction": label, "confidence": 1.0,
                     "correct": True, "explained": True, "width": 16, "height": 16, "sha256": str(i)})
    ev = Evidence(["dark", "bright"], pd.DataFrame(rows).set_index("id"), {}, {}, refs, model=model,
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    ev.model_input = lambda i: xs[i]  # the images live in memory
    return ev


def _tested(model) -> Finding:
    ev = _evidence(model)
    f = Finding(sample=20, rule="corner_border", severity="high", score=1.0, message="m.", bbox=[0, 12, 4, 16])
    confirm(ev, [f], [], InterventionSpec(fill="mean", transplant_images=12), seed=0)
    return f


def test_a_corner_cue_is_confirmed_beside_its_placebo():
    d = _tested(CornerOnly()).details
    e = d["intervention"]
    assert d["confirmed"] and e["transfer_rate"] == 1.0 and e["control_transfer_rate"] == 0.0


def test_a_region_no_stronger_than_a_random_one_is_not_confirmed():
    f = _tested(AnyPatch())
    e = f.details["intervention"]
    assert e["transfer_rate"] == 1.0 and e["control_transfer_rate"] == 1.0   # pasting anything bright turns it
    assert f.details["confirmed"] is False and f.severity == "low"
    assert "turned 12 of them into 'bright'; pasting a random region of the same size turned 12" in f.message


def _with_error(model, class1: float, n=12, bbox=(0, 12, 4, 16), errors=3, rule="corner_border",
                class_findings=(), rules=None, region="bottom-left corner") -> list[Finding]:
    """n dark images of class 0; n of class 1, ``class1`` grey with a bright bottom-left corner (the
    tag every class-1 image has); and ``errors`` dark class-0 images with that corner, which the
    model calls class 1: a finding on each boxes its corner, and they are put to the test."""
    xs, refs, rows = [], [], []
    for i in range(2 * n + errors):
        label = int(n <= i < 2 * n)
        x = torch.full((3, 16, 16), class1 if label else 0.0)
        if i >= n:
            x[:, 12:, :4] = 1.0
        xs.append(x)
        pred = int(model(x[None]).argmax(1))
        refs.append(SampleRef(None, f"{label}/{i}.png", label))
        rows.append({"id": i, "path": f"{label}/{i}.png", "label": label, "prediction": pred, "confidence": 1.0,
                     "correct": pred == label, "explained": True, "width": 16, "height": 16, "sha256": str(i)})
    ev = Evidence(["dark", "bright"], pd.DataFrame(rows).set_index("id"), {}, {}, refs, model=model,
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    ev.model_input = lambda i: xs[i]
    assert not any(r["correct"] for r in rows[2 * n:])
    found = [Finding(sample=i, rule=(rules or [rule] * errors)[k], severity="medium", score=1.0, message="m.",
                     bbox=list(bbox), details={"region": region}) for k, i in enumerate(range(2 * n, 2 * n + errors))]
    confirm(ev, found, list(class_findings), InterventionSpec(fill="mean", transplant_images=n), seed=0)
    return found


def test_a_tag_that_carries_its_class_beyond_the_class_own_content_is_high():
    f = _with_error(CornerOnly(), class1=0.5)[0]   # the model reads the tag, not the grey
    e = f.details["intervention"]
    assert e["transfer_rate"] == 1.0 and e["control_transfer_rate"] == 0.0 and e["control_content_rate"] == 0.0
    assert f.details["confirmed"] and f.severity == "high" and "carries_class" not in f.details


def test_a_region_that_carries_its_class_no_better_than_the_class_own_content_is_medium():
    """The clean twins' large logo: a max-pooled model calls anything bright 'bright', the tag as much as
    a patch of any 'bright' image. The error is the region's doing (removal and restoration confirm it),
    but pasting it shows no cue beyond the class's own look: medium, not failing a high gate."""
    f = _with_error(AnyPatch(), class1=1.0)[0]
    e = f.details["intervention"]
    assert e["transfer_rate"] == 1.0 and e["control_transfer_rate"] == 0.0   # beats random regions of its image
    assert e["control_content_rate"] == 1.0                                  # not the class's own content
    assert f.details["confirmed"] and f.severity == "medium" and f.details["carries_class"] is False
    assert "'bright' images' own content of that size turned 12" in f.message


def test_a_lone_error_whose_region_carries_its_class_is_medium():
    """The same tag, confirmed beyond both placebos, on one or two errors the model called 'bright'
    (found by a rule that looks across images): those errors are explained, but show no behaviour;
    three make each of them high."""
    f = _with_error(CornerOnly(), class1=0.5, errors=1, rule="fixed_location")[0]
    assert f.details["confirmed"] and f.severity == "medium" and f.details["recurs"] is False
    assert "It is the only image called 'bright'" in f.message
    assert all(g.severity == "medium" and "Only 2 images" in g.message
               for g in _with_error(CornerOnly(), 0.5, errors=2, rule="fixed_location"))
    assert all(g.severity == "high" and "recurs" not in g.details for g in _with_error(CornerOnly(), class1=0.5))


def test_an_error_that_nothing_else_points_to_is_a_minor_suspicion():
    """A rule that judges each image alone (corner_border) on one or two errors called 'bright', with
    no confirmed class cue of 'bright': explained, but no evidence of a shortcut, so low and minor
    (a clean model's borderline errors are decided by something too). Three errors sharing the place,
    or a confirmed class cue, keep them."""
    from auditor.outputs.report_words import is_minor
    from auditor.record import FindingRecord
    for errors in (1, 2):
        for f in _with_error(CornerOnly(), class1=0.5, errors=errors):
            assert f.details["confirmed"] and f.details["isolated"] and f.severity == "low"
            assert is_minor(FindingRecord.model_validate({k: v for k, v in f.to_json().items() if k in FindingRecord.model_fields}))
            assert "nothing shows a shortcut" in f.message
    assert all(not g.details.get("isolated") and g.severity == "high" for g in _with_error(CornerOnly(), class1=0.5))
    # Isolated errors count for no other finding's high: with two of the three isolated, the third
    # (a rule that looks across images) is a lone error, medium.
    mixed = _with_error(CornerOnly(), class1=0.5, rules=["fixed_location", "corner_border", "corner_border"])
    assert [g.severity for g in mixed] == ["medium", "low", "low"] and mixed[0].details["recurs"] is False
    assert mixed[1].details["shared_by"] == 2 and "Only 2 errors called 'bright' show this" in mixed[1].message
    # A finding that names no place shares it with no other image.
    assert all(g.details.get("isolated") for g in _with_error(CornerOnly(), class1=0.5, rule="corner_restore", region=None))
    cue = ClassFinding(cls="bright", rule="fixed_location", severity="high", score=1.0, share=0.5,
                       region=[0.0, 0.75, 0.25, 1.0], message="m.")
    kept = _with_error(CornerOnly(), class1=0.5, errors=1, class_findings=[cue])
    assert cue.details["confirmed"] and not kept[0].details.get("isolated") and kept[0].severity == "medium"


def test_a_restore_test_without_a_region_confirms_at_most_medium():
    """corner_restore's finding that names no corner: its restore test beat its placebo, so it
    decided the error; with no region to paste elsewhere, nothing shows a learned cue (and as the
    only such error, with no class cue confirmed, it is then isolated: low)."""
    ev = _evidence(CornerOnly())
    own = {"true_class": "dark", "donors": 4, "restored": 4, "restore_rate": 1.0,
           "control_restore_rate": 0.0, "restore_vs_control": [1.0, 1.0, 1.0]}
    f = Finding(sample=20, rule="corner_restore", severity="high", score=1.0, message="m.",
                details={"own_test": own})
    weak = Finding(sample=21, rule="corner_restore", severity="medium", score=1.0, message="m.",
                   details={"own_test": own | {"control_restore_rate": 0.9, "restore_vs_control": [0.1, 0.0, 0.25]}})
    confirm(ev, [f, weak], [], InterventionSpec(), seed=0)
    assert f.details["confirmed"] and "graded medium" in f.message
    assert f.details["isolated"] and f.severity == "low" and "No other error called 'bright'" in f.message
    assert weak.details["confirmed"] is False and weak.severity == "low"


def test_a_region_with_no_room_for_a_placebo_is_not_high():
    """Over half the image each way: no box of its size fits beside it, so neither placebo runs. Its
    paste turned every image, but nothing shows that more than any region of half the image would."""
    f = _with_error(CornerOnly(), class1=0.5, bbox=(0, 4, 9, 16))[0]
    e = f.details["intervention"]
    assert e["transfer_rate"] == 1.0 and "transfer_vs_control" not in e and "content_vs_control" not in e
    assert f.details["confirmed"] and f.severity == "medium"
    assert f.details["carries_class"] is None and "Neither placebo could run" in f.message  # not refuted: untested


def _class_finding(model, class1: float, region=(0.0, 0.75, 0.25, 1.0)):
    """test_views' tagged images (dark, and ``class1`` grey with a bright bottom-left corner) and a
    class finding on that corner (or ``region``), put to the test."""
    from test_views import _tagged

    from auditor.judge.evidence import ClassFinding
    f = ClassFinding(cls="tagged", rule="corner_border", severity="medium", score=1.0, share=1.0, message="m.",
                     region=list(region))
    confirm(_tagged(model, class1), [], [f], InterventionSpec(fill="mean", transplant_images=12), seed=0)
    return f


def test_a_class_region_is_a_cue_only_beyond_the_class_own_content_moved_there():
    """A model that reads the corner: the class's tag there is a cue (its grey content moved to the
    corner turns nothing); where the class is bright all over, its own content moved to the corner
    turns every image as the 'tag' does, while random regions pasted at their own places turn none
    (the clean max-pooled texture twin: its texture in a corner). That is the class's look: refuted."""
    tag = _class_finding(CornerOnly(), class1=0.5)
    e = tag.details["intervention"]
    assert e["transfer_rate"] == 1.0 and e["control_transfer_rate"] == 0.0 and e["control_content_rate"] == 0.0
    assert tag.details["confirmed"] and tag.severity == "critical"
    look = _class_finding(CornerOnly(), class1=1.0)
    e = look.details["intervention"]
    assert e["transfer_rate"] == 1.0 and e["control_transfer_rate"] == 0.0 and e["control_content_rate"] == 1.0
    assert look.details["confirmed"] is False and look.severity == "low"


def test_a_class_region_with_no_room_for_a_placebo_is_a_suspicion():
    """A class finding over half the image each way: its paste turns every image, as pasting the
    class's object would on any model; with neither placebo beside it nothing shows a cue: low."""
    f = _class_finding(CornerOnly(), class1=0.5, region=(0.0, 0.3, 0.7, 1.0))
    e = f.details["intervention"]
    assert e["transfer_rate"] == 1.0 and "transfer_vs_control" not in e and "content_vs_control" not in e
    assert f.details["confirmed"] and f.details["carries_class"] is None and f.severity == "low"
    assert "the region may hold the class's object itself" in f.message


def _with_tagged_errors(class1: float, errors: int = 3):
    """test_views' tagged images, and ``errors`` dark images labelled 'dark' that carry the bright
    corner, so the corner-reading model calls them 'tagged'; and a class finding on the corner."""
    from test_views import _tagged

    from auditor.judge.evidence import ClassFinding
    ev = _tagged(CornerOnly(), class1)
    xs = [ev.model_input(i) for i in range(len(ev.samples))]
    rows = ev.samples.reset_index().to_dict("records")
    for k in range(errors):
        i = len(xs)
        x = torch.zeros(3, 16, 16)
        x[:, 12:, :4] = 1.0
        xs.append(x)
        ev.refs.append(SampleRef(None, f"0/e{k}.png", 0))
        rows.append(rows[0] | {"id": i, "path": f"0/e{k}.png", "prediction": 1, "correct": False, "sha256": f"e{k}"})
    ev.samples = pd.DataFrame(rows).set_index("id")
    ev.model_input = lambda i: xs[i]
    f = ClassFinding(cls="tagged", rule="corner_border", severity="medium", score=1.0, share=1.0, message="m.",
                     region=[0.0, 0.75, 0.25, 1.0])
    found: list = []
    added = confirm(ev, found, [f], InterventionSpec(fill="mean", transplant_images=12), seed=0)
    return f, found, added


def test_a_confirmed_class_cue_boxes_the_errors_it_decided():
    """The corner carries 'tagged' onto other images beyond both placebos: each image the model
    wrongly calls 'tagged' is tested at the corner and, confirmed, becomes an image finding of the
    rule, boxed at the corner (in file pixels), high once three errors show it; a class finding that
    is the class's look (its content anywhere turns images as well) stands for no error."""
    f, found, added = _with_tagged_errors(class1=0.5)
    assert f.details["confirmed"] and f.severity == "critical"
    assert added == found and sorted(g.sample for g in added) == [24, 25, 26]
    for g in added:
        assert g.rule == "corner_border" and g.details["instance_of"] == "corner_border" and g.details["confirmed"]
        assert g.bbox == [0.0, 12.0, 4.0, 16.0] and g.severity == "high" and "'dark' image 'tagged'" in g.message
    f, found, added = _with_tagged_errors(class1=1.0)
    assert f.details["confirmed"] is False and added == [] and found == []


def test_a_class_behaviour_needs_three_pictures():
    """A class finding made of image findings is confirmed when most of its members carried the class
    beyond both placebos, and at least RECUR (3) of them: two pictures show no behaviour (a clean
    model's borderline errors can carry their class, as image findings' highs need three too)."""
    from auditor.judge.evidence import ClassFinding
    from auditor.judge.intervene import RECUR, _aggregate

    carried = {"removed_from": 1, "decision_changed": 1, "confidence_drop": 0.5, "pasted_onto": 10, "turned": 9,
               "transfer_rate": 0.9, "transfer_vs_control": [0.8, 0.6, 1.0], "content_vs_control": [0.7, 0.5, 0.9]}
    for n, want in ((RECUR - 1, False), (RECUR, True)):
        members = [Finding(sample=i, rule="recurring_patch", severity="high", score=1.0, message="m.",
                           details={"intervention": dict(carried)}) for i in range(n)]
        f = ClassFinding(cls="c", rule="recurring_patch", severity="medium", score=0.5, share=0.5, message="m.")
        _aggregate(f, members, InterventionSpec())
        assert f.details["confirmed"] is want and (f.severity == "high") is want
        assert want or "fewer than 3" in f.message


class PatchOrGreyHalf(nn.Module):
    """Class 1 ('tagged') when any 3 x 3 patch is bright, wherever it lies; or, a second reason
    with no patch, when the left half is mid-grey and the right half dark."""

    def forward(self, x):
        g = x.mean(1, keepdim=True)
        patch = torch.nn.functional.avg_pool2d(g, 3, 1).amax((1, 2, 3)) > 0.8
        half = ((g[..., :8].mean((1, 2, 3)) - 0.5).abs() < 0.02) & (g[..., 8:].mean((1, 2, 3)) < 0.1)
        one = (patch | half).float()
        return torch.stack([1 - one, one], 1) * 10


def test_a_confirmed_cue_at_no_fixed_place_boxes_each_error_that_carries_it(tmp_path):
    """A confirmed class cue with no region ("this patch, anywhere, is 'tagged'"): each error the
    model calls 'tagged' is tested at its own strongest evidence, and kept only where that region
    carries 'tagged' onto other images beyond random regions of its size. Three dark images with a
    bright patch at three places are boxed at the patch; an image called 'tagged' for its grey left
    half (hiding a piece of it changes the decision, beyond random regions: that decided the error)
    carries nothing, and is not."""
    from PIL import Image

    from auditor.judge.evidence import ClassFinding
    rng = np.random.default_rng(0)
    images, labels, preds, heats = [], [], [], []

    def add(img, label, pred, heat=None):
        images.append(img)
        labels.append(label)
        preds.append(pred)
        heats.append(heat)

    for k in range(12):  # dark 'plain' images, and grey 'tagged' ones with a patch somewhere
        add(np.zeros((16, 16), np.uint8), 0, 0)
        img = np.full((16, 16), 128, np.uint8)
        y, x = rng.integers(0, 13, 2)
        img[y:y + 3, x:x + 3] = 255
        add(img, 1, 1)
    patches = [(1, 2), (7, 11), (12, 5)]
    for y, x in patches:  # errors: the patch on a dark 'plain' image
        img = np.zeros((16, 16), np.uint8)
        img[y:y + 3, x:x + 3] = 255
        heat = np.zeros((16, 16), np.float32)
        heat[y:y + 3, x:x + 3] = 1.0
        add(img, 0, 1, heat)
    heat = np.zeros((16, 16), np.float32)
    heat[4:8, 2:6] = 1.0
    half = np.zeros((16, 16), np.uint8)
    half[:, :8] = 128
    add(half, 0, 1, heat)  # an error for another reason
    refs, rows = [], []
    for i, (img, label, pred) in enumerate(zip(images, labels, preds)):
        path = tmp_path / f"{i}.png"
        Image.fromarray(img).save(path)
        refs.append(SampleRef(path, f"{i}.png", label))
        rows.append({"label": label, "prediction": pred, "confidence": 1.0, "correct": label == pred,
                     "explained": True, "width": 16, "height": 16, "path": f"{i}.png", "sha256": str(i)})
    maps = {i: h for i, h in enumerate(heats) if h is not None}
    ev = Evidence(["plain", "tagged"], pd.DataFrame(rows), {"m": maps}, {}, refs, model=PatchOrGreyHalf(),
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    errors = list(range(24, 27))
    for confirmed, want in ((True, errors), (False, [])):
        f = ClassFinding(cls="tagged", rule="recurring_patch", method="m", severity="high" if confirmed else "low",
                         score=0.7, share=0.5, message="m.", details={"confirmed": confirmed})
        found: list = []
        added = confirm(ev, found, [f], InterventionSpec(fill="mean", transplant_images=12), seed=0)
        assert sorted(g.sample for g in added) == want
        for g in added:
            y, x = patches[g.sample - 24]
            assert g.rule == "recurring_patch" and g.details["instance_of"] == "recurring_patch"
            assert g.bbox == [float(x), float(y), float(x + 3), float(y + 3)] and g.severity == "high"
            assert "at no fixed place" in g.message


def _lacking_marks(confirmed: bool = True):
    """The corner-reading model's evidence with two 'tagged' images that lack the corner mark (it
    calls them 'dark'), a class finding on the corner (on another corner when not ``confirmed``:
    one that reads nothing), and a finding on the first that names no place."""
    from test_views import _tagged

    from auditor.judge.evidence import ClassFinding
    ev = _tagged(CornerOnly(), class1=0.5)
    xs = [ev.model_input(i) for i in range(len(ev.samples))]
    rows = ev.samples.reset_index().to_dict("records")
    for k in range(2):  # 'tagged' images without their mark
        xs.append(torch.full((3, 16, 16), 0.5))
        ev.refs.append(SampleRef(None, f"1/m{k}.png", 1))
        rows.append(rows[-1] | {"id": len(xs) - 1, "path": f"1/m{k}.png", "label": 1, "prediction": 0,
                                "correct": False, "sha256": f"m{k}"})
    ev.samples = pd.DataFrame(rows).set_index("id")
    ev.model_input = lambda i: xs[i]
    f = ClassFinding(cls="tagged", rule="corner_border", severity="medium", score=1.0, share=1.0, message="m.",
                     region=[0.0, 0.75, 0.25, 1.0] if confirmed else [0.75, 0.0, 1.0, 0.25])
    vague = Finding(sample=24, rule="corner_restore", severity="medium", score=0.9, message="Some corner.")
    return ev, f, vague


def test_an_image_of_the_cue_class_without_its_mark_is_flagged_where_the_mark_belongs():
    """The corner-reading model calls two 'tagged' images that lack the corner mark 'dark'. The
    confirmed class cue (the corner carries 'tagged') names the place; putting back what 'tagged'
    images show there gives 'tagged' back, beyond random regions of those images: each is flagged at
    the corner, medium, and a finding on one of them that names no place is folded into it. A class
    finding that is not confirmed explains no absence."""
    for confirmed in (True, False):
        ev, f, vague = _lacking_marks(confirmed)
        found = [vague]
        added = confirm(ev, found, [f], InterventionSpec(fill="mean", transplant_images=12), seed=0)
        if not confirmed:
            assert f.details["confirmed"] is False and added == [] and found == [vague]
            continue
        assert f.details["confirmed"] and sorted(g.sample for g in added) == [24, 25]
        assert found == added and vague.details["superseded_by"] == "corner_border"
        for g in added:
            e = g.details["intervention"]
            assert g.details["absence"] and g.details["instance_of"] == "corner_border" and g.severity == "medium"
            assert g.bbox == [0.0, 12.0, 4.0, 16.0] and e["restore_rate"] == 1.0 and e["control_restore_rate"] == 0.0
            assert "does not show there what the model looks for" in g.message
        assert [d["rule"] for d in added[0].details["same_place"]] == ["corner_restore"]


def test_a_cached_rerun_gives_the_same_absences_and_folds_the_same_findings(tmp_path, monkeypatch):
    """The interventions of an unchanged audit come from the cache: the absences come back, and the
    finding they folded in stays out, as in the run that tested them."""
    from types import SimpleNamespace

    import auditor.audit
    from auditor.audit import cached_confirm
    from auditor.explain.store import Store
    cfg = SimpleNamespace(intervention=InterventionSpec(fill="mean", transplant_images=12), run=SimpleNamespace(seed=0),
                          explain=SimpleNamespace(model_dump=lambda mode: {}), model=SimpleNamespace(target_layer=None))
    store = Store(tmp_path / "cache.sqlite")
    runs = []
    for k in range(2):
        if k:  # the second run tests nothing
            monkeypatch.setattr(auditor.audit, "confirm", lambda *a, **kw: pytest.fail("tested again"))
        ev, f, vague = _lacking_marks()
        found = [vague]
        cached_confirm(ev, found, [f], cfg, store, "model")
        runs.append([(g.sample, g.rule, g.severity, g.bbox, g.message) for g in found])
    assert runs[0] == runs[1] and [r[0] for r in runs[0]] == [24, 25]
    assert all(r[1] == "corner_border" for r in runs[1])
