"""Honest verdicts: the run's record says what ran, the gate never passes what it did not examine,
bad settings are refused at the door, a crash is never exit 1, and the folder tree has no import
that reaches back up the pipeline."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from auditor.cli import app
from auditor.record import RunRecord

runner = CliRunner()


def audit(project, *args):
    return runner.invoke(app, ["run", str(project.path), "--quiet", *args])


def record_of(project, output: str) -> RunRecord:
    from conftest import report_folder
    return RunRecord.load(report_folder(project, output))


# --- fail closed: INCOMPLETE, exit 1 -------------------------------------------------------------

def test_every_method_distrusted_is_incomplete_not_pass(project):
    """The trust gate sets every method aside: the rules had no evidence, so the audit cannot pass."""
    # nothing can pass: a benefit no method reaches, and no model-only fallback
    project.cfg["trust"] = {"enabled": True, "images": 4, "min_benefit": 100, "min_effect": 0, "max_fill_flips": 1,
                            "fallback": None}
    project.write()
    r = audit(project)
    assert r.exit_code == 1, r.output
    rec = record_of(project, r.output)
    assert rec.gate.verdict == "INCOMPLETE" and not rec.gate.passed
    assert rec.coverage.methods["saliency"].state == "unreliable"
    assert rec.coverage.rules["corner_border"].state == "no_evidence"
    assert "verdict: INCOMPLETE" in r.output and "gate INCOMPLETE" in r.output


def test_a_method_failing_on_every_batch_is_incomplete(project):
    """A Grad-CAM layer that cannot work (the classifier head) fails on every batch: not a pass."""
    project.cfg["explain"]["methods"] = ["saliency", "gradcam"]
    project.write()
    r = audit(project, "--set", "model.target_layer='7'")  # the Linear head
    assert r.exit_code == 1, r.output
    rec = record_of(project, r.output)
    assert rec.coverage.methods["gradcam"].state == "error" and rec.coverage.methods["saliency"].state == "ran"
    assert rec.gate.verdict == "INCOMPLETE" and "method gradcam: could not run" in rec.gate.failed[0]


def test_a_named_rule_that_cannot_apply_is_incomplete_a_default_one_is_not_run(project):
    r = audit(project)  # every rule by default: off_object has no masks to read
    assert r.exit_code == 0, r.output
    rec = record_of(project, r.output)
    check = rec.coverage.rules["off_object"]
    assert check.state == "not_applicable" and check.words == "not run: needs masks or boxes in the manifest"
    assert all(c.state == "ran" for n, c in rec.coverage.rules.items() if n != "off_object")
    project.cfg["rules"] = ["corner_border", "off_object"]
    project.write()
    r = audit(project)
    assert r.exit_code == 1, r.output
    assert record_of(project, r.output).gate.verdict == "INCOMPLETE"


def test_a_rule_that_raises_makes_the_audit_incomplete(project, monkeypatch):
    import dataclasses

    import auditor.rules  # noqa: F401
    from auditor.registry import RULES

    def boom(ev, **params):
        raise RuntimeError("kaputt [/x]")

    monkeypatch.setitem(RULES._entries, "fixed_location", dataclasses.replace(RULES.get("fixed_location"), fn=boom))
    r = audit(project)
    assert r.exit_code == 1, r.output
    rec = record_of(project, r.output)
    assert rec.coverage.rules["fixed_location"].state == "error"
    assert rec.coverage.rules["fixed_location"].reason == "RuntimeError: kaputt [/x]"
    assert rec.gate.verdict == "INCOMPLETE" and "kaputt [/x]" in r.output  # printed as it is, no markup


def test_incomplete_can_be_switched_off_but_is_still_recorded(project):
    project.cfg["rules"] = ["off_object"]
    project.cfg["report"]["fail_on"] = {"incomplete": False}
    project.write()
    r = audit(project)
    assert r.exit_code == 0, r.output
    rec = record_of(project, r.output)
    assert rec.coverage.rules["off_object"].state == "not_applicable" and rec.coverage.gaps()


# --- refused at the door: exit 2 -----------------------------------------------------------------

@pytest.mark.parametrize("rules, key, words", [
    ('[{corner_border: {min_lift: "two"}}]', "rules.corner_border.min_lift", "valid number"),
    ("[{corner_border: {band: 5.0}}]", "rules.corner_border.band", "less than or equal to 0.5"),
    ("[{corner_border: {bnad: 0.1}}]", "rules.corner_border.bnad", "unknown parameter; allowed: band"),
    ("[{fixed_location: {severity: {hihg: 2}}}]", "rules.fixed_location.severity.hihg", "'info', 'low'"),
    ("[{look_alike: {min_examples: 0}}]", "rules.look_alike.min_examples", "greater than or equal to 1"),
])
def test_rule_params_are_checked_before_any_work(project, rules, key, words):
    r = audit(project, "--set", f"rules={rules}")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and f"'{key}'" in line and words in line and str(project.path) in line
    assert not (project.folder / "reports").exists() or not any((project.folder / "reports").iterdir())


@pytest.mark.parametrize("methods, key", [
    ("[{smoothgrad: {n_samples: 0}}]", "explain.methods.smoothgrad.n_samples"),
    ("[{lime: {segmentation: watershed}}]", "explain.methods.lime.segmentation"),
    ("[{occlusion: {window: 2}}]", "explain.methods.occlusion.window"),
])
def test_method_params_are_checked_before_any_work(project, methods, key):
    r = audit(project, "--set", f"explain.methods={methods}")
    assert r.exit_code == 2 and f"'{key}'" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_every_registry_entry_carries_its_own_words():
    import auditor.explain.methods  # noqa: F401
    import auditor.rules  # noqa: F401
    from auditor.registry import METHODS, RULES
    for e in [*METHODS, *RULES]:
        assert e.title and e.glossary.endswith(".") and e.description, e.name
        e.params  # the signature's hints resolve into a params model
    assert all(callable(e.effects) for e in RULES)
    with pytest.raises(ValueError, match="needs a title and a glossary"):
        RULES.register("wordless", title="", glossary="")


# --- crashes are exit 2, never 1 -----------------------------------------------------------------

def test_diff_of_a_damaged_findings_json_is_exit_2(project, tmp_path):
    r = audit(project)
    from conftest import report_folder
    run = report_folder(project, r.output)
    doc = json.loads((run / "findings.json").read_text())
    del doc["metrics"]["accuracy"]
    (tmp_path / "broken.json").write_text(json.dumps(doc))
    r2 = runner.invoke(app, ["diff", str(run), str(tmp_path / "broken.json")])
    assert r2.exit_code == 2 and "'metrics.accuracy'" in r2.output and len(r2.output.strip().splitlines()) == 1


def test_an_unwritable_junit_path_is_exit_2_before_any_work(project, tmp_path):
    (tmp_path / "file").write_text("")
    r = audit(project, "--junit", str(tmp_path / "file" / "junit.xml"))
    assert r.exit_code == 2, r.output
    assert not (project.folder / "reports").exists() or not any((project.folder / "reports").iterdir())


def test_an_unexpected_error_is_one_line_and_exit_2(project, monkeypatch):
    import auditor.audit

    def bug(*a, **k):
        raise KeyError("[bold]x[/bold]")

    monkeypatch.setattr(auditor.audit, "fingerprint", bug)
    r = audit(project)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "could not run: KeyError: '[bold]x[/bold]'" in r.output


# --- the cache follows the weights that run --------------------------------------------------------

FACTORY_PY = '''
from pathlib import Path
import torch
from safetensors.torch import load_file
from torch import nn

def make(num_classes=3):
    """Loads its own weights, as from_pretrained does: model.weights is not set."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, num_classes))
    net.load_state_dict(load_file(str(Path(__file__).parent / "own.safetensors")))
    return net
'''


def test_a_factory_that_loads_its_own_weights_gets_fresh_predictions(project):
    (project.folder / "own.py").write_text(FACTORY_PY)

    def retrain(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        save_file(net.state_dict(), str(project.folder / "own.safetensors"))

    project.cfg["model"] = {**project.cfg["model"], "factory": "own.py:make"}
    del project.cfg["model"]["weights"]
    project.write()
    retrain(1)
    first = record_of(project, audit(project).output)
    retrain(2)
    second = record_of(project, audit(project).output)
    assert first.run["weights_sha256"] is None and len(first.run["model_sha256"]) == 64
    assert first.run["model_sha256"] != second.run["model_sha256"]
    assert second.run["computed"].get("predictions") == 12   # nothing from the old model's cache
    retrain(2)
    third = record_of(project, audit(project).output)
    assert third.run["model_sha256"] == second.run["model_sha256"] and not third.run["computed"].get("predictions")


# --- the record renders again without the model ------------------------------------------------------

def test_auditor_report_reproduces_the_report_from_the_run_folder_alone(project):
    project.cfg["report"]["formats"] = ["json", "html"]
    project.cfg["report"]["fail_on"] = "info"
    project.cfg["rules"] = {"corner_border": {"min_lift": 0.0, "sample_severity": {"info": 0.0}}}
    project.write()
    r = audit(project)
    assert r.exit_code == 1, r.output
    from conftest import report_folder
    run = report_folder(project, r.output)
    before = (run / "report.html").read_text()
    assert "card" in before
    (project.folder / "net.py").unlink()       # no model, no weights, no data
    (project.folder / "weights.safetensors").unlink()
    import shutil
    shutil.rmtree(project.folder / "data")
    r2 = runner.invoke(app, ["report", str(run), "--formats", "html"])
    assert r2.exit_code == 0, r2.output
    assert (run / "report.html").read_text() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]   # nothing half-written left
    r3 = runner.invoke(app, ["report", str(project.folder), "--formats", "html"])
    assert r3.exit_code == 2 and len(r3.output.strip().splitlines()) == 1


def test_findings_json_is_schema_2_and_reads_back_as_the_same_record(project):
    r = audit(project)
    from conftest import report_folder
    run = report_folder(project, r.output)
    doc = json.loads((run / "findings.json").read_text())
    assert doc["schema_version"] == 2 and doc["gate"]["verdict"] == "PASS"
    assert {"methods", "rules", "trust", "intervention"} <= doc["coverage"].keys()
    assert RunRecord.from_doc(doc).model_dump(mode="json") == doc


# --- the folder tree reads as the pipeline -------------------------------------------------------

STAGES = {"auditor.inputs": 0, "auditor.explain": 1, "auditor.rules": 2, "auditor.judge": 2, "auditor.views": 2,
          "auditor.outputs": 3, "auditor.audit": 4, "auditor.demo": 4, "auditor.cli": 5}
SHARED = {"auditor.registry", "auditor.record", "auditor"}  # leaves every stage may read


def _stage(module: str) -> int | None:
    return next((s for prefix, s in STAGES.items() if module == prefix or module.startswith(prefix + ".")), None)


def test_no_import_reaches_back_up_the_pipeline():
    """inputs → explain → judge (with rules) → outputs → audit → cli: a module may import its own
    stage, earlier ones and the shared leaves (registry, record), never a later stage, at any level
    of the file (imports inside functions count too)."""
    root = Path(__file__).parent.parent
    files = {f"auditor.{p.relative_to(root / 'auditor').with_suffix('').as_posix().replace('/', '.')}": p
             for p in (root / "auditor").rglob("*.py")}
    files |= {f"auditor.rules.{p.stem}": p for p in (root / "rules").glob("*.py")}
    back = []
    for module, path in files.items():
        module = module.removesuffix(".__init__")
        mine = 0 if module in SHARED else _stage(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                if not name.startswith("auditor"):
                    continue
                theirs = _stage(name)
                if name in SHARED and module in SHARED - {"auditor"}:
                    continue
                if theirs is not None and mine is not None and theirs > mine:
                    back.append(f"{module} imports {name}")
                if module in SHARED - {"auditor"} and name not in SHARED and theirs not in (0, None):
                    back.append(f"shared {module} imports {name}")
    assert not back, back


def test_a_high_suspicion_intervention_could_not_test_keeps_the_run_from_passing(tmp_path):
    """Capped at 'low' because it could not be tested, it must not read as refuted."""
    import importlib.util

    from auditor.inputs.config import FailOn
    from auditor.judge.gate import evaluate
    spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parent.parent / "bench" / "report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rec = bench.synthetic_result(tmp_path / "data", 3, correct_per_class=2).record
    quiet = rec.model_copy(update={"samples": tuple(s.model_copy(update={"findings": ()}) for s in rec.samples),
                                   "class_findings": ()})
    assert evaluate(FailOn(severity="high"), quiet, None).verdict == "PASS"
    untested = rec.class_findings[0].model_copy(update={"severity": "low", "details": {
        "confirmed": None, "severity_before_intervention": "high",
        "intervention": {"skipped": "the model classifies no 'gravel' image correctly"}}})
    gate = evaluate(FailOn(severity="high"), quiet.model_copy(update={"class_findings": (untested,)}), None)
    assert gate.verdict == "INCOMPLETE" and "could not be tested by intervention" in gate.failed[0]
    assert "no 'gravel' image correctly" in gate.failed[0]


def test_last_passed_takes_the_newest_passing_run_of_the_same_family(tmp_path):
    from auditor.judge.diff import last_passed

    def run(name, started, classes, factory="f:g", passed=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "findings.json").write_text(json.dumps({
            "schema_version": 2, "gate": {"passed": passed},
            "run": {"started": started, "classes": classes, "config": {"model": {"factory": factory}}}}))

    run("a", "2026-11-01", ["x", "y"])
    run("b", "2026-11-02", ["x", "y"], factory="other:h")   # another model in the same folder
    run("c", "2026-11-03", ["p", "q"])                      # another model's classes
    run("d", "2026-11-04", ["x", "y"], passed=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "findings.json").write_text("[1, 2]")  # not a run: passed over, no crash
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "findings.json").write_text(json.dumps({"schema_version": 2, "gate": None, "run": {}}))
    assert last_passed(tmp_path, ["x", "y"], "f:g") == tmp_path / "a"
    assert last_passed(tmp_path, ["x", "y"], "other:h") == tmp_path / "b"
    assert last_passed(tmp_path, ["z"], "f:g") is None
