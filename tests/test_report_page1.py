"""Page 1 as a reviewer reads it: identity, verdict, every class finding's sentence, what did not
run (never "passed"), the waivers; every enlarged region at least 160 px wide on the page."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
from PIL import Image

from auditor.outputs.write import write_run

ROOT = Path(__file__).resolve().parents[1]
WAIVER = {"rule": "look_alike", "owner": "Jane Roe", "reason": "blob images are rare in production",
          "expires": "2099-01-31"}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from auditor.audit import settle
    from auditor.inputs.config import AuditConfig
    tmp = tmp_path_factory.mktemp("page1")
    res = _bench().synthetic_result(tmp / "data", 6, correct_per_class=4)
    doc = res.cfg.model_dump(mode="json", by_alias=True) | {
        "waivers": [WAIVER], "audit": {"name": "Texture classifier", "version": "2.1", "owner": "Vision team",
                                       "intended_use": "sorting surface photos"}}
    cfg = AuditConfig.model_validate(doc | {"source": str(res.cfg.source)})
    record = res.record.model_copy(update={"run": {**res.record.run, "config": cfg.model_dump(mode="json")}})
    res = dataclasses.replace(res, cfg=cfg, record=settle(record, cfg, None))
    return res, write_run(res, tmp / "reports")


def _pages(folder):
    pypdf = pytest.importorskip("pypdf")
    return [re.sub(r"\s+", " ", p.extract_text()) for p in pypdf.PdfReader(str(folder / "report.pdf")).pages]


def test_page_one_names_the_model_the_verdict_every_class_finding_and_the_waivers(run):
    res, folder = run
    first = _pages(folder)[0]
    assert "Texture classifier" in first and "Vision team" in first and "sorting surface photos" in first
    assert "FAIL" in first
    assert str(ROOT) not in first and "/tmp" not in first          # data paths relative, never absolute
    from auditor.outputs.report_words import first_sentence
    for f in res.record.class_findings:
        assert re.sub(r"\s+", " ", first_sentence(f.message)) in first, f.message
    assert "Jane Roe" in first and "blob images are rare in production" in first and "2099-01-31" in first
    assert "not run: needs masks or boxes in the manifest" in first


def test_a_check_that_could_not_run_is_never_called_passed(run):
    res, folder = run
    text = " ".join(_pages(folder))
    for line in re.findall(r"[^.]*off_object[^.]*", text):
        assert "passed" not in line and "nothing found" not in line, line


def test_intervention_tests_each_on_a_line_with_a_mark_and_its_placebo(run):
    _, folder = run
    page = (folder / "report.html").read_text()
    lines = re.findall(r'<p class="test(?: ok| no)?">(.*?)</p>', page)
    assert lines and all(line[0] in "✓✗–" for line in lines)
    assert any("pasting the region onto 40 other images turned" in line for line in lines)
    from auditor.outputs.report_words import tests
    res, _ = run
    f = res.record.class_findings[0]
    e = dict(f.details["intervention"], turned=32, transfer_rate=0.8, control_transfer_rate=0.125,
             transfer_vs_control=[0.675, 0.5, 0.8])
    got = tests(res.record, f.model_copy(update={"details": {**f.details, "intervention": e}}))
    assert f"✓ pasting the region onto 40 other images turned 32 into '{f.cls}' (random region of the same size: 5)" \
        in [f"{t['mark']} {t['text']}" for t in got]


def test_confirmed_names_the_tests_that_confirmed(run):
    from auditor.outputs.report_words import badge
    res, _ = run
    f = res.record.class_findings[0]
    e = dict(f.details["intervention"], removal_rate=0.0, decision_changed=0, transfer_rate=0.9, turned=36)
    g = f.model_copy(update={"details": {**f.details, "intervention": e, "confirmed": True}})
    assert badge(res.record, g).endswith("confirmed by pasting")


def test_every_inset_is_at_least_160_px_wide_on_the_page(run):
    _, folder = run
    page = (folder / "report.html").read_text()
    from auditor.outputs.overlay import INSET_MM, INSET_PX
    assert INSET_MM / 25.4 * 96 >= 160 and INSET_PX >= 160
    insets = re.findall(r'<img class="inset" src="data:[^"]+" data-src="([^"]+)"', page)
    strips = re.findall(r'<img class="strip" style="width: calc\(([\d.]+)mm', page)
    assert insets and strips
    for src in insets:
        with Image.open(folder / src) as im:
            assert im.width >= 160
    css = (ROOT / "templates" / "report.css").read_text()
    assert re.search(r"img\.inset \{ width: calc\(var\(--inset\)", css)


def test_report_html_carries_its_pictures_unless_told_not_to(run, tmp_path):
    from auditor.outputs.write import load_pictures, render_reports
    res, folder = run
    page = (folder / "report.html").read_text()
    assert ' src="images/' not in page and page.count(' src="data:image/') > 10
    from auditor.record import RunRecord
    rec = RunRecord.load(folder)
    linked = rec.model_copy(update={"run": {**rec.run, "config": {
        **rec.config, "report": {**rec.config["report"], "self_contained": False}}}})
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    render_reports(linked, copy, load_pictures(copy), ["html"])
    assert ' src="images/' in (copy / "report.html").read_text()


def test_a_finding_gone_because_its_image_was_not_audited_is_not_resolved(run):
    from auditor.outputs.report_appendix import changes
    res, _ = run
    here = res.record.samples[0]
    diff = {"baseline_run": "b", "new": [], "persisting": [{"kind": "class", "class": "gravel", "rule": "x",
                                                            "severity": "high", "message": "m"}],
            "resolved": [{"kind": "sample", "path": here.path, "sha256": here.sha256, "rule": "corner_border",
                          "severity": "low", "message": "gone"},
                         {"kind": "sample", "path": "c9/elsewhere.png", "sha256": "f" * 64, "rule": "corner_border",
                          "severity": "low", "message": "not audited", "note": "image not in this run"}]}
    c = changes(diff, res.record)
    counts = {g["key"]: g["count"] for g in c["groups"]}
    assert counts["resolved"] == 1 and counts["unaudited"] == 1
    assert "1 resolved" in c["summary"] and "not audited this time" in c["summary"]
    assert c["persisting"]["count"] == 1 and "listed in the appendix" in c["summary"]
