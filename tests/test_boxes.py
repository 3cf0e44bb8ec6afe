"""Tight boxes from the evidence, and corner_restore on a clean model: the box is the evidence's
connected region grown to the object the image shows (a corner or border band only says where it
sits), and a borderline error of a model with no shortcut is no corner cue."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

import auditor.rules  # noqa: F401  (registers the rules)
from auditor.demo import synth
from auditor.explain.heatmap import (bands, box_area, evidence_box, flat_box, inner_object_box, object_box,
                                     outlined, tight_boxes)
from auditor.inputs.config import InputSpec, InterventionSpec
from auditor.inputs.data import SampleRef
from auditor.judge.evidence import Evidence, Finding
from auditor.judge.intervene import confirm
from auditor.registry import RULES

COLUMNS = ["label", "prediction", "confidence", "correct", "explained", "width", "height", "path", "sha256"]


def _covered(box, truth) -> float:
    """Share of ``truth`` (pixels) that ``box`` (pixels) covers."""
    w = max(0.0, min(box[2], truth[2]) - max(box[0], truth[0]))
    h = max(0.0, min(box[3], truth[3]) - max(box[1], truth[1]))
    return w * h / ((truth[2] - truth[0]) * (truth[3] - truth[1]))


def _photo(size: int, seed: int, name: str = "grass") -> np.ndarray:
    img = synth.texture_crop(name, size, np.random.default_rng(seed))
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def _heat_evidence(tmp_path, images: list[np.ndarray], heats: list[np.ndarray], wrong: set[int]) -> Evidence:
    """Evidence for images written to ``tmp_path``, with one heatmap each (method 'm'); ``wrong``
    are misclassified (label 0 taken for 1)."""
    refs, rows = [], []
    for i, img in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray(img).save(path)
        refs.append(SampleRef(path, f"{i}.png", 0))
        rows.append({"label": 0, "prediction": 1 if i in wrong else 0, "confidence": 0.9, "correct": i not in wrong,
                     "explained": True, "width": img.shape[1], "height": img.shape[0], "path": f"{i}.png",
                     "sha256": str(i)})
    return Evidence(["a", "b"], pd.DataFrame(rows, columns=COLUMNS), {"m": dict(enumerate(heats))}, {}, refs)


def test_a_wide_strip_tag_is_boxed_whole_not_as_the_corner_square(tmp_path):
    """A credit-line strip along the bottom edge, 60% of the width: the evidence peaks at its left
    end (in the bottom-left corner square, which holds a fifth of it); the box covers the strip."""
    img = _photo(96, 0)
    tag = [6, 84, 66, 92]                                    # x0, y0, x1, y1 in file pixels
    img[84:92, 6:66] = 0
    img[85:91, 7:65] = 255
    img[87:89, 9:63:4] = 0                                   # letters
    heat = np.zeros((64, 64), np.float32)
    heat[57:61, 2:9] = 1.0
    heat = ndimage.gaussian_filter(heat, 1.5)
    flat = np.full((64, 64), 1.0, np.float32)
    ev = _heat_evidence(tmp_path, [img, _photo(96, 1), _photo(96, 2)], [heat, flat, flat], wrong={0})
    found = [f for f in RULES.get("corner_border").fn(ev) if isinstance(f, Finding)]
    assert [f.sample for f in found] == [0]
    f = found[0]
    corner = ev.to_file_bbox(0, bands(0.15)[f.details["region"]])
    assert _covered(corner, tag) < 0.5                       # what the band alone would have boxed
    assert _covered(f.bbox, tag) >= 0.5
    assert (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) <= 0.25 * 96 * 96
    assert f.details["region"].startswith("bottom")          # the band still names where it sits


def test_a_corner_mark_smaller_than_the_corner_square_is_boxed_tightly():
    img = _photo(64, 3).astype(np.float32) / 255
    img[2:6, 56:60] = [1.0, 0.1, 0.1]                        # a 4 px red mark; the corner square is 10 px
    heat = np.zeros((16, 16), np.float32)                    # a coarse map, as Grad-CAM gives
    heat[0:2, 13:16] = 1.0
    corner = bands(0.15)["top-right corner"]
    boxes = tight_boxes(ndimage.gaussian_filter(heat, 1), img, corner)
    assert boxes[-1] == corner                               # the band stays the last resort
    px = [v * 64 for v in boxes[0]]
    assert _covered(px, [56, 2, 60, 6]) == 1.0
    assert box_area(boxes[0]) <= 2 * (4 * 4) / 64 ** 2 < box_area(corner)


def test_a_box_of_a_mark_inside_is_grown_by_its_drawn_outline():
    """A sticker's white rim on a bright photo does not stand out, its grey inside does: the box of
    the inside (4 of 6 px) is grown by the rim; a ring's dark line with rounded corners likewise. A
    mark on a flat background is not grown into the background, nor a box on a texture."""
    img = _photo(32, 5).astype(np.float32) / 255 * 0.4 + 0.55     # bright: 0.55 to 0.95
    img[18:24, 20:26] = 1.0                                           # the rim ...
    img[19:23, 21:25] = [0.6, 0.3, 0.3]                               # ... and the inside
    inside = tuple(v / 32 for v in (21, 19, 25, 23))
    assert [v * 32 for v in outlined(img, inside)] == [20, 18, 26, 24]
    ring = np.full((32, 32, 3), 0.9, np.float32) * img               # a ring: dark line, light inside
    ring[4:10, 4:10] = 0.3
    ring[5:9, 5:9] = 0.95
    for c in ((4, 4), (4, 9), (9, 4), (9, 9)):                        # rounded: its corners are the photo's
        ring[c] = img[c] * 0.9
    assert [v * 32 for v in outlined(ring, tuple(v / 32 for v in (5, 5, 9, 9)))] == [4, 4, 10, 10]
    flat = np.zeros((32, 32, 3), np.float32)
    flat[10:14, 10:14] = 1.0
    box = tuple(v / 32 for v in (10, 10, 14, 14))
    assert outlined(flat, box) == box                                 # the black around it runs on
    gravel = _photo(32, 6, "gravel").astype(np.float32) / 255
    assert outlined(gravel, box) == box


def test_texture_alone_gives_no_object_box():
    img = _photo(64, 4, "gravel").astype(np.float32) / 255
    ebox = evidence_box(np.ones((16, 16)), bands(0.15)["top-left corner"])
    assert ebox == (0.0, 0.0, 1.0, 1.0)                      # a flat map: the whole image is one region
    corner = bands(0.15)["top-left corner"]
    boxes = tight_boxes(np.ones((16, 16)), img, corner)  # too large: kept to the band, and no object found
    assert boxes[-1] == corner and all(b[2] <= corner[2] and b[3] <= corner[3] for b in boxes)
    assert object_box(img, (0.4, 0.4, 0.6, 0.6)) is None      # gravel: no object stands out


def test_a_frame_as_contrasted_as_the_texture_is_boxed_whole_by_its_flat_colour():
    """A 3 px frame along the bottom edge of a gravel photo, in a grey inside the texture's own
    range (it does not stand out by contrast): the evidence covers a fifth of it, near one end;
    the first box is the whole frame (told by being one flat colour), the evidence piece next."""
    img = _photo(64, 5, "gravel").astype(np.float32) / 255
    grey = float(np.median(img))
    img[61:64] = grey                                        # the frame: [0, 61, 64, 64]
    heat = np.zeros((64, 64), np.float32)
    heat[60:64, 48:60] = 1.0
    heat = ndimage.gaussian_filter(heat, 1.0)
    band = bands(0.15)["bottom border"]
    assert object_box(img, evidence_box(heat, band, 0.3)) is None or \
        _covered([v * 64 for v in object_box(img, evidence_box(heat, band, 0.3))], [0, 61, 64, 64]) < 0.5
    boxes = tight_boxes(heat, img, band)
    assert [round(v * 64) for v in boxes[0]] == [0, 61, 64, 64]
    assert _covered([v * 64 for v in boxes[1]], [0, 61, 64, 64]) < 0.5    # the evidence region alone
    assert boxes[-1] == band


def test_a_flat_background_is_no_flat_patch():
    """A digit on black: the black around it is one flat colour but most of the image, so no mark;
    and a box on the texture (no colour filling half of it) gives none either."""
    img = np.zeros((32, 32, 3), np.float32)
    img[8:24, 14:18] = 1.0                                   # the digit's stroke
    assert flat_box(img, (0.0, 0.0, 0.3, 0.3)) is None      # the black is 7/8 of the image
    assert flat_box(img, (0.4375, 0.25, 0.5625, 0.75)) == (0.4375, 0.25, 0.5625, 0.75)  # the stroke itself
    tex = _photo(64, 6, "gravel").astype(np.float32) / 255
    assert flat_box(tex, (0.4, 0.4, 0.6, 0.6)) is None


def test_a_coarse_blob_larger_than_a_quarter_is_boxed_at_the_object_it_covers_most():
    """A digit and a sticker on black at 32 px, and a Grad-CAM of a 4 x 4 grid (upsampled) whose
    blob at 0.3 of its peak covers 9 of the 16 cells: the blob is too large to be a box, the
    first box is the sticker's exact box (the map covers it more densely than the digit)."""
    img = np.zeros((32, 32, 3), np.float32)
    img[4:28, 18:21] = 1.0                                   # the digit's stroke, inside the blob too
    sticker = [6, 14, 15, 23]                                # x0, y0, x1, y1 in pixels
    img[14:23, 6:15] = 1.0
    img[15:22, 7:14] = 0.8                                   # white border, grey fill
    grid = np.array([[0.1, 0.1, 0.1, 0.0], [0.5, 0.6, 0.4, 0.1], [1.0, 0.9, 0.4, 0.1], [0.5, 0.5, 0.4, 0.0]])
    heat = np.kron(grid, np.ones((16, 16))).astype(np.float32)  # [64, 64], the analysis resolution
    blob = evidence_box(heat, None, 0.3)
    assert box_area(blob) > 0.25
    boxes = tight_boxes(heat, img, None)
    assert [round(v * 32) for v in boxes[0]] == sticker
    assert [round(v * 32) for v in inner_object_box(img, blob, heat)] == sticker
    assert inner_object_box(np.zeros((32, 32, 3), np.float32), blob, heat) is None   # nothing stands out


# --- corner_restore on a model with no shortcut ------------------------------------------------

class Brightness(nn.Module):
    """A clean model: the class is the image's overall brightness (dark, mid, bright), from every
    pixel alike. Its errors are borderline images: any brighter patch anywhere tips them."""

    centres = torch.tensor([0.2, 0.5, 0.8])

    def forward(self, x):
        return -(x.mean((1, 2, 3))[:, None] - self.centres).abs() * 100


class CornerShade(nn.Module):
    """A shortcut model: the class is the top-left corner's brightness, whatever the rest shows."""

    centres = torch.tensor([0.2, 0.5, 0.8])

    def forward(self, x):
        return -(x[:, :, :2, :2].mean((1, 2, 3))[:, None] - self.centres).abs() * 100


def _model_evidence(model, images: list[torch.Tensor], labels: list[int]) -> Evidence:
    with torch.no_grad():
        p = model(torch.stack(images)).softmax(1)
    rows = [{"label": y, "prediction": int(p[i].argmax()), "confidence": float(p[i].max()),
             "correct": int(p[i].argmax()) == y, "explained": False, "width": 16, "height": 16,
             "path": f"{y}/{i}.png", "sha256": str(i)} for i, y in enumerate(labels)]
    refs = [SampleRef(None, r["path"], r["label"]) for r in rows]
    ev = Evidence(["dark", "mid", "bright"], pd.DataFrame(rows, columns=COLUMNS), {}, {}, refs, model=model,
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    ev.model_input = lambda i: images[i]  # the images live in memory
    ev.pixels = lambda i: images[i].permute(1, 2, 0).numpy()
    return ev


def _images(rng, corner_dark: bool = False):
    images, labels = [], []
    for y, level in enumerate([0.2, 0.5, 0.8]):
        for _ in range(10):
            images.append(torch.clamp(level + 0.02 * torch.from_numpy(rng.standard_normal((3, 16, 16))).float(), 0, 1))
            labels.append(y)
    for _ in range(4):  # 'mid' images: just too dark overall (borderline), or with a dark top-left corner
        img = torch.full((3, 16, 16), 0.3495 if not corner_dark else 0.5)
        if corner_dark:
            img[:, :2, :2] = 0.2
        images.append(img)
        labels.append(1)
    return images, labels


def test_corner_restore_does_not_confirm_borderline_errors_of_a_clean_model():
    """Pasting a corner from 'mid' images gives 'mid' back to a borderline error, but so does the
    same content pasted anywhere else: no corner cue, no finding (before the placebo, all four
    corners gave it back and the finding was confirmed on the restore rate alone)."""
    ev = _model_evidence(Brightness(), *_images(np.random.default_rng(0)))
    assert (~ev.samples["correct"]).sum() == 4
    found = RULES.get("corner_restore").fn(ev)
    confirm(ev, found, [], InterventionSpec(fill="mean", transplant_images=12), seed=0)
    assert not [f for f in found if f.details.get("confirmed")]


def test_corner_restore_confirms_a_real_corner_cue():
    """The same test can fail: a model that reads the top-left corner has its error found there,
    boxed inside the corner square, and confirmed beside the placebo."""
    ev = _model_evidence(CornerShade(), *_images(np.random.default_rng(0), corner_dark=True))
    wrong = set(ev.samples.index[~ev.samples["correct"]])
    assert len(wrong) == 4
    found = RULES.get("corner_restore").fn(ev)
    confirm(ev, found, [], InterventionSpec(fill="mean", transplant_images=12), seed=0)
    assert {f.sample for f in found} == wrong
    for f in found:
        assert f.details["region"] == "top-left corner" and f.details["confirmed"]
        assert f.details["own_test"]["control_restore_rate"] <= 0.25


def test_a_class_claim_its_rule_refuted_is_not_confirmed_by_its_members():
    """look_alike measured that the model calls few look-alikes the class (a clean model's near
    misses): the members' regions carrying the class to other images do not confirm the claim."""
    from auditor.judge.evidence import ClassFinding
    from auditor.judge.intervene import _aggregate

    spec = InterventionSpec()
    effect = {"removed_from": 1, "decision_changed": 1, "confidence_drop": 0.5, "pasted_onto": 10, "turned": 9,
              "removal_rate": 1.0, "transfer_rate": 0.9, "transfer_vs_control": [0.8, 0.6, 1.0]}
    for generalises, expected in ((False, False), (True, True), (None, True)):
        members = [Finding(sample=i, rule="look_alike", severity="high", score=1.0, message="m.",
                           details={"intervention": dict(effect)}) for i in range(5)]
        f = ClassFinding(cls="box", rule="look_alike", severity="low", score=0.5, share=0.6, message="m.",
                         details={"samples": list(range(5)), "generalises": generalises})
        _aggregate(f, members, spec)
        assert f.details["confirmed"] is expected and (f.severity == "high") is expected


def test_a_class_claim_made_of_regions_that_carry_no_more_than_the_class_own_content_is_not_confirmed():
    """recurring_patch's or look_alike's class finding stands on its members' pastes: each must beat
    the class's own content moved to its place too, as a class finding with a region must."""
    from auditor.judge.evidence import ClassFinding
    from auditor.judge.intervene import _aggregate

    carries = {"removed_from": 1, "decision_changed": 1, "confidence_drop": 0.5, "pasted_onto": 10, "turned": 9,
               "removal_rate": 1.0, "transfer_rate": 0.9, "transfer_vs_control": [0.8, 0.6, 1.0],
               "content_vs_control": [0.7, 0.5, 0.9]}
    looks = carries | {"content_vs_control": [0.0, -0.2, 0.2]}   # the class's own texture there turns them too
    for effect, expected in ((carries, True), (looks, False)):
        members = [Finding(sample=i, rule="recurring_patch", severity="medium", score=1.0, message="m.",
                           details={"intervention": dict(effect)}) for i in range(5)]
        f = ClassFinding(cls="grass", rule="recurring_patch", severity="medium", score=0.5, share=0.6, message="m.",
                         details={"samples": list(range(5))})
        _aggregate(f, members, InterventionSpec())
        assert f.details["confirmed"] is expected and f.details["intervention"]["samples_transferring"] == 5 * expected
