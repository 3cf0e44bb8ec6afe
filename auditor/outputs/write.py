"""Write one run's folder: findings.json, samples.csv, pictures, report.html and report.pdf.

Everything goes into a hidden temporary folder that is renamed to ``<out>/<run-id>`` only
when complete: a crash leaves no half-written run that looks finished, and an earlier run is
never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from auditor.audit import AuditResult
from auditor.inputs.data import read_image
from auditor.judge.diff import document
from auditor.judge.evidence import severity_rank
from auditor.explain.heatmap import normalise, region_mask, region_mass
from auditor.outputs.overlay import (EXEMPLAR_PX, MEAN_PX, PANEL_PX, PANELS_PER_ROW, SHEET_COLUMNS, SHEET_ROWS, TILE_PX,
                             draw_boxes, heat_only, legend, overlay, save_picture, sheet, strip, thumbnail)

SCHEMA_VERSION = 1


def claim_run_folder(started: str, out: Path) -> tuple[str, Path]:
    """A run id no earlier run has, and its temporary folder (mkdir is the atomic claim)."""
    stamp = datetime.fromisoformat(started).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        rid = stamp if n == 1 else f"{stamp}-{n}"
        if (out / rid).exists():
            continue
        try:
            (out / f".{rid}.partial").mkdir()
            return rid, out / f".{rid}.partial"
        except FileExistsError:
            continue  # another run, or an interrupted one, holds this id
    raise RuntimeError(f"{out}: no free run id for {stamp}")


def findings_document(res: AuditResult, rid: str, finished: str) -> dict:
    """findings.json: the run's record (``diff.document``) with its id, finish time, gate and comparison."""
    body = res.record if res.record is not None else document(res)  # settle() built it already
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {"id": rid, **res.run, "finished": finished},
        "gate": res.gate,
        "metrics": body["metrics"],
        "samples": body["samples"],
        "class_findings": body["class_findings"],
        "changes": None if res.diff is None else {"baseline_run": res.diff["baseline_run"], **res.diff["counts"]},
        "skipped": res.skipped,
        "warnings": res.warnings,
        "errors": res.errors,
    }


def samples_table(doc: dict) -> pd.DataFrame:
    rows = []
    for s in doc["samples"]:
        worst = max((f["severity"] for f in s["findings"]), key=severity_rank, default="")
        rows.append({k: s[k] for k in ("path", "label", "prediction", "confidence", "correct", "explained")}
                    | {"findings": len(s["findings"]), "worst_severity": worst,
                       "rules": ";".join(sorted({f["rule"] for f in s["findings"]})),
                       "messages": " | ".join(f["message"] for f in s["findings"])})
    for s in doc["skipped"]:
        rows.append({"path": s["path"], "label": "", "prediction": "", "confidence": None, "correct": None,
                     "explained": False, "findings": 0, "worst_severity": "", "rules": "",
                     "messages": f"skipped: {s['reason']}"})
    return pd.DataFrame(rows)


def flagged_order(findings) -> list[int]:
    """Flagged sample ids, worst first (findings come sorted by severity, then score)."""
    return list(dict.fromkeys(f.sample for f in findings))


def class_exemplars(ev, f, ids: list[int], maps: np.ndarray, k: int = 6) -> list[int]:
    """A class finding's example images: the rule's own (``details["exemplars"]``) where it names
    them, else the class's explained images with the most evidence inside the finding's region."""
    own = [int(i) for i in f.details.get("exemplars", []) if int(i) in ev.samples.index]
    if own or not len(ids):
        return own[:k]
    mass = region_mass(maps, {"r": region_mask(maps.shape[1:], f.region)})["r"] if f.region else maps.sum((1, 2))
    return [ids[j] for j in np.argsort(-mass, kind="stable")[:k]]


def gallery_images(res: AuditResult, folder: Path, limit: int, thumbnails: int = 0) -> dict:
    """Pictures the report shows, in ``folder/images``: per flagged image (worst first, at most
    ``limit``) the original and one overlay per method with the flagged regions boxed, side by side
    in one picture per row of at most ``PANELS_PER_ROW`` panels (``samples``: per image its
    ``rows``: file, the method of each panel, None for the original, and whether a region is
    boxed); the next ``thumbnails`` flagged images as numbered tiles, many to a picture
    (``sheets``: file, first number, and per tile its sample and method); per class finding the
    class's mean heatmap and up to six example overlays. Pixel sizes fit the printed size at about
    150 dpi (see ``auditor.outputs.overlay``). Returns the file names, relative to ``folder``."""
    images = folder / "images"
    images.mkdir()
    legend().save(images / "legend.png")
    ev = res.evidence
    rel = lambda path: f"images/{path.name}"  # noqa: E731
    pictures = {"legend": "images/legend.png", "samples": {}, "classes": {}, "sheets": []}
    bboxes: dict[int, list] = {}
    worst_method: dict[int, str | None] = {}  # findings come worst first
    for f in res.findings:
        if f.bbox:
            bboxes.setdefault(f.sample, []).append(f.bbox)
        worst_method.setdefault(f.sample, f.method)

    def picture_of(i: int, side: int):
        """(thumbnail, boxes as fractions, the methods with a heatmap of it), or None when the
        file cannot be read now."""
        try:
            base = thumbnail(read_image(ev.refs[i].path), side)
        except (OSError, ValueError):
            return None  # unreadable now: the report lists it in the table instead
        w, h = ev.samples.at[i, "width"], ev.samples.at[i, "height"]
        boxes = list(dict.fromkeys((b[0] / w, b[1] / h, b[2] / w, b[3] / h) for b in bboxes.get(i, [])))
        return base, boxes, [m for m in ev.heatmaps if i in ev.heatmaps[m]]

    order = flagged_order(res.findings)
    for n, i in enumerate(order[:limit]):
        if (got := picture_of(i, PANEL_PX)) is None:
            continue
        base, boxes, have = got
        methods = [None, *have]
        panels = [base] + [overlay(base, ev.heatmaps[m][i], boxes) for m in methods[1:]]
        rows = []
        for r in range(0, len(panels), PANELS_PER_ROW):  # one picture per row of panels
            pic = strip(panels[r:r + PANELS_PER_ROW])
            rows.append({"file": rel(save_picture(pic, images / f"s{n:04d}-{r // PANELS_PER_ROW}")),
                         "methods": methods[r:r + PANELS_PER_ROW], "boxed": bool(boxes)})
        pictures["samples"][i] = {"rows": rows}
    tiles: list = []  # (image, sample, method); one sheet's worth at a time

    def save_sheet() -> None:
        first = 1 + len(pictures["sheets"]) * SHEET_COLUMNS * SHEET_ROWS  # earlier sheets are full
        pic = sheet([t for t, _, _ in tiles], first)
        pictures["sheets"].append({"file": rel(save_picture(pic, images / f"t{len(pictures['sheets']):03d}")),
                                   "first": first, "tiles": [{"sample": i, "method": m} for _, i, m in tiles]})
        tiles.clear()

    for i in order[limit:limit + thumbnails]:
        if (got := picture_of(i, TILE_PX)) is None:
            continue
        base, boxes, have = got
        m = worst_method[i] if worst_method[i] in have else next(iter(have), None)
        tiles.append((overlay(base, ev.heatmaps[m][i], boxes) if m else draw_boxes(base, boxes), i, m))
        if len(tiles) == SHEET_COLUMNS * SHEET_ROWS:
            save_sheet()
    if tiles:
        save_sheet()
    explained: dict[str, tuple] = {}  # each method's maps read from the cache once, not per finding
    for n, f in enumerate(res.class_findings):
        method = f.method if f.method in ev.heatmaps else next(iter(ev.heatmaps), None)
        if method is None or f.cls not in res.classes:
            continue
        cls = res.classes.index(f.cls)
        if method not in explained:
            explained[method] = ev.explained(method)
        ids, maps = explained[method]
        keep = [k for k, i in enumerate(ids) if ev.samples.at[i, "prediction"] == cls]
        if not keep:
            continue
        ids, maps = [ids[k] for k in keep], normalise(maps[keep])
        boxes = [f.region] if f.region else []
        mean = heat_only(maps.mean(axis=0), MEAN_PX, boxes)
        entry = {"mean": rel(save_picture(mean, images / f"c{n:03d}-mean")), "method": method,
                 "images": len(ids), "exemplars": []}
        for k, i in enumerate(class_exemplars(ev, f, ids, maps)):
            try:
                base = thumbnail(read_image(ev.refs[i].path), EXEMPLAR_PX)
            except (OSError, ValueError):
                continue
            pic = overlay(base, ev.heatmaps[method][i], boxes) if i in ev.heatmaps[method] else base
            entry["exemplars"].append({"file": rel(save_picture(pic, images / f"c{n:03d}-{k}")), "sample": i})
        pictures["classes"][n] = entry
    return pictures


def write_run(res: AuditResult, out: Path | None = None) -> Path:
    from auditor.outputs.report import render_html, render_pdf  # report imports jinja2/weasyprint: only when writing

    out = Path(out or res.cfg.report.out)
    out.mkdir(parents=True, exist_ok=True)
    rid, tmp = claim_run_folder(res.run["started"], out)
    try:
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        doc = findings_document(res, rid, finished)
        formats = res.cfg.report.formats
        # findings.json is the machine-readable record: always written, whatever formats say.
        (tmp / "findings.json").write_text(json.dumps(doc, indent=1, default=_jsonable))
        if res.diff is not None:  # the comparison with report.baseline
            (tmp / "diff.json").write_text(json.dumps({"run": rid, **res.diff}, indent=1, default=_jsonable))
        if "csv" in formats:
            samples_table(doc).to_csv(tmp / "samples.csv", index=False)
        if "html" in formats or "pdf" in formats:
            pictures = gallery_images(res, tmp, res.cfg.report.gallery_limit, res.cfg.report.thumbnail_limit)
            html = render_html(res, doc, pictures, diff=res.diff)
            (tmp / "report.html").write_text(html)
            if "pdf" in formats:
                render_pdf(tmp / "report.html", tmp / "report.pdf")
            if "html" not in formats:
                (tmp / "report.html").unlink()
        final = out / rid
        os.rename(tmp, final)  # atomic; refuses a non-empty target, so nothing is overwritten
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
