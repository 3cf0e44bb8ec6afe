"""JUnit XML for CI dashboards: one test case per rule and per class, failing where the gate failed.

A rule's (or class's) test case fails when findings of that rule (about that class) fail a gate
condition; the failure carries their messages. A rule that raised is an error; waived findings
are listed in the case's output. An image finding belongs to the class the model predicted.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from auditor.judge import diff as diffs
from auditor.record import RunRecord

MAX_LINES = 50  # per failure text; the report has them all


def _lines(items: list[dict]) -> str:
    text = [f"[{i['severity']}] {i.get('path') or i.get('class')}: {i['message']}" for i in items[:MAX_LINES]]
    if len(items) > MAX_LINES:
        text.append(f"... and {len(items) - MAX_LINES} more (see findings.json)")
    return "\n".join(text)


def _case(suite: ET.Element, classname: str, name: str, failures: dict[str, list[dict]],
          error: str | None = None, out: list[str] = ()) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if failures:  # one failure element: several per case confuse some dashboards
        ET.SubElement(case, "failure", type=",".join(failures),
                      message="fails the gate: " + ", ".join(f"{c} ({len(v)})" for c, v in failures.items())
                      ).text = "\n\n".join(f"{c}:\n{_lines(v)}" for c, v in failures.items())
    if error:
        ET.SubElement(case, "error", type="rule_error", message=error).text = error
    if out:
        ET.SubElement(case, "system-out").text = "\n".join(out)


def _suite(root: ET.Element, name: str, doc: dict) -> ET.Element:
    return ET.SubElement(root, "testsuite", name=name, timestamp=doc["run"].get("started", ""))


def _count(el: ET.Element) -> None:
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for case in el.iter("testcase"):
        totals["tests"] += 1
        totals["failures"] += case.find("failure") is not None
        totals["errors"] += case.find("error") is not None
    for k, v in totals.items():
        el.set(k, str(v))


def _class_of(item: dict) -> str | None:
    return item.get("class") or item.get("prediction")


def build(record: RunRecord) -> ET.ElementTree:
    """The JUnit tree of a run's record. An incomplete audit is a failing test case of its own
    (auditor.run / coverage), so a CI dashboard never shows it green."""
    doc = record.model_dump(mode="json")
    gate = doc["gate"]
    failed = {c["name"]: c["items"] for c in gate.get("conditions", []) if not c["passed"]}
    incomplete = failed.pop("incomplete", None)
    root = ET.Element("testsuites", name="auditor")
    run_suite = _suite(root, "auditor.run", doc)
    props = ET.SubElement(run_suite, "properties")
    for key in ("id", "weights_sha256", "model_sha256", "data_fingerprint", "config_hash", "git_commit"):
        ET.SubElement(props, "property", name=key, value=str(doc["run"].get(key) or ""))
    case = ET.SubElement(run_suite, "testcase", classname="auditor.run", name="coverage", time="0")
    if incomplete is not None:
        text = "\n".join(i["message"] for i in incomplete)
        ET.SubElement(case, "failure", type="incomplete",
                      message=f"the audit is incomplete ({len(incomplete)} check(s) did not run with evidence): "
                              f"verdict {gate['verdict']}").text = text
    waived = [r for r in diffs.records(doc) if r["waived"]]

    def waived_lines(keep) -> list[str]:
        return [f"waived until {w['waived']['expires']} by {w['waived']['owner']} ({w['waived']['reason']}): "
                f"[{w['severity']}] {w.get('path') or w.get('class')}: {w['rule']}" for w in waived if keep(w)]

    errors = {e["rule"]: e["error"] for e in doc.get("errors", [])}
    rules = sorted({*doc["run"].get("rules", {}), *errors})
    suite = _suite(root, "auditor.rules", doc)
    for rule in rules:
        fails = {c: [i for i in items if i.get("rule") == rule] for c, items in failed.items()}
        _case(suite, "auditor.rules", rule, {c: v for c, v in fails.items() if v}, errors.get(rule),
              waived_lines(lambda w: w["rule"] == rule))
    suite = _suite(root, "auditor.classes", doc)
    for cls in doc["metrics"]["confusion"]["classes"]:
        fails = {c: [i for i in items if _class_of(i) == cls] for c, items in failed.items()}
        _case(suite, "auditor.classes", cls, {c: v for c, v in fails.items() if v},
              out=waived_lines(lambda w: _class_of(w) == cls))
    if any(c["name"] == "accuracy_drop" for c in gate.get("conditions", [])):
        suite = _suite(root, "auditor.metrics", doc)
        cond = next(c for c in gate["conditions"] if c["name"] == "accuracy_drop")
        case = ET.SubElement(suite, "testcase", classname="auditor.metrics", name="accuracy", time="0")
        if not cond["passed"]:
            ET.SubElement(case, "failure", type="accuracy_drop", message=cond["message"]).text = cond["message"]
    for s in root.iter("testsuite"):
        _count(s)
    _count(root)
    ET.indent(root)
    return ET.ElementTree(root)


def write(record: RunRecord, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    build(record).write(path, encoding="utf-8", xml_declaration=True)


def write_error(message: str, path: Path) -> None:
    """A run that could not run: one test case in error, so CI shows why."""
    root = ET.Element("testsuites", name="auditor", tests="1", failures="0", errors="1")
    suite = ET.SubElement(root, "testsuite", name="auditor.run", tests="1", failures="0", errors="1")
    case = ET.SubElement(suite, "testcase", classname="auditor.run", name="audit", time="0")
    ET.SubElement(case, "error", type="could_not_run", message=message).text = message
    ET.indent(root)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
