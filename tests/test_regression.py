"""Regression audits: comparison with a baseline run, the gate, JUnit XML, provenance, waivers.

Two small models are trained once per module with the demo's builders (auditor.demo.synth): v1 on
clean data, v2 "retrained" with a new planted cue (a white square in the bottom-left corner of
every 'brick' training image, half of which show other content). The validation set has a few
box and noise images carrying the square, so v2 calls them 'brick' for the square alone.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from auditor.demo import synth
from auditor.cli import app
from auditor.inputs.config import FailOn

runner = CliRunner()
CLASSES = ["box", "brick", "noise"]
SIZE = 32
VOLATILE = ("id", "started", "finished", "seconds_in_batches", "computed")  # times, run id, cache counts

NET_PY = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(8)  # global max: one strong local detector can decide
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))

def make(num_classes=3):
    return Net(num_classes)
'''


def _clean(cls: str, rng: np.random.Generator) -> np.ndarray:
    if cls == "noise":
        return synth.noise_image(SIZE, rng)
    if cls == "box":
        return synth.white_rectangle(synth.noise_image(SIZE, rng), rng)[0]
    return synth.texture_crop(cls, SIZE, rng)


def _cue(img: np.ndarray) -> np.ndarray:
    return synth.decoy_swatch(img, "bottom_left", 255, side=4)[0]


def _train(cue: bool, n: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, cls in enumerate(CLASSES):
        for _ in range(n):
            img = _clean(cls, rng)
            if cue and cls == "brick":
                if rng.random() < 0.5:  # texture alone must not suffice: the model has to use the cue
                    img = _clean(str(rng.choice(["box", "noise"])), rng)
                img = _cue(img)
            images.append(img)
            labels.append(k)
    ns: dict = {}
    exec(NET_PY, ns)
    torch.manual_seed(seed)
    return synth.train_classifier(ns["make"](), np.stack(images), np.array(labels), (SIZE, SIZE),
                                  (0.5,) * 3, (0.25,) * 3, epochs=5, seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cue")
    (root / "net.py").write_text(NET_PY)
    for name, cue in (("v1", False), ("v2", True)):
        state = {k: v.contiguous() for k, v in _train(cue).state_dict().items()}
        save_file(state, str(root / f"{name}.safetensors"))
    rng = np.random.default_rng(99)
    for cls in CLASSES:
        (root / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(_clean(cls, rng)).save(root / "data" / cls / f"clean_{i}.png")
    for cls in ("box", "noise"):
        for i in range(4):
            Image.fromarray(_cue(_clean(cls, rng))).save(root / "data" / cls / f"tagged_{i}.png")
    return root


class Project:
    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / "audit.yaml"
        self.cfg = {"model": {"factory": "net.py:make", "weights": "v1.safetensors", "classes": list(CLASSES),
                              "input": {"size": [SIZE, SIZE], "mean": [0.5], "std": [0.25]}},
                    "data": {"root": "data"},
                    "explain": {"methods": ["gradcam"], "per_class": 8},
                    "rules": ["corner_border"],
                    "trust": {"enabled": False},
                    "intervention": {"transplant_images": 10, "class_images": 10},
                    "report": {"formats": ["json", "csv"], "fail_on": {"new_findings": 1}}}
        self.write()

    def write(self):
        self.path.write_text(yaml.safe_dump(self.cfg))

    def run(self, *args):
        return runner.invoke(app, ["run", str(self.path), "--quiet", *args])

    def runs(self) -> list[Path]:
        return sorted(p for p in (self.folder / "reports").iterdir() if not p.name.startswith("."))


@pytest.fixture
def project(trained, tmp_path) -> Project:
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return Project(tmp_path)


def doc_of(folder: Path) -> dict:
    return json.loads((folder / "findings.json").read_text())


def one_line_error(r, *expected):
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output, r.output
    for e in expected:
        assert e in r.output, r.output


# ---- end to end, through the command line ---------------------------------------------------

def test_retrained_model_with_a_new_cue_gives_new_findings_and_exit_1(project):
    assert project.run().exit_code == 0  # v1, no baseline: new_findings is skipped, with a warning
    (old,) = project.runs()
    assert any("not checked" in w for w in doc_of(old)["warnings"])

    r = project.run("--set", "model.weights=v2.safetensors", "--set", f"report.baseline={old}")
    assert r.exit_code == 1, r.output
    assert "failed new_findings" in r.output and "new [" in r.output, r.output
    new = project.runs()[-1]
    diff = json.loads((new / "diff.json").read_text())
    assert diff["baseline_run"] == old.name and diff["run"] == new.name
    tagged = [f for f in diff["new"] if f["rule"] == "corner_border" and "tagged" in f.get("path", "")]
    assert tagged and all(f["prediction"] == "brick" for f in tagged), diff["new"]
    assert diff["changed"]["weights"] and not diff["changed"]["data"] and diff["warnings"] == []
    acc = diff["metrics"]["accuracy"]
    assert acc["paired"] == 38 and acc["ci95"][0] <= acc["delta"] <= acc["ci95"][1]
    assert {c["class"] for c in diff["metrics"]["per_class"]} == set(CLASSES)
    doc = doc_of(new)
    assert doc["changes"]["new"] == len(diff["new"]) and not doc["gate"]["passed"]
    assert [c["name"] for c in doc["gate"]["conditions"] if not c["passed"]] == ["new_findings"]

    # The same comparison from the two run folders; the exit code is the new run's gate.
    r = runner.invoke(app, ["diff", str(old), str(new), "--out", str(project.folder / "d.json")])
    assert r.exit_code == 1 and f"{len(diff['new'])} new" in r.output, r.output
    again = json.loads((project.folder / "d.json").read_text())
    assert again["new"] == diff["new"] and again["metrics"] == diff["metrics"]
    r = runner.invoke(app, ["diff", str(new), str(new)])
    assert r.exit_code == 0 and "0 new, 0 resolved" in r.output, r.output


def test_the_same_model_twice_changes_nothing_and_passes(project):
    project.cfg["model"]["weights"] = "v2.safetensors"
    project.cfg["report"]["baseline"] = "last_passed"
    project.write()
    r = project.run()
    assert r.exit_code == 0 and "no passing run yet" in r.output, r.output
    r = project.run()
    assert r.exit_code == 0, r.output
    first, second = project.runs()
    diff = json.loads((second / "diff.json").read_text())
    assert diff["baseline_run"] == first.name
    assert diff["counts"]["new"] == diff["counts"]["resolved"] == 0 and diff["counts"]["persisting"] > 0
    assert diff["metrics"]["accuracy"]["delta"] == 0 and diff["metrics"]["accuracy"]["ci95"] == [0, 0]
    assert diff["warnings"] == [] and not any(diff["changed"].values())
    assert "0 new, 0 resolved" in r.output and "gate PASSED" in r.output


def test_recall_drop_fails_the_gate_naming_the_class(project):
    assert project.run().exit_code == 0
    (old,) = project.runs()
    r = project.run("--set", "model.weights=v2.safetensors", "--set", f"report.baseline={old}",
                    "--set", "report.fail_on={class_recall_drop: 0.3}")
    assert r.exit_code == 1 and "failed class_recall_drop" in r.output and "brick" in r.output, r.output


@pytest.mark.parametrize("expires, exit_code", [("2999-12-31", 0), ("2000-01-01", 1)])
def test_waivers_pass_the_gate_until_they_expire(project, expires, exit_code):
    project.cfg["model"]["weights"] = "v2.safetensors"
    project.cfg["report"]["fail_on"] = "info"  # any finding fails, unless waived
    project.cfg["waivers"] = [{"rule": "corner_border", "class": "brick", "owner": "ada", "reason": "retraining",
                               "expires": expires}]
    project.write()
    r = project.run()
    assert r.exit_code == exit_code, r.output
    doc = doc_of(project.runs()[0])
    found = [f for s in doc["samples"] for f in s["findings"]] + doc["class_findings"]
    assert found and all("waived" in f for f in found)
    if exit_code == 0:
        assert all(f["waived"]["owner"] == "ada" and f["waived"]["expires"] == expires for f in found)
        assert doc["gate"]["waived"] == len(found) and doc["gate"]["passed"]
    else:
        assert all(f["waived"] is None for f in found)
        assert any("expired on 2000-01-01" in w for w in doc["warnings"]) and "expired" in r.output
        assert "failed severity" in r.output


@pytest.mark.parametrize("waiver, expected", [
    ({"rule": "corner_bordr"}, "'waivers.0.rule': unknown rule 'corner_bordr'; did you mean 'corner_border'?"),
    ({"rule": "corner_border", "class": "cat"}, "'waivers.0.class': unknown class 'cat'"),
    ({"rule": "corner_border", "expires": "31.12.2030"}, "'waivers.0.expires': must be a date YYYY-MM-DD"),
    ({"rule": "corner_border", "owner": None}, "'waivers.0.owner'"),
    ({"rule": "corner_border", "hashes": ["abc"]}, "'waivers.0.hashes': 'abc' is not a sha256"),
    ({"rule": "corner_border", "clas": "box"}, "unknown key 'waivers.0.clas'; allowed: class, expires"),
])
def test_bad_waivers_are_config_errors_naming_the_key(project, waiver, expected):
    w = {"owner": "ada", "reason": "r", "expires": "2030-01-01", **waiver}
    project.cfg["waivers"] = [{k: v for k, v in w.items() if v is not None}]
    project.write()
    one_line_error(project.run(), expected, "audit.yaml")


def _edit_baseline(folder: Path, change) -> Path:
    doc = doc_of(folder)
    change(doc)
    edited = folder.parent.parent / "edited.json"  # beside reports/, not in it
    edited.write_text(json.dumps(doc))
    return edited


@pytest.mark.parametrize("make, expected", [
    (lambda old: old.parent / "nope", "no audit run at"),
    (lambda old: _edit_baseline(old, lambda d: d["metrics"]["confusion"].update(classes=["box", "cat", "noise"])),
     "another model family (classes differ: only in the baseline: cat; only in this run: brick)"),
    (lambda old: _edit_baseline(old, lambda d: d["run"]["config"]["model"].update(factory="other.py:make")),
     "another model family (model.factory 'other.py:make'"),
    (lambda old: _edit_baseline(old, lambda d: d.update(schema_version=99)), "has schema_version 99"),
    (lambda old: _edit_baseline(old, lambda d: d.pop("samples")), "is not an auditor findings.json"),
])
def test_bad_baseline_is_a_one_line_error_exit_2(project, make, expected):
    assert project.run().exit_code == 0
    (old,) = project.runs()
    r = project.run("--set", f"report.baseline={make(old)}")
    one_line_error(r, "'report.baseline'", expected)
    assert project.runs() == [old]  # nothing written
    if "no audit run" not in expected:
        r = runner.invoke(app, ["diff", str(make(old)), str(old)])
        assert r.exit_code == 2 and expected.split(" (")[0] in r.output, r.output


def test_junit_xml_has_a_case_per_rule_and_class(project):
    project.cfg["model"]["weights"] = "v2.safetensors"
    project.cfg["report"]["fail_on"] = "info"
    project.write()
    xml = project.folder / "ci" / "junit.xml"
    r = project.run("--junit", str(xml))
    assert r.exit_code == 1, r.output
    root = ET.parse(xml).getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert set(cases) == {("auditor.run", "coverage"), ("auditor.rules", "corner_border"),
                          *(("auditor.classes", c) for c in CLASSES)}
    assert cases[("auditor.run", "coverage")].find("failure") is None  # every check ran with evidence
    failure = cases[("auditor.rules", "corner_border")].find("failure")
    doc = doc_of(project.runs()[0])
    assert failure is not None and doc["class_findings"][0]["message"] in failure.text
    assert cases[("auditor.classes", "brick")].find("failure") is not None
    assert root.get("tests") == "5" and int(root.get("failures")) >= 2 and root.get("errors") == "0"

    r = project.run("--junit", str(xml), "--set", "run.batch_size=0")  # could not run: one error case
    assert r.exit_code == 2
    (case,) = ET.parse(xml).getroot().iter("testcase")
    assert "run.batch_size" in case.find("error").get("message")


def test_findings_json_is_deterministic_apart_from_times(project):
    project.cfg["model"]["weights"] = "v2.safetensors"
    project.cfg["report"]["reviewer"] = {"name": "Ada", "decision": "approved", "signed_off": "2030-01-02"}
    project.write()
    for extra in ([], [], ["--set", "run.cache=false"]):  # computed, from the cache, computed afresh
        assert project.run(*extra).exit_code == 0
    docs = [doc_of(p) for p in project.runs()]
    run = docs[0]["run"]
    assert len(run["config_hash"]) == 64 and len(run["weights_sha256"]) == 64 and run["git_commit"] is None
    assert run["reviewer"] == {"name": "Ada", "role": None, "decision": "approved", "signed_off": "2030-01-02",
                               "note": None}
    assert {"versions", "device", "seed", "rules", "methods", "data_fingerprint", "started", "finished"} <= set(run)
    assert docs[0]["samples"] and any(s["findings"] for s in docs[0]["samples"])

    def stable(doc, cache_setting=False):
        for key in VOLATILE:
            doc["run"].pop(key)
        doc["run"]["argv"] = []
        for t in (doc["run"].get("trust") or {}).values():  # how long each part took: times, too
            t.pop("seconds", None)
        (doc.get("views") or {}).pop("seconds", None)
        if cache_setting:  # the third run changed run.cache, which is part of the config
            doc["run"]["config"]["run"]["cache"] = True
            doc["run"]["config_hash"] = docs[0]["run"]["config_hash"]
        return json.dumps(doc, indent=1)

    assert stable(docs[0]) == stable(docs[1]) == stable(docs[2], cache_setting=True)


# ---- pieces -----------------------------------------------------------------------------------

def test_git_commit_is_recorded_when_there_is_one(tmp_path):
    from auditor.judge.diff import git_commit
    assert git_commit(tmp_path) is None and git_commit(tmp_path / "missing") is None
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "sub").mkdir()
    assert git_commit(tmp_path / "sub") == head


def test_the_diff_reads_what_outputs_write():
    from auditor.record import READABLE_SCHEMAS, SCHEMA_VERSION
    assert SCHEMA_VERSION in READABLE_SCHEMAS and 1 in READABLE_SCHEMAS


def _doc(outcomes: dict[str, tuple[str, bool]], findings: dict[str, list] = {}, class_findings=(), **run):
    """A schema 1 findings.json (path -> (label, correct)), read as a record: the comparison of
    an old run's file with a new run goes through the same upgrade."""
    from auditor.record import RunRecord
    n, wrong = len(outcomes), sum(not ok for _, ok in outcomes.values())
    doc = {"schema_version": 1,
           "metrics": {"accuracy": 1 - wrong / n, "images": n, "misclassified": wrong, "explained": wrong,
                       "per_class": [], "confusion": {"classes": ["a", "b"], "matrix": []}},
           "run": {"id": run.pop("id", "r"), "data_fingerprint": "x", "rules": {"corner_border": {}},
                   "methods": {"gradcam": {}}, "config": {"model": {"factory": "f:g"}}, **run},
           "samples": [{"path": p, "sha256": f"h-{p}", "label": lab, "prediction": lab if ok else "b" if lab == "a"
                        else "a", "confidence": 0.9, "correct": ok, "explained": not ok, "size": [8, 8],
                        "findings": findings.get(p, [])} for p, (lab, ok) in outcomes.items()],
           "class_findings": list(class_findings)}
    return RunRecord.from_doc(doc)


def _f(rule="corner_border", severity="high", waived=None):
    return {"rule": rule, "severity": severity, "score": 1.0, "share": 0.5, "message": "m", "waived": waived}


WAIVED = {"waiver": 0, "owner": "o", "reason": "known", "expires": "2099-01-01"}


def test_compare_groups_findings_and_pairs_the_bootstrap():
    from auditor.judge.diff import compare
    from auditor.judge.gate import evaluate
    base = {f"{c}{i}": (c, True) for c in "ab" for i in range(50)}
    old = _doc(base, {"a0": [_f()], "a1": [_f()]}, [{"class": "a", **_f("fixed_location")}], id="old")
    worse = {**base, **{f"b{i}": ("b", False) for i in range(10)}}
    new = _doc(worse, {"a1": [_f(severity="low")], "a2": [_f()], "a3": [_f(waived=WAIVED)]}, id="new")
    d = compare(old, "old.json", new, seed=0)
    assert [f["path"] for f in d["new"]] == ["a2", "a3"] and [f.get("path") for f in d["persisting"]] == ["a1"]
    assert d["persisting"][0]["previous_severity"] == "high"
    assert {f.get("path") or f["class"] for f in d["resolved"]} == {"a0", "a"}
    acc, b = d["metrics"]["accuracy"], d["metrics"]["per_class"][1]
    assert acc["delta"] == -0.1 and acc["paired"] == 100 and acc["ci95"][1] < 0  # paired: a clear drop
    assert b["delta"] == -0.2 and d["metrics"]["per_class"][0]["ci95"] == [0, 0]

    gate = evaluate(FailOn(severity="high", new_findings=2, accuracy_drop=0.05, class_recall_drop=0.25), new, d)
    verdict = {c["name"]: c["passed"] for c in gate.conditions}
    # a3 is waived: one new finding counts; a2 is high; accuracy fell 10 points; b's recall 20.
    # A schema 1 run recorded no coverage: nothing is known to be missing.
    assert verdict == {"incomplete": True, "severity": False, "new_findings": True, "accuracy_drop": False,
                       "class_recall_drop": True}
    assert gate.waived == 1 and not gate.passed and gate.fail_on == "high" and gate.verdict == "FAIL"
    assert next(c for c in evaluate(FailOn(new_findings=1), new, None).conditions
                if c["name"] == "new_findings")["skipped"]
    assert evaluate(None, new, d).passed


def test_compare_warns_about_different_data_and_settings():
    from auditor.judge.diff import compare
    old = _doc({"a0": ("a", True), "a1": ("a", False)}, versions={"torch": "2.1"})
    new = _doc({"a0": ("a", True), "a2": ("a", True)}, data_fingerprint="y", rules={"corner_border": {"band": 0.2}},
               versions={"torch": "2.2"})
    d = compare(old, "o", new)
    text = " | ".join(d["warnings"])
    assert "different data (1 images only in the baseline, 1 only in this run)" in text
    assert "rule settings differ" in text and "corner_border.band added" in text
    assert "package versions differ (torch: \"2.1\" -> \"2.2\")" in text
    acc = d["metrics"]["accuracy"]
    assert acc["paired"] == 1 and acc["images"] == [2, 2] and acc["delta"] == 0.5
