"""Global views benchmark: do class_visualisation and simple_rule find the poisoned class of the
cases with a cue at one place (a corner, an edge or a fixed place), and stay quiet on every clean
twin? And what do the views cost?

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/views.py [--only NAME]
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/views.py --split tune [--n 16] [--json F]
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python bench/views.py --demo   # the cost on the demo

Audits the trained cases of ``bench/detection.py`` (built there, in ``bench/out/cases/``; run it
first) in this process, with the two rules only and the trust gate off (neither rule reads a
heatmap). Per case and rule: the finding on the cue class (its region on the cue's place or not)
as the rule raised it (``raw``: before the intervention's own test) and after
intervention, its rank among the rule's findings (severity, then score) and its severity, and the
findings on other classes; per clean twin, the findings at medium or above. The last lines give the
issue's measure: per rule, the poisoned cases whose cue class ranks first and is confirmed, and the
clean twins with a finding at medium or above. Writes ``bench/out/views.json`` (or ``--json``).
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
    tags = [t for t in truth.values() if t["kind"] not in ("decoy", "blob")]  # a tag, shape, sticker, frame...
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
        fs = sorted((f for f in res.class_findings if f.rule == rule), key=lambda f: (-severity_rank(f.severity), -f.score))
        on = [f for f in fs if f.cls == cue and any(overlaps(f.region, p) for p in places)]
        out[rule] = {
            "rank": next((k + 1 for k, f in enumerate(fs) if f in on), None),
            "severity_on_cue": on[0].severity if on else None,
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
    ap.add_argument("--split", choices=("tune", "heldout"), default=None,
                    help="the drawn cases of bench/detection.py with a cue at one place (corner, edge or fixed; "
                         "and their clean twins, instead of the fixed list")
    ap.add_argument("--n", type=int, default=16, help="with --split: drawn cases looked at (as detection's --cases)")
    ap.add_argument("--json", type=Path, default=HERE / "out" / "views.json")
    args = ap.parse_args(argv)
    if args.demo:
        print(json.dumps(cost(HERE.parent / "audit.yaml")))
        return 0
    rows = []
    names = drawn_cases(args.split, args.n) if args.split else [(n, True) for n in CASES]
    for name, placed in names:
        # The cue at one place: the poisoned case is looked at; every clean twin must stay quiet.
        folders = ([args.cases / name] if placed else []) + [args.cases / (f"{name}-clean" if args.split else f"{name}-control")]
        for folder in folders:
            if (args.only and args.only not in folder.name) or not (folder / "case.yaml").is_file():
                continue
            rows.append(one(folder))
            r = rows[-1]
            print(f"{r['case']:22} cue {r['cue_class'] or '-':8} " + "  ".join(
                f"{rule}: rank {r[rule]['rank'] or '-'} {r[rule]['severity_on_cue'] or '-':8} "
                f"off {len(r[rule]['off_cue'])} med+ {r[rule]['medium_plus']}" for rule in RULES)
                + f"  views {r['views_seconds']} s of {r['seconds']} s", flush=True)
    clean = [r for r in rows if r["case"].endswith(("-clean", "-control"))]
    poisoned = [r for r in rows if r not in clean and r["cue_class"]]
    for rule in RULES:  # the measure: the cue class ranked first and confirmed; quiet twins
        first = sum(r[rule]["rank"] == 1 and r[rule]["confirmed_on_cue"] for r in poisoned)
        print(f"{rule}: cue class first and confirmed in {first}/{len(poisoned)} poisoned cases; "
              f"clean twins with a medium+ finding: {sum(r[rule]['medium_plus'] > 0 for r in clean)}/{len(clean)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


def drawn_cases(split: str, n: int) -> list[tuple[str, bool]]:
    """The drawn cases of ``split``: (name, whether its cue sits at one place: a corner, an edge or a
    fixed place)."""
    import generator
    return [(generator.draw(s).name, generator.axes(generator.draw(s))["placement"] in ("corner", "fixed", "edge"))
            for s in generator.seeds(split, n)]


if __name__ == "__main__":
    sys.exit(main())
