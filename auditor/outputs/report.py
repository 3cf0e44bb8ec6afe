"""The report's words and layout data (computed here), rendered by one jinja2 template to HTML,
and the same HTML printed to PDF by WeasyPrint, which may read nothing outside the run folder.

The template only lays out: every sentence, number and list below is made here. Everything
that comes from the data (class names, file names, messages) reaches the template as plain
text and is escaped there (autoescape is on; nothing from the data is marked safe).

The sections' words are made in the modules beside this one, in the order the report reads:
``report_summary`` (page 1 and the key numbers), ``report_findings`` (class findings and flagged
images), ``report_appendix`` (trusted methods, changes, appendix); ``report_words`` holds the
phrasing they share. This module gathers them into the template's context and renders.
"""
from __future__ import annotations

import base64
import re
from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from auditor.outputs.overlay import (EXEMPLAR_MM, GAP_MM, INSET_MM, MEAN_MM, PANELS_PER_ROW, PANEL_MM, SHEET_COLUMNS,
                                     TILE_MM)
from auditor.outputs.report_appendix import TERMS, changes, glossary, model_card, provenance, reliability, review
from auditor.outputs.report_findings import class_findings, gallery, minor_findings, rest_groups, shared, sheets
from auditor.outputs.report_summary import (checks_table, gate_rows, identity, key_charts, key_numbers, not_run,
                                            problems, verdict, waiver_rows)
from auditor.outputs.report_words import relative_path
from auditor.outputs.views import views_context
from auditor.record import RunRecord


# Okabe-Ito colours (colour-blind safe) in the stylesheet; the verdict is always written in words too.
VERDICT_STYLE = {"FAIL": ("fail", "✗"), "INCOMPLETE": ("fail", "?"), "PASS WITH WARNINGS": ("warn", "!"),
                 "PASS": ("pass", "✓")}


def jinja_env() -> Environment:
    folder = Path(str(files("auditor.templates")))
    return Environment(loader=FileSystemLoader(folder), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _strip_home(text: str, rec: RunRecord) -> str:
    """``text`` with the config file's folder left out of every path in it: paths relative to
    the config, as the reader's own copy would have them, never this machine's layout."""
    config = str(rec.run.get("config_file") or "")
    base = str(Path(config).parent) if Path(config).is_absolute() else ""
    return text.replace(base + "/", "") if base and base != "/" else text


def context(rec: RunRecord, pictures: dict) -> dict:
    cfg, run = rec.config, rec.run
    word, lines = verdict(rec)
    numbers, per_class = key_numbers(rec)
    cards, rest = gallery(rec, pictures)
    groups, grouped = shared(rec, pictures)
    minor = minor_findings(rec)
    flagged = len(cards) + len(rest)
    limit = (cfg.get("report") or {}).get("gallery_limit")
    small, n_small = sheets(rec, pictures)
    gallery_note = ("" if not rest else
                    f"The {len(cards)} most severe of the {flagged} flagged images are shown with pictures "
                    f"(report.gallery_limit: {limit}); the other {len(rest)} are listed by group in the table "
                    f"after them" + (f", and {'all' if n_small == len(rest) else n_small} of them "
                                     f"as small pictures after the table (report.thumbnail_limit)" if n_small else "")
                    + "; every image, with its confidence, is in samples.csv.")
    sheets_note = ("Worst first, numbered from 1: each picture is the image with the explanation of its worst "
                   "finding's method laid over it and the flagged region boxed. Under each block of pictures, "
                   "the numbers with their file names and that method (named once when all share it).")
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    weights, state = model.get("weights"), run.get("model_sha256")
    who = identity(rec)
    return {
        "identity": who, "problems": problems(rec, pictures), "not_run": not_run(rec),
        "waivers": waiver_rows(rec), "data_warnings": [str(w) for w in (rec.diff or {}).get("warnings") or []],
        "minor": minor, "scale": pictures.get("scale"), "groups": groups,
        "title": f"Model audit: {who['name']}", "run_id": run["id"], "date": run["started"][:10],
        "started": run["started"].replace("T", " "), "model": who["name"],
        "data": relative_path(data.get("root") or data.get("manifest"), rec), "classes": ", ".join(rec.classes),
        "verdict": word, "verdict_class": VERDICT_STYLE[word][0], "verdict_symbol": VERDICT_STYLE[word][1],
        "verdict_lines": lines, "checks": checks_table(rec), "gate": gate_rows(rec),
        "weights": (f"{Path(weights).name} (sha256 {str(run['weights_sha256'])[:12]}…)" if weights else
                    f"loaded by the factory (model state sha256 {state[:12]}…)" if state else "none given"),
        "numbers": numbers, "per_class": per_class, "key_charts": key_charts(rec, pictures),
        "class_findings": class_findings(rec, pictures), "views": views_context(rec, pictures),
        "gallery": cards, "rest": rest_groups(rest), "gallery_note": gallery_note,
        "sheets": small, "sheets_note": sheets_note,
        "reliability": reliability(rec, pictures), "changes": changes(rec.diff, rec),
        "skipped": [{"path": str(s.get("path", "")), "reason": str(s.get("reason", ""))} for s in rec.skipped],
        "warnings": [str(w) for w in rec.warnings],
        "errors": [f"check {e['rule']} failed: {e['error']}" for e in rec.errors],
        "config": _strip_home(yaml.safe_dump(run["config"], sort_keys=False), rec),
        "provenance": [(k, _strip_home(v, rec)) for k, v in provenance(rec)],
        "glossary": glossary(rec), "terms": TERMS, "model_card": model_card(rec),
        "review": review(cfg),
        "legend": pictures.get("legend", "images/legend.png"),
        "sizes": {"inset": INSET_MM, "panel": PANEL_MM, "gap": GAP_MM, "per_row": PANELS_PER_ROW, "exemplar": EXEMPLAR_MM,
                  "mean": MEAN_MM, "tile": TILE_MM, "columns": SHEET_COLUMNS},
    }


def render_html(rec: RunRecord, pictures: dict) -> str:
    """report.html from the record and the pictures: CSS inline, pictures beside it in images/, no
    script, no remote resource."""
    css = (Path(str(files("auditor.templates"))) / "report.css").read_text()
    return jinja_env().get_template("report.html.j2").render(css=css, **context(rec, pictures))


_PICTURE = re.compile(r'src="(images/[\w.-]+\.(png|jpg))"')
_MIME = {"png": "image/png", "jpg": "image/jpeg"}


def inline_pictures(html: str, folder: Path) -> str:
    """report.html with every picture of images/ inside it as a data: URI, so the one file can be
    sent on its own; ``data-src`` keeps the name of the file in images/ that each one is."""
    def one(m: re.Match) -> str:
        data = base64.b64encode((folder / m.group(1)).read_bytes()).decode("ascii")
        return f'src="data:{_MIME[m.group(2)]};base64,{data}" data-src="{m.group(1)}"'
    return _PICTURE.sub(one, html)


def allowed_url(url: str, root: Path) -> bool:
    """True only for a local file:// URL inside ``root`` (after resolving '..' and links)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost"):
        return False
    target = Path(unquote(parts.path)).resolve()
    root = root.resolve()
    return target == root or root in target.parents


def run_folder_fetcher(root: Path):
    """A WeasyPrint URL fetcher that reads files under ``root`` and refuses every other URL."""
    import weasyprint

    class RunFolderOnly(weasyprint.URLFetcher):
        def fetch(self, url, headers=None):
            if not allowed_url(url, root):
                raise ValueError(f"refused to fetch {url}: the report may only read its own run folder")
            return super().fetch(url, headers)

    return RunFolderOnly(allowed_protocols=["file"])


def render_pdf(html_path: Path, pdf_path: Path) -> None:
    """Print the HTML with WeasyPrint; any URL outside the run folder is refused, never fetched.

    The cyclic garbage collector is paused while WeasyPrint works: a big report keeps hundreds of
    thousands of layout objects alive, and every collection walks them all (measured: a quarter of
    the time for a 1,000-card gallery, for ~30 MB more peak memory).
    """
    import gc

    import weasyprint

    root = html_path.parent.resolve()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        weasyprint.HTML(filename=str(html_path), base_url=str(root) + "/",
                        url_fetcher=run_folder_fetcher(root)).write_pdf(str(pdf_path))
    finally:
        if was_enabled:
            gc.enable()
