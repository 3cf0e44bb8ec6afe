"""The gate: does a run pass? A pure function of the run's record (and its comparison with the
baseline). Exit code 0 when it passes, 1 when a condition in ``report.fail_on`` is met.

Conditions: the audit could not examine everything it was asked to (``incomplete``: a check
or method that errored or had no evidence); a finding (not waived) at or above a severity;
findings new since the baseline; accuracy or a class's recall fallen since the baseline. Each
is reported with its threshold, its value, whether it passed, a sentence, and the findings or
classes that failed it. The verdict is FAIL when a finding or metric condition fails, else
INCOMPLETE when the audit was incomplete, else PASS: PASS only for what was examined.
"""
from __future__ import annotations

from auditor.inputs.config import FailOn, ReportSpec
from auditor.judge import diff as diffs
from auditor.record import Gate, RunRecord, severity_rank


def _item(rec: dict) -> dict:
    keep = ("kind", "class", "path", "prediction", "rule", "severity", "message")
    return {k: rec[k] for k in keep if rec.get(k) is not None}


def _condition(name, threshold, value, passed, message, items=(), skipped=False) -> dict:
    return {"name": name, "threshold": threshold, "value": value, "passed": passed, "skipped": skipped,
            "message": message, "items": list(items)}


def _no_baseline(name, threshold) -> dict:
    return _condition(name, threshold, None, True, "not checked: no baseline to compare with (set report.baseline)",
                      skipped=True)


def evaluate(fail_on: FailOn | None, record: RunRecord, diff: dict | None) -> Gate:
    """The gate of a run's record (and its comparison with the baseline, if any)."""
    fail_on = fail_on or FailOn()
    recs = diffs.records(record.model_dump(mode="json"))
    live = [r for r in recs if not r["waived"]]
    worst = max((r["severity"] for r in live), key=severity_rank, default=None)
    conditions = []
    if fail_on.incomplete:
        suspicions = untested(record, fail_on.severity or "high")
        gaps = record.coverage.gaps() + suspicions
        said = "; ".join(filter(None, [record.coverage.summary(), *suspicions]))
        conditions.append(_condition(
            "incomplete", True, len(gaps), not gaps,
            f"the audit is incomplete: {said}" if gaps else "every check ran with evidence",
            [{"kind": "coverage", "rule": g.split(":")[0], "severity": "high", "message": g} for g in gaps]))
    if fail_on.severity:
        t = fail_on.severity
        hits = sorted((r for r in live if severity_rank(r["severity"]) >= severity_rank(t)),
                      key=lambda r: -severity_rank(r["severity"]))
        waived = len(recs) - len(live)
        conditions.append(_condition(
            "severity", t, worst, not hits,
            f"{len(hits)} finding(s) at or above '{t}' (worst: {worst})" if hits else
            f"no finding reaches '{t}'" + (f" apart from {waived} waived" if waived else ""),
            map(_item, hits)))
    if fail_on.new_findings:
        t, least = fail_on.new_findings, fail_on.new_severity
        if diff is None:
            conditions.append(_no_baseline("new_findings", t))
        else:
            hits = [r for r in diff["new"] if not r["waived"] and severity_rank(r["severity"]) >= severity_rank(least)]
            floor = f" at or above '{least}'" if least != "info" else ""
            conditions.append(_condition(
                "new_findings", t, len(hits), len(hits) < t,
                f"{len(hits)} new finding(s){floor} since run {diff['baseline_run']} (fails at {t})",
                map(_item, hits) if len(hits) >= t else ()))
    acc = diff and diff["metrics"]["accuracy"]
    if fail_on.accuracy_drop:
        t = fail_on.accuracy_drop
        if not acc:
            conditions.append(_no_baseline("accuracy_drop", t))
        else:
            drop, (lo, hi) = round(-acc["delta"], 6), acc["ci95"]
            conditions.append(_condition(
                "accuracy_drop", t, drop, drop < t,
                f"accuracy {acc['baseline']:.1%} -> {acc['current']:.1%} since run {diff['baseline_run']} "
                f"(change {diffs.pts(acc['delta'])}, 95% CI {diffs.pts(lo)} to {diffs.pts(hi)}; fails at a drop of {100 * t:.1f} points)"))
    if fail_on.class_recall_drop:
        t = fail_on.class_recall_drop
        if diff is None:
            conditions.append(_no_baseline("class_recall_drop", t))
        else:
            per = [c for c in diff["metrics"]["per_class"] if c["delta"] is not None]
            hits = sorted((c for c in per if round(-c["delta"], 6) >= t), key=lambda c: c["delta"])
            largest = max((round(-c["delta"], 6) for c in per), default=0.0)
            conditions.append(_condition(
                "class_recall_drop", t, largest, not hits,
                (f"recall fell by {100 * t:.1f} points or more for {len(hits)} class(es): "
                 + ", ".join(f"{c['class']} {c['baseline']:.1%} -> {c['current']:.1%}" for c in hits))
                if hits else f"no class's recall fell by {100 * t:.1f} points or more since run {diff['baseline_run']}",
                [{"kind": "metric", "class": c["class"], "rule": "class_recall_drop", "severity": "high",
                  "message": f"recall of '{c['class']}' {c['baseline']:.1%} -> {c['current']:.1%} "
                             f"(95% CI of the change {diffs.pts(c['ci95'][0])} to {diffs.pts(c['ci95'][1])})"} for c in hits]))
    criteria = fail_on.model_dump(exclude_none=True)
    if not fail_on.new_findings:
        criteria.pop("new_severity", None)
    failed = [c for c in conditions if not c["passed"]]
    verdict = ("PASS" if not failed else "INCOMPLETE" if all(c["name"] == "incomplete" for c in failed)
               else "FAIL")
    return Gate(passed=not failed, verdict=verdict, fail_on=fail_on.severity, worst=worst, criteria=criteria,
                waived=len(recs) - len(live), conditions=conditions,
                failed=[f"{c['name']}: {c['message']}" for c in failed])


def untested(record: RunRecord, least: str) -> list[str]:
    """Suspicions at or above ``least`` that intervention could not put to the test: capped at
    'low' as unconfirmed, they must not let the run pass as if they had been refuted."""
    out = []
    for what, f in [*((f"finding {f.rule} on {s.path}", f) for s, f in record.findings()),
                    *((f"class finding {f.rule} on '{f.cls}'", f) for f in record.class_findings)]:
        before = f.details.get("severity_before_intervention")
        if not f.waived and f.confirmed is None and "confirmed" in f.details \
                and severity_rank(before) >= severity_rank(least):
            why = (f.details.get("intervention") or {}).get("skipped", "")
            out.append(f"{what} (a {before} suspicion) could not be tested by intervention"
                       + (f": {why}" if why else ""))
    return out


def criteria_of(record: RunRecord) -> FailOn | None:
    """The fail_on a run was audited with (the default when it does not say)."""
    config = record.config.get("report", {})
    return ReportSpec.model_validate({"fail_on": config["fail_on"]} if "fail_on" in config else {}).fail_on


def describe(gate: Gate) -> list[str]:
    """Lines for the terminal."""
    crit = ", ".join(f"{k}={v}" for k, v in gate.criteria.items()) or "never"
    waived = f", {gate.waived} waived" if gate.waived else ""
    word = {"PASS": "PASSED", "FAIL": "FAILED", "INCOMPLETE": "INCOMPLETE (not passed)"}[gate.verdict]
    lines = [f"gate {word} (fail_on: {crit}; worst={gate.worst}{waived})"]
    lines += [f"  failed {c['name']}: {c['message']}" for c in gate.conditions if not c["passed"]]
    lines += [f"  skipped {c['name']}: {c['message']}" for c in gate.conditions if c["skipped"]]
    return lines
