"""Compare an audit with an earlier one of the same model family, image by image.

Image findings are matched by the image's content hash and the rule, class findings by class
and rule, and sorted into new, resolved and persisting. Accuracy and per-class recall deltas
come with 95% bootstrap intervals, paired over the images both runs saw (matched by hash).
Where the runs differ in data, rules, methods or settings, the comparison says so in warnings.
Both sides are run records (a pure function of the two). This module also records what a run
needs to be compared later (``provenance``).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np

from auditor.inputs.config import AuditConfig, ConfigError
from auditor.record import READABLE_SCHEMAS, RunRecord, severity_rank

RESAMPLES = 2000
SETTINGS = ("explain", "intervention", "trust")  # config sections that change what is found


# ---- provenance -------------------------------------------------------------------------------

def config_hash(cfg: AuditConfig) -> str:
    """sha256 of the validated config as canonical JSON (paths resolved, defaults filled in)."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def git_commit(folder: Path) -> str | None:
    """HEAD of the git work tree holding ``folder``; None outside one, or without git. Never fails."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def provenance(cfg: AuditConfig) -> dict:
    review = cfg.report.reviewer
    return {"config_hash": config_hash(cfg), "git_commit": git_commit(cfg.folder),
            "reviewer": review.model_dump(mode="json") if review else None}


# ---- loading ----------------------------------------------------------------------------------

def load_run(path: Path, where: str) -> RunRecord:
    """A run's record, from the run folder or its findings.json; ConfigError (one line) if unusable."""
    return RunRecord.load(path, where)


def last_passed(out: Path, classes: list[str] | None = None, factory: str | None = None) -> Path | None:
    """The newest run folder under ``out`` whose gate passed, of the model family given (the same
    classes and factory; runs of other models sharing the folder are passed over)."""
    best = None
    for folder in sorted(p for p in Path(out).glob("*/findings.json") if not p.parent.name.startswith(".")):
        try:
            doc = json.loads(folder.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("run"), dict):
            continue
        model = (doc["run"].get("config") or {}).get("model") or {}
        theirs = doc["run"].get("classes") or ((doc.get("metrics") or {}).get("confusion") or {}).get("classes")
        if classes is not None and (theirs != classes or model.get("factory") != factory):
            continue
        if (doc.get("gate") or {}).get("passed") and doc.get("schema_version") in READABLE_SCHEMAS:
            key = (doc["run"].get("started", ""), folder.parent.name)
            if best is None or key > best[0]:
                best = (key, folder.parent)
    return best[1] if best else None


def classes_of(rec: RunRecord) -> list[str]:
    return rec.classes or rec.config.get("model", {}).get("classes") or []


def factory_of(rec: RunRecord) -> str | None:
    return rec.config.get("model", {}).get("factory")


def check_family(old: RunRecord, classes: list[str], factory: str | None, where: str) -> None:
    """Runs of different models (classes or factory) cannot be compared image by image."""
    rid, old_classes = old.run.get("id", "?"), classes_of(old)
    if old_classes != classes:
        gone, extra = [c for c in old_classes if c not in classes], [c for c in classes if c not in old_classes]
        how = (f"only in the baseline: {', '.join(gone) or '-'}; only in this run: {', '.join(extra) or '-'}"
               if gone or extra else "the same classes in another order")
        raise ConfigError(f"{where}: run {rid} is of another model family (classes differ: {how})")
    if factory_of(old) != factory:
        raise ConfigError(f"{where}: run {rid} is of another model family "
                          f"(model.factory {factory_of(old)!r}, this run {factory!r})")


def load_baseline(cfg: AuditConfig, classes: list[str]) -> tuple[tuple[RunRecord, Path] | None, list[str]]:
    """``report.baseline`` loaded and checked: ((its record, its path) or None, warnings)."""
    wanted, where = cfg.report.baseline, f"{cfg.source}: 'report.baseline'"
    if wanted is None:
        return None, []
    path = last_passed(cfg.report.out, classes, cfg.model.factory) if wanted == "last_passed" else wanted
    if path is None:
        return None, [f"report.baseline is last_passed, but {cfg.report.out} holds no passing run yet: "
                      f"nothing to compare with"]
    doc = load_run(path, where)
    check_family(doc, classes, cfg.model.factory, where)
    return (doc, path), []


# ---- comparison -------------------------------------------------------------------------------

def _findings(doc: dict) -> dict[tuple, dict]:
    """One record per (image hash, rule) and per (class, rule): the worst finding of each."""
    out: dict[tuple, dict] = {}

    def keep(key, rec):
        if key not in out or severity_rank(rec["severity"]) > severity_rank(out[key]["severity"]):
            out[key] = rec

    for r in records(doc):
        keep(("sample", r["sha256"] or r["path"], r["rule"]) if r["kind"] == "sample" else
             ("class", r["class"], r["rule"]), r)
    return out


def records(doc: dict) -> list[dict]:
    """Every finding of a findings document as one flat record (image findings, then class findings)."""
    recs = [{"kind": "sample", "path": s["path"], "sha256": s.get("sha256"), "label": s.get("label"),
             "prediction": s.get("prediction"), "rule": f["rule"], "severity": f["severity"],
             "message": f["message"], "waived": f.get("waived")}
            for s in doc["samples"] for f in s["findings"]]
    return recs + [{"kind": "class", "class": f["class"], "rule": f["rule"], "severity": f["severity"],
                    "message": f["message"], "waived": f.get("waived")} for f in doc["class_findings"]]


def _order(rec: dict) -> tuple:
    return (-severity_rank(rec["severity"]), rec["kind"] != "class", rec.get("class") or rec["path"], rec["rule"])


def _outcomes(doc: dict) -> dict[tuple, tuple[str, bool]]:
    """(hash, n-th image with that hash) -> (label, correct); duplicates pair up in path order."""
    seen: dict[str, int] = {}
    out = {}
    for s in sorted(doc["samples"], key=lambda s: s["path"]):
        h = s.get("sha256") or s["path"]
        seen[h] = seen.get(h, 0) + 1
        out[(h, seen[h])] = (s["label"], bool(s["correct"]))
    return out


def _interval(pairs: list[tuple[bool, bool]], old_only: list[bool], new_only: list[bool],
              rng: np.random.Generator) -> dict | None:
    """Rate before, after, their difference and its 95% bootstrap interval.

    Matched images are resampled as pairs (a multinomial over the four correct/wrong outcomes),
    unmatched ones on their own side, so shared images cancel their own difficulty out.
    """
    m, a, b = len(pairs), len(old_only), len(new_only)
    if m + a == 0 or m + b == 0:
        return None
    p = np.asarray(pairs, dtype=int).reshape(-1, 2)
    old_hits, new_hits = np.zeros(RESAMPLES), np.zeros(RESAMPLES)
    if m:
        draws = rng.multinomial(m, np.bincount(2 * p[:, 0] + p[:, 1], minlength=4) / m, size=RESAMPLES)
        old_hits += draws[:, 2] + draws[:, 3]
        new_hits += draws[:, 1] + draws[:, 3]
    if a:
        old_hits += rng.binomial(a, np.mean(old_only), size=RESAMPLES)
    if b:
        new_hits += rng.binomial(b, np.mean(new_only), size=RESAMPLES)
    before = (p[:, 0].sum() + sum(old_only)) / (m + a)
    after = (p[:, 1].sum() + sum(new_only)) / (m + b)
    lo, hi = np.percentile(new_hits / (m + b) - old_hits / (m + a), [2.5, 97.5])
    r = lambda v: round(float(v), 6)  # noqa: E731
    return {"baseline": r(before), "current": r(after), "delta": r(after - before), "ci95": [r(lo), r(hi)],
            "images": [m + a, m + b], "paired": m}


def _metric_deltas(old: dict, new: dict, classes: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    before, after = _outcomes(old), _outcomes(new)
    shared = [k for k in after if k in before]

    def split(keep):  # (pairs of outcomes, unpaired before, unpaired after) of the images ``keep`` takes
        paired = {k for k in shared if keep(before[k][0]) and keep(after[k][0])}
        return ([(before[k][1], after[k][1]) for k in sorted(paired)],
                [v[1] for k, v in before.items() if keep(v[0]) and k not in paired],
                [v[1] for k, v in after.items() if keep(v[0]) and k not in paired])

    per_class = []
    for c in classes:
        d = _interval(*split(lambda label: label == c), rng)
        per_class.append({"class": c, **(d or {"baseline": None, "current": None, "delta": None, "ci95": None,
                                                "images": None, "paired": 0})})
    return {"images": {"baseline": len(before), "current": len(after), "matched": len(shared)},
            "accuracy": _interval(*split(lambda label: True), rng),
            "per_class": per_class,
            "bootstrap": {"resamples": RESAMPLES, "seed": seed, "interval": "95% percentile",
                          "paired": "images matched by sha256; unmatched images are resampled on their own side"}}


def _changes(old: dict | None, new: dict | None, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as 'key: old -> new'."""
    old, new = old or {}, new or {}
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}" if k in old and k in new
                       else f"{prefix}{k} {'added' if k in new else 'removed'}")
    return out


def _brief(items: list[str], n: int = 4) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def _distrusted(run: dict) -> list[str]:
    return sorted(m for m, t in (run.get("trust") or {}).items() if not t.get("reliable", True))


def _setting_warnings(old: dict, new: dict, old_ids: set, new_ids: set) -> list[str]:
    a, b = old["run"], new["run"]
    warnings = []
    if a.get("data_fingerprint") != b.get("data_fingerprint"):
        warnings.append(f"the runs audited different data ({len(old_ids - new_ids)} images only in the baseline, "
                        f"{len(new_ids - old_ids)} only in this run): changes mix data and model")
    for key, what in (("rules", "rule settings"), ("methods", "explanation method settings")):
        if a.get(key) != b.get(key):
            warnings.append(f"{what} differ from the baseline's ({_brief(_changes(a.get(key), b.get(key)))}): "
                            f"findings may change for that reason alone")
    sa, sb = a.get("config", {}), b.get("config", {})
    changed = _changes({s: sa.get(s) for s in SETTINGS}, {s: sb.get(s) for s in SETTINGS})
    changed += _changes({"model.input": sa.get("model", {}).get("input")},
                        {"model.input": sb.get("model", {}).get("input")})
    if a.get("seed") != b.get("seed"):
        changed.append(f"run.seed: {a.get('seed')} -> {b.get('seed')}")
    if changed:
        warnings.append(f"audit settings differ from the baseline's ({_brief(changed)})")
    if _distrusted(a) != _distrusted(b):
        warnings.append(f"methods set aside by the trust gate differ (baseline: {', '.join(_distrusted(a)) or 'none'}; "
                        f"this run: {', '.join(_distrusted(b)) or 'none'})")
    versions = _changes(a.get("versions"), b.get("versions"))
    if versions:
        warnings.append(f"package versions differ ({_brief(versions)})")
    return warnings


def compare(old_record: RunRecord, old_path: Path | str, new_record: RunRecord, seed: int = 0) -> dict:
    """What changed from run ``old`` to run ``new``."""
    old, new = old_record.model_dump(mode="json"), new_record.model_dump(mode="json")
    before, after = _findings(old), _findings(new)
    new_list = sorted((after[k] for k in after if k not in before), key=_order)
    resolved = sorted((before[k] for k in before if k not in after), key=_order)
    persisting = sorted(({**after[k], "previous_severity": before[k]["severity"]} for k in after if k in before),
                        key=_order)
    old_ids = {s.get("sha256") or s["path"] for s in old["samples"]}
    new_ids = {s.get("sha256") or s["path"] for s in new["samples"]}
    for rec in new_list:
        if rec["kind"] == "sample" and (rec["sha256"] or rec["path"]) not in old_ids:
            rec["note"] = "image not in the baseline"
    for rec in resolved:
        if rec["kind"] == "sample" and (rec["sha256"] or rec["path"]) not in new_ids:
            rec["note"] = "image not in this run"
    a, b = old["run"], new["run"]
    return {
        "baseline_run": a.get("id"), "baseline_path": str(old_path),
        "counts": {"new": len(new_list), "resolved": len(resolved), "persisting": len(persisting)},
        "changed": {"weights": a.get("weights_sha256") != b.get("weights_sha256"),
                    "data": a.get("data_fingerprint") != b.get("data_fingerprint"),
                    "rules": a.get("rules") != b.get("rules"), "methods": a.get("methods") != b.get("methods")},
        "new": new_list, "resolved": resolved, "persisting": persisting,
        "metrics": _metric_deltas(old, new, new_record.classes, seed),
        "warnings": _setting_warnings(old, new, old_ids, new_ids),
    }


# ---- words ------------------------------------------------------------------------------------

def pts(v: float) -> str:
    return f"{100 * v:+.1f} points"


def summary(diff: dict, limit: int = 5) -> list[str]:
    """Lines for the terminal."""
    n = diff["counts"]
    lines = [f"changes since run {diff['baseline_run']}: {n['new']} new, {n['resolved']} resolved, "
             f"{n['persisting']} persisting"]
    for word, recs in (("new", diff["new"]), ("resolved", diff["resolved"])):
        for rec in recs[:limit]:
            waived = " (waived)" if rec.get("waived") else ""
            lines.append(f"  {word} [{rec['severity']}] {rec.get('class') or rec['path']}: {rec['rule']}{waived}")
        if len(recs) > limit:
            lines.append(f"  ... and {len(recs) - limit} more {word}")
    acc = diff["metrics"]["accuracy"]
    if acc:
        lo, hi = acc["ci95"]
        lines.append(f"accuracy {acc['baseline']:.1%} -> {acc['current']:.1%} ({pts(acc['delta'])}, "
                     f"95% CI {pts(lo)} to {pts(hi)}, {acc['paired']} images paired)")
    drops = sorted((c for c in diff["metrics"]["per_class"] if (c["delta"] or 0) < 0), key=lambda c: c["delta"])
    if drops:
        lines.append("recall fell for " + ", ".join(f"{c['class']} ({pts(c['delta'])})" for c in drops[:limit])
                     + (f" and {len(drops) - limit} more" if len(drops) > limit else ""))
    lines += [f"  warning: {w}" for w in diff["warnings"]]
    return lines
