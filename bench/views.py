"""Global views benchmark: do class_visualisation and simple_rule find the poisoned class of the
fixed-location cases, and stay quiet on their clean twins? And what do the views cost?

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/views.py [--only NAME]
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/views.py --demo   # the cost on the demo

Audits the trained cases of ``bench/detection.py`` (built there, in ``bench/out/cases/``; run it
first) in this process, with the two rules only and the trust gate off (neither rule reads a
heatmap). Per case and rule: the finding on the cue class (its region on the cue's place or not)
as the rule raised it (``raw``: for class_visualisation that is with no data at all) and after
intervention, and the findings on other classes; per clean twin, the findings at medium or above.
Writes ``bench/out/views.json``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from auditor.audit import run_audit  # noqa: E402
from auditor.inputs.config import load_config  # noqa: E402
from auditor.judge.evidence import severity_rank  # noqa: E402

CASES = ["horse-a", "horse-b", "horse-c", "rect-a", "rect-b", "decoy-digits"]
RULES = ("class_visualisation", "simple_rule")


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def cue_of(folder: Path) -> tuple[str | None, list[list[float]]]:
    """The class a fixed-place cue stands for and its places as fractions (None for Decoy and blobs:
    no fixed place)."""
    truth = json.loads((folder / "truth.json").read_text())
    tags = [t for t in truth.values() if t["kind"] in ("tag", "missing tag")]
    if not tags:
        return None, []
    from PIL import Image
    first = next(iter(truth))
    w, h = Image.open(folder / "val" / first).size
    return tags[0]["expected"], [[t["bbox"][0] / w, t["bbox"][1] / h, t["bbox"][2] / w, t["bbox"][3] / h] for t in tags]


def one(folder: Path) -> dict:
    cue, places = cue_of(folder)
    cfg = load_config(folder / "case.yaml", ["rules={class_visualisation: {}, simple_rule: {}}", "trust.enabled=false",
                                             "report.formats=[json]"])
    t = time.perf_counter()
    res = run_audit(cfg, quiet=True)
    seconds = time.perf_counter() - t
    out = {"case": folder.name, "cue_class": cue, "seconds": round(seconds, 1),
           "views_seconds": res.record.views.seconds if res.record.views else None,
           "apl": res.record.views.average_path_length if res.record.views else None}
    for rule in RULES:
        fs = [f for f in res.class_findings if f.rule == rule]
        on = [f for f in fs if f.cls == cue and any(overlaps(f.region, p) for p in places)]
        out[rule] = {
            "raw_on_cue": bool(on), "confirmed_on_cue": any(f.details.get("confirmed") for f in on),
            "off_cue": [(f.cls, f.details.get("region"), f.details.get("severity_before_intervention"), f.severity)
                        for f in fs if f not in on],
            "medium_plus": sum(severity_rank(f.severity) >= severity_rank("medium") for f in fs),
            "findings": [(f.cls, f.details.get("region"), f.score, f.details.get("severity_before_intervention"),
                          f.severity) for f in fs]}
    return out


def cost(config: Path) -> dict:
    """One whole audit with its reports (``auditor run``'s work), timing the global section inside
    it: the two rules and ``global_views``."""
    import auditor.audit as audit
    from auditor.outputs.write import write_run
    from auditor.registry import RULES as REG
    spent = {"class_visualisation": 0.0, "simple_rule": 0.0, "global_views": 0.0}

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return run

    for name in RULES:
        entry = REG.get(name)
        object.__setattr__(entry, "fn", timed(name, entry.fn))
    audit.global_views = timed("global_views", audit.global_views)
    t = time.perf_counter()
    res = audit.run_audit(load_config(config, ["report.out=" + str(HERE / "out" / "views-demo")]), quiet=True)
    audit_s = time.perf_counter() - t
    try:
        write_run(res)
        error = None
    except Exception as e:  # the reports are part of the time, but a rendering bug is not the views'
        error = f"{type(e).__name__}: {e}"
    total = time.perf_counter() - t
    return {"total_s": round(total, 1), "audit_s": round(audit_s, 1), "write_error": error,
            **{k: round(v, 2) for k, v in spent.items()}, "share": round(sum(spent.values()) / total, 3),
            "views": res.record.views.seconds if res.record.views else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None)
    ap.add_argument("--cases", type=Path, default=HERE / "out" / "cases")
    ap.add_argument("--demo", action="store_true", help="measure the global section's share of the demo audit")
    args = ap.parse_args(argv)
    if args.demo:
        print(json.dumps(cost(HERE.parent / "audit.yaml")))
        return 0
    rows = []
    for name in CASES:
        for folder in (args.cases / name, args.cases / f"{name}-control"):
            if (args.only and args.only not in folder.name) or not (folder / "case.yaml").is_file():
                continue
            rows.append(one(folder))
            r = rows[-1]
            print(f"{r['case']:22} cue {r['cue_class'] or '-':8} " + "  ".join(
                f"{rule}: raw {'Y' if r[rule]['raw_on_cue'] else '-'} conf {'Y' if r[rule]['confirmed_on_cue'] else '-'} "
                f"off {len(r[rule]['off_cue'])} med+ {r[rule]['medium_plus']}" for rule in RULES)
                + f"  views {r['views_seconds']} s of {r['seconds']} s", flush=True)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "views.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
