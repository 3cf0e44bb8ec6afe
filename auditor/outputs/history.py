"""A folder of scheduled audits read as one history: ``auditor history DIR``.

Every finished run folder directly under DIR is read from its findings.json alone (any schema the
project has written, through ``RunRecord.load``; hidden folders such as ``.cache`` and partial
runs are passed over; a folder that cannot be read is listed with the reason). Runs are grouped
by model family (the same classes and the same ``model.factory``) and, per family, laid out in
time order: a table row per run, charts of accuracy and of findings by severity, when each
class-level finding first appeared and when it was resolved, and which runs failed their gate
and why. A run whose data or audit settings differ from the previous run of its family is marked
(a letter in the table and a dashed line on the charts, explained in a footnote), so a jump that
a new validation set caused is not read as the model's.

Written like a run's report: the same template pipeline (jinja2, autoescape, inline CSS, no
script, nothing remote) to ``history.html``, printed to ``history.pdf`` by ``render_pdf`` (which
reads nothing outside the HTML's folder), the charts in ``history-images/`` beside them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

from auditor.inputs.config import SEVERITIES, ConfigError
from auditor.judge.diff import SETTINGS, _changes, classes_of, factory_of
from auditor.outputs import plots
from auditor.outputs.report import jinja_env, render_pdf
from auditor.outputs.report_words import and_list, plural, wilson
from auditor.record import RunRecord, severity_rank

IMAGES = "history-images"
IDENT = ("weights_sha256", "model_sha256", "data_fingerprint")
VERDICT_CSS = {"PASS": "pass", "FAIL": "fail", "INCOMPLETE": "fail"}
WORST_FIRST = tuple(reversed(SEVERITIES))


@dataclass
class Run:
    """What the history shows of one run, read from its record (not kept: a year of nightly runs
    with thousands of images each would not fit in memory)."""
    folder: Path
    ident: dict                               # weights_sha256, model_sha256, data_fingerprint
    id: str
    started: str
    family: tuple
    verdict: str
    accuracy: float
    lo: float
    hi: float
    images: int
    severities: dict[str, int]
    confirmed: dict[str, list[str]]           # rule -> classes with a confirmed class finding
    class_keys: dict[tuple[str, str], dict]   # (class, rule) -> severity, confirmed
    waivers: list[str]
    failed: list[str]
    settings: dict
    mark: str = ""                            # footnote letter where data or settings changed
    changed: list[str] = field(default_factory=list)   # "data", "settings"
    new_model: bool = False                   # other weights (or model state) than the run before


def _when(started: str) -> datetime:
    try:
        t = datetime.fromisoformat(started)
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _settings(rec: RunRecord) -> dict:
    """What changes what a run finds, besides the model: its methods, rules, the explain,
    intervention and trust sections of its config, the model's input."""
    cfg = rec.config
    return {"methods": rec.run.get("methods"), "rules": rec.run.get("rules"),
            **{s: cfg.get(s) for s in SETTINGS}, "model.input": (cfg.get("model") or {}).get("input")}


def _failed(rec: RunRecord) -> list[str]:
    g = rec.gate
    if g is None:
        return ["no gate was recorded"]
    if g.verdict == "PASS":
        return []
    lines = list(g.failed) or [str(c.get("message", c.get("name", ""))) for c in g.conditions if not c.get("passed")]
    if not lines and g.verdict == "INCOMPLETE":
        lines = rec.coverage.gaps()
    return lines or ([f"a finding reaches '{g.worst}'"] if g.worst else ["(no reason recorded)"])


def _waivers(rec: RunRecord) -> list[str]:
    seen = {}
    for f in rec.every_finding():
        if f.waived:
            w = f.waived
            seen.setdefault((w.waiver, w.owner, w.expires), [w.reason, 0])[1] += 1
    return [f"{owner} until {expires} ({plural(n, 'finding')}): {reason}"
            for (_, owner, expires), (reason, n) in seen.items()]


def read_run(folder: Path) -> Run:
    """One run folder as the history shows it; ConfigError (one line) when it cannot be read."""
    rec = RunRecord.load(folder, f"{folder.name}/findings.json")
    try:
        m, run = rec.metrics, rec.run
        lo, hi = wilson(m.images - m.misclassified, m.images)
        everything = rec.every_finding()
        confirmed: dict[str, list[str]] = {}
        for f in rec.class_findings:
            if f.confirmed:
                confirmed.setdefault(f.rule, []).append(f.cls)
        keys: dict[tuple[str, str], dict] = {}
        for f in rec.class_findings:
            k = (f.cls, f.rule)
            if k not in keys or severity_rank(f.severity) > severity_rank(keys[k]["severity"]):
                keys[k] = {"severity": f.severity, "confirmed": bool(f.confirmed)}
        return Run(folder=folder, ident={k: run.get(k) for k in IDENT}, id=str(run.get("id") or folder.name),
                   started=str(run.get("started") or ""),
                   family=(tuple(map(str, classes_of(rec))), str(factory_of(rec) or "") or None),
                   verdict=rec.gate.verdict if rec.gate else "no gate", accuracy=m.accuracy, lo=lo, hi=hi,
                   images=m.images, severities={s: sum(f.severity == s for f in everything) for s in WORST_FIRST},
                   confirmed=confirmed, class_keys=keys, waivers=_waivers(rec), failed=_failed(rec),
                   settings=_settings(rec))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder.name}/findings.json: could not be read as a run: "
                          f"{type(e).__name__}: {e}") from None


def collect(folder: Path) -> tuple[list[Run], list[dict]]:
    """Every readable run folder directly under ``folder``, and the others with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: is not a folder (give the folder that holds the run folders, e.g. reports)")
    runs, skipped = [], []
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise ConfigError(f"{folder}: cannot be read: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith(".") or entry.name == IMAGES or not entry.is_dir():
            continue  # .cache, partial runs, our own pictures, files
        if not (entry / "findings.json").exists():
            skipped.append({"folder": entry.name, "reason": "no findings.json (not a finished run folder)"})
            continue
        try:
            runs.append(read_run(entry))
        except ConfigError as e:  # "<folder>/findings.json: <reason>", the reason naming the file's full path
            reason = str(e).split(": ", 1)[-1].replace(f"{entry / 'findings.json'} ", "findings.json ")
            skipped.append({"folder": entry.name, "reason": reason})
        except OSError as e:
            skipped.append({"folder": entry.name, "reason": f"cannot be read: {e.strerror or e}"})
    return runs, skipped


def _letter(k: int) -> str:
    return chr(ord("A") + k) if k < 26 else f"Z{k - 25}"


def _brief(items: list[str], n: int = 4) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def mark_changes(runs: list[Run]) -> list[dict]:
    """Mark each run (in time order) whose data or settings differ from the previous run's; the
    footnotes, one per mark. A new model (other weights) is what the history is for: it is shown
    in the table, not marked as a change of the measuring."""
    notes = []
    for prev, run in zip(runs, runs[1:]):
        a, b = prev.ident, run.ident
        what = {}
        if a.get("data_fingerprint") != b.get("data_fingerprint"):
            what["data"] = (f"the data changed (fingerprint {str(a.get('data_fingerprint'))[:10]}… → "
                            f"{str(b.get('data_fingerprint'))[:10]}…; {prev.images} → {run.images} images)")
        if settings := _changes(prev.settings, run.settings):
            what["settings"] = f"the audit settings changed ({_brief(settings)})"
        run.new_model = any(a.get(k) != b.get(k) for k in ("weights_sha256", "model_sha256"))
        if what:
            run.mark, run.changed = _letter(len(notes)), list(what)
            notes.append({"letter": run.mark, "run": run.id, "date": run.started[:10],
                          "text": f"Run {run.id} ({run.started[:10]}) differs from run {prev.id}: "
                                  f"{' and '.join(what.values())}. Changes from this run on may come from that, "
                                  f"not from the model."})
    return notes


def timeline(runs: list[Run]) -> list[dict]:
    """Per class-level finding (class, rule): the run it first appeared in, the last run it was
    seen in, and the run it was resolved in (the first after the last sighting), worst first."""
    keys = dict.fromkeys(k for r in runs for k in r.class_keys)
    out = []
    for cls, rule in keys:
        seen = [k for k, r in enumerate(runs) if (cls, rule) in r.class_keys]
        first, last = seen[0], seen[-1]
        latest = runs[last].class_keys[(cls, rule)]
        gaps = last - first + 1 - len(seen)
        resolved = runs[last + 1] if last + 1 < len(runs) else None
        notes = []
        if gaps:
            notes.append(f"absent from {plural(gaps, 'run')} in between")
        for what, r in (("appeared", runs[first]), ("resolved", resolved)):
            if r is not None and r.mark and first > 0:
                notes.append(f"{what} in a run marked {r.mark}: the data or settings changed then")
        out.append({"class": cls, "rule": rule, "severity": latest["severity"],
                    "confirmed": "yes" if latest["confirmed"] else "no",
                    "first": f"{runs[first].started[:10]} ({runs[first].id})",
                    "last": f"{runs[last].started[:10]} ({runs[last].id})",
                    "resolved": f"{resolved.started[:10]} ({resolved.id})" if resolved else "not yet: still present",
                    "open": resolved is None, "runs": f"{len(seen)} of {len(runs)}", "note": "; ".join(notes),
                    "_order": (resolved is not None, -severity_rank(latest["severity"]), -first)})
    out.sort(key=lambda t: t.pop("_order"))
    return out


def _labels(runs: list[Run]) -> list[str]:
    days = [r.started[:10] or "?" for r in runs]
    return [d if days.count(d) == 1 else f"{d} {r.started[11:16]}" for d, r in zip(days, runs)]


def _hash(run: Run) -> str:
    w, s = run.ident["weights_sha256"], run.ident["model_sha256"]
    return f"weights {str(w)[:8]}…" if w else f"state {str(s)[:8]}…" if s else "not recorded"


def family_context(k: int, runs: list[Run], images: Path) -> dict:
    """One model family's section: its sentences, table, charts, timeline and failures."""
    notes = mark_changes(runs)
    labels = _labels(runs)
    marks = [(i, r.mark) for i, r in enumerate(runs) if r.mark]
    acc = plots.accuracy_history([{"label": lab, "accuracy": r.accuracy, "lo": r.lo, "hi": r.hi,
                                   "passed": r.verdict == "PASS"} for lab, r in zip(labels, runs)],
                                 marks, images / f"f{k}-accuracy.png")
    found = plots.findings_history(labels, {s: [r.severities[s] for r in runs] for s in WORST_FIRST}, marks,
                                   images / f"f{k}-findings.png")
    rows = []
    for r in runs:
        sev = [f"{n} {s}" for s, n in r.severities.items() if n]
        rows.append({"date": r.started[:16].replace("T", " "), "id": r.id, "hash": _hash(r),
                     "new_model": r.new_model, "verdict": r.verdict, "css": VERDICT_CSS.get(r.verdict, "skip"),
                     "accuracy": f"{r.accuracy:.1%}", "interval": f"{r.lo:.1%} to {r.hi:.1%}", "images": r.images,
                     "findings": ", ".join(sev) or "none",
                     "confirmed": [f"{rule}: {', '.join(cls)}" for rule, cls in sorted(r.confirmed.items())],
                     "waivers": r.waivers, "mark": r.mark, "mark_what": " and ".join(r.changed)})
    classes, factory = runs[0].family
    failures = [{"date": r.started[:16].replace("T", " "), "id": r.id, "verdict": r.verdict, "lines": r.failed}
                for r in runs if r.verdict != "PASS"]
    first, last = runs[0], runs[-1]
    lines = [f"{plural(len(runs), 'run')} from {first.started[:10]} to {last.started[:10]}; the latest ({last.id}) "
             f"{'passed' if last.verdict == 'PASS' else 'did not pass'} its gate ({last.verdict}) with accuracy "
             f"{last.accuracy:.1%} (95% interval {last.lo:.1%} to {last.hi:.1%})."]
    if len(runs) > 1:
        lines.append((f"{plural(len(failures), 'run')} of {len(runs)} did not pass; " if failures else
                      "Every run passed its gate; ")
                     + (f"{plural(len(notes), 'run')} audited other data or used other settings than the run "
                        f"before (marked {and_list([n['letter'] for n in notes])}): read changes across those marks "
                        f"with care." if notes else "every run audited the same data with the same settings."))
    shown, more = list(classes[:12]), len(classes) - 12
    return {"title": str(factory or "model (factory not recorded)"), "anchor": f"family-{k}",
            "classes": ", ".join(shown) + (f" and {more} more" if more > 0 else ""),
            "n_classes": len(classes), "lines": lines, "rows": rows, "notes": notes,
            "accuracy_chart": f"{IMAGES}/{acc.name}" if acc else None,
            "findings_chart": f"{IMAGES}/{found.name}" if found else None,
            "accuracy_alt": f"Accuracy of each of the {len(runs)} runs in time order, with its 95% interval"
                            + (f"; dashed lines mark the runs {and_list([m for _, m in marks])}, where the data or "
                               f"settings changed" if marks else ""),
            "findings_alt": "Number of findings of each severity in each run, in time order",
            "timeline": timeline(runs), "failures": failures}


def context(folder: Path, runs: list[Run], skipped: list[dict], images: Path) -> dict:
    groups: dict[tuple, list[Run]] = {}
    for r in sorted(runs, key=lambda r: (_when(r.started), r.id)):
        groups.setdefault(r.family, []).append(r)
    ordered = sorted(groups.values(), key=lambda rs: (_when(rs[-1].started), rs[-1].id), reverse=True)
    families = [family_context(k, rs, images) for k, rs in enumerate(ordered)]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("T", " ").replace("+00:00", " UTC")
    summary = (f"{plural(len(runs), 'run')} of {plural(len(families), 'model family', 'model families')} read "
               f"from {folder}" + (f"; {plural(len(skipped), 'folder')} could not be read (listed at the end)"
                                   if skipped else "") + ". A model family is the runs with the same classes and the "
               "same model factory; within one, each run is compared with the run before it.")
    return {"title": "Audit history", "folder": str(folder), "written": now, "summary": summary,
            "families": families, "skipped": skipped, "severities": list(WORST_FIRST)}


def render_html(ctx: dict) -> str:
    css = (Path(str(files("auditor.templates"))) / "report.css").read_text()
    return jinja_env().get_template("history.html.j2").render(css=css, **ctx)


def write_history(folder: Path, out: Path | None = None) -> tuple[list[Path], int, list[dict]]:
    """history.html and history.pdf (default in ``folder``; ``out`` names the HTML, the PDF goes
    beside it) and their charts in ``history-images/``. Returns the files written, how many runs
    they show and the folders skipped; ConfigError when there is no run to show."""
    folder = Path(folder)
    html = Path(out) if out else folder / "history.html"
    if html.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {html}: give a file name ending in .html (the PDF is written beside it)")
    runs, skipped = collect(folder)
    if not runs:
        why = f" ({len(skipped)} could not be read: {skipped[0]['folder']}: {skipped[0]['reason']})" if skipped else ""
        raise ConfigError(f"{folder}: holds no finished run folder to show{why}")
    where = html.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {html}: cannot create its folder: {e.strerror or e}") from None
    # Written under hidden names of their own and renamed into place: a reader (or a second history
    # written at the same time) never sees half of one.
    new = Path(tempfile.mkdtemp(prefix=f".{IMAGES}.", dir=where))
    old = where / f"{new.name}.old"
    pdf = html.with_suffix(".pdf")
    partial_html, partial_pdf = where / f"{new.name}.html", where / f"{new.name}.pdf"
    try:
        page = render_html(context(folder, runs, skipped, new))
        try:
            os.rename(where / IMAGES, old)
        except FileNotFoundError:
            pass
        os.rename(new, where / IMAGES)
        shutil.rmtree(old, ignore_errors=True)
        partial_html.write_text(page)
        render_pdf(partial_html, partial_pdf)
        os.replace(partial_pdf, pdf)
        os.replace(partial_html, html)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        partial_html.unlink(missing_ok=True)
        partial_pdf.unlink(missing_ok=True)
    return [html, pdf], len(runs), skipped
