"""Detection benchmark: do the rules find planted "Clever Hans" cues, and stay quiet without one?

    OMP_WAIT_POLICY=PASSIVE python bench/detection.py [--quick] [--only NAME] [--fresh]

Each case (``bench/cases.py``) plants a cue with known truth, trains a small model on it
(seconds), and is written as an ordinary user project: ``val/<class>/*.png`` (ImageFolder),
``net.py`` (the model factory), ``model.safetensors`` and ``case.yaml``. It is then audited
through the command line (``auditor run case.yaml --quiet``, a subprocess) and its
``findings.json`` is scored against the truth, per rule:

- recall: of the misclassified images that carry a planted cue and whose error the cue caused
  (the model gets the image's neutral twin right, see cases.py), the share with a finding
  whose box overlaps the cue's box;
- precision: of the findings on misclassified images, the share whose box overlaps a planted
  cue in that image, or, on a cue-class photo that its missing tag made wrong, the place where
  the tag would be; "strict" precision gives no credit for the missing tag;
- confirmed: of those true findings (and the cue class's class findings), the share the
  intervention confirmed (``details.confirmed``);
- rank: the position of the cue class among the class findings (ordered by severity, then
  score), n/a for Decoy where every class carries the cue;
- control: class findings at severity medium or above on the clean-trained control;
- dose: the same for the cue on 0, 10, 50 and 100 % of one class's training images.

Goals: recall >= 0.95, precision >= 0.90, cue class ranked first, no medium+ class finding on
any control, confirmed share >= 0.9. The precision goal is judged on "precision", not "strict":
a finding on the empty corner of a photo whose missing tag made it wrong (its twin with the tag
is classified right) is a true finding about the model's reliance on the tag. The table goes to stdout and, with every number, to
``bench/out/detection.json``. Trained cases are cached in ``bench/out/cases/`` by a stamp of
their parameters (``--fresh`` rebuilds them); the audit always runs anew.
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
import cases as case_lib  # noqa: E402
import nets  # noqa: E402

VERSION = "detection-1"
GOALS = {"recall": 0.95, "precision": 0.90, "confirmed": 0.90}


# --- Writing a case as a user project ------------------------------------------------------

def stamp(case) -> str:
    src = "".join((HERE / f).read_text() for f in ("cases.py", "nets.py"))
    src += Path(synth.__file__).read_text()
    blob = json.dumps(asdict(case), sort_keys=True, default=str) + VERSION + src
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_case(case, folder: Path, fresh: bool, log) -> dict:
    """Make ``folder`` (data, model, config) unless a current one exists; return timings."""
    mark = folder / "STAMP"
    if not fresh and mark.is_file() and mark.read_text() == stamp(case):
        return {"built": False, "train_s": 0.0}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    images, labels, val, truth, twins = case.build()
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
        "explain": {"samples": "misclassified", "per_class": 24},
        "report": {"out": "reports", "formats": ["json"], "fail_on": "high"},
        "run": {"seed": 0},
    }
    (folder / "case.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    mark.write_text(stamp(case))
    log(f"  built {case.name}: {len(images)} training images, {len(val)} validation files, "
        f"trained in {train_s:.0f} s")
    return {"built": True, "train_s": round(train_s, 1)}


def audit(folder: Path) -> tuple[dict, float, int]:
    """``auditor run case.yaml --quiet`` in a subprocess; (findings.json, seconds, exit code)."""
    shutil.rmtree(folder / "reports", ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "auditor.cli", "run", "case.yaml", "--quiet"],
                          cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    seconds = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"audit of {folder.name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run = next(p for p in (folder / "reports").iterdir() if not p.name.startswith("."))
    return json.loads((run / "findings.json").read_text()), seconds, proc.returncode


# --- Scoring -------------------------------------------------------------------------------

def overlaps(a, b) -> bool:
    return a is not None and b is not None and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def score(case, doc: dict, truth: dict) -> dict:
    samples = doc["samples"]
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
    places = [[t["bbox"][0] / case.image_size, t["bbox"][1] / case.image_size,
               t["bbox"][2] / case.image_size, t["bbox"][3] / case.image_size]
              for t in truth.values() if t["kind"] != "blob"]

    def on_target(f) -> bool:
        return f["class"] == case.cue_class and (f.get("region") is None or
                                                 any(overlaps(f["region"], p) for p in places))

    rules = sorted({f["rule"] for s in samples for f in s["findings"]} | {f["rule"] for f in classes})
    per_rule = {}
    for r in [*rules, "any"]:
        found = [(s, f) for s in wrong for f in s["findings"] if r in ("any", f["rule"])]
        # A hit points at the planted cue; on a cue-class photo that the missing tag made wrong,
        # at the empty place where the tag would be (counted apart: "strict" leaves them out).
        hits = [(s, f) for s, f in found if s["path"] in truth and overlaps(f.get("bbox"), truth[s["path"]]["bbox"])
                and (truth[s["path"]]["kind"] != "missing tag" or s["path"] in absent)]
        strict = [(s, f) for s, f in hits if truth[s["path"]]["kind"] != "missing tag"]
        flagged = {s["path"] for s, f in hits}
        cls_true = [f for f in classes if r in ("any", f["rule"]) and on_target(f)]
        confirmed = [bool(f["details"].get("confirmed")) for _, f in hits] + \
                    [bool(f["details"].get("confirmed")) for f in cls_true]
        per_rule[r] = {
            "findings": len(found), "hits": len(hits),
            "recall": round(sum(s["path"] in flagged for s in cue_errors) / len(cue_errors), 4) if cue_errors else None,
            "precision": round(len(hits) / len(found), 4) if found else None,
            "precision_strict": round(len(strict) / len(found), 4) if found else None,
            "missing_tag_recall": round(sum(p in flagged for p in absent) / len(absent), 4) if absent else None,
            "confirmed": round(float(np.mean(confirmed)), 4) if confirmed else None,
            "class_findings": sum(1 for f in classes if r in ("any", f["rule"])),
            "medium_plus_class": sum(1 for f in classes
                                     if r in ("any", f["rule"]) and severity_rank(f["severity"]) >= severity_rank("medium")),
        }
    cue_rank = next((k + 1 for k, f in enumerate(classes) if on_target(f)), None) if case.cue_class else "n/a"
    top = classes[0] if classes else None
    return {
        "accuracy": doc["metrics"]["accuracy"], "images": doc["metrics"]["images"],
        "misclassified": len(wrong), "cue_errors": len(cue_errors), "missing_tag_errors": len(absent),
        "cue_errors_by_kind": {k: sum(truth[s["path"]]["kind"] == k for s in cue_errors)
                               for k in sorted({t["kind"] for t in truth.values()})},
        "transfer": round(turned / len(planted), 4) if planted else None,
        "rules": per_rule, "cue_rank": cue_rank,
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


def table(results: list[dict]) -> str:
    head = (f"{'case':20} {'setup':42} {'acc':>4} {'cue err':>7} {'rule':14} {'recall':>6} {'prec':>5} "
            f"{'strict':>6} {'conf':>5} {'finds':>5} {'rank':>4}  top class finding")
    lines = [head, "-" * (len(head) + 20)]
    for r in results:
        s = r["score"]
        rules = [k for k in s["rules"] if k != "any" and (s["rules"][k]["findings"] or s["rules"][k]["class_findings"])]
        for n, rule in enumerate([*rules, "any"]):
            m = s["rules"][rule]
            first, last = n == 0, rule == "any"
            lines.append(
                f"{(r['case'] if first else ''):20} {(r['setup'] if first else ''):42} "
                f"{(fmt(s['accuracy']) if first else ''):>4} {(str(s['cue_errors']) if first else ''):>7} "
                f"{rule:14} {fmt(m['recall']):>6} {fmt(m['precision']):>5} {fmt(m['precision_strict']):>6} "
                f"{fmt(m['confirmed']):>5} {m['findings']:>5} {(fmt(s['cue_rank']) if last else ''):>4}  "
                + ("" if not last else _top(s) if r["poisoned"] else
                   f"control: {m['medium_plus_class']} class finding(s) medium+; {_top(s)}"))
        lines.append("")
    return "\n".join(lines)


def goals(results: list[dict]) -> dict:
    poisoned = [r for r in results if r["poisoned"] and not r.get("dose_only")]
    controls = [r for r in results if not r["poisoned"]]
    anyrule = [r["score"]["rules"]["any"] for r in poisoned]
    vals = lambda k: [m[k] for m in anyrule if m[k] is not None]  # noqa: E731
    out = {
        "recall": {"worst": min(vals("recall"), default=None)},
        "precision": {"worst": min(vals("precision"), default=None)},
        "confirmed": {"worst": min(vals("confirmed"), default=None)},
        "cue_class_first": {"cases": {r["case"]: r["score"]["cue_rank"] for r in poisoned}},
        "controls_quiet": {"medium_plus": {r["case"]: r["score"]["rules"]["any"]["medium_plus_class"]
                                           for r in controls}},
    }
    for k in ("recall", "precision", "confirmed"):
        out[k]["goal"] = GOALS[k]
        out[k]["met"] = out[k]["worst"] is not None and out[k]["worst"] >= GOALS[k]
    out["cue_class_first"]["met"] = all(v in (1, "n/a") for v in out["cue_class_first"]["cases"].values())
    out["controls_quiet"]["met"] = not any(out["controls_quiet"]["medium_plus"].values())
    return out


def dose_table(rows: list[dict]) -> str:
    head = (f"{'dose':>5} {'acc':>5} {'transfer':>8} {'cue err':>7} {'recall':>6} {'prec':>5} {'strict':>6} "
            f"{'rank':>4}  top class finding")
    lines = [head, "-" * (len(head) + 30)]
    for r in rows:
        s = r["score"]
        m = s["rules"]["any"]
        lines.append(f"{int(100 * r['dose']):>4}% {fmt(s['accuracy']):>5} {fmt(s['transfer']):>8} {s['cue_errors']:>7} "
                     f"{fmt(m['recall']):>6} {fmt(m['precision']):>5} {fmt(m['precision_strict']):>6} "
                     f"{fmt(s['cue_rank']):>4}  {_top(s)}")
    return "\n".join(lines)


LEGEND = """recall: cue-driven errors (the cue's neutral twin is classified right) flagged with a box on the cue.
prec: findings on misclassified images whose box is on a planted cue, or on the empty corner of a
  cue-class photo whose missing tag made it wrong; strict: the planted cue only.
conf: share of those true findings, and of the cue class's class findings, that the intervention confirmed.
rank: position of the first class finding on the cue (cue class, region on the cue) among all class findings.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases (a few minutes)")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--fresh", action="store_true", help="rebuild and retrain every case")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    todo = case_lib.suite(args.quick) + case_lib.dose_cases(args.quick)
    if args.only:
        todo = [c for c in todo if args.only in c.name]
    results = []
    for case in todo:
        folder = args.out / ("cases-quick" if args.quick else "cases") / case.name
        log(f"{case.name}: {case.describe()}")
        built = build_case(case, folder, args.fresh, log)
        doc, seconds, code = audit(folder)
        truth = json.loads((folder / "truth.json").read_text())
        s = score(case, doc, truth)
        log(f"  audited in {seconds:.0f} s (exit {code}); accuracy {s['accuracy']:.2f}, "
            f"{s['cue_errors']} cue-driven errors, recall {fmt(s['rules']['any']['recall'])}, "
            f"precision {fmt(s['rules']['any']['precision'])}, cue rank {s['cue_rank']}")
        results.append({"case": case.name, "kind": case.kind, "poisoned": case.poisoned, "setup": case.describe(),
                        "dose": case.dose, "cue_class": case.cue_class, "dose_only": "-dose" in case.name,
                        "exit_code": code, "audit_s": round(seconds, 1), **built, "score": s})
    main_rows = [r for r in results if not r["dose_only"]]
    print(table(main_rows))
    print(LEGEND)
    dose_rows = sorted([r for r in results if r["case"].startswith("horse-a")], key=lambda r: r["dose"])
    if len(dose_rows) > 1:
        print("Dose-response (horse-a: share of the cue class's training images with the tag)")
        print(dose_table(dose_rows))
        print()
    g = goals(results)
    for k, v in g.items():
        detail = {kk: vv for kk, vv in v.items() if kk != "met"}
        print(f"goal {k:16} {'MET' if v['met'] else 'NOT MET'}  {detail}")
    total = time.perf_counter() - t0
    print(f"\n{len(results)} audits in {total / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection.json").write_text(json.dumps(
        {"version": VERSION, "quick": args.quick, "seconds": round(total, 1), "goals": g, "cases": results},
        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
