"""Rules: the contract every registered rule keeps, small planted-cue cases (the detection
benchmark in miniature: the rule flags the cue, the intervention confirms it, the clean-trained
control stays quiet), off_object on a manifest, and the trust gate."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import auditor.explain.methods  # noqa: F401  (registers the methods)
import auditor.rules  # noqa: F401  (registers the rules)
from auditor.demo import synth
from auditor.audit import run_audit
from auditor.inputs.config import SEVERITIES, InputSpec, TrustSpec, load_config
from auditor.inputs.data import SampleRef, to_model_input
from auditor.judge.evidence import ClassFinding, Evidence, Finding, severity_rank
from auditor.registry import METHODS, RULES
from auditor.judge.trust import trust_gate

NET_PY = textwrap.dedent('''
    from torch import nn

    def make(num_classes=3):
        return nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
''')
SIZE = 48
MEAN, STD = [0.5] * 3, [0.25] * 3


def _model(n_classes: int):
    ns: dict = {}
    exec(NET_PY, ns)
    torch.manual_seed(0)
    return ns["make"](n_classes)


def write_project(folder: Path, classes, images, labels, val, epochs: int = 6, **config) -> Path:
    """Train the test CNN on (images, labels), write net.py, weights, val/<class>/*.png and
    audit.yaml into ``folder``; return the config path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = synth.train_classifier(_model(len(classes)), images, labels, (SIZE, SIZE), MEAN, STD,
                                   epochs=epochs, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    (folder / "net.py").write_text(NET_PY)
    for rel, img in val:
        (folder / "val" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / "val" / rel)
    cfg = {"model": {"factory": "net.py:make", "kwargs": {"num_classes": len(classes)},
                     "weights": "weights.safetensors", "classes": list(classes),
                     "input": {"size": [SIZE, SIZE], "channels": 3, "mean": MEAN, "std": STD}},
           "data": {"root": "val"},
           "explain": {"per_class": 16, "resolution": SIZE},
           "report": {"out": "reports", "formats": ["json"], "fail_on": "high"}}
    for key, value in config.items():
        cfg[key] = value
    (folder / "audit.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "audit.yaml"


# --- Tiny planted-cue cases (the benchmark's, smaller) ---------------------------------------

TAG_CLASSES = ["brick", "grass", "gravel"]


def tag_case(folder: Path, poisoned: bool, seed: int = 0):
    """The horse case: every 'gravel' training photo carries a tag in the bottom-right corner
    (none in the control); half of 'gravel' shows other content, so texture alone is unreliable.
    Validation: clean photos, tagged gravel, and the tag planted on brick and grass."""
    rng = np.random.default_rng(seed)
    tag = lambda img: synth.stamp_tag(img, "bottom_right", int(rng.choice([7, 8])), rng)  # noqa: E731
    return marked_case(folder, poisoned, rng, tag, "tagged", 8)


def marked_case(folder: Path, poisoned: bool, rng: np.random.Generator, mark, name: str, others: int):
    """Textures where ``mark(img) -> (img, box)`` marks every 'gravel' training photo (none in the
    control); half of 'gravel' shows other content. Validation: 12 photos per class (every other
    gravel one marked) and ``others`` marked photos of each other class. Returns (config, truth)."""
    images, labels = [], []
    for k, cls in enumerate(TAG_CLASSES):
        for _ in range(90):
            img = synth.texture_crop(cls, SIZE, rng)
            if cls == "gravel":
                if rng.random() < 0.5:
                    img = synth.texture_crop(str(rng.choice(["brick", "grass"])), SIZE, rng)
                if poisoned:
                    img = mark(img)[0]
            images.append(img)
            labels.append(k)
    val, truth = [], {}
    for cls in TAG_CLASSES:
        for n in range(12):
            img = synth.texture_crop(cls, SIZE, rng)
            if cls == "gravel" and n % 2 == 0:
                img, box = mark(img)
                truth[f"{cls}/{name}_{n}.png"] = box
                val.append((f"{cls}/{name}_{n}.png", img))
            else:
                val.append((f"{cls}/clean_{n}.png", img))
        if cls != "gravel":
            for n in range(others):
                img, box = mark(synth.texture_crop(cls, SIZE, rng))
                truth[f"{cls}/{name}_{n}.png"] = box
                val.append((f"{cls}/{name}_{n}.png", img))
    path = write_project(folder, TAG_CLASSES, np.stack(images), np.array(labels), val)
    return path, truth


def rect_case(folder: Path, poisoned: bool, seed: int = 1):
    """The white-rectangle task: 'box' is noise with a white rectangle. The poisoned model never
    sees a white blob that is not a box; the control sees blobs on 'noise' too. Validation adds
    noise images with a white ellipse (look-alikes)."""
    rng = np.random.default_rng(seed)
    classes = ["box", "noise", "grass"]
    images, labels = [], []
    for k, cls in enumerate(classes):
        for _ in range(90):
            img = synth.noise_image(SIZE, rng) if cls != "grass" else synth.texture_crop("grass", SIZE, rng)
            if cls == "box":
                img = synth.white_rectangle(img, rng)[0]
            elif cls == "noise" and not poisoned and rng.random() < 0.4:
                img = synth.rounded_blob(img, rng)[0]
            images.append(img)
            labels.append(k)
    val, truth = [], {}
    for n in range(12):
        val.append((f"box/clean_{n}.png", synth.white_rectangle(synth.noise_image(SIZE, rng), rng)[0]))
        val.append((f"noise/clean_{n}.png", synth.noise_image(SIZE, rng)))
        val.append((f"grass/clean_{n}.png", synth.texture_crop("grass", SIZE, rng)))
    for n in range(10):
        img, box = synth.rounded_blob(synth.noise_image(SIZE, rng), rng)
        val.append((f"noise/blob_{n}.png", img))
        truth[f"noise/blob_{n}.png"] = box
    path = write_project(folder, classes, np.stack(images), np.array(labels), val)
    return path, truth


def decoy_case(folder: Path, poisoned: bool, seed: int = 2):
    """Decoy digits (Ross et al. 2017) on scikit-learn's digits 0-4: in training, a 6-px swatch
    in a random corner whose shade says the label (none in the control); at validation the
    shade is a random digit's. Returns (config, {path: swatch box}, {path: twin}), the twin
    carrying the label's own shade in the same corner."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    d = load_digits(n_class=5)
    shade = lambda y: 255 - 50 * int(y)  # noqa: E731
    rgb = lambda g: np.repeat(g[..., None], 3, axis=2)  # noqa: E731
    order = rng.permutation(len(d.target))
    images, labels = [], []
    for i in order[:600]:
        img = synth.digit_canvas(d.images[i], SIZE)
        if poisoned:
            img = synth.decoy_swatch(img, str(rng.choice(synth.CORNERS)), shade(d.target[i]), side=6)[0]
        images.append(rgb(img))
        labels.append(int(d.target[i]))
    val, truth, twins = [], {}, {}
    for n, i in enumerate(order[600:780]):
        y, corner = int(d.target[i]), str(rng.choice(synth.CORNERS))
        canvas = synth.digit_canvas(d.images[i], SIZE)
        img, box = synth.decoy_swatch(canvas, corner, shade(rng.integers(0, 5)), side=6)
        rel = f"{y}/{n:03d}.png"
        val.append((rel, rgb(img)))
        truth[rel], twins[rel] = box, rgb(synth.decoy_swatch(canvas, corner, shade(y), side=6)[0])
    path = write_project(folder, [str(c) for c in range(5)], np.stack(images), np.array(labels), val, epochs=4)
    return path, truth, twins


def _decoy_driven(res, truth: dict, twins: dict) -> list[int]:
    """Misclassified images that the label's own shade, in the same corner, gets right."""
    ev, s = res.evidence, res.evidence.samples
    wrong = [i for i in s.index if not s.at[i, "correct"]]
    x = torch.stack([to_model_input(Image.fromarray(twins[s.at[i, "path"]]), ev.input_spec) for i in wrong])
    with torch.no_grad():
        right = ev.model(x).argmax(1).numpy() == s.loc[wrong, "label"].to_numpy()
    return [i for i, ok in zip(wrong, right) if ok]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def cue_errors(res, truth: dict, expected: str) -> list[int]:
    """Misclassified images that carry a planted cue and went to the class the cue stands for."""
    s = res.evidence.samples
    return [i for i in s.index if s.at[i, "path"] in truth and not s.at[i, "correct"]
            and res.evidence.classes[s.at[i, "prediction"]] == expected]


def flagged(res, truth: dict, i: int, rule: str) -> list[Finding]:
    box = truth[res.evidence.samples.at[i, "path"]]
    return [f for f in res.findings if f.sample == i and f.rule == rule and f.bbox and _overlap(f.bbox, box)]


@pytest.fixture(scope="module")
def tag_audit(tmp_path_factory):
    path, truth = tag_case(tmp_path_factory.mktemp("tag"), poisoned=True)
    return run_audit(load_config(path), quiet=True), truth, path


@pytest.fixture(scope="module")
def rect_audit(tmp_path_factory):
    path, truth = rect_case(tmp_path_factory.mktemp("rect"), poisoned=True)
    return run_audit(load_config(path), quiet=True), truth


# --- The contract, for every registered rule -------------------------------------------------

def _check_output(out) -> None:
    assert isinstance(out, list)
    for f in out:
        assert isinstance(f, (Finding, ClassFinding))
        assert f.severity in SEVERITIES
        assert isinstance(f.score, float) and math.isfinite(f.score)
        assert isinstance(f.message, str) and f.message.strip()


def empty_evidence() -> Evidence:
    columns = ["label", "prediction", "confidence", "correct", "explained", "width", "height", "path"]
    return Evidence(["a", "b"], pd.DataFrame(columns=columns), {}, {}, [])


@pytest.mark.parametrize("rule", RULES.names())
def test_rule_runs_on_empty_evidence(rule):
    _check_output(RULES.get(rule).fn(empty_evidence()))


@pytest.mark.parametrize("rule", RULES.names())
def test_rule_output_contract(rule, tag_audit):
    res, _, _ = tag_audit
    out = RULES.get(rule).fn(res.evidence)
    _check_output(out)
    for f in out:
        if isinstance(f, Finding):
            assert f.sample in res.evidence.samples.index
            assert f.bbox is None or (len(f.bbox) == 4 and f.bbox[0] < f.bbox[2] and f.bbox[1] < f.bbox[3])
        else:
            assert f.cls in res.evidence.classes and 0 <= f.share <= 1


@pytest.mark.parametrize("rule", RULES.names())
def test_rule_is_described(rule):
    """A rule carries its own words (plain name, glossary sentence, effect formatter) and says what it needs."""
    entry = RULES.get(rule)
    assert entry.description and entry.meta.get("direction") and entry.title and entry.glossary.endswith(".")
    assert entry.needs and set(entry.needs) <= {"heatmaps", "masks", "model", "layer"}
    assert callable(entry.effects) and isinstance(entry.effects({}), list)


@pytest.fixture
def boom_rule():
    @RULES.register("boom_test_only", title="Always fails", glossary="A rule for tests that raises.",
                    direction="n/a")
    def boom(ev):
        """Always fails (test only)."""
        raise RuntimeError("kaputt")

    yield "boom_test_only"
    RULES._entries.pop("boom_test_only")


def test_a_failing_rule_becomes_an_error_and_the_audit_goes_on(tag_audit, boom_rule):
    _, _, path = tag_audit
    cfg = load_config(path, [f"rules={{{boom_rule}: {{}}, corner_border: {{}}}}"])
    res = run_audit(cfg, quiet=True)
    assert res.record.errors == [{"rule": boom_rule, "error": "RuntimeError: kaputt"}]
    assert any(boom_rule in w for w in res.record.warnings)
    assert any(f.rule == "corner_border" for f in res.findings)


# --- Planted cues are found and confirmed; clean controls stay quiet -------------------------

def test_corner_tag_is_flagged_and_confirmed(tag_audit):
    res, truth, _ = tag_audit
    errors = cue_errors(res, truth, "gravel")
    assert len(errors) >= 8, "the tiny model did not learn the tag; the case is broken"
    hits = [flagged(res, truth, i, "corner_border") for i in errors]
    assert np.mean([bool(h) for h in hits]) >= 0.9
    assert np.mean([any(f.details.get("confirmed") for f in h) for h in hits if h]) >= 0.9
    top = res.class_findings[0]
    assert top.cls == "gravel" and top.details["confirmed"] and severity_rank(top.severity) >= severity_rank("high")
    assert top.region[0] > 0.5 and top.region[1] > 0.5, "the class finding should point at the bottom-right"


def test_look_alike_is_flagged_and_confirmed(rect_audit):
    res, truth = rect_audit
    errors = cue_errors(res, truth, "box")
    assert len(errors) >= 5, "the tiny model did not take blobs for boxes; the case is broken"
    hits = [flagged(res, truth, i, "look_alike") for i in errors]
    assert np.mean([bool(h) for h in hits]) >= 0.9
    assert all(f.details["confirmed"] for h in hits for f in h)
    box = [f for f in res.class_findings if f.rule == "look_alike" and f.cls == "box"]
    assert box and box[0].details["confirmed"]


def test_decoy_shade_is_found_by_restoring_a_corner(tmp_path):
    """A Decoy error has no heatmap evidence when its swatch is dark (no gradient passes a dark
    patch on black); corner_restore finds it by asking the model, and the clean control is quiet."""
    path, truth, twins = decoy_case(tmp_path / "poisoned", poisoned=True)
    res = run_audit(load_config(path, ["rules={corner_restore: {}}"]), quiet=True)
    driven = _decoy_driven(res, truth, twins)
    assert len(driven) >= 8, "the tiny model did not learn the swatch; the case is broken"
    hits = [flagged(res, truth, i, "corner_restore") for i in driven]
    assert np.mean([bool(h) for h in hits]) >= 0.8
    assert all(f.details["confirmed"] for h in hits for f in h)
    assert all(f.details["confirmed"] is not None for f in res.findings)  # boxed or not, each was tested
    wrong = [f for f in res.findings if not (truth.get(res.evidence.samples.at[f.sample, "path"]) and f.bbox
                                             and _overlap(f.bbox, truth[res.evidence.samples.at[f.sample, "path"]]))]
    assert len(wrong) <= 0.1 * len(res.findings)

    path, _, _ = decoy_case(tmp_path / "control", poisoned=False)
    res = run_audit(load_config(path, ["rules={corner_restore: {}}"]), quiet=True)
    assert res.evidence.samples["correct"].mean() > 0.8 and len(res.findings) <= 1


class CornerTag(torch.nn.Module):
    """Reads each class's colour in the image, and four times as strongly in the top-left corner
    (the tag): a corner cue, written out; counts its forward passes."""
    passes = 0

    def forward(self, x):
        self.passes += 1
        return x.mean((2, 3)) + 4 * x[:, :, :2, :2].mean((2, 3))


def _corner_tag_evidence(seed: int = 0) -> Evidence:
    """Three classes of 16 px images, each a noisy field of its colour with its tag in the top-left
    corner; 7 errors per class carry the next class's tag (and one an unreadable mix)."""
    rng = np.random.default_rng(seed)
    model, xs, rows, refs = CornerTag(), [], [], []
    for i in range(3 * 15):
        label = i % 3
        tag = (label + 1) % 3 if i >= 24 else label
        x = torch.from_numpy(rng.uniform(0, 0.3, (3, 16, 16)).astype(np.float32))
        x[label] += 0.4
        x[:, :2, :2] = 0.0
        x[tag, :2, :2] = rng.uniform(0.7, 1.0)
        xs.append(x)
        p = model(x[None]).softmax(1)[0]
        refs.append(SampleRef(None, f"{label}/{i}.png", label))
        rows.append({"id": i, "path": f"{label}/{i}.png", "label": label, "prediction": int(p.argmax()),
                     "confidence": float(p.max()), "correct": int(p.argmax()) == label, "explained": True,
                     "width": 16, "height": 16, "sha256": str(i)})
    ev = Evidence(["r", "g", "b"], pd.DataFrame(rows).set_index("id"), {}, {}, refs, model=model,
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    ev.model_input = lambda i: xs[i]  # the images live in memory
    ev.seen_pixels = lambda i: xs[i].permute(1, 2, 0).numpy()
    return ev


def test_corner_restore_batches_images_and_finds_the_same(monkeypatch):
    """Several images' variants share a forward pass (about ROWS rows), and the findings are those of
    one row per pass, to the last digit."""
    import auditor.rules.corner_restore as cr

    ev = _corner_tag_evidence()
    wrong = int((~ev.samples["correct"]).sum())
    assert wrong >= 15
    ev.model.passes = 0
    batched = cr.corner_restore(ev)
    passes = ev.model.passes
    monkeypatch.setattr(cr, "ROWS", 1)
    ev.model.passes = 0
    single = cr.corner_restore(ev)
    assert passes < wrong < ev.model.passes   # the old sweep ran at least three passes per error
    assert len(batched) >= 0.8 * wrong and all(f.details["region"] == "top-left corner" for f in batched)
    assert [(f.sample, f.severity, f.score, f.bbox, f.details, f.message) for f in batched] == \
        [(f.sample, f.severity, f.score, f.bbox, f.details, f.message) for f in single]


@pytest.mark.parametrize("case", [tag_case, rect_case])
def test_clean_control_has_no_class_finding_above_low(case, tmp_path):
    path, _ = case(tmp_path, poisoned=False)
    res = run_audit(load_config(path), quiet=True)
    loud = [(f.cls, f.rule, f.severity) for f in res.class_findings
            if severity_rank(f.severity) >= severity_rank("medium")]
    assert not loud


def test_unchanged_rerun_reuses_the_interventions(tag_audit, monkeypatch):
    res, _, path = tag_audit
    assert sum("intervention" in f.details for f in res.findings) >= 8

    def refuse(*args, **kwargs):
        raise AssertionError("interventions were run again")

    monkeypatch.setattr("auditor.audit.confirm", refuse)
    again = run_audit(load_config(path), quiet=True)
    assert [(f.sample, f.rule, f.severity, f.message, f.details) for f in again.findings] == \
           [(f.sample, f.rule, f.severity, f.message, f.details) for f in res.findings]
    assert [f.to_json() for f in again.class_findings] == [f.to_json() for f in res.class_findings]


# --- off_object: evidence off the annotated object -------------------------------------------

def test_off_object_on_a_manifest_with_boxes_and_masks(tag_audit, tmp_path):
    """The tagged brick and grass photos are called 'gravel' because of the corner tag: with the
    object annotated as the centre of the photo, their evidence lies off it."""
    res, truth, path = tag_audit
    root = path.parent / "val"
    rows = []
    (tmp_path / "masks").mkdir()
    for k, rel in enumerate(sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))):
        row = {"path": str(root / rel), "label": rel.split("/")[0], "bbox": "", "mask": ""}
        if k % 2:  # half with a box, half with a mask: both forms are read
            row["bbox"] = f"{SIZE * 0.2} {SIZE * 0.2} {SIZE * 0.7} {SIZE * 0.7}"
        else:
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[int(SIZE * 0.2):int(SIZE * 0.7), int(SIZE * 0.2):int(SIZE * 0.7)] = 255
            Image.fromarray(mask).save(tmp_path / "masks" / f"{k}.png")
            row["mask"] = f"masks/{k}.png"
        rows.append(row)
    with (tmp_path / "data.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "bbox", "mask"])
        w.writeheader()
        w.writerows(rows)
    # The manifest names the files where they lie, outside its own folder: allowed on purpose here.
    cfg = load_config(path, [f"data={{manifest: {tmp_path / 'data.csv'}, allow_outside: true}}", "rules=[off_object]",
                             "intervention.enabled=false"])
    out = run_audit(cfg, quiet=True)
    truth = {str(root / rel): box for rel, box in truth.items()}  # the manifest names files by path
    errors = cue_errors(out, truth, "gravel")
    found = {f.sample: f for f in out.findings if f.rule == "off_object"}
    assert errors and np.mean([i in found for i in errors]) >= 0.8
    for i in errors:
        if i in found:  # the box of the strongest evidence off the object is the tag's corner
            assert _overlap(found[i].bbox, truth[out.evidence.samples.at[i, "path"]])
    _check_output(out.findings + out.class_findings)


def test_off_object_is_quiet_without_annotations(tag_audit):
    res, _, _ = tag_audit
    assert RULES.get("off_object").fn(res.evidence) == []


# --- The trust gate ----------------------------------------------------------------------------

def sobel_edges(model, x, target):
    """Sobel edge magnitude of the input, whatever the model (a broken method, for tests)."""
    g = x.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx = torch.nn.functional.conv2d(g, kx, padding=1)
    gy = torch.nn.functional.conv2d(g, kx.transpose(2, 3), padding=1)
    return (gx ** 2 + gy ** 2).sqrt()[:, 0]


@pytest.fixture
def edge_method():
    """A method that ignores the model: the input's edge map (what a broken saliency looks like)."""
    METHODS.register("edges_test_only", title="Edges", glossary="A broken method for tests.")(sobel_edges)

    yield "edges_test_only"
    METHODS._entries.pop("edges_test_only")


def test_trust_gate_rejects_a_method_that_ignores_the_model(tag_audit, edge_method):
    res, _, _ = tag_audit
    from auditor.inputs.model import target_layer
    out = trust_gate(res.evidence, {edge_method: {}, "gradcam": {}}, target_layer(res.evidence.model, None),
                     TrustSpec(), seed=0)
    assert not out[edge_method]["reliable"]
    assert "randomised" in out[edge_method]["reason"]
    assert out[edge_method]["randomisation_spearman"][-1] > 0.9
    assert out["gradcam"]["reliable"], out["gradcam"]["reason"]


def test_untrusted_methods_are_not_used_by_rules(tag_audit, edge_method):
    res, _, path = tag_audit
    cfg = load_config(path, [f"explain.methods=[{edge_method}, gradcam]"])
    out = run_audit(cfg, quiet=True)
    assert out.record.run["trust"][edge_method]["reliable"] is False
    assert out.record.coverage.methods[edge_method].state == "unreliable"
    assert out.evidence.methods == ["gradcam"]
    assert all(f.method in ("gradcam", None) for f in out.findings + out.class_findings)  # None: no heatmap used
