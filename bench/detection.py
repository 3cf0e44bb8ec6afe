"""Detection benchmark: do the rules find planted "Clever Hans" cues, and stay quiet without one?

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/detection.py --split tune|heldout|fixed|all
        [--cases N] [--skip K] [--only NAME] [--fresh] [--quick] [--jobs N] [--json PATH]

Splits: ``tune`` and ``heldout`` are drawn by ``bench/generator.py`` (even seeds tune, odd seeds
held out; ``--cases N`` cases per split, each with its clean twin; ``--skip K`` draws them after
the split's first K: held-out cases that no one has read, once the first ones have been); ``fixed`` is the old list
of ``bench/cases.py`` (Decoy digits, three horse cases, two look-alike cases, their controls
and the dose cases); ``all`` is the three. Tune thresholds on ``tune`` only; report ``heldout``.

Each case plants a cue with known truth, trains a small model on it (seconds), and is written
as an ordinary user project: ``val/<class>/*.png`` (ImageFolder), ``net.py`` (the model
factory, a copy of ``bench/nets.py``), ``model.safetensors`` and ``case.yaml``. The config
holds ``model`` and ``data`` only, plus ``report: {formats: [json]}``: every other setting
(methods, rules, trust gate, interventions, ``fail_on: high``) is the project's default, as a
user who writes the shortest config gets. It is audited through the command line (``auditor
run case.yaml --quiet``, a subprocess) and its ``findings.json`` is scored against the truth:

- a finding counts when the report flags it: confirmed, or medium and above (an unconfirmed
  low one is a minor suspicion the report lists apart, neither a hit nor a false alarm;
  ``precision_all`` counts them too);
- a hit: a finding on an image whose box covers at least half the cue's box and at most a
  quarter of the image, where the cue decided the prediction (its neutral twin is predicted
  otherwise);
- recall: of the misclassified images that carry a planted cue and whose error the cue caused
  (the model gets the image's neutral twin right, see cases.py), the share with a hit;
- precision: of the findings on misclassified images, the share that are hits, counting, on
  a cue-class image that the cue's missing made wrong, a box on the place where the cue would
  be; "strict" precision gives no credit for the missing cue;
- confirmed: of those hits (and the cue class's class findings), the share the intervention
  confirmed (``details.confirmed``);
- rank: the position of the cue class among the class findings (ordered by severity, then
  score; first finding naming the cue class whose region, if any, touches the cue), per rule
  and over all rules; n/a for Decoy, where every class carries the cue; counted in the goal
  only for cases with at least one cue-driven error (the model does use the cue);
- clean twin (the same validation files, a model trained without the cue): class findings at
  severity medium or above, and whether the gate passes (``gate.verdict`` PASS); apart, the
  twins the cue sways (it turns at least ``SWAY`` of the planted images into its class on a
  model never trained on it: the model reads it as the class, so a finding there is real);
- coverage: the state of every method and rule (``coverage`` in findings.json: e.g. methods
  the trust gate marked unreliable).

Goals: recall >= 0.95 and precision >= 0.90 (pooled over the split's cue-driven errors and
findings; the worst case is shown too), the cue class ranked first, and on every clean twin
no medium+ class finding and a passing gate; apart (not instead), the same two by behaviour: the
cue class first where the model took the cue (the cue turns at least ``SWAY`` of the other
classes' images that carry it), the twins the cue does not sway. Issue 16's class views
(``class_views``): class_visualisation and simple_rule first and confirmed in most cases with a
cue at a fixed place, none at medium+ on a clean twin; apart, the cases within simple_rule's reach
(``cue_reach``: the cue's presence alone reproduces 90% of the model's decisions). The tables go
to stdout and, with every number, to ``bench/out/detection-<split>.json`` (tagged ``-skipK`` etc.
for other cases). Trained cases are cached in ``bench/out/cases/`` by a stamp of their parameters
and code (``--fresh`` rebuilds them); the audit always runs anew.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from auditor.demo import synth  # noqa: E402
from auditor.judge.evidence import severity_rank  # noqa: E402
from auditor.views.tree import FIDELITY, balanced  # noqa: E402
import cases as case_lib  # noqa: E402
import generator  # noqa: E402
import nets  # noqa: E402

VERSION = "detection-2"
GOALS = {"recall": 0.95, "precision": 0.90, "confirmed": 0.90}


# --- Writing a case as a user project ------------------------------------------------------

def stamp(case, data=None) -> str:
    """What the cached folder was made from: the case, the training code and nets.py, and for a
    drawn case its data itself (built in a second), so that editing generator.py retrains only
    the cases whose images it changes; a fixed case stamps cases.py's source instead."""
    h = hashlib.sha256()
    h.update((json.dumps(asdict(case), sort_keys=True, default=str) + VERSION).encode())
    for f in (HERE / "nets.py", Path(synth.__file__)) + (() if data else (HERE / "cases.py",)):
        h.update(f.read_bytes())
    if data:
        images, labels, val, truth, twins = data
        h.update(images.tobytes() + np.asarray(labels).tobytes())
        for rel, img in val:
            h.update(rel.encode() + img.tobytes())
        h.update(json.dumps(truth, sort_keys=True).encode())
        for rel in sorted(twins):
            h.update(twins[rel].tobytes())
    return h.hexdigest()[:16]


def build_case(case, folder: Path, fresh: bool, log) -> dict:
    """Make ``folder`` (data, model, config) unless a current one exists; return timings.
    A lock file beside it keeps two benchmark processes from building one case at once."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_case(case, folder, fresh, log)


def _build_case(case, folder: Path, fresh: bool, log) -> dict:
    mark = folder / "STAMP"
    data = case.build() if case.kind == "planted" else None
    key = stamp(case, data)  # before training adds the twins' predictions to the truth
    if not fresh and mark.is_file() and mark.read_text() == key:
        return {"built": False, "train_s": 0.0}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    data = data or case.build()
    images, labels, val, truth, twins = data
    torch.manual_seed(case.seed)
    model = nets.build(case.arch, len(case.classes), case.channels, **case.net_kwargs)
    model = synth.train_classifier(model, images, labels, (case.input_size,) * 2, case.mean, case.std,
                                   epochs=case.epochs, seed=case.seed)
    train_s = time.perf_counter() - t
    # The truth side of "cue-driven": the model's prediction on each cue image's neutral twin.
    rels = sorted(twins)
    with torch.no_grad():
        x = synth.preprocess(np.stack([twins[r] for r in rels]), (case.input_size,) * 2, case.mean, case.std)
        pred = torch.cat([model(chunk) for chunk in x.split(128)]).argmax(1).tolist()
    for r, p in zip(rels, pred):
        truth[r]["twin_prediction"] = case.classes[p]
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    shutil.copy(HERE / "nets.py", folder / "net.py")
    for rel, img in val:
        path = folder / "val" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    config = {
        "model": {"factory": "net.py:build",
                  "kwargs": {"arch": case.arch, "num_classes": len(case.classes), "channels": case.channels,
                             **case.net_kwargs},
                  "weights": "model.safetensors", "classes": case.classes,
                  "input": {"size": [case.input_size] * 2, "channels": case.channels,
                            "mean": case.mean, "std": case.std}},
        "data": {"root": "val"},
        "report": {"formats": ["json"]},  # project defaults everywhere else
    }
    (folder / "case.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    mark.write_text(key)
    log(f"  built {case.name}: {len(images)} training images, {len(val)} validation files, "
        f"trained in {train_s:.0f} s")
    return {"built": True, "train_s": round(train_s, 1)}


def audit(folder: Path) -> tuple[dict | None, float, int, str]:
    """``auditor run case.yaml --quiet`` in a subprocess; (findings.json or None where the run
    failed, seconds, exit code, the output's tail). Each benchmark process writes to its own
    ``reports/<pid>/`` (emptied first), so that several may audit one cached case at once."""
    out = folder / "reports" / str(os.getpid())
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "auditor.cli", "run", "case.yaml", "--quiet", "--out", str(out)],
                          cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    seconds = time.perf_counter() - t
    tail = (proc.stdout + proc.stderr)[-2000:]
    runs = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if proc.returncode not in (0, 1) or not runs or not (runs[0] / "findings.json").is_file():
        return None, seconds, proc.returncode, tail  # recorded as a failed case, never as passed
    return json.loads((runs[0] / "findings.json").read_text()), seconds, proc.returncode, tail


# --- Scoring -------------------------------------------------------------------------------

def overlaps(a, b) -> bool:
    return a is not None and b is not None and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def covers(box, cue, image_area: float) -> bool:
    """The issue's hit: ``box`` covers at least half of ``cue`` and at most a quarter of the image."""
    if box is None or cue is None:
        return False
    inter = [max(box[0], cue[0]), max(box[1], cue[1]), min(box[2], cue[2]), min(box[3], cue[3])]
    return area(inter) >= 0.5 * area(cue) and area(box) <= 0.25 * image_area


def _coverage(doc: dict) -> dict:
    cov = doc.get("coverage") or {}
    states = {f"{part}:{name}": c.get("state") for part in ("methods", "rules") for name, c in (cov.get(part) or {}).items()}
    for part in ("trust", "intervention"):
        if isinstance(cov.get(part), dict):
            states[part] = cov[part].get("state")
    return {"states": states,
            "unreliable_methods": sorted(k.split(":", 1)[1] for k, v in states.items()
                                         if k.startswith("methods:") and v != "ran"),
            "rules_without_evidence": sorted(k.split(":", 1)[1] for k, v in states.items()
                                             if k.startswith("rules:") and v in ("no_evidence", "unreliable", "error"))}


def shown(f: dict) -> bool:
    """A finding the report flags: confirmed, or medium and above. A low one that is unconfirmed, or
    one error nothing else points to (``isolated``), is a minor suspicion, listed apart in the appendix
    and not in the gallery of flagged images (``auditor.outputs.report_words.is_minor``): neither a
    hit nor a false alarm."""
    d = f["details"]
    return (bool(d.get("confirmed")) and not d.get("isolated")) or severity_rank(f["severity"]) > severity_rank("low")


def cue_reach(case, samples: list[dict], truth: dict) -> float | None:
    """How well the cue's presence alone reproduces the model's decisions for the cue class on the
    explained images: the balanced agreement (as simple_rule's fidelity, ``auditor.views.tree``) of
    "the image carries the cue" with "the model calls it the cue class". It is the most that
    knowing where the cue is can reproduce: simple_rule asks ``tree.FIDELITY`` (issue 16's
    "reproduces 90% of a class's decisions"), so a case below it is out of that rule's reach
    (a region's own look may add a little: measured, three cases found just below it). None
    without a cue class or with one side empty."""
    seen = [s for s in samples if s.get("explained", True)]
    if not case.cue_class or not seen:
        return None
    cue = np.array([s["path"] in truth and truth[s["path"]]["kind"] != "missing tag" for s in seen], int)
    called = np.array([s["prediction"] == case.cue_class for s in seen], int)
    if called.all() or not called.any():
        return None
    return round(balanced(cue, called), 4)


def score(case, doc: dict, truth: dict) -> dict:
    samples = doc["samples"]
    image_area = float(case.image_size) ** 2
    wrong = [s for s in samples if not s["correct"]]
    # Cue-driven: the model gets the image right once the cue is neutral (see cases.py).
    driven = [s for s in wrong if s["path"] in truth and truth[s["path"]]["twin_prediction"] == s["label"]]
    cue_errors = [s for s in driven if truth[s["path"]]["kind"] != "missing tag"]
    absent = {s["path"] for s in driven if truth[s["path"]]["kind"] == "missing tag"}
    planted = [t for t in truth.values() if t["label"] != t["expected"]]
    turned = sum(1 for s in samples if s["path"] in truth and truth[s["path"]]["label"] != truth[s["path"]]["expected"]
                 and s["prediction"] == truth[s["path"]]["expected"])
    classes = doc["class_findings"]  # ordered by severity, then score
    # Where the cue lies, as fractions of the image: a class finding is on target when it names
    # the cue class and a region overlapping that place (or no region: look_alike's "any blob").
    # A blob can be anywhere: only a region-less finding ("anything of this shape") is on it.
    places = [[v / case.image_size for v in t["bbox"]] for t in truth.values() if t["kind"] != "blob"]

    def on_target(f) -> bool:
        return f["class"] == case.cue_class and (f.get("region") is None or
                                                 any(overlaps(f["region"], p) for p in places))

    def is_hit(s, f) -> bool:
        # The box covers the cue, and the cue decided this prediction: without it the model
        # predicts something else (on an image it would get wrong anyway, the cue still decided
        # *this* wrong class); a missing tag, when its absence made the error.
        t = truth.get(s["path"])
        return t is not None and covers(f.get("bbox"), t["bbox"], image_area) and \
            (s["path"] in absent if t["kind"] == "missing tag" else t["twin_prediction"] != s["prediction"])

    rules = sorted({f["rule"] for s in samples for f in s["findings"]} | {f["rule"] for f in classes})
    per_rule = {}
    for r in [*rules, "any"]:
        mine = lambda f: r in ("any", f["rule"])  # noqa: E731
        every = [(s, f) for s in wrong for f in s["findings"] if mine(f)]
        found = [(s, f) for s, f in every if shown(f)]
        # A hit boxes the planted cue; on a cue-class image that the missing cue made wrong,
        # the empty place where it would be (counted apart: "strict" leaves them out).
        hits = [(s, f) for s, f in found if is_hit(s, f)]
        strict = [(s, f) for s, f in hits if truth[s["path"]]["kind"] != "missing tag"]
        touching = {s["path"] for s, f in found if s["path"] in truth and overlaps(f.get("bbox"), truth[s["path"]]["bbox"])}
        flagged = {s["path"] for s, f in hits}
        own = [f for f in classes if mine(f)]
        cls_true = [f for f in own if on_target(f)]
        confirmed = [bool(f["details"].get("confirmed")) for _, f in hits] + \
                    [bool(f["details"].get("confirmed")) for f in cls_true]
        per_rule[r] = {
            "findings": len(found), "hits": len(hits), "cue_errors_hit": sum(s["path"] in flagged for s in cue_errors),
            "found": sorted(s["path"] for s in cue_errors if s["path"] in flagged),  # which rule found what
            "recall": round(sum(s["path"] in flagged for s in cue_errors) / len(cue_errors), 4) if cue_errors else None,
            # Boxes that touch the cue but fail the size test (too loose or too small a share).
            "recall_touching": round(sum(s["path"] in touching for s in cue_errors) / len(cue_errors), 4)
            if cue_errors else None,
            "precision": round(len(hits) / len(found), 4) if found else None,
            # Every finding, the minor suspicions counted as flags too.
            "findings_all": len(every),
            "precision_all": round(sum(is_hit(s, f) for s, f in every) / len(every), 4) if every else None,
            "precision_strict": round(len(strict) / len(found), 4) if found else None,
            "missing_tag_recall": round(sum(p in flagged for p in absent) / len(absent), 4) if absent else None,
            "confirmed": round(float(np.mean(confirmed)), 4) if confirmed else None,
            "class_findings": len(own),
            "rank": next((k + 1 for k, f in enumerate(own) if on_target(f)), None) if case.cue_class else "n/a",
            "medium_plus_class": sum(1 for f in own if severity_rank(f["severity"]) >= severity_rank("medium")),
            # The rule's first class finding names the cue class, at its place, and is confirmed (issue 16).
            "first_confirmed": bool(own) and on_target(own[0]) and bool(own[0]["details"].get("confirmed")),
        }
    top = classes[0] if classes else None
    gate = doc.get("gate") or {}
    return {
        "cue_reach": cue_reach(case, samples, truth),
        "accuracy": doc["metrics"]["accuracy"], "images": doc["metrics"]["images"],
        "misclassified": len(wrong), "cue_errors": len(cue_errors), "missing_tag_errors": len(absent),
        "cue_errors_by_kind": {k: sum(truth[s["path"]]["kind"] == k for s in cue_errors)
                               for k in sorted({t["kind"] for t in truth.values()})},
        "transfer": round(turned / len(planted), 4) if planted else None,
        "rules": per_rule, "cue_rank": per_rule["any"]["rank"],
        "gate": gate.get("verdict"), "medium_plus_class": per_rule["any"]["medium_plus_class"],
        # Why a gate failed (on a clean twin: what it would wrongly stop a user for).
        "gate_reasons": [c.get("message") for c in gate.get("conditions", []) if not c.get("passed", True)],
        "medium_plus_image_findings": {r: sum(1 for x in samples for f in x["findings"] if f["rule"] == r and
                                              severity_rank(f["severity"]) >= severity_rank("medium"))
                                       for r in rules},
        "coverage": _coverage(doc),
        "top_class_finding": None if top is None else
        {k: top.get(k) for k in ("class", "rule", "severity", "score")} | {"region": top["details"].get("region"),
                                                                         "confirmed": top["details"].get("confirmed")},
        "class_findings": [{k: f.get(k) for k in ("class", "rule", "severity", "score")} |
                           {"region": f["details"].get("region"), "confirmed": f["details"].get("confirmed")}
                           for f in classes],
        "warnings": doc["warnings"], "errors": doc["errors"],
    }


# --- Report --------------------------------------------------------------------------------

def fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _top(s: dict) -> str:
    top = s["top_class_finding"]
    if top is None:
        return "none"
    return f"{top['class']}: {top['rule']} [{top['severity']}] {top['region'] or ''}".strip()


def pairs(results: list[dict]) -> list[tuple[dict, dict | None]]:
    """(poisoned case, its clean twin or control) pairs; dose-only cases have no twin."""
    by_name = {r["case"]: r for r in results}
    out = []
    for r in results:
        if r["poisoned"]:
            twin = by_name.get(r["twin"]) if r.get("twin") else None
            out.append((r, twin))
    return out


def _twin_ok(t: dict | None) -> bool | None:
    if t is None or t["score"] is None:
        return None if t is None else False  # a twin whose audit failed never reads as quiet
    return t["score"]["medium_plus_class"] == 0 and t["score"]["gate"] == "PASS"


def _rules_hit(s: dict) -> str:
    bits = [f"{k} {m['cue_errors_hit']}/{s['cue_errors']}" for k, m in s["rules"].items()
            if k != "any" and m["cue_errors_hit"]]
    return ", ".join(bits) or "-"


def table(results: list[dict]) -> str:
    head = (f"{'case':22} {'setup':58} {'acc':>4} {'cue err':>7} {'recall':>6} {'prec':>5} {'strict':>6} "
            f"{'rank':>4} {'twin m+':>7} {'gate':>5} {'sway':>4}  rules hitting; unreliable methods; top class finding")
    lines = [head, "-" * (len(head) + 10)]
    for r, t in pairs(results):
        s = r["score"]
        if s is None:
            lines.append(f"{r['case']:22} {r['setup'][:58]:58} audit failed (exit {r['exit_code']})")
            continue
        m = s["rules"]["any"]
        ts = t["score"] if t else None
        lines.append(
            f"{r['case']:22} {r['setup'][:58]:58} {fmt(s['accuracy']):>4} {s['cue_errors']:>7} {fmt(m['recall']):>6} "
            f"{fmt(m['precision']):>5} {fmt(m['precision_strict']):>6} {fmt(s['cue_rank']):>4} "
            f"{(fmt(ts['medium_plus_class']) if ts else ('fail' if t else '-')):>7} "
            f"{(ts['gate'] if ts else ('fail' if t else '-')):>5} {fmt(ts['transfer'] if ts else None):>4}  {_rules_hit(s)}; "
            f"{','.join(s['coverage']['unreliable_methods']) or '-'}; {_top(s)}")
    return "\n".join(lines)


def rule_table(results: list[dict]) -> str:
    """Per rule over the split: cue-driven errors hit, findings and their precision, cases where the
    rule ranks the cue class first, and on the clean twins its class and image findings at medium+."""
    rows: dict[str, dict] = {}
    total = 0
    for r, t in pairs(results):
        if r["score"] is None:
            continue
        total += r["score"]["cue_errors"]
        for k, m in r["score"]["rules"].items():
            row = rows.setdefault(k, {"hit": 0, "findings": 0, "hits": 0, "first": 0, "twin_m+": 0, "twin_img": 0})
            row["hit"] += m["cue_errors_hit"]
            row["findings"] += m["findings"]
            row["hits"] += m["hits"]
            row["first"] += m["rank"] == 1
            if t and t["score"]:
                row["twin_m+"] += t["score"]["rules"].get(k, {}).get("medium_plus_class", 0)
                img = t["score"].get("medium_plus_image_findings", {})
                row["twin_img"] += sum(img.values()) if k == "any" else img.get(k, 0)
    head = (f"{'rule':19} {'cue err hit':>11} {'findings':>8} {'prec':>5} {'ranked first':>12} {'twin class m+':>13} "
            f"{'twin image m+':>13}")
    lines = [head, "-" * len(head)]
    for k, row in sorted(rows.items(), key=lambda kv: kv[0] == "any"):
        prec = row["hits"] / row["findings"] if row["findings"] else None
        lines.append(f"{k:19} {row['hit']:>5}/{total:<5} {row['findings']:>8} {fmt(prec):>5} {row['first']:>12} "
                     f"{row['twin_m+']:>13} {row['twin_img']:>13}")
    return "\n".join(lines)


def axis_rows(results: list[dict]) -> dict:
    """Per axis value (generated cases): cases, mean recall, mean precision, rank-first share
    (cases with a cue-driven error), clean-twin pass share (no medium+ class finding, gate PASS)."""
    out: dict[str, dict] = {}
    for r, t in pairs(results):
        if not r.get("axes"):
            continue
        s = r["score"]
        for axis, value in r["axes"].items():
            cell = out.setdefault(axis, {}).setdefault(str(value), {"cases": 0, "recall": [], "precision": [],
                                                                    "first": [], "twin_pass": []})
            cell["cases"] += 1
            if s is not None:
                m = s["rules"]["any"]
                if m["recall"] is not None:
                    cell["recall"].append(m["recall"])
                if m["precision"] is not None:
                    cell["precision"].append(m["precision"])
                if s["cue_errors"]:
                    cell["first"].append(s["cue_rank"] == 1)
            else:
                cell["recall"].append(0.0)
            if t is not None:
                cell["twin_pass"].append(bool(_twin_ok(t)))
    mean = lambda v: round(float(np.mean(v)), 3) if v else None  # noqa: E731
    return {axis: {value: {"cases": c["cases"], "recall": mean(c["recall"]), "precision": mean(c["precision"]),
                           "rank_first": mean(c["first"]), "twin_pass": mean(c["twin_pass"])}
                   for value, c in sorted(vals.items())} for axis, vals in out.items()}


def axis_table(rows: dict) -> str:
    head = f"{'axis':11} {'value':22} {'cases':>5} {'recall':>6} {'prec':>5} {'first':>5} {'twin ok':>7}"
    lines = [head, "-" * len(head)]
    for axis, vals in rows.items():
        for n, (value, c) in enumerate(vals.items()):
            lines.append(f"{(axis if n == 0 else ''):11} {value[:22]:22} {c['cases']:>5} {fmt(c['recall']):>6} "
                         f"{fmt(c['precision']):>5} {fmt(c['rank_first']):>5} {fmt(c['twin_pass']):>7}")
    return "\n".join(lines)


def goals(results: list[dict]) -> dict:
    ps = [(r, t) for r, t in pairs(results) if not r.get("dose_only")]
    scored = [r["score"] for r, _ in ps if r["score"] is not None]
    failed = [r["case"] for r, t in ps if r["score"] is None] + [t["case"] for r, t in ps if t and t["score"] is None]
    anyrule = [s["rules"]["any"] for s in scored]
    n_err = sum(s["cue_errors"] for s in scored)
    n_hit = sum(m["cue_errors_hit"] for m in anyrule)
    n_found = sum(m["findings"] for m in anyrule)
    n_true = sum(m["hits"] for m in anyrule)
    worst = lambda k: min((m[k] for m in anyrule if m[k] is not None), default=None)  # noqa: E731
    out = {
        "recall": {"pooled": round(n_hit / n_err, 4) if n_err else None, "cue_errors": n_err,
                   "worst_case": worst("recall"), "goal": GOALS["recall"]},
        "precision": {"pooled": round(n_true / n_found, 4) if n_found else None, "findings": n_found,
                      "worst_case": worst("precision"), "goal": GOALS["precision"]},
        "confirmed": {"worst_case": worst("confirmed"), "goal": GOALS["confirmed"]},
        "cue_class_first": {"cases": {r["case"]: r["score"]["cue_rank"] for r, _ in ps
                                      if r["score"] is not None and r["score"]["cue_errors"]}},
        "clean_twins": {"cases": {t["case"]: None if t["score"] is None else
                                  {"medium_plus": t["score"]["medium_plus_class"], "gate": t["score"]["gate"]}
                                  for _, t in ps if t is not None}},
        "class_views": class_views(ps),
        "audits_failed": failed,
    }
    # Fail closed: a failed audit, or a split without a cue-driven error, meets nothing.
    for k in ("recall", "precision"):
        out[k]["met"] = not failed and out[k]["pooled"] is not None and out[k]["pooled"] >= GOALS[k]
    out["confirmed"]["met"] = not failed and out["confirmed"]["worst_case"] is not None and \
        out["confirmed"]["worst_case"] >= GOALS["confirmed"]
    firsts = out["cue_class_first"]["cases"].values()
    out["cue_class_first"]["met"] = not failed and bool(firsts) and all(v in (1, "n/a") for v in firsts)
    # Apart, as for the twins: the cases whose model took the cue, by the same SWAY (a model the
    # cue turns few images with has no shortcut to rank: g031's one cue-driven error, 6%).
    by_case = {r["case"]: r for r, _ in ps}
    took = {c: v for c, v in out["cue_class_first"]["cases"].items() if swayed(by_case[c])}
    out["cue_class_first"]["first_among_swayed"] = f"{sum(v in (1, 'n/a') for v in took.values())}/{len(took)}"
    twins = [t for _, t in ps if t is not None]
    out["clean_twins"]["met"] = not failed and bool(twins) and all(_twin_ok(t) for t in twins)
    # Apart, not instead: the twins on which the planted cue, never trained on, still turns at
    # least SWAY of the other classes' images that carry it into the cue class. The model does
    # behave as if it had the shortcut there (the cue reads as the class), so a finding on such a
    # twin reports a real behaviour; the goal above still counts them.
    calm = [t for t in twins if not swayed(t)]
    out["clean_twins"]["swayed"] = sorted(t["case"] for t in twins if t not in calm)
    out["clean_twins"]["ok_among_unswayed"] = f"{sum(bool(_twin_ok(t)) for t in calm)}/{len(calm)}"
    out["class_views"]["met"] = not failed and all(v["met"] for v in out["class_views"].values())
    return out


VIEW_RULES = ("class_visualisation", "simple_rule")


def class_views(ps: list[tuple[dict, dict | None]]) -> dict:
    """Issue 16's goal for the two class-level views: in most cases with a cue at a fixed place
    (a corner, an edge or a fixed spot; a cue anywhere has no place to draw or to ask about) the
    rule's first class finding is the cue class's, confirmed; and no class finding of it at
    medium or above on any clean twin (a twin has no cue to find, wherever its case puts one).
    Counted apart, not instead: the cases whose model took the cue (it turns at least ``SWAY`` of
    the images that carry it, as for cue_class_first), and the twins it does not sway."""
    fixed = [(r, t) for r, t in ps if r.get("axes") and r["axes"]["placement"] != "anywhere" and r["score"]]
    took = [r for r, _ in fixed if swayed(r)]
    # Within simple_rule's reach: the cue's presence alone reproduces FIDELITY of the decisions.
    reach = [r for r in took if (r["score"].get("cue_reach") or 0) >= FIDELITY]
    twins = [t for _, t in ps if t and t["score"]]
    out = {}
    for rule in VIEW_RULES:
        got = [r["case"] for r, _ in fixed if r["score"]["rules"].get(rule, {}).get("first_confirmed")]
        m_plus = lambda ts: sum(t["score"]["rules"].get(rule, {}).get("medium_plus_class", 0) for t in ts)  # noqa: E731
        out[rule] = {"found": f"{len(got)}/{len(fixed)}", "found_where_cue_taken":
                     f"{sum(r['case'] in got for r in took)}/{len(took)}",
                     "found_within_reach": f"{sum(r['case'] in got for r in reach)}/{len(reach)}",
                     "twin_medium_plus": m_plus(twins),
                     "twin_medium_plus_unswayed": m_plus([t for t in twins if not swayed(t)]),
                     "met": bool(fixed) and 2 * len(got) > len(fixed) and m_plus(twins) == 0, "cases": got}
    return out


def dose_table(rows: list[dict]) -> str:
    head = (f"{'dose':>5} {'acc':>5} {'transfer':>8} {'cue err':>7} {'recall':>6} {'prec':>5} {'strict':>6} "
            f"{'rank':>4}  top class finding")
    lines = [head, "-" * (len(head) + 30)]
    for r in rows:
        s = r["score"]
        if s is None:
            continue
        m = s["rules"]["any"]
        lines.append(f"{int(100 * r['dose']):>4}% {fmt(s['accuracy']):>5} {fmt(s['transfer']):>8} {s['cue_errors']:>7} "
                     f"{fmt(m['recall']):>6} {fmt(m['precision']):>5} {fmt(m['precision_strict']):>6} "
                     f"{fmt(s['cue_rank']):>4}  {_top(s)}")
    return "\n".join(lines)


LEGEND = """recall: cue-driven errors (the cue's neutral twin is classified right) with a hit: a box covering at
  least half the cue's box and at most a quarter of the image.
prec: findings on misclassified images that are hits (or box the empty place of the cue on a cue-class
  image whose missing cue made it wrong); strict: the planted cue only.
rank: position of the first class finding on the cue (cue class, region touching the cue) among all class
  findings (severity, then score). twin m+ / gate: the clean twin's class findings at medium or above, and
  its gate verdict. first (axis table): share of cases with a cue-driven error whose cue class ranks first;
  twin ok: share of clean twins with no medium+ class finding and a passing gate. sway: the share of
  the clean twin's planted images (other classes' images carrying the cue) it calls the cue class; at
  0.5 or more the cue reads as the class to a model never trained on it ("swayed", counted apart).
Only what the report flags counts (findings confirmed or at medium and above); the minor suspicions
  it lists apart (low: unconfirmed, or isolated) are neither hits nor false alarms (precision_all
  counts them).
"""

# A clean twin is "swayed" when the cue alone turns this share of the planted images into its class.
SWAY = 0.5


def swayed(r: dict) -> bool:
    """The cue turns at least ``SWAY`` of the other classes' images that carry it into its class:
    the model behaves as if it had the shortcut (a poisoned case's model took it; a twin reads it)."""
    return r["score"] is not None and (r["score"]["transfer"] or 0) >= SWAY


# Per split, cases drawn when --cases is not given: one split in about 15 min on two free cores.
DEFAULT_CASES = 8


def todo(split: str, n: int, quick: bool, skip: int = 0) -> list[tuple[object, dict]]:
    """(case, extra fields) in run order; a poisoned case is followed by its clean twin."""
    out = []
    if split in ("fixed", "all"):
        fixed = case_lib.suite(quick)
        names = {c.name for c in fixed}
        for c in fixed + case_lib.dose_cases(quick):
            twin = f"{c.name}-control" if c.poisoned and f"{c.name}-control" in names else None
            out.append((c, {"split": "fixed", "twin": twin, "dose_only": "-dose" in c.name}))
    for sp in ("tune", "heldout"):
        if split in (sp, "all"):
            for seed in generator.seeds(sp, n, skip):
                case, clean = generator.draw(seed), generator.draw(seed, poisoned=False)
                ax = generator.axes(case)
                out.append((case, {"split": sp, "twin": clean.name, "axes": ax, "dose_only": False}))
                out.append((clean, {"split": sp, "twin": None, "axes": ax, "dose_only": False}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tune", "heldout", "fixed", "all"), default="tune",
                    help="drawn cases (tune: even seeds, heldout: odd seeds), the fixed list, or all")
    ap.add_argument("--cases", type=int, default=DEFAULT_CASES,
                    help=f"drawn cases per split, each with its clean twin (default {DEFAULT_CASES})")
    ap.add_argument("--skip", type=int, default=0,
                    help="draw the split's cases after its first SKIP (fresh cases that no one has read)")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller fixed cases")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this (and their twins)")
    ap.add_argument("--fresh", action="store_true", help="rebuild and retrain every case")
    ap.add_argument("--jobs", type=int, default=1,
                    help="audits run at once (each one thread); 2 on two free cores halves the time")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--json", type=Path, default=None,
                    help="where the results go (default: <out>/detection-<split>[-skipK][-casesN][-quick][-only].json); several people "
                         "running the benchmark at once each give their own")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    jobs = todo(args.split, args.cases, args.quick, args.skip)
    if args.only:
        keep = {c.name for c, x in jobs if args.only in c.name}
        keep |= {x["twin"] for c, x in jobs if c.name in keep and x["twin"]}
        jobs = [(c, x) for c, x in jobs if c.name in keep]
    def run_one(case, extra, built, folder) -> dict:
        doc, seconds, code, tail = audit(folder)
        truth = json.loads((folder / "truth.json").read_text())
        s = score(case, doc, truth) if doc is not None else None
        if s is None:
            log(f"{case.name}: AUDIT FAILED (exit {code}):\n{tail}")
        else:
            log(f"{case.name}: audited in {seconds:.0f} s (exit {code}); accuracy {s['accuracy']:.2f}, "
                f"{s['cue_errors']} cue-driven errors, recall {fmt(s['rules']['any']['recall'])}, "
                f"precision {fmt(s['rules']['any']['precision'])}, cue rank {s['cue_rank']}, gate {s['gate']}, "
                f"medium+ class findings {s['medium_plus_class']}")
        return {"case": case.name, "folder": str(folder), "kind": case.kind, "poisoned": case.poisoned,
                "setup": case.describe(), "dose": case.dose, "cue_class": case.cue_class, "seed": case.seed,
                **extra, "exit_code": code, "audit_s": round(seconds, 1), **built, "score": s,
                "audit_tail": tail if s is None else None}

    # Train one case at a time (in this process), audit up to --jobs at once (subprocesses).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = []
        for case, extra in jobs:
            sub = "cases-quick" if args.quick and extra["split"] == "fixed" else "cases"
            folder = args.out / sub / case.name
            log(f"{case.name}: {case.describe()}")
            built = build_case(case, folder, args.fresh, log)
            futures.append(pool.submit(run_one, case, extra, built, folder))
        results = [f.result() for f in futures]
    main_rows = [r for r in results if not r["dose_only"]]
    print(table(main_rows))
    print()
    print(LEGEND)
    print(rule_table(main_rows))
    print()
    axes = axis_rows(main_rows)
    if axes:
        print(axis_table(axes))
        print()
    dose_rows = sorted([r for r in results if r["case"].startswith("horse-a") and r["poisoned"]],
                       key=lambda r: r["dose"])
    if len(dose_rows) > 1:
        print("Dose-response (horse-a: share of the cue class's training images with the tag)")
        print(dose_table(dose_rows))
        print()
    g = goals(results)
    for k, v in g.items():
        if k == "audits_failed":
            print(f"audits failed: {v or 'none'}")
            continue
        detail = {kk: vv for kk, vv in v.items() if kk != "met"}
        if k == "cue_class_first":  # the counts first: the cases' list is long
            detail = {"first": f"{sum(c in (1, 'n/a') for c in v['cases'].values())}/{len(v['cases'])}",
                      "first_among_swayed": v["first_among_swayed"], "cases": v["cases"]}
        if k == "clean_twins":  # the count first: the cases' list is long
            ok = sum(bool(c) and c["medium_plus"] == 0 and c["gate"] == "PASS" for c in v["cases"].values())
            detail = {"ok": f"{ok}/{len(v['cases'])}", "swayed": v["swayed"],
                      "ok_among_unswayed": v["ok_among_unswayed"], "cases": v["cases"]}
        if k == "class_views":  # each rule's counts, without its list of cases (in the JSON)
            detail = {r: {kk: vv for kk, vv in v[r].items() if kk not in ("cases", "met")} for r in VIEW_RULES}
        print(f"goal {k:16} {'MET' if v['met'] else 'NOT MET'}  {json.dumps(detail, default=str)[:400]}")
    total = time.perf_counter() - t0
    print(f"\n{len(results)} audits in {total / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    # a run of other cases (fresh ones past --skip, another count, one case) does not overwrite the split's file
    tag = "".join([f"-skip{args.skip}" if args.skip else "", f"-cases{args.cases}" if args.cases != DEFAULT_CASES else "",
                   "-quick" if args.quick else "", "-only" if args.only else ""])
    path = args.json or args.out / f"detection-{args.split}{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(
        {"version": VERSION, "split": args.split, "cases_per_split": args.cases, "skip": args.skip, "quick": args.quick,
         "only": args.only, "seconds": round(total, 1), "goals": g, "axes": axes, "cases": results},
        indent=1, default=str))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
