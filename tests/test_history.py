"""auditor history: a folder of runs read as one history per model family; and the run report's
charts (confusion matrix, per-class precision and recall, the trust gate's cascade).

Runs are made without a model: bench/report.py's synthetic audit, varied (dates, data, settings,
class findings, gate), written by write_run as findings.json only; one schema 1 findings.json is
written by hand; damaged folders sit beside them."""
from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from auditor.outputs import history, plots
from auditor.outputs.write import load_pictures, rerender, write_run
from auditor.record import Waived

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>$x$"
runner = CliRunner()


def _bench():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(res, out: Path, day: int, *, drop=(), data="0", factory=None, trust=None, passed=False, waive=False):
    """Write one variant of the synthetic run: its date, data fingerprint, class findings dropped
    by rule, another model.factory, other trust settings, a passing gate, its class findings waived."""
    rec = res.record
    cfg = json.loads(json.dumps(rec.run["config"]))
    if factory:
        cfg["model"]["factory"] = factory
    if trust:
        cfg["trust"].update(trust)
    run = {**rec.run, "started": f"2026-11-{day:02d}T02:15:00+00:00", "data_fingerprint": data * 64, "config": cfg}
    waiver = Waived(waiver=0, owner="jane@example.com", reason=f"TICKET-1 {EVIL}", expires="2026-12-31")
    update = {"run": run, "class_findings": tuple(f.model_copy(update={"waived": waiver}) if waive else f
                                                  for f in rec.class_findings if f.rule not in drop)}
    if passed:
        update["gate"] = rec.gate.model_copy(update={"passed": True, "verdict": "PASS", "failed": []})
    return write_run(dataclasses.replace(res, record=rec.model_copy(update=update)), out)


def _schema1(res, folder: Path) -> None:
    """A findings.json as schema 1 wrote it (no sample ids, no verdict, no coverage), by hand."""
    rec = res.record
    run = {**{k: rec.run[k] for k in ("config", "classes", "weights_sha256", "model_sha256", "data_fingerprint",
                                      "methods", "rules", "seed", "versions")},
           "id": folder.name, "started": "2026-10-31T02:15:00+00:00", "finished": "2026-10-31T02:16:00+00:00"}
    doc = {"schema_version": 1, "run": run,
           "samples": [{"path": "c0/a.png", "label": "box", "prediction": "box", "confidence": 0.9, "correct": True,
                        "explained": True, "size": [96, 96], "findings": []}],
           "class_findings": [{"class": "gravel", "rule": "corner_border", "severity": "high", "score": 0.5,
                               "share": 0.8, "message": "old corner finding", "details": {"confirmed": True}}],
           "metrics": {"accuracy": 0.75, "images": 40, "misclassified": 10, "explained": 10,
                       "per_class": [], "confusion": {"classes": rec.classes, "matrix": []}},
           "gate": {"passed": False, "fail_on": "high", "worst": "high",
                    "failed": ["severity: 1 finding(s) at or above 'high' (worst: high)"]}}
    folder.mkdir()
    (folder / "findings.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """reports/: family A (bench.synthetic:net) over six nights, a schema 1 run first; family B (other
    classes, one hostile); family C (A's classes, another factory); damaged and hidden folders."""
    tmp = tmp_path_factory.mktemp("history")
    out = tmp / "reports"
    bench = _bench()
    a = bench.synthetic_result(tmp / "data-a", 4, correct_per_class=3)
    a.cfg.report.formats = ["json"]
    out.mkdir()
    _schema1(a, out / "20261031-021500")
    _run(a, out, 1)                                             # both class findings
    _run(a, out, 2, drop=("fixed_location",))                   # fixed_location resolved here
    _run(a, out, 3, drop=("fixed_location", "corner_border"), data="1")   # new data (A): corner resolved
    _run(a, out, 4, drop=("fixed_location", "corner_border"), data="1", trust={"max_spearman": 0.3}, passed=True)
    _run(a, out, 6, drop=("fixed_location",), data="1", trust={"max_spearman": 0.3}, waive=True)  # back, waived
    _run(a, out, 5, factory="other.py:make")                    # family C
    b = bench.synthetic_result(tmp / "data-b", 3, classes=[EVIL, "cat", "dog", "emu"], correct_per_class=3)
    b.cfg.report.formats = ["json"]
    b.record.run["config"]["model"]["factory"] = "bench.other:net"
    _run(b, out, 7)
    _run(b, out, 8, passed=True)
    (out / "broken").mkdir()
    (out / "broken" / "findings.json").write_text("{not json")
    (out / "future").mkdir()
    (out / "future" / "findings.json").write_text(json.dumps({"schema_version": 99, "run": {}, "samples": [],
                                                              "class_findings": [], "metrics": {}}))
    (out / "notes").mkdir()
    (out / ".cache").mkdir()
    (out / ".20261109-000000.partial").mkdir()
    (out / "nightly.log").write_text("a file, not a run\n")
    return out


@pytest.fixture(scope="module")
def written(runs):
    r = runner.invoke(app, ["history", str(runs)])
    assert r.exit_code == 0, r.output
    return r.output, (runs / "history.html").read_text()


def _families(runs):
    found, skipped = history.collect(runs)
    ctx = history.context(runs, found, skipped, runs / "scratch-images")
    shutil.rmtree(runs / "scratch-images")
    return {f["title"]: f for f in ctx["families"]}, skipped


def test_runs_are_grouped_by_family_in_time_order(runs):
    fams, _ = _families(runs)
    assert set(fams) == {"bench.synthetic:net", "other.py:make", "bench.other:net"}
    a = fams["bench.synthetic:net"]
    assert [r["date"][:10] for r in a["rows"]] == ["2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03",
                                                   "2026-11-04", "2026-11-06"]   # the schema 1 run first
    assert len(fams["other.py:make"]["rows"]) == 1 and len(fams["bench.other:net"]["rows"]) == 2
    assert a["rows"][0]["verdict"] == "FAIL" and a["rows"][4]["verdict"] == "PASS"
    assert a["rows"][1]["confirmed"] == ["corner_border: gravel", "fixed_location: gravel"]
    assert re.fullmatch(r"\d+\.\d% to \d+\.\d%", a["rows"][1]["interval"])
    assert a["rows"][5]["waivers"] == [f"jane@example.com until 2026-12-31 (1 finding): TICKET-1 {EVIL}"]
    assert a["rows"][4]["waivers"] == []
    assert [x["date"][:10] for x in a["failures"]] == ["2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03",
                                                       "2026-11-06"]
    assert a["failures"][0]["lines"] == ["severity: 1 finding(s) at or above 'high' (worst: high)"]


def test_first_seen_last_seen_and_resolved(runs):
    fams, _ = _families(runs)
    t = {(x["class"], x["rule"]): x for x in fams["bench.synthetic:net"]["timeline"]}
    fixed, corner = t[("gravel", "fixed_location")], t[("gravel", "corner_border")]
    assert fixed["first"].startswith("2026-11-01") and fixed["last"].startswith("2026-11-01")
    assert fixed["resolved"].startswith("2026-11-02") and not fixed["open"]
    assert corner["first"].startswith("2026-10-31")                     # from the schema 1 run
    assert corner["last"].startswith("2026-11-06") and corner["open"]   # came back after two runs away
    assert corner["runs"] == "4 of 6" and "absent from 2 runs in between" in corner["note"]
    assert list(t)[0] == ("gravel", "corner_border")                    # still open: listed first


def test_data_and_settings_changes_are_marked(runs):
    fams, _ = _families(runs)
    a = fams["bench.synthetic:net"]
    assert [r["mark"] for r in a["rows"]] == ["", "", "", "A", "B", ""]
    assert a["rows"][3]["mark_what"] == "data" and a["rows"][4]["mark_what"] == "settings"
    assert "the data changed" in a["notes"][0]["text"] and "trust.max_spearman" in a["notes"][1]["text"]
    assert "marked A and B" in a["lines"][1]
    assert not any(r["new_model"] for r in a["rows"])


def test_damaged_folders_are_listed_with_the_reason_hidden_ones_not(runs):
    _, skipped = _families(runs)
    why = {s["folder"]: s["reason"] for s in skipped}
    assert set(why) == {"broken", "future", "notes"}
    assert "not readable JSON" in why["broken"] and str(runs) not in why["broken"]
    assert "schema_version 99" in why["future"] and "no findings.json" in why["notes"]


def test_html_is_self_contained_and_escapes_hostile_names(written, runs):
    output, page = written
    assert "skipped broken:" in output and "9 runs read" in output
    assert EVIL not in page and html.escape(EVIL, quote=False) in page

    class Refs(HTMLParser):
        refs, tags = [], set()

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.refs += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]
            assert not any(k.startswith("on") for k, _ in attrs)

    p = Refs()
    p.feed(page)
    assert not p.tags & {"script", "link", "iframe", "object"}
    assert not re.search(r"url\(|@import|https?://", page, re.I)
    charts = [r for r in p.refs if not r.startswith("#")]
    assert len(charts) == 6 and all(re.fullmatch(r"history-images/f\d-(accuracy|findings)\.png", r) for r in charts)
    assert all((runs / r).is_file() for r in charts)
    assert sorted(p.name for p in (runs / "history-images").iterdir()) == sorted(r.split("/")[1] for r in charts)
    assert not [p for p in runs.iterdir() if p.name.startswith(".history")]   # nothing half-written left


def test_pdf_is_written_and_reads_only_its_folder(runs, tmp_path, monkeypatch):
    from auditor.outputs import report
    fetched, real = [], report.run_folder_fetcher

    def spy(root):
        inner = real(root)
        original = inner.fetch

        def fetch(url, headers=None):
            fetched.append(url)
            return original(url, headers)
        inner.fetch = fetch
        return inner

    monkeypatch.setattr(report, "run_folder_fetcher", spy)
    out = tmp_path / "elsewhere" / "h.html"
    written, n, _ = history.write_history(runs, out)
    assert written == [out, out.with_suffix(".pdf")] and n == 9
    assert out.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    pngs = [u for u in fetched if u.endswith(".png")]
    assert len(pngs) == 6 and all(report.allowed_url(u, out.parent) for u in fetched)
    assert (out.parent / "history-images").is_dir()
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext is not installed (Debian: poppler-utils)")
    text = subprocess.run(["pdftotext", str(out.with_suffix(".pdf")), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "bench.synthetic:net" in text and "Class-level findings over time" in text and EVIL[:8] in text


def test_cli_exit_codes(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["history", str(empty)])
    assert r.exit_code == 2 and "holds no finished run folder" in r.output
    r = runner.invoke(app, ["history", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "is not a folder" in r.output
    only_bad = tmp_path / "bad"
    shutil.copytree(runs / "broken", only_bad / "broken")
    r = runner.invoke(app, ["history", str(only_bad)])
    assert r.exit_code == 2 and "not readable JSON" in r.output and not (only_bad / "history.html").exists()
    r = runner.invoke(app, ["history", str(runs), "--out", str(tmp_path / "h.pdf")])
    assert r.exit_code == 2 and ".html" in r.output
    one = tmp_path / "one"
    shutil.copytree(runs / "20261101-021500", one / "20261101-021500")
    r = runner.invoke(app, ["history", str(one)])
    assert r.exit_code == 0 and (one / "history.html").is_file() and (one / "history.pdf").is_file(), r.output


# --- the run report's charts (item 3 of the issue) ------------------------------------------

def test_report_shows_confusion_matrix_class_rates_and_cascade_for_many_classes(tmp_path):
    classes = [f"class {k:02d} with a long name" for k in range(19)] + [EVIL]
    res = _bench().synthetic_result(tmp_path / "data", 6, classes=classes, correct_per_class=2)
    res.cfg.report.formats = ["html"]
    folder = write_run(res, tmp_path / "reports")
    pictures = load_pictures(folder)
    assert pictures["cascade"] == "images/cascade.png"
    for key in ("confusion", "class_rates"):
        assert (folder / pictures[key]["file"]).is_file() and 60 < pictures[key]["width_mm"] < 200
    page = (folder / "report.html").read_text()
    numbers = page[page.index('<section id="numbers">'):page.index('<section id="classes">')]
    methods = page[page.index('<section id="methods">'):page.index('<section id="changes">')]
    # report.html carries its pictures inline; data-src names each picture's file
    assert 'data-src="images/confusion.png"' in numbers and 'data-src="images/class_rates.png"' in numbers
    assert "each row is a true class" in numbers and "95% interval" in numbers
    assert 'src="images/cascade.png"' in methods and "randomised" in methods
    assert "width: calc(184.0mm" in numbers or re.search(r"width: calc\(1\d\d\.\dmm", numbers)
    assert EVIL not in page
    (folder / "report.html").unlink()
    rerender(folder, ["html"])                       # from the folder alone, charts included
    assert 'data-src="images/confusion.png"' in (folder / "report.html").read_text()


def test_charts_draw_nothing_without_data(tmp_path):
    assert plots.confusion_chart([], [], tmp_path / "c.png") is None
    assert plots.class_rates_chart(["a", "b"], [[1]], tmp_path / "r.png") is None
    assert plots.accuracy_history([], [], tmp_path / "a.png") is None
    assert not list(tmp_path.iterdir())
    assert plots.rates(["a", "b"], [[3, 1], [0, 2]]) == [{"class": "a", "precision": (3, 3), "recall": (3, 4)},
                                                       {"class": "b", "precision": (2, 3), "recall": (2, 2)}]


def test_five_nightly_runs_a_cue_appears_in_the_third_and_is_waived_in_the_fifth(tmp_path):
    """The issue's own case: history.html names the run where the finding first appeared, the
    waiver, and each run's verdict."""
    res = _bench().synthetic_result(tmp_path / "data", 4, correct_per_class=3)
    res.cfg.report.formats = ["json"]
    out = tmp_path / "reports"
    out.mkdir()
    clean = ("fixed_location", "corner_border")
    runs = [_run(res, out, 1, drop=clean, passed=True), _run(res, out, 2, drop=clean, passed=True),
            _run(res, out, 3, drop=("fixed_location",)), _run(res, out, 4, drop=("fixed_location",)),
            _run(res, out, 5, drop=("fixed_location",), waive=True)]
    r = runner.invoke(app, ["history", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "history.html").read_text()
    fams, _ = _families(out)
    (fam,) = fams.values()
    corner = {(x["class"], x["rule"]): x for x in fam["timeline"]}[("gravel", "corner_border")]
    assert corner["first"].startswith("2026-11-03") and corner["open"] and corner["runs"] == "3 of 5"
    assert runs[2].name in corner["first"] or "2026-11-03" in page
    verdicts = [row["verdict"] for row in fam["rows"]]
    assert verdicts[:2] == ["PASS", "PASS"] and verdicts[2] in ("FAIL", "INCOMPLETE") and len(verdicts) == 5
    assert fam["rows"][4]["waivers"] and "jane@example.com" in " ".join(fam["rows"][4]["waivers"])
    assert "jane@example.com" in page and all(v in page for v in ("PASS", "FAIL"))
    assert all(run.name in page for run in runs)
