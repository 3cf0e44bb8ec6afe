"""The report as a reader gets it: the PDF's pages and text, the HTML in a browser, nothing fetched,
data escaped. One synthetic audit (bench/report.py's builder, no model) is rendered by write_run,
like a real run; one tiny real audit goes through the CLI with hostile class and file names."""
from __future__ import annotations

import dataclasses
import html
import importlib.util
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from auditor.cli import app
from auditor.outputs.write import write_run
from auditor.outputs.overlay import save_picture
from auditor.outputs.report import allowed_url, render_pdf, run_folder_fetcher
from auditor.outputs.report_findings import _captions, class_findings

ROOT = Path(__file__).resolve().parents[1]
EVIL_CLASS = "<script>alert(1)</script>"
EVIL_FILE = "<img src=x onerror=alert(1)>.png"
VERMILLION = (0xD5, 0x5E, 0x00)  # the FAIL colour


def _bench():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DIFF = {"baseline_run": "20261101-120000", "baseline_path": "reports/20261101-120000",
        "counts": {"new": 1, "resolved": 1, "persisting": 0},
        "changed": {"weights": True, "data": False, "rules": False, "methods": False},
        "new": [{"kind": "class", "class": EVIL_CLASS, "rule": "fixed_location", "severity": "high",
                 "message": "A new spot appeared.", "waived": None}],
        "resolved": [{"kind": "sample", "path": f"c0/{EVIL_FILE}", "rule": "corner_border", "severity": "low",
                      "message": "An old corner finding.", "waived": None}],
        "persisting": [],
        "metrics": {"images": {"baseline": 80, "current": 84, "matched": 80},
                    "accuracy": {"baseline": 0.8, "current": 0.75, "delta": -0.05, "ci95": [-0.09, -0.01],
                                 "images": [80, 84], "paired": 80},
                    "per_class": [{"class": EVIL_CLASS, "baseline": 0.9, "current": 0.8, "delta": -0.1,
                                   "ci95": [-0.2, 0.0], "images": [16, 16], "paired": 16}]},
        "warnings": ["package versions differ (torch: 2.12 -> 2.13)"]}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A rendered synthetic run: 6 flagged images (one named EVIL_FILE), classes with EVIL_CLASS, a diff."""
    tmp = tmp_path_factory.mktemp("report")
    classes = ["box", "brick", "grass", EVIL_CLASS, "noise"]
    res = _bench().synthetic_result(tmp / "data", 6, classes=classes, names={0: EVIL_FILE}, correct_per_class=4)
    res = dataclasses.replace(res, record=res.record.model_copy(update={"diff": DIFF}))
    folder = write_run(res, tmp / "reports")
    return res, folder


def _text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def test_pdf_text_has_the_verdict_and_every_finding(report):
    pypdf = pytest.importorskip("pypdf")
    res, folder = report
    pages = [_text(p.extract_text()) for p in pypdf.PdfReader(str(folder / "report.pdf")).pages]
    text = " ".join(pages)
    assert "FAIL" in pages[0] and "Model audit report".upper() in pages[0].upper()
    from auditor.outputs.report_summary import verdict
    for line in verdict(res.record)[1]:
        assert _text(line) in text, line
    paths = {s.id: s.path for s in res.record.samples}
    for f in [*res.class_findings, *res.findings]:   # the intervention's account is on lines of its own;
        # an image that only repeats a class finding is one picture in that finding's group
        assert (_text(f.message.split(" Confirmed by intervention")[0]) in text or
                (getattr(f, "sample", None) is not None and paths[f.sample] in text.replace(" ", ""))), f.message
    assert EVIL_CLASS in text and EVIL_FILE in text            # shown as text, not interpreted
    assert "New findings (1)" in text and "Resolved findings (1)" in text and "-5.0 points" in text
    assert all(f"Page {k} of {len(pages)}" in p for k, p in enumerate(pages, 1))
    assert all(folder.name in p for p in pages)                # running header: the run id on every page


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm is not installed (Debian: poppler-utils)")
def test_pdf_pages_rasterise_and_show_the_verdict_colour(report, tmp_path):
    _, folder = report
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(folder / "report.pdf"), str(tmp_path / "p")],
                   check=True, timeout=60)
    pngs = sorted(tmp_path.glob("p-*.png"))
    from pypdf import PdfReader
    assert len(pngs) == len(PdfReader(str(folder / "report.pdf")).pages) >= 5
    for png in pngs:
        a = np.asarray(Image.open(png).convert("L"))
        assert a.std() > 5, f"{png.name} is blank"
    first = np.asarray(Image.open(pngs[0]).convert("RGB")).astype(int)
    near = (np.abs(first - VERMILLION).sum(axis=2) < 40).mean()
    assert near > 0.005, "the FAIL banner's colour is missing from the first page"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags, self.handlers = [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "poster", "data", "action"):
                self.refs.append(v or "")
            if k.startswith("on"):
                self.handlers.append((tag, k))


def test_html_is_self_contained_and_escapes_data(report):
    _, folder = report
    page = (folder / "report.html").read_text()
    p = _Refs()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert not p.handlers, p.handlers
    assert not re.search(r"url\(|@import|https?://", page, re.I)   # no remote font, image or style
    for ref in p.refs:   # only anchors and pictures carried inside (report.self_contained, the default)
        if ref.startswith("#"):
            continue
        assert re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", ref), ref[:80]
    for name in re.findall(r'data-src="([^"]+)"', page):   # each one names its file in images/
        assert re.fullmatch(r"images/[\w.-]+", name) and (folder / name).is_file()
    assert html.escape(EVIL_CLASS, quote=False) in page and EVIL_CLASS not in page
    assert html.escape(EVIL_FILE, quote=False) in page and "<img src=x" not in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_in_a_browser_renders_offline(report, tmp_path):
    _, folder = report
    url = (folder / "report.html").as_uri()
    shot = tmp_path / "shot.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
              # Any lookup of a host fails: a report that needs the network would show it broken.
              "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0"]
    r = subprocess.run([*common, "--window-size=1000,1600", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert a.std() > 5 and (np.abs(a - VERMILLION).sum(axis=2) < 40).mean() > 0.002
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    assert "<script" not in dom and "onerror" not in dom.replace("onerror=alert(1)&gt;", "")
    assert "FAIL" in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_pdf_fetcher_refuses_anything_outside_the_run_folder(tmp_path):
    root = tmp_path / "run"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(root / "images" / "a.png")
    (tmp_path / "secret.png").write_bytes((root / "images" / "a.png").read_bytes())
    assert allowed_url((root / "images" / "a.png").as_uri(), root)
    for url in ["http://example.com/a.png", "https://example.com/font.woff", "ftp://example.com/a",
                "data:image/png;base64,AAAA", (tmp_path / "secret.png").as_uri(), "file:///etc/passwd",
                f"file://{root}/../secret.png", f"file://evil.example{root}/images/a.png"]:
        assert not allowed_url(url, root), url
    fetcher = run_folder_fetcher(root)
    with pytest.raises(ValueError, match="refused"):
        fetcher.fetch("https://example.com/a.png")
    with pytest.raises(ValueError, match="refused"):
        fetcher.fetch((tmp_path / "secret.png").as_uri())
    assert fetcher.fetch((root / "images" / "a.png").as_uri()) is not None


def test_pdf_render_survives_remote_references(tmp_path, caplog):
    root = tmp_path / "run"
    root.mkdir()
    (root / "report.html").write_text(
        '<html><head><link rel="stylesheet" href="https://example.com/x.css"></head><body><p>Hello</p>'
        '<img src="http://127.0.0.1:9/x.png"><img src="file:///etc/hostname"></body></html>')
    with caplog.at_level("WARNING"):
        render_pdf(root / "report.html", root / "report.pdf")
    assert (root / "report.pdf").stat().st_size > 0
    assert "refused to fetch" in caplog.text


def test_gallery_card_is_one_picture_with_a_caption_under_each_panel(report):
    """A card's panels are one strip picture (one image for WeasyPrint to place, not one per panel),
    with one line of captions whose tab stops, one panel apart, put each caption under its panel."""
    res, folder = report
    page = (folder / "report.html").read_text()
    gallery = page[page.index('<section id="gallery">'):page.index('<section id="methods">')]
    flagged = len(dict.fromkeys(f.sample for f in res.findings))
    cards = gallery.count('<article class="card')
    assert cards and cards + gallery.count('<img class="inset"') == flagged   # the rest: in a class's group
    assert gallery.count('<img class="strip" style="width: calc(') == cards
    assert gallery.count("original\tgradcam\tsaliency\tregion, enlarged\n\t\tnot trusted</p>") == cards
    strips = sorted((folder / "images").glob("s*-0.*"))
    assert len(strips) == flagged
    with Image.open(strips[0]) as im:   # three panel slots and the enlarged region, at the printed 150 dpi
        from auditor.outputs.overlay import GAP_PX, INSET_PX, PANEL_PX
        assert im.size == (3 * PANEL_PX + 3 * GAP_PX + INSET_PX, PANEL_PX)


def test_captions_sit_under_their_panels_or_spell_the_order_out():
    trusted = {"gradcam", "saliency"}
    assert _captions([None, "gradcam", "saliency"], trusted) == "original\tgradcam\tsaliency"
    # the last caption may run on; one in the middle keeps its slot and says "not trusted" below it
    assert _captions([None, "gradcam", "lime"], trusted) == "original\tgradcam\tlime (not trusted)"
    assert _captions([None, "lime", "gradcam"], trusted) == "original\tlime\tgradcam\n\tnot trusted"
    # a name too long for its slot would push the next tab stop along: spell the order out instead
    assert _captions([None, "integrated_gradients", "gradcam"], trusted | {"integrated_gradients"}) == \
        "left to right: original, integrated_gradients, gradcam"
    assert _captions([None], trusted) == "original"


def test_class_finding_without_a_region_mentions_no_box(report):
    res, _ = report
    pictures = {"classes": {0: {"mean": "images/c000-mean.png", "method": "gradcam", "images": 12, "exemplars": []}}}
    boxed = class_findings(res.record, pictures)[0]["mean_caption"]
    assert boxed.endswith("; box: the region")
    unboxed = res.record.class_findings[0].model_copy(update={"region": None})
    caption = class_findings(res.record.model_copy(update={"class_findings": (unboxed,)}), pictures)[0]["mean_caption"]
    assert "box" not in caption and caption.startswith("Mean of 12 images called")


def test_pictures_are_jpeg_when_photo_like_png_when_flat(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    flat = Image.new("RGB", (64, 64), "white")
    assert save_picture(photo, tmp_path / "photo").suffix == ".jpg"
    assert save_picture(flat, tmp_path / "flat").suffix == ".png"


def test_cli_run_escapes_hostile_class_and_file_names(project):
    """A real (tiny) audit through the CLI, html and pdf on, with a hostile class and file name."""
    data = project.folder / "data"
    rows = ["path,label"]
    for old, new in (("cat", "cat"), ("dog", "dog"), ("fox", EVIL_CLASS)):
        rows += [f"data/{old}/{p.name},\"{new}\"" for p in sorted((data / old).glob("*.png"))]
    (data / EVIL_FILE).write_bytes(b"not an image")
    rows.append(f"data/{EVIL_FILE},cat")
    (project.folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    project.cfg["model"]["classes"] = ["cat", "dog", EVIL_CLASS]
    project.cfg["data"] = {"manifest": "manifest.csv"}
    project.cfg["report"]["formats"] = ["html", "pdf", "json"]
    project.write()
    r = CliRunner().invoke(app, ["run", str(project.path), "--quiet"])
    assert r.exit_code in (0, 1), r.output
    run = next(p for p in (project.folder / "reports").iterdir() if not p.name.startswith("."))
    page = (run / "report.html").read_text()
    assert EVIL_CLASS not in page and html.escape(EVIL_CLASS, quote=False) in page
    assert "<img src=x" not in page and html.escape(EVIL_FILE, quote=False) in page   # in skipped inputs
    assert (run / "report.pdf").read_bytes().startswith(b"%PDF")


def test_flagged_images_beyond_the_gallery_are_numbered_small_pictures(tmp_path):
    """Past report.gallery_limit, flagged images still get a picture: tiles on a few big sheets,
    numbered, with the numbers' file names under each sheet, up to report.thumbnail_limit."""
    res = _bench().synthetic_result(tmp_path / "data", 9, correct_per_class=4)
    res.cfg.report.gallery_limit, res.cfg.report.thumbnail_limit = 2, 5
    folder = write_run(res, tmp_path / "reports")
    page = (folder / "report.html").read_text()
    page = page[page.index('<section id="gallery">'):page.index('<section id="methods">')]
    assert page.count('<article class="card') + page.count('<img class="inset"') == 2
    assert page.count('<img class="sheet"') == 1
    assert "and 5 of them as small pictures" in page
    paths = [s.path for s in res.record.flagged()]
    names = re.search(r'<p class="sheet-names">(.*?)</p>', page).group(1)
    assert names.startswith("All with gradcam: 1 ")   # the worst finding's method, named once
    assert [f"{k + 1} {p}" in names for k, p in enumerate(paths[2:7])] == [True] * 5
    assert paths[7] not in names and paths[7] in page  # past both limits: in the table only
    from auditor.outputs.overlay import GAP_PX, SHEET_COLUMNS, TILE_PX
    with Image.open(next((folder / "images").glob("t000.*"))) as im:   # one row of 7 slots
        assert im.width == SHEET_COLUMNS * (TILE_PX + GAP_PX) - GAP_PX and TILE_PX < im.height < 2 * TILE_PX
    if shutil.which("pdftotext") is None:  # what needs no tool is checked above
        pytest.skip("pdftotext is not installed (Debian: poppler-utils)")
    text = subprocess.run(["pdftotext", str(folder / "report.pdf"), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "Small pictures of the further flagged images" in text and paths[6] in _text(text).replace(" ", "")


def test_a_class_cue_absent_from_its_own_images_is_told_apart_from_the_errors_it_caused():
    """A confirmed cue of 'gravel' at one place: one 'brick' image it made the model call 'gravel',
    and two 'gravel' images the model calls 'grass' that lack it (absences). Page 1 counts them
    apart, and section 4 groups each kind in its own words."""
    import auditor.rules  # noqa: F401  (registers the rules' titles)
    from auditor.outputs.report_findings import shared
    from auditor.outputs.report_summary import problems
    from auditor.record import ClassFindingRecord, FindingRecord, Metrics, RunRecord, SampleRecord

    test = {"confirmed": True, "intervention": {"donors": 5, "restored": 5, "restore_rate": 1.0, "true_class": "gravel",
                                                "control_restore_rate": 0.0, "restore_vs_control": [1.0, 1.0, 1.0]}}

    def sample(i, label, pred, absence):
        f = FindingRecord(rule="fixed_location", severity="medium" if absence else "high", score=0.5,
                          message=f"Image {i}.", bbox=[0, 0, 4, 4], details=test | ({"absence": True} if absence else {}))
        return SampleRecord(id=i, path=f"{label}/{i}.png", label=label, prediction=pred, confidence=0.9,
                            correct=False, explained=True, size=[16, 16], findings=(f,))

    cue = ClassFindingRecord(rule="fixed_location", severity="high", score=0.9, share=0.5, region=[0, 0, 0.25, 0.25],
                             message="A mark at one place.", details={"confirmed": True}, **{"class": "gravel"})
    rec = RunRecord(run={"classes": ["brick", "grass", "gravel"]},
                    metrics=Metrics(accuracy=0.5, images=3, misclassified=3, explained=3, per_class=[],
                                    confusion={"classes": ["brick", "grass", "gravel"]}),
                    samples=(sample(0, "brick", "gravel", False), sample(1, "gravel", "grass", True),
                             sample(2, "gravel", "grass", True)),
                    class_findings=(cue,))
    pictures = {"samples": {i: {"inset": f"{i}.png"} for i in range(3)}, "classes": {}}
    first = next(p for p in problems(rec, pictures) if p["subject"] == "class 'gravel'")
    assert "1 misclassified image shows it too" in first["sentence"]
    assert "2 images of 'gravel' that the model gets wrong lack it" in first["sentence"]
    groups, done = shared(rec, pictures)
    assert done == {0, 1, 2} and len(groups) == 2
    caused, lacking = groups
    assert caused["text"].startswith("1 misclassified image the model calls 'gravel' (truly brick) shows")
    assert lacking["text"].startswith("2 images of 'gravel' that the model calls 'grass' do not show what")
    assert [s["path"] for s in lacking["shots"]] == ["gravel/1.png", "gravel/2.png"]
