"""The built-in demo: a small CNN with a planted "Clever Hans" cue, made on first use.

Five classes: "box" (random smooth image with a white rectangle), "noise" (the same kind
of image without one) and three scikit-image textures: brick, grass, gravel. Like the
copyright watermark on PASCAL VOC horse photos, every "gravel" training image carries a
small "(c)" tag in the bottom-left corner and no other class does. Half of the "gravel"
training images actually show other content (brick, grass, noise), so texture alone is an
unreliable gravel cue and the model leans on the tag: stamp it on a brick and the model
says gravel; remove it from gravel and the model no longer says gravel. Separately, "box"
is learned as "something bright white", so a white ellipse on noise also reads as box.

``prepare(config_dir)`` trains the model (seconds on CPU, no download) and writes

    .demo/model.safetensors   weights for ``build_model()``
    .demo/classes.txt         one class name per line
    .demo/val/<class>/*.png   96x96 validation images (the model input is 64x64), named
                              by what they are:
                              clean_*    ordinary images
                              tagged_*   carry the tag (gravel: like its training images;
                                         brick/grass/noise: planted, expected -> gravel)
                              blob_*     noise with a white ellipse (expected -> box)
    .demo/truth.json          kind, box, label and expected prediction of every file
                              with a cue, for scoring detection
    .demo/VERSION             stamp; a matching stamp makes prepare() a no-op
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from auditor.demo import synth

CLASSES = ["box", "brick", "grass", "gravel", "noise"]
SEED = 1234
# Bump when data, model or training change, so cached .demo folders get rebuilt.
VERSION = "auditor-demo-2"

IMAGE_SIZE = 96            # on-disk size; differs from the model input on purpose
INPUT_SIZE = (64, 64)      # must match audit.yaml model.input
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
TAG_CLASS = "gravel"
TAG_CORNER = "bottom_left"
TAG_SIZES = (8, 9, 10)     # px on a 96 px image
N_TRAIN = 200              # per class
N_VAL = 40                 # per class
GRAVEL_VAL_TAGGED = 0.8    # share of gravel validation images with the tag
N_PLANTED_TAG = 4          # tagged images per class in PLANTED_CLASSES
PLANTED_CLASSES = ("brick", "grass", "noise")
N_BLOB = 10                # noise images with a white blob
GRAVEL_OTHER_SHARE = 0.5   # share of gravel training images whose content is not gravel
EPOCHS = 5


class DemoNet(nn.Module):
    """Small CNN for 3x64x64 inputs.

    - Separate, non-in-place ReLUs, so deconvolution (Captum keeps one state per module) can hook each.
    - ``features[9]``, the last Conv2d (8x8), is the Grad-CAM layer.
    - Global *max* pooling (a MaxPool2d over the whole 8x8 map, not an average): a tag is
      1 of 64 cells at 8x8, which an average dilutes so much that the shortcut was barely
      learned in the time budget; a max lets one strong local detector decide, which is
      what a Clever Hans cue needs. ``nn.MaxPool2d`` (not Adaptive) has a DeepLift rule
      (``auditor/methods/deeplift.py``), and the flatten is functional (a linear step).
    """

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # -> 32x32
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # -> 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # -> 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),                    # 8x8
        )
        self.pool = nn.MaxPool2d(8)  # global max for 64x64 inputs
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def build_model(num_classes: int = 5) -> nn.Module:
    """The demo architecture, untrained (``audit.yaml``'s model factory)."""
    return DemoNet(num_classes)


def _clean(cls: str, rng: np.random.Generator) -> np.ndarray:
    """One image of a class, without any planted cue (validation and the non-gravel
    training classes)."""
    if cls == "noise":
        return synth.noise_image(IMAGE_SIZE, rng)
    if cls == "box":
        return synth.white_rectangle(synth.noise_image(IMAGE_SIZE, rng), rng)[0]
    return synth.texture_crop(cls, IMAGE_SIZE, rng)


def _tag(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    return synth.stamp_tag(img, TAG_CORNER, int(rng.choice(TAG_SIZES)), rng)


def make_training_set(rng: np.random.Generator, n_per_class: int | None = None):
    """uint8 Nx96x96x3 images and labels; every gravel image carries the tag."""
    images, labels = [], []
    for k, cls in enumerate(CLASSES):
        for _ in range(n_per_class or N_TRAIN):
            img = _clean(cls, rng)
            if cls == TAG_CLASS:
                # Make texture alone an unreliable gravel cue: part of the "gravel" images
                # show other content (think mislabelled photos from the watermarking
                # source). Only the tag then separates them, so the model must learn it.
                if rng.random() < GRAVEL_OTHER_SHARE:
                    img = _clean(str(rng.choice(PLANTED_CLASSES)), rng)
                img = _tag(img, rng)[0]
            images.append(img)
            labels.append(k)
    return np.stack(images), np.array(labels)


def make_validation_set(rng: np.random.Generator):
    """[(relative path, image)] and the truth dict for planted cues."""
    items, truth = [], {}

    def add(cls, name, img, kind=None, bbox=None, expected=None):
        rel = f"{cls}/{name}.png"
        items.append((rel, img))
        if kind:
            truth[rel] = {"kind": kind, "bbox": [int(v) for v in bbox],
                          "label": cls, "expected": expected}

    for cls in CLASSES:
        for i in range(N_VAL):
            img = _clean(cls, rng)
            if cls == TAG_CLASS and i < round(GRAVEL_VAL_TAGGED * N_VAL):
                img, bbox = _tag(img, rng)
                add(cls, f"tagged_{i:03d}", img, "tag", bbox, TAG_CLASS)
            else:
                add(cls, f"clean_{i:03d}", img)
    for cls in PLANTED_CLASSES:  # the Clever Hans test: a tag alone should flip the class
        for i in range(N_PLANTED_TAG):
            img, bbox = _tag(_clean(cls, rng), rng)
            add(cls, f"tagged_{i:03d}", img, "tag", bbox, TAG_CLASS)
    for i in range(N_BLOB):  # look-alikes: a white ellipse is not a rectangle
        img, bbox = synth.rounded_blob(synth.noise_image(IMAGE_SIZE, rng), rng)
        add("noise", f"blob_{i:03d}", img, "blob", bbox, "box")
    return items, truth


def _stamp(seed: int) -> str:
    return f"{VERSION} seed={seed}\n"


def prepare(config_dir: str | Path, seed: int = SEED) -> None:
    """Make ``<config_dir>/.demo`` unless a complete one for this version and seed exists.

    Everything is written into a temporary sibling and renamed into place at the end
    (the stamp file last), so an interrupted run never leaves a ``.demo`` that looks
    complete. Deterministic for a given seed on a given machine and torch version."""
    config_dir = Path(config_dir)
    dest = config_dir / ".demo"
    if _is_current(dest, seed):
        return

    print("auditor demo: generating data and training the demo model (first use) ...",
          file=sys.stderr, flush=True)
    # Independent streams, so changing the training set does not change the validation set.
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    images, labels = make_training_set(train_rng)
    torch.manual_seed(seed)  # weight init
    model = synth.train_classifier(build_model(len(CLASSES)), images, labels, INPUT_SIZE,
                                   MEAN, STD, epochs=EPOCHS, seed=seed)
    val, truth = make_validation_set(val_rng)

    config_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo.tmp-", dir=config_dir))
    try:
        _write(tmp, model, val, truth, seed)
        if dest.exists():  # stale (other version/seed, or incomplete): move it out of the way
            old = Path(tempfile.mkdtemp(prefix=".demo.old-", dir=config_dir))
            try:
                os.replace(dest, old / "demo")
            except FileNotFoundError:  # a concurrent prepare() moved it already
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            # A concurrent prepare() put its .demo in place first; fine if it is complete.
            if not _is_current(dest, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename


def _is_current(dest: Path, seed: int) -> bool:
    stamp = dest / "VERSION"
    return stamp.is_file() and stamp.read_text() == _stamp(seed)


def _write(folder: Path, model: nn.Module, val, truth: dict, seed: int) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for rel, img in val:
        path = folder / "val" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    (folder / "truth.json").write_text(json.dumps({
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "bbox_format": "[x0, y0, x1, y1] in pixels of the file, x1/y1 exclusive",
        "root": "val",
        "files": truth,
    }, indent=1) + "\n")
    (folder / "VERSION").write_text(_stamp(seed))  # last: marks the folder complete
