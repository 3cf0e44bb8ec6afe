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
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd

from auditor.explain.heatmap import normalise, region_mask, region_mass
from auditor.inputs.config import ConfigError
from auditor.inputs.data import input_view, read_image
from auditor.inputs.preflight import OWNER, mark_partial
from auditor.outputs.overlay import (EXEMPLAR_PX, MEAN_PX, PANEL_PX, PANELS_PER_ROW, SHEET_COLUMNS, SHEET_ROWS,
                                     TILE_PX, dim_unseen, draw_boxes, inset, legend, mean_image, overlay, save_picture,
                                     scale_bar, sheet, strip, thumbnail)
from auditor.record import RunRecord, severity_rank

if TYPE_CHECKING:
    from auditor.inputs.config import AuditConfig
    from auditor.judge.evidence import Evidence


class Audited(Protocol):
    """What writing needs of an audit (``auditor.audit.AuditResult``): the record, and the config
    and evidence the pictures are drawn from."""
    cfg: AuditConfig
    record: RunRecord
    evidence: Evidence

PICTURES = "images/pictures.json"  # what each picture shows: the report is rendered from it and the record


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


def samples_table(record: RunRecord) -> pd.DataFrame:
    """samples.csv: one row per image; text from the data cannot start a spreadsheet formula."""
    from auditor.outputs.text import csv_cell
    rows = []
    for s in record.samples:
        rows.append({"path": s.path, "label": s.label, "prediction": s.prediction, "confidence": s.confidence,
                     "correct": s.correct, "explained": s.explained, "findings": len(s.findings),
                     "worst_severity": s.worst or "", "rules": ";".join(sorted({f.rule for f in s.findings})),
                     "messages": " | ".join(f.message for f in s.findings)})
    for s in record.skipped:
        rows.append({"path": s["path"], "label": "", "prediction": "", "confidence": None, "correct": None,
                     "explained": False, "findings": 0, "worst_severity": "", "rules": "",
                     "messages": f"skipped: {s['reason']}"})
    return pd.DataFrame(rows).map(csv_cell) if rows else pd.DataFrame(rows)


def class_exemplars(ev: Evidence, f, ids: list[int], maps: np.ndarray, k: int = 6) -> list[int]:
    """A class finding's example images: the rule's own (``details["exemplars"]``) where it names
    them, else the class's explained images with the most evidence inside the finding's region."""
    own = [int(i) for i in f.details.get("exemplars", []) if int(i) in ev.samples.index]
    if own or not len(ids):
        return own[:k]
    mass = region_mass(maps, {"r": region_mask(maps.shape[1:], f.region)})["r"] if f.region else maps.sum((1, 2))
    return [ids[j] for j in np.argsort(-mass, kind="stable")[:k]]


def gallery_images(record: RunRecord, ev: Evidence, folder: Path, limit: int, thumbnails: int = 0) -> dict:
    """Pictures the report shows, in ``folder/images``: per flagged image (worst first, at most
    ``limit``) the original and one overlay per method with the flagged regions boxed, side by side
    in one picture per row of at most ``PANELS_PER_ROW`` panels (``samples``: per image id its
    ``rows``: file, the method of each panel, None for the original, and whether a region is
    boxed); the next ``thumbnails`` flagged images as numbered tiles, many to a picture
    (``sheets``: file, first number, and per tile its sample and method); per class finding (by
    position) the class's mean heatmap and up to six example overlays. Pixel sizes fit the printed
    size at about 150 dpi (see ``auditor.outputs.overlay``). Charts: the trust gate's cascade
    (``cascade``, a file name), the confusion matrix (``confusion``) and per-class precision and
    recall (``class_rates``), each a file name and its printed width. Returns the file names, relative to
    ``folder``, and writes them to ``PICTURES`` too, so the report can be rendered again."""
    images = folder / "images"
    images.mkdir()
    legend().save(images / "legend.png")
    scale_bar().save(images / "scale.png")
    flagged = record.flagged()
    pictures = {"legend": "images/legend.png", "scale": "images/scale.png",
                "samples": _sample_pictures(ev, flagged[:limit], images),
                "sheets": _sheets(ev, flagged[limit:limit + thumbnails], images),
                "classes": _class_pictures(record, ev, images)}
    pictures |= _charts(record, images)
    from auditor.outputs.views import view_pictures
    pictures["views"] = view_pictures(record, images)  # section 3b: each class's picture and the probes' chart
    (folder / PICTURES).write_text(json.dumps(pictures, indent=1))
    return pictures


def _rel(path: Path) -> str:
    return f"images/{path.name}"


def _picture_of(ev: Evidence, s, side: int):
    """(the decoded file, its thumbnail, boxes as fractions, the methods with a heatmap of it,
    the part of the file the model saw as fractions), or None when the file cannot be read now."""
    try:
        img = read_image(ev.refs[s.id].path)
    except (OSError, ValueError):
        return None  # unreadable now: the report lists it in the table instead
    w, h = s.size
    boxes = list(dict.fromkeys((b[0] / w, b[1] / h, b[2] / w, b[3] / h) for f in s.findings if (b := f.bbox)))
    return (img, thumbnail(img, side), boxes, [m for m in ev.heatmaps if s.id in ev.heatmaps[m]],
            input_view(s.size, ev.input_spec).frac)


def _sample_pictures(ev: Evidence, flagged: list, images: Path) -> dict:
    """Per flagged image its rows of panels (original, one overlay per method, the inset last)."""
    out = {}
    for n, s in enumerate(flagged):
        if (got := _picture_of(ev, s, PANEL_PX)) is None:
            continue
        img, base, boxes, have, seen = got
        methods = [None, *have]
        panels = [dim_unseen(base, seen)] + [overlay(base, ev.heatmaps[m][s.id], boxes, seen) for m in methods[1:]]
        worst = max(s.findings, key=lambda f: (severity_rank(f.severity), f.score))
        box = worst.bbox or next((f.bbox for f in s.findings if f.bbox), None)
        zoom = inset(img, (box[0] / s.size[0], box[1] / s.size[1], box[2] / s.size[0],
                           box[3] / s.size[1]), seen=seen) if box else None
        cuts = [0, *range(min(3, len(panels)) if zoom else PANELS_PER_ROW, len(panels), PANELS_PER_ROW), len(panels)]
        rows = []
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):  # one picture per row of panels; the inset ends the first
            extra = [zoom] if zoom and k == 0 else []
            pic = strip(panels[a:b] + extra)
            rows.append({"file": _rel(save_picture(pic, images / f"s{n:04d}-{k}")),
                         "methods": methods[a:b] + (["@inset"] if extra else []), "boxed": bool(boxes)})
        out[s.id] = {"rows": rows} | ({"inset": _rel(save_picture(zoom, images / f"s{n:04d}-z"))} if zoom else {})
    return out


def _sheets(ev: Evidence, flagged: list, images: Path) -> list[dict]:
    """The further flagged images as numbered tiles, one sheet's worth held at a time."""
    sheets: list[dict] = []
    tiles: list = []  # (image, sample, method)

    def save_sheet() -> None:
        first = 1 + len(sheets) * SHEET_COLUMNS * SHEET_ROWS  # earlier sheets are full
        pic = sheet([t for t, _, _ in tiles], first)
        sheets.append({"file": _rel(save_picture(pic, images / f"t{len(sheets):03d}")),
                       "first": first, "tiles": [{"sample": i, "method": m} for _, i, m in tiles]})
        tiles.clear()

    for s in flagged:
        if (got := _picture_of(ev, s, TILE_PX)) is None:
            continue
        _, base, boxes, have, seen = got
        worst = max(s.findings, key=lambda f: (severity_rank(f.severity), f.score)).method
        m = worst if worst in have else next(iter(have), None)
        tiles.append((overlay(base, ev.heatmaps[m][s.id], boxes, seen) if m else draw_boxes(dim_unseen(base, seen), boxes),
                      s.id, m))
        if len(tiles) == SHEET_COLUMNS * SHEET_ROWS:
            save_sheet()
    if tiles:
        save_sheet()
    return sheets


def _class_pictures(record: RunRecord, ev: Evidence, images: Path) -> dict:
    """Per class finding (by position) the class's mean image under its mean heatmap and its examples."""
    out = {}
    explained: dict[str, tuple] = {}  # each method's maps read from the cache once, not per finding
    classes = record.classes
    for n, f in enumerate(record.class_findings):
        method = f.method if f.method in ev.heatmaps else next(iter(ev.heatmaps), None)
        if method is None or f.cls not in classes:
            continue
        cls = classes.index(f.cls)
        if method not in explained:
            explained[method] = ev.explained(method)
        ids, maps = explained[method]
        keep = [k for k, i in enumerate(ids) if ev.samples.at[i, "prediction"] == cls]
        if not keep:
            continue
        ids, maps = [ids[k] for k in keep], normalise(maps[keep])
        boxes = [f.region] if f.region else []
        decoded: dict[int, object] = {}  # each file decoded once, for the mean and the examples

        def read(i: int):
            if i not in decoded:
                try:
                    decoded[i] = read_image(ev.refs[i].path)
                except (OSError, ValueError):
                    decoded[i] = None
            return decoded[i]

        looks = [im for i in ids[:64] if (im := read(i)) is not None]  # at most 64 images in the mean
        h, w = maps.shape[1:]
        size = (MEAN_PX, max(1, round(MEAN_PX * h / w))) if w >= h else (max(1, round(MEAN_PX * w / h)), MEAN_PX)
        seen = [input_view(im.size, ev.input_spec).frac for im in looks]   # the mean of what the model saw
        mean = overlay(mean_image(looks, size, seen), maps.mean(axis=0), boxes)
        entry = {"mean": _rel(save_picture(mean, images / f"c{n:03d}-mean")), "method": method,
                 "images": len(ids), "mean_of": len(looks), "exemplars": []}
        for k, i in enumerate(class_exemplars(ev, f, ids, maps)):
            if (img := read(i)) is None:
                continue
            base, v = thumbnail(img, EXEMPLAR_PX), input_view(img.size, ev.input_spec)
            on_file = [v.to_file_frac(b) for b in boxes]   # the region is the model input's; the picture the file's
            pic = (overlay(base, ev.heatmaps[method][i], on_file, v.frac) if i in ev.heatmaps[method]
                   else dim_unseen(base, v.frac))
            entry["exemplars"].append({"file": _rel(save_picture(pic, images / f"c{n:03d}-{k}")), "sample": int(i)})
            if f.region and "inset" not in entry:  # the region of the first example, cut out and enlarged
                entry["inset"] = {"file": _rel(save_picture(inset(img, v.to_file_frac(f.region), seen=v.frac),
                                                            images / f"c{n:03d}-inset")), "sample": int(i)}
        out[n] = entry
    return out


def _charts(record: RunRecord, images: Path) -> dict:
    """The trust gate's cascade (section 5), the confusion matrix and per-class rates (section 2)."""
    from auditor.outputs.charts import cascade_chart
    from auditor.outputs.plots import class_rates_chart, confusion_chart, width_mm
    out: dict = {}
    if cascade_chart(record.run.get("trust") or {}, images / "cascade.png"):
        out["cascade"] = "images/cascade.png"
    confusion = record.metrics.confusion
    for key, draw in (("confusion", confusion_chart), ("class_rates", class_rates_chart)):
        if path := draw(confusion.get("classes") or record.classes, confusion.get("matrix") or [], images / f"{key}.png"):
            out[key] = {"file": _rel(path), "width_mm": width_mm(path)}
    return out


def load_pictures(folder: Path) -> dict:
    """``gallery_images``' index of a written run (JSON keys are strings; ids and positions are ints)."""
    pictures = json.loads((folder / PICTURES).read_text())
    pictures["samples"] = {int(k): v for k, v in pictures["samples"].items()}
    pictures["classes"] = {int(k): v for k, v in pictures["classes"].items()}
    return pictures


def render_reports(record: RunRecord, folder: Path, pictures: dict, formats) -> list[Path]:
    """report.html (and report.pdf) in ``folder`` from the record and the pictures alone, each
    written under a hidden name and renamed into place, so a reader never sees half a report."""
    import auditor.explain.methods  # noqa: F401  (the registries hold each check's and method's own words:
    import auditor.rules  # noqa: F401  a re-render without the audit must find them too)
    from auditor.outputs.report import inline_pictures, render_html, render_pdf  # jinja2/weasyprint: only when writing

    html, pdf = folder / ".report.html.partial", folder / ".report.pdf.partial"
    try:
        page = render_html(record, pictures)
        html.write_text(page)
        if "pdf" in formats:
            render_pdf(html, pdf)  # from the linked page: the PDF is the same either way
            os.replace(pdf, folder / "report.pdf")
        if "html" in formats:
            if (record.config.get("report") or {}).get("self_contained", True):
                html.write_text(inline_pictures(page, folder))
            os.replace(html, folder / "report.html")
    finally:
        html.unlink(missing_ok=True)
        pdf.unlink(missing_ok=True)
    return [folder / f"report.{f}" for f in ("html", "pdf") if f in formats]


def write_run(res: Audited, out: Path | None = None) -> Path:
    out = Path(out or res.cfg.report.out)
    out.mkdir(parents=True, exist_ok=True)
    rid, tmp = claim_run_folder(res.record.run["started"], out)
    try:
        mark_partial(tmp)  # so a later run can tell a live partial folder from one a killed run left
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = res.record.model_copy(update={"run": {"id": rid, **res.record.run, "finished": finished}})
        formats = res.cfg.report.formats
        # findings.json is the machine-readable record: always written, whatever formats say.
        (tmp / "findings.json").write_text(record.to_json())
        if record.diff is not None:  # the comparison with report.baseline
            (tmp / "diff.json").write_text(json.dumps({"run": rid, **record.diff}, indent=1, default=_jsonable))
        if "csv" in formats:
            samples_table(record).to_csv(tmp / "samples.csv", index=False)
        if "html" in formats or "pdf" in formats:
            pictures = gallery_images(record, res.evidence, tmp, res.cfg.report.gallery_limit,
                                      res.cfg.report.thumbnail_limit)
            render_reports(record, tmp, pictures, formats)
        final = out / rid
        (tmp / OWNER).unlink(missing_ok=True)
        os.rename(tmp, final)  # atomic; refuses a non-empty target, so nothing is overwritten
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rerender(folder: Path, formats=("html", "pdf")) -> list[Path]:
    """A finished run's report rendered again from its folder alone (no model, no data)."""
    record = RunRecord.load(folder)
    if not (folder / PICTURES).is_file():
        raise ConfigError(f"{folder}: has no {PICTURES} (written by runs of schema_version 2 with an html or "
                          f"pdf report); run the audit again to get a report")
    return render_reports(record, folder, load_pictures(folder), formats)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
