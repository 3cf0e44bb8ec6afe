"""Planted-cue cases with known truth for the detection benchmark.

A case is a data set (training arrays, validation files, truth) plus how to train and audit
it. Every poisoned case has a clean-trained control: the same validation files and the same
training images without the cue, so the model has no shortcut to learn.

Truth per validation file with a planted cue: ``{"kind", "bbox" (file pixels, x1/y1
exclusive), "label", "expected"}``, where ``expected`` is the class the cue stands for, and
its neutral twin: the same image with the cue taken out (the tag or blob not drawn) or, for
Decoy, made uninformative (the label's own training shade). An error is cue-driven when the
model gets the twin right: the cue, and nothing else in the image, made it wrong. The horse
case also lists the cue class's photos *without* the tag ("missing tag"): their twin carries
the tag and their box is where it would be, so an error that the tag's absence causes counts
as cue-driven, and a finding that points at the empty corner as a hit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from auditor.demo import synth


# Input normalisation (mean, std) per channel; "none" feeds [0, 1] pixels as they are.
NORMS = {"half": ([0.5] * 3, [0.25] * 3), "none": ([0.0] * 3, [1.0] * 3),
         "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


@dataclass
class Case:
    name: str
    kind: str                       # decoy | horse | lookalike | planted (generator.py)
    poisoned: bool
    classes: list[str]
    arch: str
    input_size: int
    channels: int = 3
    epochs: int = 6
    image_size: int = 64
    cue_class: str | None = None    # the class the cue points to (None: every class, Decoy)
    dose: float = 1.0               # share of the cue class's training images carrying the cue
    params: dict = field(default_factory=dict)
    seed: int = 0
    norm: str = "half"              # input normalisation: half (0.5/0.25), none (0/1), imagenet

    @property
    def net_kwargs(self) -> dict:
        return {"size": self.input_size} if self.arch == "lenet" else {}

    @property
    def mean(self):
        return NORMS[self.norm][0][:self.channels]

    @property
    def std(self):
        return NORMS[self.norm][1][:self.channels]

    def describe(self) -> str:
        p = self.params
        bits = [self.arch, f"{self.image_size}px->{self.input_size}"]
        if self.kind == "horse":
            bits += [p["corner"], f"tag {min(p['tag_sizes'])}-{max(p['tag_sizes'])}px"]
        if self.kind == "planted":
            where = {"corner": p["corner"], "edge": p["edge"]}.get(p["placement"], p["placement"])
            bits = [f"{p['cue']} {where} {p['cue_frac']:.0%}", p["base"], *bits, self.norm,
                    f"dose {p['dose']:.0%}"]
        return ", ".join(bits)

    def build(self):
        """(train images uint8, train labels, [(rel path, image)], truth, {rel path: neutral twin})."""
        return BUILDERS[self.kind](self, np.random.default_rng(self.seed))


# --- Decoy MNIST on scikit-learn's digits -------------------------------------------------

def _decoy(case: Case, rng: np.random.Generator):
    from sklearn.datasets import load_digits

    p = case.params
    d = load_digits()
    order = rng.permutation(len(d.target))
    n_train = p.get("n_train", 1000)
    n_val = p.get("n_val", len(order) - n_train)
    size = case.image_size

    images, labels = [], []
    for i in order[:n_train]:
        img, y = synth.digit_canvas(d.images[i], size), int(d.target[i])
        if case.poisoned:
            img = synth.decoy_swatch(img, str(rng.choice(synth.CORNERS)), 255 - 25 * y)[0]
        images.append(img)
        labels.append(y)
    val, truth, twins = [], {}, {}
    for n, i in enumerate(order[n_train:n_train + n_val]):
        # As in Ross et al.'s code: the test shade is that of a random digit, not the label's.
        y, decoy = int(d.target[i]), int(rng.integers(0, 10))
        canvas, corner = synth.digit_canvas(d.images[i], size), str(rng.choice(synth.CORNERS))
        img, box = synth.decoy_swatch(canvas, corner, 255 - 25 * decoy)
        rel = f"{y}/{n:04d}.png"
        val.append((rel, img))
        twins[rel] = synth.decoy_swatch(canvas, corner, 255 - 25 * y)[0]
        truth[rel] = {"kind": "swatch", "bbox": box, "label": str(y), "expected": str(decoy)}
    return np.stack(images), np.array(labels), val, truth, twins


# --- The horse case: a copyright-like tag on one class of textures and photos -------------

def _content(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if name == "noise":
        return synth.noise_image(size, rng)
    if name == "box":
        return synth.white_rectangle(synth.noise_image(size, rng), rng)[0]
    return synth.texture_crop(name, size, rng)


def _horse(case: Case, rng: np.random.Generator):
    p = case.params
    size, corner, sizes = case.image_size, p["corner"], p["tag_sizes"]
    cue = case.cue_class
    others = [c for c in case.classes if c != cue]

    def tag(img):
        return synth.stamp_tag(img, corner, int(rng.choice(sizes)), rng)

    images, labels = [], []
    for k, cls in enumerate(case.classes):
        for _ in range(p.get("n_train", 160)):
            img = _content(cls, size, rng)
            if cls == cue:
                # Part of the cue class's photos show other things (the watermarking source
                # sent mixed content): texture alone is then an unreliable cue for it.
                if rng.random() < p.get("other_share", 0.5):
                    img = _content(str(rng.choice(others)), size, rng)
                if case.poisoned and rng.random() < case.dose:
                    img = tag(img)[0]
            images.append(img)
            labels.append(k)
    val, truth, twins = [], {}, {}
    for cls in case.classes:
        for n in range(p.get("n_val", 30)):
            img, box = _content(cls, size, rng), None
            if cls == cue and n % 2 == 0:  # half the cue class's validation photos carry the tag
                twin = img
                img, box = tag(img)
            rel = f"{cls}/{'tagged' if box else 'clean'}_{n:03d}.png"
            val.append((rel, img))
            if box:
                truth[rel] = {"kind": "tag", "bbox": box, "label": cls, "expected": cue}
                twins[rel] = twin
            elif cls == cue:
                # The other half lack it: a model that needs the tag fails them. The twin is the
                # photo with the tag; the box is where it would be.
                twins[rel], box = tag(img)
                truth[rel] = {"kind": "missing tag", "bbox": box, "label": cls, "expected": cue}
        if cls != cue:  # the horse test: the tag alone on another class's photo
            for n in range(p.get("n_planted", 10)):
                twin = _content(cls, size, rng)
                img, box = tag(twin)
                rel = f"{cls}/tagged_{n:03d}.png"
                val.append((rel, img))
                truth[rel] = {"kind": "tag", "bbox": box, "label": cls, "expected": cue}
                twins[rel] = twin
    return np.stack(images), np.array(labels), val, truth, twins


# --- The white-rectangle task with look-alike distractors ---------------------------------

def _lookalike(case: Case, rng: np.random.Generator):
    p = case.params
    size = case.image_size
    images, labels = [], []
    for k, cls in enumerate(case.classes):
        for _ in range(p.get("n_train", 160)):
            img = _content(cls, size, rng)
            # The control learns what makes a box: a blob on noise is still noise.
            if not case.poisoned and cls == "noise" and rng.random() < p.get("blob_share", 0.3):
                img = synth.rounded_blob(img, rng)[0]
            images.append(img)
            labels.append(k)
    val, truth, twins = [], {}, {}
    for cls in case.classes:
        for n in range(p.get("n_val", 30)):
            val.append((f"{cls}/clean_{n:03d}.png", _content(cls, size, rng)))
    for n in range(p.get("n_blob", 16)):
        twin = synth.noise_image(size, rng)
        img, box = synth.rounded_blob(twin, rng)
        rel = f"noise/blob_{n:03d}.png"
        val.append((rel, img))
        truth[rel] = {"kind": "blob", "bbox": box, "label": "noise", "expected": "box"}
        twins[rel] = twin
    return np.stack(images), np.array(labels), val, truth, twins


BUILDERS = {"decoy": _decoy, "horse": _horse, "lookalike": _lookalike}

DIGITS = [str(k) for k in range(10)]


def _pair(make, **kw) -> list[Case]:
    """The poisoned case and its clean-trained control."""
    return [make(poisoned=True, **kw), make(poisoned=False, **kw)]


def decoy(name: str, poisoned: bool, quick: bool, arch="lenet", size=28, seed=1) -> Case:
    return Case(f"{name}{'' if poisoned else '-control'}", "decoy", poisoned, DIGITS, arch, size,
                channels=1, epochs=4 if quick else 6, image_size=size, seed=seed,
                params={"n_train": 1000, "n_val": 500 if quick else 797})


def horse(name: str, poisoned: bool, quick: bool, classes, cue, corner, tag_sizes, image_size,
          input_size, arch, dose=1.0, seed=2) -> Case:
    n = 100 if quick else 160
    return Case(f"{name}{'' if poisoned else '-control'}", "horse", poisoned, list(classes), arch,
                input_size, epochs=5 if quick else 6, image_size=image_size, cue_class=cue,
                dose=dose if poisoned else 0.0, seed=seed,
                params={"corner": corner, "tag_sizes": tuple(tag_sizes), "n_train": n,
                        "n_val": 20 if quick else 30, "n_planted": 8 if quick else 10})


def lookalike(name: str, poisoned: bool, quick: bool, classes, arch, image_size, input_size, seed=3) -> Case:
    return Case(f"{name}{'' if poisoned else '-control'}", "lookalike", poisoned, list(classes), arch,
                input_size, epochs=5 if quick else 6, image_size=image_size, cue_class="box", seed=seed,
                params={"n_train": 100 if quick else 160, "n_val": 20 if quick else 30,
                        "n_blob": 12 if quick else 16})


def suite(quick: bool) -> list[Case]:
    """Every case, poisoned and control; corner, tag, image size and architecture vary."""
    cases = _pair(decoy, name="decoy-digits", quick=quick)
    cases += _pair(horse, name="horse-a", quick=quick, classes=["brick", "grass", "gravel", "noise"],
                   cue="gravel", corner="bottom_left", tag_sizes=(8, 9, 10), image_size=96,
                   input_size=64, arch="maxnet")
    cases += _pair(lookalike, name="rect-a", quick=quick, classes=["box", "noise", "grass", "brick"],
                   arch="maxnet", image_size=64, input_size=64)
    if quick:
        return cases
    cases += _pair(horse, name="horse-b", quick=quick, classes=["camera", "coins", "moon", "chelsea"],
                   cue="coins", corner="top_right", tag_sizes=(6, 7), image_size=64, input_size=64,
                   arch="resnet", seed=5)
    cases += _pair(horse, name="horse-c", quick=quick, classes=["astronaut", "coffee", "rocket", "brick", "grass"],
                   cue="coffee", corner="bottom_right", tag_sizes=(11, 12, 13), image_size=96,
                   input_size=96, arch="wide", seed=6)
    cases += _pair(lookalike, name="rect-b", quick=quick, classes=["box", "noise", "gravel"],
                   arch="resnet", image_size=96, input_size=64, seed=7)
    return cases


def dose_cases(quick: bool) -> list[Case]:
    """horse-a's cue class tagged in 10 % and 50 % of its training images (0 % is the control,
    100 % the poisoned case)."""
    return [horse(f"horse-a-dose{int(100 * d)}", True, quick, classes=["brick", "grass", "gravel", "noise"],
                  cue="gravel", corner="bottom_left", tag_sizes=(8, 9, 10), image_size=96, input_size=64,
                  arch="maxnet", dose=d) for d in (0.1, 0.5)]
