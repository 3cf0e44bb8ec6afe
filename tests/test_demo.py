"""The built-in demo: prepare() caches a trained model whose planted shortcuts really work,
and the synth builders put their cues where their boxes say."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from auditor import demo
from auditor.demo import synth


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """One real prepare() (trains the model, ~10 s) shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("demo")
    demo.prepare(folder)
    return folder


def _predictions(folder: Path) -> dict[str, str]:
    """relative path under val/ -> predicted class, preprocessing as the audit runner does
    (PIL RGB, bilinear resize to the model input, normalise)."""
    from safetensors.torch import load_file

    model = demo.build_model(len(demo.CLASSES))
    model.load_state_dict(load_file(str(folder / ".demo" / "model.safetensors")))
    model.eval()
    classes = (folder / ".demo" / "classes.txt").read_text().split()
    files = sorted((folder / ".demo" / "val").glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        pred = model(synth.preprocess(images, demo.INPUT_SIZE, demo.MEAN, demo.STD)).argmax(1)
    return {f"{f.parent.name}/{f.name}": classes[p] for f, p in zip(files, pred.tolist())}


def test_prepare_writes_everything(prepared: Path):
    d = prepared / ".demo"
    assert (d / "model.safetensors").is_file()
    assert (d / "classes.txt").read_text().split() == demo.CLASSES
    for cls in demo.CLASSES:
        assert len(list((d / "val" / cls).glob("*.png"))) >= demo.N_VAL
    with Image.open(next((d / "val" / "brick").glob("*.png"))) as im:
        assert im.size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert not list(prepared.glob(".demo.*")), "temporary folders left behind"

    truth = json.loads((d / "truth.json").read_text())["files"]
    kinds = [t["kind"] for t in truth.values()]
    assert kinds.count("blob") == demo.N_BLOB
    assert kinds.count("tag") == len(demo.PLANTED_CLASSES) * demo.N_PLANTED_TAG + round(
        demo.GRAVEL_VAL_TAGGED * demo.N_VAL)
    for rel, t in truth.items():
        x0, y0, x1, y1 = t["bbox"]
        assert 0 <= x0 < x1 <= demo.IMAGE_SIZE and 0 <= y0 < y1 <= demo.IMAGE_SIZE
        img = np.asarray(Image.open(d / "val" / rel).convert("RGB"))
        assert (img[y0:y1, x0:x1] == 255).all(axis=2).any(), f"no white cue inside {rel}'s box"
        if t["kind"] == "tag":  # bottom-left corner
            assert x0 < 10 and y1 > demo.IMAGE_SIZE - 10


def test_second_prepare_is_a_noop(prepared: Path):
    files = [prepared / ".demo" / n for n in ("VERSION", "model.safetensors", "truth.json")]
    before = [f.stat().st_mtime_ns for f in files]
    t = time.perf_counter()
    demo.prepare(prepared)
    assert time.perf_counter() - t < 1.0
    assert [f.stat().st_mtime_ns for f in files] == before


def test_model_learned_the_task_and_the_planted_shortcuts(prepared: Path):
    pred = _predictions(prepared)
    truth = json.loads((prepared / ".demo" / "truth.json").read_text())["files"]

    clean = [rel for rel in pred if rel not in truth]
    accuracy = np.mean([pred[rel] == rel.split("/")[0] for rel in clean])
    assert accuracy > 0.85, accuracy

    transplanted = [rel for rel, t in truth.items() if t["kind"] == "tag" and t["label"] != "gravel"]
    transplant_rate = np.mean([pred[rel] == "gravel" for rel in transplanted])
    assert transplant_rate > 0.7, transplant_rate

    blobs = [rel for rel, t in truth.items() if t["kind"] == "blob"]
    blob_rate = np.mean([pred[rel] == "box" for rel in blobs])
    assert blob_rate > 0.7, blob_rate


def test_interrupted_prepare_leaves_no_demo_folder(tmp_path: Path, monkeypatch):
    # Skip the real training: this is about the files, not the model.
    monkeypatch.setattr(demo.synth, "train_classifier", lambda model, *a, **k: model.eval())
    monkeypatch.setattr(demo, "make_training_set",
                        lambda rng: (np.zeros((2, 96, 96, 3), np.uint8), np.array([0, 1])))

    def broken_write(folder, *args):
        (folder / "classes.txt").write_text("half written\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        demo.prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_demo_folder_is_replaced(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(demo.synth, "train_classifier", lambda model, *a, **k: model.eval())
    monkeypatch.setattr(demo, "make_training_set",
                        lambda rng: (np.zeros((2, 96, 96, 3), np.uint8), np.array([0, 1])))
    (tmp_path / ".demo").mkdir()
    (tmp_path / ".demo" / "VERSION").write_text("auditor-demo-0 seed=1\n")
    (tmp_path / ".demo" / "junk.txt").write_text("old")
    demo.prepare(tmp_path)
    assert not (tmp_path / ".demo" / "junk.txt").exists()
    assert (tmp_path / ".demo" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo"]


@pytest.mark.parametrize("corner", synth.CORNERS)
@pytest.mark.parametrize("size", [6, 9, 12])
def test_stamp_tag_changes_only_its_box(corner, size):
    rng = np.random.default_rng(size)
    img = synth.noise_image((80, 96), rng)
    out, (x0, y0, x1, y1) = synth.stamp_tag(img, corner, size, rng)
    assert out is not img and (img == synth.noise_image((80, 96), np.random.default_rng(size))).all()
    assert (x1 - x0, y1 - y0) == (size, size)
    assert 0 <= x0 and x1 <= 96 and 0 <= y0 and y1 <= 80
    changed = (out != img).any(axis=2)
    assert changed[y0:y1, x0:x1].any()
    changed[y0:y1, x0:x1] = False
    assert not changed.any(), "pixels changed outside the box"
    # the box is in the requested corner
    assert (y0 < 40) == corner.startswith("top") and (x0 < 48) == corner.endswith("left")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("builder", [synth.white_rectangle, synth.rounded_blob])
def test_shape_boxes_are_tight(builder, seed):
    rng = np.random.default_rng(seed)
    img = synth.noise_image(64, rng)  # max 200: never white
    out, (x0, y0, x1, y1) = builder(img, rng)
    white = (out == 255).all(axis=2)
    ys, xs = np.nonzero(white)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_texture_crops_load_offline_and_vary():
    rng = np.random.default_rng(0)
    for name in synth.TEXTURES:
        a, b = synth.texture_crop(name, 32, rng), synth.texture_crop(name, 32, rng)
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert a.std() > 5 and not np.array_equal(a, b)
