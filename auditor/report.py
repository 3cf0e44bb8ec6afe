"""The report's words and layout data (computed here), rendered by one jinja2 template to HTML,
and the same HTML printed to PDF by WeasyPrint, which may read nothing outside the run folder."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from auditor.audit import AuditResult
from auditor.evidence import severity_rank
from auditor.registry import METHODS, RULES

VERDICT_STYLE = {"FAIL": "fail", "PASS WITH WARNINGS": "warn", "PASS": "pass"}


def _env() -> Environment:
    folder = Path(str(files("auditor.templates")))
    return Environment(loader=FileSystemLoader(folder), autoescape=select_autoescape(default=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def verdict(res: AuditResult) -> tuple[str, list[str]]:
    m, g = res.metrics, res.gate
    flagged = len({f.sample for f in res.findings})
    word = "FAIL" if not g["passed"] else ("PASS WITH WARNINGS" if res.findings or res.class_findings
                                           or res.errors else "PASS")
    ran = [r for r in res.run["rules"] if r not in {e["rule"] for e in res.errors}]
    quiet_rules = [r for r in ran if not any(f.rule == r for f in [*res.findings, *res.class_findings])]
    lines = [f"We checked {_plural(m['images'], 'image')} with {_plural(len(ran), 'check')} that look for shortcuts: "
             f"signs that the model decides from something other than the object, such as a watermark or a "
             f"shape that merely looks similar. The model classified {m['accuracy']:.0%} of the images correctly."]
    if res.class_findings:
        worst = res.class_findings[0]
        lines.append(f"{_plural(len(res.class_findings), 'class-level warning')} "
                     f"{'was' if len(res.class_findings) == 1 else 'were'} raised; the most serious: "
                     f"{worst.message}")
    if flagged:
        lines.append(f"{_plural(flagged, 'misclassified image')} "
                     f"{'was' if flagged == 1 else 'were'} flagged for a suspicious explanation.")
    if quiet_rules:
        lines.append(f"{_plural(len(quiet_rules), 'check')} found nothing: {', '.join(quiet_rules)}.")
    if word == "FAIL":
        lines.append(f"Findings reach the severity '{g['worst']}', at or above the failure threshold "
                     f"'{g['fail_on']}'. Do not release this model until the findings below are understood: "
                     f"remove the cue from the training data or retrain, then audit again.")
    elif word == "PASS WITH WARNINGS":
        lines.append("No finding reaches the failure threshold, but the warnings below deserve a look before release.")
    else:
        lines.append("Nothing suspicious was found by these checks; this does not prove the model is free of shortcuts.")
    if res.errors:
        lines.append(f"{_plural(len(res.errors), 'check')} could not run; see the appendix.")
    return word, lines


def context(res: AuditResult, doc: dict, pictures: dict) -> dict:
    cfg, m, c = res.cfg, res.metrics, res.classes
    word, lines = verdict(res)
    samples = res.evidence.samples
    gallery, rest = [], []
    seen = []
    for f in res.findings:
        if f.sample not in seen:
            seen.append(f.sample)
    for i in seen:
        row = samples.loc[i]
        item = {"path": row["path"], "label": c[row["label"]], "prediction": c[row["prediction"]],
                "confidence": f"{row['confidence']:.0%}",
                "findings": [{"severity": f.severity, "rule": f.rule, "method": f.method or "",
                              "message": f.message, "bbox": f.bbox} for f in res.findings if f.sample == i]}
        item["severity"] = max((f["severity"] for f in item["findings"]), key=severity_rank)
        picture = pictures["samples"].get(i)
        if picture:
            item |= {"image": picture["file"], "panels": picture["panels"]}
            gallery.append(item)
        else:
            rest.append(item)
    class_findings = [{"class": f.cls, "rule": f.rule, "severity": f.severity, "message": f.message,
                       "share": f"{f.share:.0%}", "method": f.method or "",
                       "image": pictures["classes"].get(n, {}).get("file"),
                       "agree": ", ".join(f.details.get("methods_agreeing", []))}
                      for n, f in enumerate(res.class_findings)]
    per_class = [{"class": r["class"], "precision": _pct(r["precision"]), "recall": _pct(r["recall"]),
                  "support": int(r["support"])} for r in m["per_class"].to_dict("records")]
    methods = [{"name": name, "description": METHODS.get(name).description,
                "status": ("failed: " + res.run["methods_disabled"][name]) if name in res.run["methods_disabled"]
                else "used"} for name in res.run["methods"]]
    glossary = ([{"name": e.name, "kind": "method", "text": e.description} for e in METHODS] +
                [{"name": e.name, "kind": "check", "text": e.description} for e in RULES])
    run = doc["run"]
    provenance = [("Run id", run["id"]), ("Started (UTC)", run["started"]), ("Finished (UTC)", run["finished"]),
                  ("Config file", run["config_file"]), ("Weights sha256", run["weights_sha256"] or "none"),
                  ("Data fingerprint", run["data_fingerprint"]), ("Device", run["device"]), ("Seed", run["seed"])]
    provenance += [(f"{k} version", v) for k, v in run["versions"].items()]
    return {
        "title": f"Model audit: {cfg.model.factory}", "run_id": run["id"], "date": run["started"][:10],
        "model": cfg.model.factory, "data": str(cfg.data.root or cfg.data.manifest),
        "verdict": word, "verdict_class": VERDICT_STYLE[word], "verdict_lines": lines,
        "numbers": [("Accuracy", f"{m['accuracy']:.1%}"), ("Images audited", m["images"]),
                    ("Misclassified", m["misclassified"]), ("Explained", m["explained"]),
                    ("Images flagged", len(seen)), ("Class-level warnings", len(res.class_findings)),
                    ("Skipped inputs", len(res.skipped))],
        "per_class": per_class, "class_findings": class_findings, "gallery": gallery, "rest": rest,
        "methods": methods, "skipped": res.skipped, "warnings": res.warnings, "errors": res.errors,
        "config": yaml.safe_dump(run["config"], sort_keys=False), "provenance": provenance, "glossary": glossary,
        "legend": "images/legend.png", "fail_on": res.gate["fail_on"] or "never",
    }


def _pct(v) -> str:
    return "n/a" if v != v else f"{v:.0%}"  # NaN: no images predicted as / labelled as this class


def render_html(res: AuditResult, doc: dict, pictures: dict) -> str:
    css = (Path(str(files("auditor.templates"))) / "report.css").read_text()
    return _env().get_template("report.html.j2").render(css=css, **context(res, doc, pictures))


def render_pdf(html_path: Path, pdf_path: Path) -> None:
    """Print the HTML with WeasyPrint; any URL outside the run folder is refused, never fetched."""
    import weasyprint

    root = html_path.parent.resolve()

    def allowed(url: str) -> bool:
        if not url.startswith("file://"):
            return False
        from urllib.parse import unquote, urlsplit
        target = Path(unquote(urlsplit(url).path)).resolve()
        return target == root or root in target.parents

    class RunFolderOnly(weasyprint.URLFetcher):
        def fetch(self, url, headers=None):
            if not allowed(url):
                raise ValueError(f"refused to fetch {url}: the report may only read its own run folder")
            return super().fetch(url, headers)

    weasyprint.HTML(filename=str(html_path), base_url=str(root) + "/",
                    url_fetcher=RunFolderOnly(allowed_protocols=["file"])).write_pdf(str(pdf_path))
