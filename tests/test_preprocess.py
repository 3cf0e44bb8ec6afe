"""Preprocessing as the model saw it: squash, or the shorter side resized and the centre cropped
(``model.input.resize`` / ``crop``), and boxes, masks and heatmaps mapped through the crop."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from auditor.inputs.config import ConfigError, InputSpec, load_config
from auditor.inputs.data import SampleRef, input_view, to_input_mask, to_model_input
from auditor.inputs.huggingface import input_spec
from auditor.judge.evidence import Evidence
from auditor.outputs import overlay as ov

SQUASH = InputSpec(size=(24, 32))
SHORTER = InputSpec(size=(24, 24), resize="shorter_side", resize_to=28, crop="center")
SQUASH_CROP = InputSpec(size=(24, 24), resize_to=(30, 28), crop="center")   # BEiT: squash, then crop
SPECS = {"squash": SQUASH, "shorter_side": SHORTER, "squash+crop": SQUASH_CROP}
FILES = [(61, 40), (40, 61), (97, 53), (50, 50)]   # (w, h): landscape, portrait, odd margins, square


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """torchvision's Resize then CenterCrop, written out with PIL and numpy: [H, W, 3] in [0, 1]."""
    w, h = img.size
    ch, cw = spec.size
    resample = Image.Resampling[spec.interpolation.upper()]
    if spec.resize == "shorter_side":   # Resize(int): the short side to size, the long one truncated
        s = spec.resize_to
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    else:
        size = (spec.resize_to or spec.size)[::-1]
    arr = np.asarray(img.resize(size, resample), np.float32) / 255.0
    top, left = int(round((size[1] - ch) / 2.0)), int(round((size[0] - cw) / 2.0))   # CenterCrop's anchor
    return arr[top:top + ch, left:left + cw]


# ------------------------------------------------------------------------------ the geometry

def test_torchvision_numbers_for_a_500_by_375_file():
    """Resize(256) on 500×375 gives 341×256 (torchvision's docs); CenterCrop(224) rounds 58.5 to 58."""
    v = input_view((500, 375), InputSpec(size=(224, 224), resize="shorter_side", resize_to=256, crop="center"))
    assert v.resized == (341, 256) and v.crop == (58, 16, 282, 240)
    assert v.box == pytest.approx((58 * 500 / 341, 16 * 375 / 256, 282 * 500 / 341, 240 * 375 / 256))
    assert input_view((500, 375), InputSpec(size=(224, 224))).box == (0, 0, 500, 375)   # squash: all of it


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("file", FILES)
def test_to_model_input_matches_a_torchvision_style_reference(name, file):
    img = photo(*file)
    x = to_model_input(img, SPECS[name])
    assert tuple(x.shape) == (3, *SPECS[name].size)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), reference(img, SPECS[name]))


def test_bicubic_and_the_default_shorter_side():
    spec = InputSpec(size=(24, 24), resize="shorter_side", crop="center", interpolation="bicubic")
    img = photo(61, 40, seed=3)
    np.testing.assert_array_equal(to_model_input(img, spec).permute(1, 2, 0).numpy(),
                                  reference(img, spec.model_copy(update={"resize_to": 24})))


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("file", FILES)
def test_a_box_in_the_file_maps_into_the_model_input_and_back(name, file):
    spec, (w, h) = SPECS[name], file
    v = input_view(file, spec)
    x0, y0, x1, y1 = v.box
    box = (x0 + 0.2 * (x1 - x0), y0 + 0.3 * (y1 - y0), x0 + 0.7 * (x1 - x0), y0 + 0.9 * (y1 - y0))
    frac = v.to_input(box)
    assert frac == pytest.approx((0.2, 0.3, 0.7, 0.9))
    assert v.to_file(frac) == pytest.approx(box, abs=1e-9)
    assert v.to_file_frac(frac) == pytest.approx((box[0] / w, box[1] / h, box[2] / w, box[3] / h))
    ev = Evidence(["a"], pd.DataFrame([{"width": w, "height": h}]), {}, {}, [SampleRef(None, "a/0.png", 0)],
                  input_spec=spec)
    assert ev.to_file_bbox(0, frac) == pytest.approx(list(box), abs=0.05)   # rounded to 0.1 px
    outside = (x0 - 30.0, y0 - 30.0, x0 - 1.0, y0 - 1.0)
    if x0 > 0 and y0 > 0:   # a box in the cropped-off margin: the model saw none of it
        f = v.to_input(outside)
        assert f[0] == f[2] == 0.0 and f[1] == f[3] == 0.0


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("file", FILES)
def test_a_pixel_marked_in_the_file_lands_where_the_model_input_shows_it(name, file):
    """A bright 3×3 block: the model input's brightness centroid is where the mapping puts the
    block (within a model-input pixel); the mask mapping marks exactly the pixels a nearest-
    neighbour model input shows bright."""
    spec, (w, h) = SPECS[name], file
    v = input_view(file, spec)
    bx, by = int(v.box[0] + 0.6 * (v.box[2] - v.box[0])), int(v.box[1] + 0.35 * (v.box[3] - v.box[1]))
    arr = np.zeros((h, w, 3), np.uint8)
    arr[by:by + 3, bx:bx + 3] = 255
    x = to_model_input(Image.fromarray(arr), spec)[0].numpy()
    H, W = spec.size
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    cx, cy = (xs * x).sum() / x.sum() / W, (ys * x).sum() / x.sum() / H
    fx0, fy0, fx1, fy1 = v.to_input((bx, by, bx + 3, by + 3))
    assert abs(cx - (fx0 + fx1) / 2) * W < 1 and abs(cy - (fy0 + fy1) / 2) * H < 1
    near = spec.model_copy(update={"interpolation": "nearest"})
    shown = to_model_input(Image.fromarray(arr), near)[0].numpy() > 0.5
    assert shown.any()
    np.testing.assert_array_equal(to_input_mask(Image.fromarray(arr[..., 0]), v, spec.size), shown)


def test_what_the_crop_cuts_off_the_model_never_sees():
    spec = SHORTER
    arr = np.zeros((40, 61, 3), np.uint8)
    arr[:, :4] = 255   # a stripe at the left edge: outside the centre crop of a 61×40 file
    v = input_view((61, 40), spec)
    assert v.box[0] > 4
    assert to_model_input(Image.fromarray(arr), spec).max() == 0
    assert not to_input_mask(Image.fromarray(arr[..., 0]), v, (12, 12)).any()


# ------------------------------------------------------------------------------ the overlay

def test_the_heat_is_drawn_only_over_what_the_model_saw():
    base = Image.fromarray(np.full((40, 60, 3), 200, np.uint8))
    seen = input_view((61, 40), SHORTER).frac
    out = np.asarray(ov.overlay(base, np.ones((8, 8), np.float32), seen=seen)).astype(int)
    l, t, r, b = ov.seen_box(seen, base.size)
    assert (l, t, r, b) == tuple(round(f * s) for f, s in zip(seen, (60, 40, 60, 40))) and t > 0 and l > t
    inside = np.zeros((40, 60), bool)
    inside[t:b, l:r] = True
    assert (out[~inside] == int(200 * ov.UNSEEN)).all()   # dimmed, no colour
    assert (np.abs(out[inside] - int(200 * ov.DARKEN)).sum(-1) > 30).all()   # tinted strongly: the heat's peak
    full = np.asarray(ov.overlay(base, np.ones((8, 8), np.float32))).astype(int)
    lv = ov.level(np.ones((8, 8), np.float32), base.size)
    expected = Image.composite(ov.colorize(lv), base.point(ov._DARK), lv.point(ov._ALPHA))
    np.testing.assert_array_equal(full, np.asarray(expected))   # the whole file seen: as before


def test_the_mean_image_and_the_inset_follow_the_crop():
    arr = np.zeros((40, 61, 3), np.uint8)
    arr[:, :10] = 255   # bright only in the part the crop cuts off
    img, seen = Image.fromarray(arr), input_view((61, 40), SHORTER).frac
    assert np.asarray(ov.mean_image([img], (12, 12), seen=[seen])).max() == 0
    assert np.asarray(ov.mean_image([img], (12, 12))).max() > 0
    white = lambda pic: (np.asarray(pic) == 255).all(-1).any()  # noqa: E731  (the box is cyan, never white)
    assert white(ov.inset(img, (0.0, 0.0, 0.1, 0.5))) and not white(ov.inset(img, (0.0, 0.0, 0.1, 0.5), seen=seen))


# ------------------------------------------------------------------------------ the config

def test_the_config_names_the_key_of_a_preprocessing_it_cannot_follow(tmp_path):
    def error(**given) -> str:
        cfg = {"model": {"factory": "net.py:make", "classes": ["a", "b"],
                         "input": {"size": [24, 24], **given}}, "data": {"root": "data"}}
        (tmp_path / "audit.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / "audit.yaml")
        assert "\n" not in str(e.value) and "'model.input" in str(e.value)
        return str(e.value)
    assert "needs crop: center" in error(resize="shorter_side")
    assert "below size's larger side" in error(resize="shorter_side", resize_to=20, crop="center")
    assert "give crop: center" in error(resize_to=[32, 32])
    assert "smaller than size" in error(resize_to=[16, 32], crop="center")
    assert "'model.input.resize'" in error(resize="shortest")
    assert "'model.input.crop'" in error(crop="random")


# ------------------------------------------------------------------------------ Hugging Face processors

CONVNEXT = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875,
            "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
CLIP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "resample": 3, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
BEIT = {"image_processor_type": "BeitImageProcessor", "size": {"height": 256, "width": 256},
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "resample": 2}
VIT = {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}, "resample": 2}


def hf_folder(tmp_path, proc: dict):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc))
    (tmp_path / "config.json").write_text(json.dumps({"num_channels": 3}))
    return tmp_path


@pytest.mark.parametrize("proc, want", [
    (CONVNEXT, {"size": (224, 224), "resize": "shorter_side", "resize_to": 256, "crop": "center",
                "interpolation": "bicubic"}),
    (CONVNEXT | {"size": {"shortest_edge": 384}}, {"size": (384, 384), "resize": "squash", "crop": "none"}),
    (CLIP, {"size": (224, 224), "resize": "shorter_side", "resize_to": 224, "crop": "center"}),
    (BEIT, {"size": (224, 224), "resize": "squash", "resize_to": (256, 256), "crop": "center",
            "interpolation": "bilinear"}),
    (VIT, {"size": (224, 224), "resize": "squash", "resize_to": None, "crop": "none"}),
    ({"image_processor_type": "LevitImageProcessor", "size": {"shortest_edge": 224}, "do_center_crop": True,
      "crop_size": {"height": 224, "width": 224}}, {"resize": "shorter_side", "resize_to": 256}),
    ({"image_processor_type": "PoolFormerImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.9,
      "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
     {"resize": "shorter_side", "resize_to": 248}),
], ids=["convnext", "convnext-384", "clip", "beit", "vit", "levit", "poolformer"])
def test_a_preprocessor_config_yields_the_spec(tmp_path, proc, want):
    spec = input_spec(hf_folder(tmp_path, proc))
    assert {k: getattr(spec, k) for k in want} == want


@pytest.mark.parametrize("proc, why", [
    ({"size": {"shortest_edge": 224}}, "no one size"),
    ({"size": {"shortest_edge": 224, "longest_edge": 512}}, "bounds the longer side"),
    (VIT | {"do_resize": False}, "do_resize is false"),
])
def test_a_preprocessor_config_it_cannot_follow_is_one_line(tmp_path, proc, why):
    with pytest.raises(ConfigError, match=why) as e:
        input_spec(hf_folder(tmp_path, proc))
    assert "give model.input" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow   # importing transformers: ~20 s on a shared machine
@pytest.mark.parametrize("proc", [CONVNEXT, CLIP], ids=["convnext", "clip"])
def test_to_model_input_matches_the_hugging_face_processor(tmp_path, proc):
    """transformers' own (PIL) processor on a non-square file; the crop's margins are even, where
    its floor and torchvision's rounding of the centre crop agree."""
    import transformers
    cls = getattr(transformers, proc["image_processor_type"] + "Pil")
    img = photo(300, 200, seed=1)
    want = cls(**{k: v for k, v in proc.items() if k != "image_processor_type"})(img, return_tensors="np")
    got = to_model_input(img, input_spec(hf_folder(tmp_path, proc))).numpy()
    assert got.shape == want["pixel_values"][0].shape == (3, 224, 224)
    np.testing.assert_allclose(got, want["pixel_values"][0], atol=1e-4)


# ------------------------------------------------------------------------------ end to end

@pytest.mark.slow   # a whole audit (~30 s on a shared machine)
def test_a_cropped_audit_boxes_only_what_the_model_saw(project):
    """Non-square files (28×24) cropped to 16×16 from a shorter side of 18: every finding's box,
    in the file's pixels, lies inside the part of the file the model input shows."""
    from typer.testing import CliRunner

    from auditor.cli import app
    from conftest import report_folder
    rows = ["path,label,bbox"] + [f"{p.parent.name}/{p.name},{p.parent.name},2 3 12 20"
                                  for p in sorted((project.folder / "data").rglob("*.png"))]
    (project.folder / "data" / "boxes.csv").write_text("\n".join(rows) + "\n")
    given = {"size": [16, 16], "mean": [0.5], "std": [0.25], "resize": "shorter_side", "resize_to": 18,
             "crop": "center"}
    project.cfg["model"]["input"] = given
    project.cfg["data"] = {"manifest": "data/boxes.csv"}
    project.cfg["explain"]["methods"] = ["saliency", "gradcam"]
    project.write()
    r = CliRunner().invoke(app, ["run", str(project.path), "--quiet"])
    assert r.exit_code in (0, 1), r.output
    doc = json.loads((report_folder(project, r.output) / "findings.json").read_text())
    assert doc["run"]["config"]["model"]["input"]["resize"] == "shorter_side"
    x0, y0, x1, y1 = input_view((28, 24), InputSpec(**given)).box
    boxes = [f["bbox"] for s in doc["samples"] for f in s.get("findings", []) if f.get("bbox")]
    assert boxes and (x0, y0) != (0, 0)
    for b in boxes:
        assert x0 - 0.05 <= b[0] < b[2] <= x1 + 0.05 and y0 - 0.05 <= b[1] < b[3] <= y1 + 0.05, (b, (x0, y0, x1, y1))
