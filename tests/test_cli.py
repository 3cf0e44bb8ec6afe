"""The command line: exit codes, one-line config errors, bad input skipped, runs never overwritten."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from auditor.cli import app

runner = CliRunner()


def audit(project, *args):
    return runner.invoke(app, ["run", str(project.path), "--quiet", *args])


def only_run(project):
    runs = [p for p in (project.folder / "reports").iterdir() if p.name != ".cache"]
    assert len(runs) == 1 and not runs[0].name.startswith("."), runs
    return runs[0]


def test_clean_run_writes_outputs_and_exits_0(project):
    r = audit(project)
    assert r.exit_code == 0, r.output
    run = only_run(project)
    doc = json.loads((run / "findings.json").read_text())
    assert doc["run"]["id"] == run.name
    assert len(doc["samples"]) == 12 and doc["metrics"]["images"] == 12
    assert {"path", "label", "prediction", "confidence", "correct", "findings"} <= set(doc["samples"][0])
    assert doc["samples"][0]["path"].startswith("cat/")
    assert len(doc["run"]["weights_sha256"]) == 64 and len(doc["run"]["data_fingerprint"]) == 64
    assert (run / "samples.csv").read_text().startswith("path,label,prediction")


def test_second_run_never_overwrites_the_first(project):
    assert audit(project).exit_code == 0
    assert audit(project).exit_code == 0
    runs = sorted(p.name for p in (project.folder / "reports").iterdir() if p.name != ".cache")
    assert len(runs) == 2 and not any(r.startswith(".") for r in runs)


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(modle={}), "unknown key 'modle'"),
    (lambda c: c["model"].update(wieghts="x"), "unknown key 'model.wieghts'; allowed: classes, classes_file"),
    (lambda c: c["run"].update(batch_size="many"), "'run.batch_size'"),
    (lambda c: c["model"].update(weights="nope.safetensors"), "'model.weights': file not found"),
    (lambda c: c["model"].update(weights="w.onnx"), "'model.weights': must be a .safetensors"),
    (lambda c: c["data"].update(root="missing"), "'data.root': folder not found"),
    (lambda c: c["explain"].update(methods=["salency"]), "did you mean 'saliency'"),
    (lambda c: c.update(rules={"corner_border": {"bandd": 0.1}}), "'rules.corner_border.bandd': unknown parameter"),
    (lambda c: c["model"].update(factory="net.py:nothing"), "'model.factory'"),
    (lambda c: c["model"].update(classes=["cat", "dog"]), "class folder(s) 'fox' not in model.classes"),
    (lambda c: c["model"]["input"].update(channels=2), "'model.input.channels'"),
    (lambda c: c["model"].update(target_layer="nope"), "'model.target_layer': no module 'nope'"),
    (lambda c: c["model"].update(kwargs={"num_classes": 4}), "does not fit the model"),
])
def test_config_errors_are_one_line_naming_file_and_key(project, change, expected):
    change(project.cfg)
    project.write()
    r = audit(project)
    assert r.exit_code == 2, r.output
    assert expected in r.output, r.output
    assert "audit.yaml" in r.output or "/data" in r.output  # names the file it is about
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output
    assert not (project.folder / "reports").exists() or \
        not [p for p in (project.folder / "reports").iterdir() if p.name != ".cache"]


def test_output_width_must_match_classes(project):
    from safetensors.torch import save_file
    ns = {}
    exec((project.folder / "net.py").read_text(), ns)
    save_file(ns["make"](num_classes=4).state_dict(), str(project.folder / "w4.safetensors"))
    project.cfg["model"].update(kwargs={"num_classes": 4}, weights="w4.safetensors")
    project.write()
    r = audit(project)
    assert r.exit_code == 2 and "expected (1, 3)" in r.output, r.output


def test_weights_mismatch_names_the_keys(project):
    from safetensors.torch import save_file
    state = {"0.weight": torch.zeros(8, 3, 3, 3), "extra.bias": torch.zeros(2)}
    save_file(state, str(project.folder / "bad.safetensors"))
    r = audit(project, "--set", "model.weights=bad.safetensors")
    assert r.exit_code == 2
    assert "extra.bias" in r.output and "0.bias" in r.output, r.output


def test_pickled_code_in_pt_weights_is_refused(project):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (project.folder / "evil.pt").write_bytes(pickle.dumps({"0.weight": Evil()}))
    r = audit(project, "--set", "model.weights=evil.pt")
    assert r.exit_code == 2 and "weights_only" in r.output and "pwned" not in r.output, r.output


def test_state_dict_pt_weights_load(project):
    ns = {}
    exec((project.folder / "net.py").read_text(), ns)
    torch.save(ns["make"]().state_dict(), project.folder / "w.pt")
    assert audit(project, "--set", "model.weights=w.pt").exit_code == 0


def test_set_override_and_bad_set(project):
    r = audit(project, "--set", "run.batch_size=0")
    assert r.exit_code == 2 and "'run.batch_size'" in r.output
    r = audit(project, "--set", "nonsense")
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_bad_files_are_skipped_with_reasons_and_the_run_continues(project):
    d = project.folder / "data" / "cat"
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    good = (d / "cat_0.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "notes.txt").write_text("hello")
    r = audit(project)
    assert r.exit_code == 0, r.output
    doc = json.loads((only_run(project) / "findings.json").read_text())
    reasons = {s["path"]: s["reason"] for s in doc["skipped"]}
    assert set(reasons) == {"cat/zero.png", "cat/text.png", "cat/truncated.png", "cat/notes.txt"}
    assert "empty" in reasons["cat/zero.png"] and "truncated" in reasons["cat/truncated.png"]
    assert len(doc["samples"]) == 12


def test_empty_class_folder_is_a_recorded_warning(project):
    for p in (project.folder / "data" / "fox").iterdir():
        p.unlink()
    r = audit(project)
    assert r.exit_code == 0
    doc = json.loads((only_run(project) / "findings.json").read_text())
    assert any("empty class folder" in w for w in doc["warnings"])


def test_image_modes_become_model_channels(tmp_path):
    from auditor.inputs.config import InputSpec
    from auditor.inputs.data import read_image, to_model_input
    arr = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100
    images = {"L": Image.fromarray((arr // 256).astype(np.uint8)), "I;16": Image.fromarray(arr),
              "RGBA": Image.new("RGBA", (30, 20), (10, 20, 30, 128)), "P": Image.new("P", (30, 20), 3),
              "1": Image.new("1", (30, 20), 1)}
    for mode, img in images.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        img.save(path)
        decoded = read_image(path)
        assert decoded.size == (30, 20), mode
        for channels in (1, 3):
            x = to_model_input(decoded, InputSpec(size=(8, 12), channels=channels))
            assert x.shape == (channels, 8, 12) and torch.isfinite(x).all(), mode
    # 16-bit is scaled by its range, not clipped at 255
    x = to_model_input(read_image(tmp_path / "I16.png"), InputSpec(size=(20, 30), channels=1))
    assert 0.9 < x.max() <= 1.0


def test_gate_fails_with_exit_1(project):
    project.cfg["report"]["fail_on"] = "info"
    project.cfg["rules"] = {"corner_border": {"min_lift": 0.0, "sample_severity": {"info": 0.0}}}
    project.write()
    r = audit(project)
    assert r.exit_code == 1, r.output
    assert "gate FAILED" in r.output


def test_methods_and_rules_listed():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "saliency" in r.output and "occlusion" in r.output
    r = runner.invoke(app, ["rules"])
    assert r.exit_code == 0 and "corner_border" in r.output
