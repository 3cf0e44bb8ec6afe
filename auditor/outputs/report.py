"""The report's words and layout data (computed here), rendered by one jinja2 template to HTML,
and the same HTML printed to PDF by WeasyPrint, which may read nothing outside the run folder.

The template only lays out: every sentence, number and list below is made here. Everything
that comes from the data (class names, file names, messages) reaches the template as plain
text and is escaped there (autoescape is on; nothing from the data is marked safe).
"""
from __future__ import annotations

import base64
import math
import os
import re
from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from auditor.judge.diff import pts
from auditor.judge.trust import share_words
from auditor.outputs.views import key_number as views_key_number, views_context
from auditor.outputs.overlay import (EXEMPLAR_MM, GAP_MM, INSET_MM, MEAN_MM, PANEL_MM, PANELS_PER_ROW, SHEET_COLUMNS,
                                     TILE_MM)
from auditor.record import ClassFindingRecord, RunRecord, beats, severity_rank
from auditor.registry import METHODS, RULES

# Okabe-Ito colours (colour-blind safe) in the stylesheet; the verdict is always written in words too.
VERDICT_STYLE = {"FAIL": ("fail", "✗"), "INCOMPLETE": ("fail", "?"), "PASS WITH WARNINGS": ("warn", "!"),
                 "PASS": ("pass", "✓")}

TERMS = [
    ("Heatmap", "A picture of where in an image the model's evidence for its prediction lies: bright means much "
                "evidence. Each heatmap is scaled to its own maximum, so compare places, not brightness between "
                "pictures."),
    ("Trust gate", "Before the checks use a method's heatmaps, the method is tested: randomising the model's weights "
                   "must change its heatmaps, and removing the pixels it marks must hurt the prediction more than "
                   "removing random regions of the same size. A method that fails is shown for comparison but not used."),
    ("Intervention", "A finding that names a region is tested: the region is hidden (filled in from its "
                     "surroundings) and pasted onto images of other classes. If hiding it changes decisions, or "
                     "pasting it carries the decision over, the finding is confirmed."),
    ("Severity", "info, low, medium, high, critical: the check's own measure graded by thresholds. Confirmation "
                 "raises a finding to at least high; a suspicion that fails both tests is lowered to low."),
    ("Rank correlation", "How alike two heatmaps are in the order of their places, from most to least evidence: "
                         "1 means the same order, 0 no relation at all. The trust gate uses it to see whether "
                         "a method's heatmaps change when the model is scrambled."),
    ("Area under the curve", "Remove an image's pixels step by step, most marked first, and follow how the "
                             "model's confidence falls. The area under that curve is small when the marked pixels "
                             "truly matter, so a good method's area is well below that of removing random pixels."),
    ("Pointing game", "Whether the place a heatmap marks most lies on the annotated object. Counted over many "
                      "images, it says how often a method points at the object rather than beside it."),
    ("Placebo (random region)", "Each intervention is repeated with a random region of the same size elsewhere in "
                                "the image. A finding counts as confirmed only when the real region does clearly "
                                "more than the random one."),
    ("Precision and recall", "Precision: of the images the model gave a class, the share that truly are. Recall: of "
                             "the images that truly are the class, the share the model found."),
]


def _env() -> Environment:
    folder = Path(str(files("auditor.templates")))
    return Environment(loader=FileSystemLoader(folder), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.0%}"  # NaN: no images predicted as / labelled as this class


def _list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))


def _confirmed(findings) -> tuple[int, int]:
    tested = [f for f in findings if "intervention" in f.details]
    return sum(bool(f.details.get("confirmed")) for f in tested), len(tested)


def _waiver(f) -> str:
    w = f.waived
    return f"waived by {w.owner} until {w.expires}: {w.reason}" if w else ""


def _trusted(rec: RunRecord) -> list[str]:
    """The methods whose heatmaps the checks used (they ran, and passed the trust gate or were not tested)."""
    return [m for m, c in rec.coverage.methods.items() if c.state == "ran"]


def _is_class(f) -> bool:
    return isinstance(f, ClassFindingRecord)


# --- the intervention tests, one line each ------------------------------------------------


def _placebo(e: dict, name: str, n: int) -> str:
    rate = e.get(f"control_{name}_rate")
    return "" if rate is None else f" (random region of the same size: {round(rate * n)})"


def tests(rec: RunRecord, f) -> list[dict]:
    """Each intervention test of a finding on its own line: passed or not (✓/✗), its numbers and
    its placebo's. ``name`` is the test's short name, for "confirmed by ...". """
    e = f.details.get("intervention")
    if e is None:
        return []
    if e.get("skipped"):
        return [{"ok": False, "mark": "–", "name": "", "text": f"not tested: {e['skipped']}"}]
    spec = {"remove_drop": 0.5, "transplant_rate": 0.5, "control_margin": 0.25} | (rec.config.get("intervention") or {})
    cls = f.cls if _is_class(f) else next((s.prediction for s in rec.samples if any(g is f for g in s.findings)), "")
    out = []
    if "samples_tested" in e:  # a class finding made of image findings: their pasting tests decide
        out.append({"ok": bool(f.confirmed), "name": "pasting",
                    "text": f"pasting each of the {_plural(e['samples_tested'], 'flagged region')} onto images of "
                            f"other classes: {e['samples_transferring']} turned at least half of them into '{cls}' "
                            f"({e['turned']} of {e['pasted_onto']} images in all)"})
    else:
        n = e.get("removed_from") or 0
        if n == 1:
            ok = beats(e, "removal", e["removal_rate"] >= spec["remove_drop"], spec["control_margin"])
            text = (f"hiding the region changed the prediction to '{e['new_predictions'][0]}'"
                    if e.get("decision_changed") and e.get("new_predictions") else
                    f"hiding the region did not change the prediction (confidence in '{cls}' "
                    f"{'fell' if e['confidence_drop'] >= 0 else 'rose'} by {abs(100 * e['confidence_drop']):.0f} "
                    f"points)")
            if e.get("control_removal_rate") is not None:
                text += f" (random region of the same size: {e['control_removal_rate']:.0%} of the time)"
            out.append({"ok": ok, "name": "hiding", "text": text})
        elif n:
            ok = beats(e, "removal", e["removal_rate"] >= spec["remove_drop"], spec["control_margin"])
            out.append({"ok": ok, "name": "hiding",
                        "text": f"hiding the region in {n} images the model calls '{cls}' changed "
                                f"{e['decision_changed']} of the decisions" + _placebo(e, "removal", n)})
        if e.get("pasted_onto"):
            ok = beats(e, "transfer", e["transfer_rate"] >= spec["transplant_rate"], spec["control_margin"])
            out.append({"ok": ok, "name": "pasting",
                        "text": f"pasting the region onto {e['pasted_onto']} other images turned {e['turned']} into "
                                f"'{cls}'" + _placebo(e, "transfer", e["pasted_onto"])})
        if e.get("donors"):
            ok = beats(e, "restore", e["restore_rate"] >= spec["transplant_rate"], spec["control_margin"])
            true = e.get("true_class", "the true class")
            out.append({"ok": ok, "name": "restoring",
                        "text": f"putting back what {e['donors']} correctly classified '{true}' images show there "
                                f"gave '{true}' back in {e['restored']}" + _placebo(e, "restore", e["donors"])})
    for t in out:
        t["mark"] = "✓" if t["ok"] else "✗"
    return out


def confirmed_by(rec: RunRecord, f) -> str:
    """'' when not confirmed; else 'confirmed by pasting' / 'confirmed by hiding and pasting'."""
    if not f.confirmed:
        return ""
    names = [t["name"] for t in tests(rec, f) if t["ok"] and t["name"]]
    return "confirmed" + (f" by {_list(names)}" if names else "")


def _badge(rec: RunRecord, f) -> str:
    """'high · confirmed by restoring' / 'low · not confirmed' / 'medium · not tested'."""
    tag = confirmed_by(rec, f) or ("not confirmed" if f.confirmed is False else "not tested")
    return f"{f.severity} · {tag}"


# --- 1. page 1: identity, problems, what did not run, waivers -----------------------------

def _relative(path, rec: RunRecord) -> str:
    """A data path relative to the config file's folder, never absolute (a reader gets no host's layout)."""
    if not path:
        return ""
    p, base = Path(str(path)), Path(str(rec.run.get("config_file") or ".")).parent
    if p.is_absolute():
        try:
            p = Path(os.path.relpath(p, base.resolve() if not base.is_absolute() else base))
        except ValueError:
            p = Path(p.name)
    return "the config file's folder" if p.as_posix() == "." else p.as_posix()


def identity(rec: RunRecord) -> dict:
    """The model's identity from the config's ``audit`` section, with defaults from the model."""
    cfg = rec.config
    a, model, data = cfg.get("audit") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    name = a.get("name") or (Path(str(model["huggingface"])).name if model.get("huggingface")
                             else str(model.get("factory") or "the model"))
    data_path = _relative(data.get("root") or data.get("manifest"), rec)
    rows = [(k, str(v)) for k, v in (("Version", a.get("version")), ("Owner", a.get("owner")),
                                      ("Intended use", a.get("intended_use"))) if v]
    rows.append(("Data set", (f"{a['data_description']} ({data_path})" if a.get("data_description")
                              else data_path) + f"; {_plural(rec.metrics.images, 'image')}"))
    return {"name": name, "rows": rows, "code": str(model.get("factory") or model.get("huggingface") or "")}


def _predicted(rec: RunRecord) -> dict[str, int]:
    """How many images the model called each class (the confusion matrix's columns)."""
    classes, matrix = rec.metrics.confusion.get("classes") or rec.classes, rec.metrics.confusion.get("matrix") or []
    return {c: int(sum(row[k] for row in matrix)) for k, c in enumerate(classes)} if matrix else {}


def _links(rec: RunRecord) -> dict[int, int]:
    """id(image finding) -> position of the class finding it belongs to: the class finding names
    its image (``details.samples``), or is the same check on the class the image was called."""
    out = {}
    for s in rec.samples:
        for f in s.findings:
            for n, c in enumerate(rec.class_findings):
                if s.id in (c.details.get("samples") or []) or (c.rule == f.rule and c.cls == s.prediction):
                    out[id(f)] = n
                    break
    return out


def _without_tests(f) -> str:
    """A finding's message less its closing account of the intervention, which the test lines
    under it give one by one (findings.json keeps the whole message)."""
    if not tests_of(f):
        return f.message
    for cut in (" Confirmed by intervention", " Not confirmed by intervention"):
        if cut in f.message:
            return f.message[:f.message.index(cut)]
    return f.message


def tests_of(f) -> bool:
    e = f.details.get("intervention")
    return bool(e) and not e.get("skipped")


def _first_sentence(text: str) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head + "."


def _minor(f) -> bool:
    """An unconfirmed low (or info) finding: listed in the appendix, not in the gallery."""
    return not f.confirmed and severity_rank(f.severity) <= severity_rank("low")


def problems(rec: RunRecord, pictures: dict) -> list[dict]:
    """Page 1: one plain sentence per problem, worst first, each with a small picture: every class
    finding, then the image findings no class finding covers, grouped by check and predicted class."""
    out, links, called = [], _links(rec), _predicted(rec)
    for n, f in enumerate(rec.class_findings):
        pic = pictures["classes"].get(n, {})
        members = {s.id for s in rec.samples for g in s.findings if links.get(id(g)) == n}  # images, not findings
        t = [x for x in tests(rec, f) if x["ok"]]
        said = (f" {confirmed_by(rec, f).capitalize()}: {t[0]['text']}." if f.confirmed and t else
                f" {confirmed_by(rec, f).capitalize()}." if f.confirmed else
                " Not confirmed by the intervention tests." if f.confirmed is False else " Not tested by intervention.")
        also = f" {_plural(len(members), 'misclassified image')} show it too (section 4)." if members else ""
        picture = (pic.get("inset") or {}).get("file") or pic.get("mean")
        out.append({"severity": f.severity, "badge": _badge(rec, f), "check": _title(RULES, f.rule),
                    "subject": f"class '{f.cls}'", "waived": bool(f.waived),
                    "sentence": _first_sentence(f.message) + said + also, "picture": picture,
                    "alt": f"the evidence for class {f.cls}: " + ("its flagged region, enlarged" if pic.get("inset")
                                                                 else "the mean explanation"),
                    "rank": (severity_rank(f.severity), bool(f.confirmed))})
    groups: dict[tuple, list] = {}
    for s in rec.flagged():
        for f in s.findings:
            if id(f) not in links and not _minor(f):
                groups.setdefault((f.rule, s.prediction), []).append((s, f))
    for (rule, pred), items in groups.items():
        s0, f0 = max(items, key=lambda x: (severity_rank(x[1].severity), x[1].score))
        paths = dict.fromkeys(s.path for s, _ in items)
        labels = sorted({s.label for s, _ in items})
        k, confirmed = len(paths), sum(bool(f.confirmed) for _, f in items)
        denominator = called.get(pred)
        of = f"{k} of the {denominator} images the model calls '{pred}'" if denominator else             f"{_plural(k, 'image')} the model calls '{pred}'"
        pic = pictures["samples"].get(s0.id, {})
        out.append({"severity": f0.severity, "badge": _badge(rec, f0), "check": _title(RULES, rule),
                    "subject": f"images called '{pred}'", "waived": all(f.waived for _, f in items),
                    "sentence": f"{of} (truly {_list(labels)}) were flagged, {confirmed} of them confirmed by "
                                f"intervention. For example {s0.path}: {_first_sentence(f0.message)}",
                    "picture": pic.get("inset") or (pic.get("rows") or [{}])[0].get("file"),
                    "alt": f"{s0.path}: its flagged region, enlarged",
                    "rank": (severity_rank(f0.severity), bool(f0.confirmed))})
    return sorted(out, key=lambda p: (-p["rank"][0], not p["rank"][1]))


def not_run(rec: RunRecord) -> list[str]:
    """Every check and method that could not run (or was not trusted), named as such, never as passed."""
    out = [f"{_title(RULES, n)}: {c.words}" for n, c in rec.coverage.rules.items() if c.state != "ran"]
    out += [f"{_title(METHODS, n)}: {c.words}" for n, c in rec.coverage.methods.items() if c.state != "ran"]
    return out


def waiver_rows(rec: RunRecord) -> list[dict]:
    """The config's waivers: who accepted what, why, until when, and how many findings each covers now."""
    count: dict[int, int] = {}
    for f in rec.every_finding():
        if f.waived:
            count[f.waived.waiver] = count.get(f.waived.waiver, 0) + 1
    rows = []
    for k, w in enumerate(rec.config.get("waivers") or []):
        cls = w.get("class") or w.get("class_")
        what = _title(RULES, w.get("rule", "")) + (f", class '{cls}'" if cls else "")
        if w.get("paths") or w.get("hashes"):
            what += f", {_plural(len(w.get('paths') or []) + len(w.get('hashes') or []), 'image pattern')}"
        rows.append({"owner": str(w.get("owner", "")), "what": what, "reason": str(w.get("reason", "")),
                     "expires": str(w.get("expires", "")), "covers": _plural(count.get(k, 0), "finding")})
    return rows


# --- 1. verdict ---------------------------------------------------------------------------

def verdict(rec: RunRecord) -> tuple[str, list[str]]:
    """The verdict word and three to six plain sentences: checked, found, counts, meaning, what to do."""
    m, g, diff = rec.metrics, rec.gate, rec.diff
    flagged = len(rec.flagged())
    everything = rec.every_finding()
    word = g.verdict if g.verdict != "PASS" else ("PASS WITH WARNINGS" if everything else "PASS")
    rules = list(rec.run["rules"])
    trusted = _trusted(rec)
    how = (f"explanation {'method' if len(trusted) == 1 else 'methods'} ({_list(trusted)}) showed where its evidence "
           f"lies" if trusted else "no explanation method could show where its evidence lies")
    lines = [f"We checked how the model decides on {_plural(m.images, 'image')}: {how}, and "
             f"{_plural(len(rules), 'check')} looked for shortcuts, such as a watermark or a shape that merely "
             f"resembles the class. It classified {m.accuracy:.0%} of the images correctly."]
    if everything:
        worst = max(everything, key=lambda f: (severity_rank(f.severity), _is_class(f)))  # class on ties
        lines.append(f"The most serious finding ({worst.severity}): {_headline(rec, worst)}")
    confirmed, tested = _confirmed(everything)
    ran = [r for r in rules if rec.coverage.rules.get(r) and rec.coverage.rules[r].state == "ran"]
    quiet = [r for r in ran if not any(f.rule == r for f in everything)]
    not_run = len(rules) - len(ran)
    counts = ((f"All {_plural(len(rules), 'check')} ran and found nothing" if len(quiet) == len(rules) else
               f"{len(quiet)} of {_plural(len(rules), 'check')} ran and found nothing") if not everything else
              f"{len(quiet)} of {_plural(len(rules), 'check')} ran and found nothing; "
              f"{_plural(len(rec.class_findings), 'class-level finding')} and "
              f"{_plural(flagged, 'flagged misclassified image')} came from the others")
    if not_run:
        counts += f"; {not_run} did not run (see the table below)"
    if tested:
        counts += f", and intervention confirmed {confirmed} of the {_plural(tested, 'finding')} it could test"
    if g.waived:
        counts += f"; {g.waived} {'is' if g.waived == 1 else 'are'} waived"
    if diff:
        gone, unaudited = resolved_split(diff, rec)
        counts += (f"; since the previous audit {len(diff.get('new') or [])} new, {len(gone)} resolved"
                   + (f" ({len(unaudited)} more on images not audited this time)" if unaudited else ""))
    lines.append(counts + ".")
    failed = [c for c in g.conditions if not c["passed"]]
    incomplete = next((c for c in failed if c["name"] == "incomplete"), None)
    gaps = incomplete["message"].removeprefix("the audit is incomplete: ") if incomplete else ""
    if word == "INCOMPLETE":
        lines.append(f"The audit could not examine everything it was asked to ({gaps}), so it cannot "
                     f"say the model passed. Fix what kept these checks from running and audit again; until "
                     f"then, treat the model as not reviewed.")
    elif word == "FAIL":
        names = {c["name"] for c in failed if c["name"] != "incomplete"} or {"severity"}
        why = "; ".join(c["message"] for c in failed if c["name"] != "incomplete") or \
            f"a finding reaches '{g.worst}'"
        meaning = []
        if names & {"severity", "new_findings"}:
            meaning.append("the model probably relies on a shortcut and may fail on data where the cue is missing "
                           "or appears by chance")
        if names & {"accuracy_drop", "class_recall_drop"}:
            meaning.append("the model has become worse than the baseline")
        lines.append(f"It fails the release gate because of {why}; "
                     f"{' and '.join(meaning) or 'see the gate below'}.")
        if names & {"severity", "new_findings"}:
            lines.append("Do not release this model yet: look at the examples below, remove the cue from the "
                         "training data (or make it appear in every class), retrain, and audit again.")
        else:
            lines.append("Do not release this model yet: find out why it became worse than the baseline "
                         "(section 6), fix it, and audit again.")
    elif word == "PASS WITH WARNINGS":
        lines.append("No finding reaches the failure threshold, but the findings below may point to a shortcut; "
                     "review them before release, confirmed ones first.")
    else:
        lines.append("No check found a shortcut. This does not prove there is none, only that these checks, with "
                     "these methods, found nothing; keep this report with the release record.")
    caveats = []
    if word == "FAIL" and gaps:
        caveats.append(f"besides, the audit is incomplete ({gaps})")
    if rec.coverage.trust is not None and rec.coverage.trust.state == "off":
        caveats.append("the trust gate was switched off, so no explanation method was tested before use")
    if caveats:
        lines.append(f"Caution: {' and '.join(caveats)} (see sections 5 and 7).")
    return word, lines


def gate_rows(rec: RunRecord) -> list[dict]:
    """The release gate's conditions (report.fail_on), each with its outcome in words."""
    rows = []
    for c in rec.gate.conditions:
        state, css = ("not checked", "skip") if c.get("skipped") else (("met", "pass") if c["passed"]
                                                                       else ("failed", "fail"))
        message = c["message"]
        skipped = [n for n, k in rec.coverage.rules.items() if k.state != "ran"]
        if c["name"] == "incomplete" and c["passed"] and skipped:
            message = (message.replace("every check ran", "every check that applies ran") +
                       f"; {_list(skipped)} did not apply and {'was' if len(skipped) == 1 else 'were'} not run "
                       f"(see 'Not checked')")
        rows.append({"name": c["name"].replace("_", " "), "threshold": str(c["threshold"]), "state": state,
                     "css": css, "message": message})
    return rows


def _headline(rec: RunRecord, f) -> str:
    """One sentence on a finding: where the evidence is, and what the intervention showed."""
    where = f.details.get("region")
    if _is_class(f):
        head = (f"when the model says '{f.cls}', its evidence concentrates in the {where}" if where
                else f.message.split(". ")[0].rstrip("."))
    else:
        s = next(s for s in rec.samples if any(g is f for g in s.findings))
        head = (f"image {s.path} (a '{s.label}' taken for '{s.prediction}') has its evidence in the "
                f"{where or 'flagged region'}")
    e = f.details.get("intervention")
    if e is None:
        return head + "."
    if f.details.get("confirmed") and not e.get("removed_from"):  # confirmed by its rule's restore test alone
        return head + f"; restoring it from {e['donors']} correctly classified images gave the true class back."
    if f.details.get("confirmed"):
        return (head + f"; hiding that region changed {e['decision_changed']} of {e['removed_from']} decisions, and "
                f"pasting it onto other images turned {e['turned']} of {e['pasted_onto']}.")
    return head + "; the intervention test did not confirm it."


def checks_table(rec: RunRecord) -> list[dict]:
    """Per check (rule): what it looks for and what came of it; one that did not run says why."""
    rows = []
    everything = rec.every_finding()
    for name in rec.run["rules"]:
        mine = [f for f in everything if f.rule == name]
        check = rec.coverage.rules.get(name)
        if check is None:
            result, css = "not recorded (a run from before coverage was recorded)", "skip"
        elif check.state == "error":
            result, css = check.words, "error"
        elif check.state != "ran":
            result, css = check.words, "error" if check.state == "no_evidence" or check.required else "skip"
        elif not mine:
            result, css = f"nothing found ({check.words})", "pass"
        else:
            worst = max((f.severity for f in mine), key=severity_rank)
            n_cls = sum(_is_class(f) for f in mine)
            parts = ([_plural(n_cls, "class-level finding")] if n_cls else []) + \
                    ([_plural(len(mine) - n_cls, "image finding")] if len(mine) > n_cls else [])
            confirmed, tested = _confirmed(mine)
            result = f"{' and '.join(parts)}, worst {worst}"
            result += f"; {confirmed} of {tested} confirmed" if tested else ""
            css = "fail" if severity_rank(worst) >= severity_rank("high") else "warn"
        rows.append({"name": _title(RULES, name), "looks_for": _description(RULES, name), "result": result,
                     "css": css})
    return rows


def _description(registry, name: str) -> str:
    return registry.get(name).description if name in registry else ""


def _title(registry, name: str) -> str:
    """'Mark in a corner or along an edge (corner_border)': the plain name, and the one in the config."""
    return f"{registry.get(name).title} ({name})" if name in registry else name


# --- 2. key numbers -------------------------------------------------------------------------

def key_numbers(rec: RunRecord) -> tuple[list[tuple], list[dict]]:
    m = rec.metrics
    lo, hi = wilson(m.images - m.misclassified, m.images)
    confirmed, tested = _confirmed(rec.every_finding())
    flagged = rec.flagged()
    numbers = [("Accuracy", f"{m.accuracy:.1%}", f"95% CI {lo:.1%} to {hi:.1%}"),
               ("Images audited", m.images, f"{len(rec.skipped)} skipped"),
               ("Misclassified", m.misclassified, f"{m.explained} explained"),
               ("Images flagged", len(flagged), "misclassified, suspicious evidence"),
               ("Class-level findings", len(rec.class_findings), "how a whole class is decided"),
               ("Confirmed by intervention", confirmed, f"of {_plural(tested, 'finding')} tested")]
    numbers += [n] if (n := views_key_number(rec)) else []  # the global views' metric
    flagged_pred: dict[str, int] = {}
    for s in flagged:
        flagged_pred[s.prediction] = flagged_pred.get(s.prediction, 0) + 1
    per_class = [{"class": r["class"], "support": int(r["support"]), "precision": _pct(r["precision"]),
                  "recall": _pct(r["recall"]), "flagged": flagged_pred.get(r["class"], 0),
                  "findings": sum(f.cls == r["class"] for f in rec.class_findings)}
                 for r in m.per_class]
    return numbers, per_class


PAGE_MM = 184  # the printed text width (A4 less the margins of report.css)


def _chart(pic: dict | None, alt: str, caption: str) -> dict | None:
    """A chart of gallery_images (file and printed width) as the template places it."""
    if not pic:
        return None
    return {"file": pic["file"], "width": f"{min(float(pic['width_mm']), PAGE_MM):.1f}mm", "alt": alt,
            "caption": caption}


def key_charts(rec: RunRecord, pictures: dict) -> list[dict]:
    """Section 2's pictures: the confusion matrix, and per-class precision and recall with intervals."""
    n = len(rec.classes)
    return [c for c in (
        _chart(pictures.get("class_rates"),
               f"Bar chart of precision and recall for each of the {n} classes, each with its 95% interval; "
               f"the same numbers are in the table above.",
               "Precision (solid bars) and recall (hatched bars) of each class. The whisker is the 95% interval: "
               "wide when a class has few images, so two classes whose whiskers overlap may not truly differ."),
        _chart(pictures.get("confusion"),
               f"Confusion matrix of the {n} classes: one row per true class, one column per predicted class; "
               f"each cell gives a number of images and is shaded by its share of the row.",
               "Where the model's answers go: each row is a true class, each column the class the model said. A "
               "cell counts images; its shading" + (" and percentage give" if n <= 10 else " gives") + " its share "
               "of the row, so the diagonal is each class's recall and a dark cell off it is a frequent mix-up."),
    ) if c]


# --- 3. class-level findings ----------------------------------------------------------------

def _intervention_rows(f, cls: str) -> list[tuple[str, str]]:
    e = f.details.get("intervention")
    if e is None:
        return [("Intervention", "not tested: the finding names no region, or intervention is switched off")]
    if "samples_tested" in e:  # a class finding made of image findings: their transplant tests decide
        return [("Pasting the regions", f"of {_plural(e['samples_tested'], 'flagged image')}, "
                                        f"{e['samples_transferring']} turned most images of other classes into '{cls}'"),
                ("Result", "confirmed" if f.details.get("confirmed") else "not confirmed")]
    if "removed_from" not in e:
        return [("Intervention", f"not tested: {e.get('skipped', 'no test applied')}")]
    rows = [("Hiding the region", f"in {_plural(e['removed_from'], 'image')} the model called '{cls}': "
                                  f"{e['decision_changed']} changed decision ({e['removal_rate']:.0%}); confidence in "
                                  f"'{cls}' {'fell' if e['confidence_drop'] >= 0 else 'rose'} by "
                                  f"{abs(100 * e['confidence_drop']):.0f} points on average")]
    if e.get("pasted_onto"):
        rows.append(("Pasting the region", f"onto {_plural(e['pasted_onto'], 'correctly classified image')} of "
                                           f"other classes: {e['turned']} turned into '{cls}' "
                                           f"({e['transfer_rate']:.0%})"))
    before = f.details.get("severity_before_intervention")
    verdict_ = "confirmed" if f.details.get("confirmed") else "not confirmed"
    rows.append(("Result", verdict_ + (f" (severity before the test: {before}; now {f.severity})"
                                       if before and before != f.severity else "")))
    return rows


def class_findings(rec: RunRecord, pictures: dict) -> list[dict]:
    out = []
    samples = rec.by_id()
    for n, f in enumerate(rec.class_findings):
        pic = pictures["classes"].get(n, {})
        exemplars = [{"file": e["file"], "path": samples[e["sample"]].path,
                      "caption": f"{samples[e['sample']].path} (labelled {samples[e['sample']].label})"}
                     for e in pic.get("exemplars", [])]
        how = ("the images the rule grouped together" if f.details.get("exemplars")
               else "the class's images with the most evidence in the region")
        called = _predicted(rec).get(f.cls)
        out.append({"class": f.cls, "rule": _title(RULES, f.rule), "severity": f.severity,
                    "message": _without_tests(f),
                    "badge": _badge(rec, f), "tests": tests(rec, f),
                    "inset": (pic.get("inset") or {}).get("file"),
                    "inset_caption": (f"The region in {samples[pic['inset']['sample']].path}, enlarged"
                                      if pic.get("inset") else ""),
                    "called": (f"The model calls {called} images '{f.cls}'; {pic['images']} of them "
                               f"{'was' if pic['images'] == 1 else 'were'} explained and examined."
                               if called is not None and pic.get("images") is not None else ""),
                    "waived": _waiver(f),
                    "confirmed": f.details.get("confirmed"), "method": f.method or "",
                    "share": _pct(f.share), "agree": _list(f.details["methods_agreeing"])
                    if f.details.get("methods_agreeing") else "",
                    "mean": pic.get("mean"), "mean_alt": f"mean explanation ({pic.get('method', '')}) of "
                                                        f"{pic.get('images', 0)} images the model called {f.cls}",
                    "mean_caption": f"Mean of {_plural(pic.get('images', 0), 'image')} called '{f.cls}' "
                                    f"({pic.get('method', '')}), over their mean image"
                                    + ("; box: the region" if f.region else ""),
                    "exemplars": exemplars, "exemplar_note": f"Examples: {how}.",
                    "intervention": _intervention_rows(f, f.cls)})
    return out


# --- 4. gallery -----------------------------------------------------------------------------

def _effects(f) -> list[str]:
    """A sample finding's effect sizes, in short phrases (the sentence says the same in words): the
    rule's own (its registry entry formats them), then the intervention's."""
    d = f.details
    entry = RULES.get(f.rule) if f.rule in RULES else None
    out = list(entry.effects(d)) if entry and entry.effects else []
    agree = d.get("methods_agreeing") or []
    if len(agree) > 1 or (agree and agree != [f.method]):
        out.append(f"methods agreeing: {_list(agree)}")
    return out


# What fits under one panel at the caption size (8 pt DejaVu Sans in print: a method's name of 17
# lower-case characters is 17-27 mm wide, its slot 30 mm); a longer one would push the next tab on.
CAPTION_CHARS = 17


def _captions(methods: list, trusted: set) -> str:
    """The captions under one strip of panels (None: the original), as text for ``p.cap``.

    Panel k's caption starts at tab stop k, and the tab stops are one panel slot apart, so each
    caption sits under its picture: one line of text instead of a box per picture. "(not trusted)"
    follows the last panel's name, or goes on a second line under a panel in the middle. A name
    too long for its slot gets the order spelled out instead.
    """
    names = ["original" if m is None else "region, enlarged" if m == "@inset" else m for m in methods]
    flags = [m is not None and m != "@inset" and m not in trusted for m in methods]
    if any(len(n) > CAPTION_CHARS for n in names[:-1]):
        return "left to right: " + ", ".join(n + (" (not trusted)" if f else "") for n, f in zip(names, flags))
    if flags[-1]:
        names[-1] += " (not trusted)"
    under = ["not trusted" if f else "" for f in flags[:-1]]
    return "\t".join(names) + ("\n" + "\t".join(under).rstrip("\t") if any(under) else "")


def shared(rec: RunRecord, pictures: dict) -> tuple[list[dict], set[int]]:
    """Flagged images whose findings all belong to a class finding (section 3): per class finding
    one paragraph and a grid of their enlarged regions, instead of a card each; and their ids."""
    links, groups, done = _links(rec), {}, set()
    for s in rec.flagged():
        main = [f for f in s.findings if not _minor(f)]
        pic = pictures["samples"].get(s.id) or {}
        if not main or not pic.get("inset") or any(id(f) not in links for f in main):
            continue
        groups.setdefault(links[id(main[0])], []).append((s, main))
        done.add(s.id)
    out = []
    for n, items in sorted(groups.items()):
        c = rec.class_findings[n]
        found = [f for _, fs in items for f in fs]
        passed: dict[str, int] = {}
        for f in found:
            for t in tests(rec, f):
                if t["ok"] and t["name"]:
                    passed[t["name"]] = passed.get(t["name"], 0) + 1
        labels = sorted({s.label for s, _ in items})
        rules = _list(list(dict.fromkeys(f"“{_title(RULES, f.rule)}”" for f in found)))
        confirmed = sum(any(f.confirmed for f in fs) for _, fs in items)
        text = (f"{_plural(len(items), 'misclassified image')} the model calls '{c.cls}' (truly {_list(labels)}) "
                f"{'shows' if len(items) == 1 else 'show'} what the class-level finding “{_title(RULES, c.rule)}” describes"
                + (f", flagged by {rules}" if {f.rule for f in found} != {c.rule} else "") + "; "
                f"intervention confirmed {confirmed} of them"
                + (f" ({'; '.join(f'{k} passed in {v}' for k, v in passed.items())})" if passed else "") + ".")
        out.append({"severity": max((f.severity for f in found), key=severity_rank), "class": c.cls,
                    "small": len(items) <= 6,
                    "check": _title(RULES, c.rule), "text": text,
                    "shots": [{"file": pictures["samples"][s.id]["inset"], "path": s.path,
                               "caption": f"{s.path}: {s.label} → {s.prediction}; " + "; ".join(
                                   dict.fromkeys(_badge(rec, f).split(" · ", 1)[1] for f in fs))}
                              for s, fs in items]})
    return out, done


def gallery(rec: RunRecord, pictures: dict) -> tuple[list[dict], list[dict]]:
    """Flagged images worst first: those with pictures as cards, the rest as table rows. Images
    that only repeat a class finding (``shared``) and minor ones (``minor_findings``) are shown there."""
    trusted = set(_trusted(rec))
    cards, rest = [], []
    _, grouped = shared(rec, pictures)
    for s in rec.flagged():
        if all(_minor(f) for f in s.findings) or s.id in grouped:
            continue  # unconfirmed and low: the appendix lists it (minor_findings); or in a group
        mine = sorted(s.findings, key=lambda f: (-severity_rank(f.severity), -f.score))
        worst = s.worst
        item = {"path": s.path, "label": s.label, "prediction": s.prediction,
                "confidence": f"{s.confidence:.0%}", "severity": worst,
                "confirmed": any(f.confirmed for f in mine),
                "waived": all(f.waived for f in mine),
                "rules": ", ".join(dict.fromkeys(f.rule for f in mine))}
        pic = pictures["samples"].get(s.id)
        if pic is None:
            rest.append(item)
            continue
        item["badge"] = _badge(rec, mine[0])
        item["inset"] = pic.get("inset")
        item["rows"] = [{"file": r["file"], "n": len(r["methods"]), "captions": _captions(r["methods"], trusted),
                         "width": (f"{(len(r['methods']) - 1) * (PANEL_MM + GAP_MM) + INSET_MM}mm"
                                   if r["methods"][-1] == "@inset" else ""),
                         "alt": f"{s.path}, left to right: " + ", ".join(
                             "the image as given" if m is None else "the flagged region, enlarged" if m == "@inset" else
                             f"{m} explanation{'' if m in trusted else ' (not trusted)'}" for m in r["methods"])
                                + ("; flagged region boxed" if r.get("boxed") and any(r["methods"]) else "")}
                        for r in pic["rows"]]
        item["findings"] = [{"severity": f.severity, "rule": _title(RULES, f.rule), "method": f.method or "",
                             "message": _without_tests(f), "effects": _effects(f), "waived": _waiver(f),
                             "badge": _badge(rec, f), "tests": tests(rec, f)}
                            for f in mine]
        cards.append(item)
    return cards, rest


def minor_findings(rec: RunRecord) -> list[dict]:
    """Images whose every finding is unconfirmed and low: one table row each, in the appendix."""
    return [{"path": s.path, "label": s.label, "prediction": s.prediction,
             "checks": ", ".join(dict.fromkeys(_title(RULES, f.rule) for f in s.findings)),
             "outcome": "; ".join(dict.fromkeys(_badge(rec, f) for f in s.findings))}
            for s in rec.flagged() if all(_minor(f) for f in s.findings)]


def rest_groups(rest: list[dict]) -> list[dict]:
    """Flagged images beyond the gallery, grouped by what happened to them (worst group first).

    One table row per group with its file names, not one per image: a reader sees the pattern,
    and WeasyPrint lays a thousand names out in a paragraph ~3x faster than in a thousand rows.
    """
    groups: dict[tuple, dict] = {}
    for s in rest:
        key = (s["severity"], s["confirmed"], s["label"], s["prediction"], s["rules"])
        g = groups.setdefault(key, {"severity": s["severity"] + (", confirmed" if s["confirmed"] else ""),
                                    "label": s["label"], "prediction": s["prediction"], "rules": s["rules"],
                                    "paths": []})
        g["paths"].append(s["path"])
    rows = sorted(groups.values(), key=lambda g: (-severity_rank(g["severity"].split(",")[0]), -len(g["paths"])))
    return [g | {"count": len(g["paths"]), "paths": ", ".join(g["paths"])} for g in rows]


def sheets(rec: RunRecord, pictures: dict) -> tuple[list[dict], int]:
    """The further flagged images' pictures, each with its tiles' numbers and file names; and
    how many images they show."""
    paths, out, last = {s.id: s.path for s in rec.samples}, [], 0
    for sh in pictures.get("sheets", []):
        methods = {t["method"] for t in sh["tiles"]}
        one = len(methods) == 1  # then the method is named once, not after every file
        names = [f"{sh['first'] + k} {paths[t['sample']]}" + (f" ({t['method']})" if t["method"] and not one else "")
                 for k, t in enumerate(sh["tiles"])]
        head = f"All with {methods.pop()}: " if one and None not in methods else ""
        last = sh["first"] + len(sh["tiles"]) - 1
        out.append({"file": sh["file"], "names": head + " · ".join(names),
                    "alt": f"Flagged images {sh['first']} to {last}, each with its explanation and the "
                           f"flagged region boxed; their file names follow."})
    return out, last


# --- 5. method reliability ------------------------------------------------------------------

def _cascade_rule(trust: dict) -> str:
    """How to read the cascade chart, naming only what the chart draws."""
    if not any(t.get("max_spearman") is not None for t in trust.values()):
        return "the lower a method's line falls, the more its heatmaps depend on the model."
    if any(t.get("decisive_step") is not None for t in trust.values()):
        return "a method passes when its line is below the dashed threshold at the step marked 'decided here'."
    return "a method passes when its line falls below the dashed threshold."


def reliability(rec: RunRecord, pictures: dict | None = None) -> dict:
    trust, spec = rec.run.get("trust") or {}, _Spec(rec.config.get("trust") or {})
    pictures = pictures or {}
    rows = []
    fallbacks = [k for k, t in trust.items() if t.get("fallback") and k not in rec.run["methods"]]
    for name in [*rec.run["methods"], *fallbacks]:
        t, check = trust.get(name), rec.coverage.methods.get(name)
        if check is not None and check.state in ("error", "not_applicable", "no_evidence"):
            status, css, text = "could not run", "fail", f"It {check.words}."
        elif t is None:
            status, css, text = "not tested", "warn", ("The trust gate was switched off, so its heatmaps were used "
                                                      "without being tested." if not spec.enabled else
                                                      "It produced no heatmaps to test.")
        elif t.get("fallback"):
            status, css = ("used instead", "warn") if t["reliable"] else ("could not run", "fail")
            text = (f"No configured method passed the trust gate, so the checks read this model-only method instead "
                    f"(it hides parts of the image and measures the model's own answer; there is no propagation rule "
                    f"to distrust), on {_plural(t.get('images', 0), 'image')}." if t["reliable"] else
                    f"No configured method passed the trust gate, and this model-only fallback {t.get('reason')}.")
        elif t["reliable"]:
            curve = t.get("randomisation_spearman") or [float("nan")]
            d = min(t.get("decisive_step", len(curve) - 1), len(curve) - 1)
            n = len(t.get("randomisation_steps") or curve)
            status, css = "trusted", "pass"
            benefit = (f"a benefit of {t['deletion_benefit']:+.2f} in probability, 95% interval "
                       f"{t['deletion_ci'][0]:+.2f} to {t['deletion_ci'][1]:+.2f}"
                       if "deletion_ci" in t else f"area under the curve {t['deletion_auc']:.2f} against "
                                                  f"{t['random_deletion_auc']:.2f}")
            text = (f"When {share_words(spec.decide_at)} was randomised, block by block from the output, its "
                    f"heatmaps changed: their rank correlation with the originals fell to {curve[d]:.2f} after "
                    f"{d + 1} of {n} steps (at most {t.get('max_spearman', spec.max_spearman):.2f} "
                    f"allowed). Removing the pixels it marks first, the prediction fell faster than removing random "
                    f"blobs ({benefit}). Tested on {_plural(t.get('images', 0), 'image')}.")
            if t.get("note"):
                text += f" Kept although a test could not decide: {t['note']}."
        else:
            status, css = "not trusted", "fail"
            reason = t.get("reason") or "no reason given"
            text = (f"It failed the trust gate: {reason}. The checks ignored its heatmaps; the gallery shows them "
                    f"for comparison only.")
        rows.append({"name": _title(METHODS, name), "status": status, "css": css, "text": text,
                     "description": _description(METHODS, name)})
    n_ok = sum(r["status"] == "trusted" for r in rows)
    if not spec.enabled:
        intro = "The trust gate was switched off (trust.enabled: false): no method was tested before use."
    else:
        intro = (f"{n_ok} of {_plural(len(rows) - len(fallbacks), 'method')} passed the trust gate. A method passes when its "
                 f"heatmaps depend on the model (they change once {share_words(spec.decide_at)} is randomised) "
                 f"and are faithful "
                 f"(removing the pixels it marks hurts the prediction more than removing random ones).")
    cascade = pictures.get("cascade")
    chart = {"file": cascade, "alt": "Line chart: for each method, how much its heatmaps still resemble the "
                                     "originals as more of the model is randomised, with the threshold dashed",
             "caption": "How much each method's heatmaps still look like the originals as more and more of the "
                        "model is randomised, from the top down: " + _cascade_rule(trust)} if cascade else None
    return {"intro": intro, "rows": rows, "chart": chart}


# --- 6. changes since the previous audit ----------------------------------------------------

def _rate_change(d: dict | None) -> str:
    """'84.0% → 86.0% (+2.0 points; 95% CI -1.0 to +5.0 points)' from diff.json's rate records."""
    if not d or d.get("baseline") is None:
        return "not comparable (no images on one side)"
    text = f"{d['baseline']:.1%} → {d['current']:.1%} ({pts(d['delta'])}"
    if d.get("ci95"):
        lo, hi = d["ci95"]
        text += f"; 95% CI {100 * lo:+.1f} to {100 * hi:+.1f} points"
    return text + ")"


def resolved_split(diff: dict, rec: RunRecord | None) -> tuple[list[dict], list[dict]]:
    """The baseline's findings that are gone: (truly resolved, gone only because this run did not
    audit the image: not in its data, or not explained)."""
    explained = ({s.sha256 or s.path for s in rec.samples if s.explained} | {s.path for s in rec.samples if s.explained}
                 if rec is not None else None)
    gone, unaudited = [], []
    for f in diff.get("resolved") or []:
        image = f.get("kind") != "class" and f.get("path")
        missing = f.get("note") == "image not in this run" or (
            image and explained is not None and (f.get("sha256") or f.get("path")) not in explained)
        (unaudited if missing else gone).append(f)
    return gone, unaudited


def changes(diff: dict | None, rec: RunRecord | None = None) -> dict:
    """The comparison with the baseline run (diff.json, from auditor/diff.py), or a note that there is none.
    Persisting findings are counted here and listed in the appendix; a finding on an image this run
    did not audit is not counted as resolved."""
    if not diff:
        return {"given": False}
    gone, unaudited = resolved_split(diff, rec)
    groups = []
    for key, title, items in (("new", "New findings", diff.get("new")), ("resolved", "Resolved findings", gone),
                              ("unaudited", "Gone only because the image was not audited this time", unaudited),
                              ("persisting", "Persisting findings", diff.get("persisting"))):
        rows = []
        for f in items or []:
            notes = [str(f["note"])] if f.get("note") else []
            if f.get("previous_severity") and f["previous_severity"] != f.get("severity"):
                notes.append(f"was {f['previous_severity']}")
            if f.get("waived"):
                notes.append("waived")
            rows.append({"where": str(f.get("path") or f.get("class") or ""),
                         "kind": "class" if f.get("kind") == "class" or not f.get("path") else "image",
                         "rule": str(f.get("rule", "")), "severity": str(f.get("severity", "")),
                         "message": str(f.get("message", "")), "note": "; ".join(notes)})
        groups.append({"key": key, "title": title, "count": len(rows), "rows": rows})
    metrics = diff.get("metrics") or {}
    rows = []
    if "accuracy" in metrics:
        acc = metrics["accuracy"]
        rows.append(("Accuracy", _rate_change(acc) + (f", {acc['paired']} images paired" if acc and
                                                      acc.get("paired") is not None else "")))
    if isinstance(metrics.get("images"), dict):
        i = metrics["images"]
        rows.append(("Images", f"{i.get('baseline')} in the baseline, {i.get('current')} now, "
                               f"{i.get('matched')} the same (by content hash)"))
    changed = [k for k, v in (diff.get("changed") or {}).items() if v]
    if diff.get("changed") is not None:
        rows.append(("Changed since the baseline", ", ".join(changed) if changed else "nothing: same weights, "
                                                                                     "data, rules and methods"))
    per_class = [{"class": str(c.get("class", "")), "change": _rate_change(c)}
                 for c in metrics.get("per_class") or [] if isinstance(c, dict)]
    baseline = diff.get("baseline_run") or diff.get("baseline")
    n = {g["title"]: g["count"] for g in groups}
    summary = (f"Compared with the previous audit{f' (run {baseline})' if baseline else ''}: "
               f"{n['New findings']} new, {n['Resolved findings']} resolved and {n['Persisting findings']} "
               f"persisting {'finding' if n['Persisting findings'] == 1 else 'findings'}"
               + (f"; {len(unaudited)} more are gone only because their images were not audited this time "
                  f"(a smaller or different data sample), so they do not count as resolved" if unaudited else "")
               + (". The persisting ones are listed in the appendix." if n['Persisting findings'] else "."))
    return {"given": True, "summary": summary, "groups": [g for g in groups if g["key"] != "persisting"],
            "persisting": next(g for g in groups if g["key"] == "persisting"), "metrics": rows, "per_class": per_class,
            "warnings": [str(w) for w in diff.get("warnings") or []],
            "source": str(diff.get("baseline_path") or "")}


# --- 7. appendix ----------------------------------------------------------------------------

def glossary(rec: RunRecord) -> list[dict]:
    used = set(rec.run["methods"]) | set(rec.run["rules"])
    return ([{"name": _title(METHODS, e.name), "kind": "explanation method", "used": e.name in used,
              "text": e.glossary or e.description} for e in METHODS] +   # in words; the formula is in section 5
            [{"name": _title(RULES, e.name), "kind": "check", "used": e.name in used,
              "text": " ".join(filter(None, [e.description, e.glossary]))} for e in RULES])


def model_card(rec: RunRecord) -> dict:
    """Where this report's sections belong in a model card (Mitchell et al., "Model Cards for Model
    Reporting"), and what an audit of this kind does not cover."""
    a = rec.config.get("audit") or {}
    rows = [("Model details", "Page 1 (name, version, owner, weights) and the provenance table below"),
            ("Intended use", f"Page 1: {a['intended_use']}" if a.get("intended_use") else
             "not given (set audit.intended_use in the config)"),
            ("Factors", "Per class: sections 2 and 3 (the audit looks at classes, not at groups of people)"),
            ("Metrics", "Section 2: accuracy with its 95% interval, precision and recall per class"),
            ("Evaluation data", f"Page 1 and the configuration below: {_plural(rec.metrics.images, 'image')}"),
            ("Quantitative analyses", "Sections 2 to 4: the confusion matrix, the findings and their intervention "
                                      "tests; section 6: the change since the previous audit"),
            ("Caveats and recommendations", "Page 1: the verdict, every confirmed problem, what was not checked "
                                            "and the waivers; section 5: which explanation methods can be trusted")]
    gaps = ["the training data and how it was collected (this audit sees only the validation images it is given)",
            "fairness across groups of people, and any other factor the data set does not label",
            "ethical considerations, privacy and the model's behaviour on data unlike the audited images",
            "shortcuts no check looks for, and those that no trusted explanation method can show"]
    return {"rows": rows, "gaps": gaps}


def _layer_words(layer: dict | None) -> str:
    """'features (Sequential), feature map (8×8): the last spatial feature map before pooling'."""
    if not layer or not layer.get("name"):
        return "(none: the model has no layer to read)" if layer else "(not recorded)"
    return f"{layer['name']} ({layer.get('kind')}), {layer.get('reading')}: {layer.get('why')}"


def provenance(rec: RunRecord) -> list[tuple[str, str]]:
    run = rec.run
    rows = [("Run id", run["id"]), ("Started (UTC)", run["started"]), ("Finished (UTC)", run["finished"]),
            ("Config file", run["config_file"]), ("Weights file sha256", run["weights_sha256"] or "none"),
            ("Model state sha256", run.get("model_sha256") or "(not recorded)"),
            ("Layer read by Grad-CAM and kin", _layer_words(run.get("layer"))),
            ("Data fingerprint (sha256)", run["data_fingerprint"]), ("Device", run["device"]),
            ("Seed", run["seed"]), ("Config sha256", run.get("config_hash") or "(not recorded)"),
            ("Git commit", run.get("git_commit") or "(not in a git work tree)"),
            ("Command line", " ".join(run.get("argv") or []) or "(not recorded)")]
    return [(k, str(v)) for k, v in rows + [(f"{k} version", v) for k, v in run["versions"].items()]]


def review(config: dict) -> list[tuple[str, str]]:
    """The sign-off fields, filled from ``report.reviewer`` where the config gives it, else blank lines."""
    r = (config.get("report") or {}).get("reviewer")
    get = (lambda k: r.get(k)) if isinstance(r, dict) else (lambda k: getattr(r, k, None))  # noqa: E731
    name = r if isinstance(r, str) else get("name")
    role, decision, date, note = (None,) * 4 if isinstance(r, str) else (get("role"), get("decision"),
                                                                       get("signed_off"), get("note"))
    return [("Reviewer", f"{name}{f' ({role})' if role else ''}" if name else ""),
            ("Decision (approved / rejected)", "" if decision in (None, "pending") else str(decision)),
            ("Date", str(date) if date else ""), ("Note", str(note) if note else ""), ("Signature", "")]


class _Spec(dict):
    """A config section as the record holds it (a dict), read by attribute with the config's defaults."""

    def __getattr__(self, key):
        from auditor.inputs.config import TrustSpec
        return self[key] if key in self else getattr(TrustSpec(), key)


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
        "data": _relative(data.get("root") or data.get("manifest"), rec), "classes": ", ".join(rec.classes),
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
    return _env().get_template("report.html.j2").render(css=css, **context(rec, pictures))


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
