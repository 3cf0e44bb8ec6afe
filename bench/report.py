"""Report size and render time for synthetic audits with 20, 200 and 1000 flagged images.

    OMP_WAIT_POLICY=PASSIVE python bench/report.py [--sizes 20 200 1000] [--repeats 3] [--limit 100] [--all]

Each size is a synthetic AuditResult (``synthetic_result`` below: photo-like 96-px images on
disk, two methods' heatmaps, a corner finding with intervention effects on every flagged
image, a look-alike finding on every third, two class findings, trust results) rendered the
way ``write_run`` renders a run: pictures (``gallery_images``), report.html (``render_html``),
report.pdf (``render_pdf``). Times are medians over ``--repeats`` renders into fresh folders
(wall clock, and the PDF's CPU time too, which a busy shared machine disturbs less; print the
load average with them); sizes are report.html (self-contained: its pictures inside it) and report.pdf. The gallery holds
at most ``--limit`` images (report.gallery_limit, default 100), the rest go to a table; ``--all``
adds a row with every flagged image in the gallery (limit = size), the worst case.

Goals (issue 4): 200 flagged < 20 MB and PDF < 30 s on 2 cores; issue "Scale and speed", item 5:
1000 flagged to PDF <= 10 s and <= 200 MB. Past the gallery, up to report.thumbnail_limit (default
1000) further flagged images are drawn as small numbered tiles, 35 to a sheet picture ("small"
column); "total s" = pictures + HTML + PDF. Overlays <= 3 ms each (printed below, median of 500).

Where WeasyPrint's time goes (cProfile and py-spy on ``render_pdf``, 1000 cards): text, about
half, paid per line and per styled inline box (Pango lays out every line at least twice, and
every glyph is written out in Python); pages, about a tenth (all sixteen margin boxes are built
again for every page); then parsing, the style cascade, box building, pictures. Fonts
(subsetting) and PDF writing are small. So a gallery card is now a few plain blocks:
- one picture per row of panels (original and overlays side by side, composed with PIL) and one
  line of captions aligned by tab stops, not a figure (an inline-block) per panel;
- no float, flex, grid, table or inline-block. Measured on 400 cards against plain blocks:
  float 2.1x, inline-block 2.7x, table 2.8x, grid 4.0x, flex 5.1x. A float is worse than it
  looks: WeasyPrint measures every later line of the block formatting context that holds it
  (here, the rest of the page) a second time, for its minimum width;
- no rounded corners (6% of the work), a left bar and one rule instead of a box, one styled
  span per line;
- the page header from string-set, not a running element, in two margin boxes of fixed width
  (7% fewer calls for 300 cards).
``render_pdf`` also pauses the cyclic garbage collector, which otherwise walks the whole box tree
again and again (a quarter of the time for 1000 cards, for ~30 MB more peak memory).
Tried without gain: write_pdf's hinting, uncompressed_pdf and full_fonts (optimize_images,
jpeg_quality and dpi re-encode every picture, slower still); font-kerning and ligatures off;
one font family; panels of 26-28 mm (7% fewer pages, 3% less work).

Measured here (2 shared cores, load average 0.8-1.7), 1000 flagged: at the defaults (100 cards, 900
small pictures) 5.7 s in all (PDF 3.9 s), 11.6 MB, 69 pages. Every image a full card: PDF 41.9 s before
the changes above, 15.3-17.0 s after (peak memory 463 -> 223 MB), 43.5 MB, 312 pages: what is left is
WeasyPrint laying out and drawing the text every card must show (without the findings' sentences and
effect lines, 5.5 s; without the pictures, 10.4 s).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from auditor.audit import AuditResult, build_record, settle  # noqa: E402
from auditor.inputs.config import AuditConfig  # noqa: E402
from auditor.inputs.data import SampleRef  # noqa: E402
from auditor.judge.evidence import ClassFinding, Evidence, Finding, severity_rank  # noqa: E402
from auditor.record import Check, Coverage  # noqa: E402

CLASSES = ["box", "brick", "grass", "gravel", "noise"]
CORNER = (0.0, 0.85, 0.15, 1.0)  # bottom-left, as fractions


def _image(rng: np.random.Generator, side: int) -> np.ndarray:
    """Photo-like: smooth colour fields plus fine texture (JPEG territory, not flat graphics)."""
    coarse = rng.random((6, 6, 3)) * 255
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((side, side), Image.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 18, (side, side, 3)), 0, 255).astype(np.uint8)


def _heat(rng: np.random.Generator, box, res: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:res, 0:res] / res
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.004)
    return (blob + 0.05 * rng.random((res, res))).astype(np.float16)


def _effect(rng, n_from: int, cls: str) -> dict:
    changed = int(rng.integers(max(1, n_from // 2), n_from + 1))
    turned = int(rng.integers(10, 40))
    return {"removed_from": n_from, "decision_changed": changed,
            "confidence_drop": round(float(rng.uniform(.3, .99)), 4),
            "new_predictions": ["grass"] * min(changed, 5), "pasted_onto": 40, "turned": turned,
            "transfer_rate": round(turned / 40, 4), "removal_rate": round(changed / n_from, 4), "fill": "inpaint"}


def synthetic_result(folder: Path, flagged: int, *, classes: list[str] | None = None,
                     names: dict[int, str] | None = None, correct_per_class: int = 12, limit: int = 100,
                     seed: int = 0) -> AuditResult:
    """An AuditResult with ``flagged`` flagged misclassified images whose files live under ``folder``.

    ``classes`` replaces the class names; ``names`` gives some flagged images (by their index
    0..flagged-1) a file name of their own. Nothing here runs a model.
    """
    classes = classes or CLASSES
    names = names or {}
    rng = np.random.default_rng(seed)
    k = len(classes)
    tag = 3 % k  # the class a corner tag leads to
    rows, refs = [], []

    def add(label: int, pred: int, name: str) -> int:
        i = len(rows)
        sub = folder / f"c{label}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = _image(rng, 96)
        Image.fromarray(arr).save(sub / name)
        rel = f"c{label}/{name}"
        refs.append(SampleRef(sub / name, rel, label))
        rows.append({"id": i, "path": rel, "label": label, "prediction": pred,
                     "confidence": float(rng.uniform(.55, 1.0)), "correct": label == pred, "explained": True,
                     "width": 96, "height": 96, "sha256": hashlib.sha256(arr.tobytes()).hexdigest()})
        return i

    for c in range(k):
        for j in range(correct_per_class):
            add(c, c, f"clean_{j:04d}.png")
    flagged_ids = []
    for j in range(flagged):
        label = [c for c in range(k) if c != tag][j % (k - 1)]
        flagged_ids.append(add(label, tag, names.get(j, f"tagged_{j:05d}.png")))
    samples = pd.DataFrame(rows).set_index("id")
    methods = ["gradcam", "saliency"]
    heatmaps = {m: {i: _heat(rng, CORNER if i in set(flagged_ids) or rows[i]["label"] == tag
                             else (0.4, 0.4, 0.6, 0.6)) for i in samples.index} for m in methods}
    ev = Evidence(classes, samples, heatmaps, {m: {} for m in methods}, refs)
    ev.reliable = {"gradcam": True, "saliency": False}

    findings = []
    severities = ["critical", "high", "medium", "low"]
    for n, i in enumerate(flagged_ids):
        sev = severities[min(3, n * 4 // max(flagged, 1))]
        e = _effect(rng, 1, classes[tag])
        mass = float(rng.uniform(.5, .97))
        findings.append(Finding(
            sample=i, rule="corner_border", severity=sev, score=round(mass, 4), method="gradcam",
            bbox=ev.to_file_bbox(i, CORNER),
            message=(f"{mass:.0%} of the evidence for '{classes[tag]}' sits in the bottom-left corner, which is only "
                     f"2% of the image. Confirmed by intervention: hiding this region changed the prediction to "
                     f"'{classes[rows[i]['label']]}'; pasting it onto 40 images of other classes turned "
                     f"{e['turned']} of them into '{classes[tag]}'."),
            details={"region": "bottom-left corner", "lift": round(mass / 0.0225, 2), "methods_agreeing": ["gradcam"],
                     "intervention": e, "confirmed": True, "severity_before_intervention": "high"}))
        if n % 3 == 0:
            findings.append(Finding(
                sample=i, rule="look_alike", severity="medium", score=0.5, method="gradcam",
                bbox=ev.to_file_bbox(i, (0.3, 0.3, 0.6, 0.6)),
                message=(f"The model's evidence here is a bright rounded blob, and it resembles the bright marks "
                         f"of class '{classes[tag]}' in correctly classified images."),
                details={"distance": 1.2, "methods_agreeing": ["gradcam"]}))
    findings.sort(key=lambda f: (-severity_rank(f.severity), -f.score))

    members = [i for i in samples.index if rows[i]["prediction"] == tag]
    class_findings = [
        ClassFinding(cls=classes[tag], rule="fixed_location", severity="critical", score=0.97, share=0.5,
                     method="gradcam", region=[0.0, 0.8125, 0.1875, 1.0],
                     message=(f"For {len(members) // 2} of the {len(members)} images the model calls "
                              f"'{classes[tag]}', the explanations agree on one small spot: 97% of their evidence "
                              f"sits in a window covering 4% of the image (bottom left)."),
                     details={"region": "bottom left", "exemplars": members[:6], "methods_agreeing": ["gradcam"],
                              "intervention": _effect(rng, 31, classes[tag]), "confirmed": True,
                              "severity_before_intervention": "high"}),
        ClassFinding(cls=classes[tag], rule="corner_border", severity="high", score=0.51, share=0.84,
                     method="gradcam", region=list(CORNER),
                     message=(f"When the model says '{classes[tag]}', 51% of its evidence on average comes from the "
                              f"bottom-left corner, which is 2% of the image (other classes: 1%)."),
                     details={"region": "bottom-left corner", "methods_agreeing": ["gradcam"],
                              "intervention": _effect(rng, 31, classes[tag]), "confirmed": True,
                              "severity_before_intervention": "high"}),
    ]
    cfg = AuditConfig.model_validate({
        "model": {"factory": "bench.synthetic:net", "classes": classes, "input": {"size": [64, 64]}},
        "data": {"root": str(folder)}, "report": {"gallery_limit": limit}, "source": str(folder / "audit.yaml")})
    trust = {"gradcam": {"reliable": True, "reason": "", "randomisation_spearman": [0.2, 0.1], "deletion_auc": 0.07,
                         "random_deletion_auc": 0.25, "images": 16},
             "saliency": {"reliable": False, "reason": "its heatmaps barely change when the model's weights are "
                                                       "randomised (rank correlation 0.52)",
                          "randomisation_spearman": [0.8, 0.52], "deletion_auc": 0.08, "random_deletion_auc": 0.25,
                          "images": 16}}
    rules = ("corner_border", "fixed_location", "look_alike", "off_object")
    run = {"started": "2026-11-22T06:00:00+00:00", "config": cfg.model_dump(mode="json"),
           "config_file": str(cfg.source), "classes": classes, "weights_sha256": None, "model_sha256": "1" * 64,
           "data_fingerprint": "0" * 64, "versions": {"python": sys.version.split()[0]}, "device": "cpu",
           "seed": seed, "methods": {m: {} for m in methods}, "rules": {r: {} for r in rules},
           "methods_disabled": {}, "trust": trust, "argv": ["run", "audit.yaml"]}
    coverage = Coverage(
        methods={"gradcam": Check(state="ran", examined=len(samples)),
                 "saliency": Check(state="unreliable", examined=len(samples),
                                   reason=f"failed the trust gate: {trust['saliency']['reason']}")},
        rules={**{r: Check(state="ran", examined=len(samples)) for r in rules[:3]},
               "off_object": Check(state="not_applicable", reason="needs masks or boxes in the manifest")},
        trust=Check(state="ran", examined=16), intervention=Check(state="ran", examined=len(findings)))
    skipped = [{"path": "c0/broken.png", "reason": "corrupt or truncated image"}]
    record = build_record(run, coverage, ev, findings, class_findings, [], skipped, [])
    return AuditResult(cfg, settle(record, cfg, None), ev, findings, class_findings)


def render(res: AuditResult, out: Path, diff: dict | None = None) -> dict[str, float]:
    """Render like write_run: pictures, report.html, report.pdf; seconds per step, and how many
    flagged images got a small picture."""
    from auditor.outputs.write import gallery_images
    from auditor.outputs.report import inline_pictures, render_html, render_pdf

    out.mkdir(parents=True)
    record = res.record.model_copy(update={"diff": diff, "run": {"id": "bench-run", **res.record.run,
                                                                  "finished": "2026-11-22T06:01:00+00:00"}})
    t0 = time.perf_counter()
    pictures = gallery_images(record, res.evidence, out, res.cfg.report.gallery_limit, res.cfg.report.thumbnail_limit)
    t1 = time.perf_counter()
    page = render_html(record, pictures)
    (out / "linked.html").write_text(page)
    (out / "report.html").write_text(inline_pictures(page, out))   # report.self_contained, the default
    t2 = time.perf_counter()
    c2 = time.process_time()
    render_pdf(out / "linked.html", out / "report.pdf")
    t3 = time.perf_counter()
    return {"images": t1 - t0, "html": t2 - t1, "pdf": t3 - t2, "pdf_cpu": time.process_time() - c2,
            "small": sum(len(sh["tiles"]) for sh in pictures["sheets"])}


def _mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def overlay_ms(n: int = 500) -> float:
    from auditor.outputs.overlay import PANEL_PX, overlay, thumbnail
    rng = np.random.default_rng(0)
    base = thumbnail(Image.fromarray(_image(rng, 96)), PANEL_PX)
    heat = _heat(rng, CORNER)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        overlay(base, heat, [CORNER])
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _png_only(img: Image.Image, stem: Path) -> Path:
    """What every picture would cost as PNG (for --png): WeasyPrint re-encodes each one."""
    img.save(stem.with_suffix(".png"), compress_level=6)
    return stem.with_suffix(".png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 200, 1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=100, help="report.gallery_limit")
    ap.add_argument("--all", action="store_true", help="also render the largest size with every image in the gallery")
    ap.add_argument("--png", action="store_true", help="also render the 200 case with every picture saved as PNG")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    from pypdf import PdfReader

    from auditor.outputs import write as outputs
    from auditor.outputs.overlay import save_picture

    import weasyprint
    weasyprint.HTML(string="<p>warm-up: fonts and the user-agent stylesheet load once</p>").write_pdf()
    cases = [(n, min(n, args.limit), "auto") for n in args.sizes]
    if args.all:
        cases.append((max(args.sizes), max(args.sizes), "auto"))
    if args.png:
        cases.append((200, min(200, args.limit), "png"))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; overlay "
          f"{overlay_ms():.2f} ms each (median of 500); medians of {args.repeats} renders")
    head = (f"{'flagged':>7} {'gallery':>7} {'small':>5} {'format':>6} {'pictures s':>10} {'HTML s':>7} {'PDF s':>7} "
            f"{'PDF cpu s':>9} {'total s':>7} {'HTML MB':>11} {'PDF MB':>7} {'pages':>5} {'files':>5}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        for n, limit, fmt in cases:
            res = synthetic_result(Path(tmp) / f"data{n}", n, limit=limit)
            outputs.save_picture = _png_only if fmt == "png" else save_picture
            times = [render(res, Path(tmp) / f"run{n}-{limit}-{r}") for r in range(args.repeats)]
            outputs.save_picture = save_picture
            keep = Path(tmp) / f"run{n}-{limit}-0"
            med = {k: statistics.median(t[k] for t in times) for k in times[0]}
            html_mb = _mb(keep / "report.html")   # self-contained: its pictures are inside it
            pages = len(PdfReader(str(keep / "report.pdf")).pages)
            files = len(list((keep / "images").iterdir()))
            small = int(med["small"])
            total = statistics.median(t["images"] + t["html"] + t["pdf"] for t in times)
            print(f"{n:>7} {limit:>7} {small:>5} {fmt:>6} {med['images']:>10.2f} {med['html']:>7.2f} {med['pdf']:>7.2f} "
                  f"{med['pdf_cpu']:>9.2f} {total:>7.2f} "
                  f"{html_mb:>11.2f} {_mb(keep / 'report.pdf'):>7.2f} {pages:>5} {files:>5}", flush=True)
            for r in range(args.repeats):
                shutil.rmtree(Path(tmp) / f"run{n}-{limit}-{r}", ignore_errors=True)


if __name__ == "__main__":
    main()
