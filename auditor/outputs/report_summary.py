"""The report's page 1 and section 2: who and what was audited, the problems in plain sentences, the
verdict, the release gate, the checks, the key numbers and their charts."""
from __future__ import annotations

from pathlib import Path

from auditor.outputs.report_appendix import resolved_split
from auditor.outputs.report_words import (and_list, badge, class_links, confirmed_by, confirmed_count, described,
                                          first_sentence, is_class, is_minor, pct, plural, predicted_counts,
                                          relative_path, tests, titled, trusted_methods, wilson)
from auditor.outputs.views import key_number as views_key_number
from auditor.record import RunRecord, severity_rank
from auditor.registry import METHODS, RULES


# --- 1. page 1: identity, problems, what did not run, waivers -----------------------------

def identity(rec: RunRecord) -> dict:
    """The model's identity from the config's ``audit`` section, with defaults from the model."""
    cfg = rec.config
    a, model, data = cfg.get("audit") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    name = a.get("name") or (Path(str(model["huggingface"])).name if model.get("huggingface")
                             else str(model.get("factory") or "the model"))
    data_path = relative_path(data.get("root") or data.get("manifest"), rec)
    rows = [(k, str(v)) for k, v in (("Version", a.get("version")), ("Owner", a.get("owner")),
                                      ("Intended use", a.get("intended_use"))) if v]
    rows.append(("Data set", (f"{a['data_description']} ({data_path})" if a.get("data_description")
                              else data_path) + f"; {plural(rec.metrics.images, 'image')}"))
    return {"name": name, "rows": rows, "code": str(model.get("factory") or model.get("huggingface") or "")}


def problems(rec: RunRecord, pictures: dict) -> list[dict]:
    """Page 1: one plain sentence per problem, worst first, each with a small picture: every class
    finding, then the image findings no class finding covers, grouped by check and predicted class."""
    out, links, called = [], class_links(rec), predicted_counts(rec)
    for n, f in enumerate(rec.class_findings):
        pic = pictures["classes"].get(n, {})
        linked = [(s.id, bool(g.details.get("absence"))) for s in rec.samples for g in s.findings
                  if links.get(id(g)) == n and not is_minor(g)]  # (a minor one is in the appendix, not section 4)
        members = {i for i, absent in linked if not absent}  # images, not findings
        lacking = {i for i, absent in linked if absent}
        t = [x for x in tests(rec, f) if x["ok"]]
        said = (f" {confirmed_by(rec, f).capitalize()}: {t[0]['text']}." if f.confirmed and t else
                f" {confirmed_by(rec, f).capitalize()}." if f.confirmed else
                " Not confirmed by the intervention tests." if f.confirmed is False else " Not tested by intervention.")
        also = (f" {plural(len(members), 'misclassified image')} {'shows' if len(members) == 1 else 'show'} it too "
                f"(section 4)." if members else "") + (
            f" {plural(len(lacking), 'image')} of '{f.cls}' that the model gets wrong "
            f"{'lacks' if len(lacking) == 1 else 'lack'} it (section 4)." if lacking else "")
        picture = (pic.get("inset") or {}).get("file") or pic.get("mean")
        out.append({"severity": f.severity, "badge": badge(rec, f), "check": titled(RULES, f.rule),
                    "subject": f"class '{f.cls}'", "waived": bool(f.waived),
                    "sentence": first_sentence(f.message) + said + also, "picture": picture,
                    "alt": f"the evidence for class {f.cls}: " + ("its flagged region, enlarged" if pic.get("inset")
                                                                 else "the mean explanation"),
                    "rank": (severity_rank(f.severity), bool(f.confirmed))})
    groups: dict[tuple, list] = {}
    for s in rec.flagged():
        for f in s.findings:
            if id(f) not in links and not is_minor(f):
                groups.setdefault((f.rule, s.prediction), []).append((s, f))
    for (rule, pred), items in groups.items():
        s0, f0 = max(items, key=lambda x: (severity_rank(x[1].severity), x[1].score))
        paths = dict.fromkeys(s.path for s, _ in items)
        labels = sorted({s.label for s, _ in items})
        k, confirmed = len(paths), sum(bool(f.confirmed) for _, f in items)
        denominator = called.get(pred)
        of = f"{k} of the {denominator} images the model calls '{pred}'" if denominator else             f"{plural(k, 'image')} the model calls '{pred}'"
        pic = pictures["samples"].get(s0.id, {})
        out.append({"severity": f0.severity, "badge": badge(rec, f0), "check": titled(RULES, rule),
                    "subject": f"images called '{pred}'", "waived": all(f.waived for _, f in items),
                    "sentence": f"{of} (truly {and_list(labels)}) were flagged, {confirmed} of them confirmed by "
                                f"intervention. For example {s0.path}: {first_sentence(f0.message)}",
                    "picture": pic.get("inset") or (pic.get("rows") or [{}])[0].get("file"),
                    "alt": f"{s0.path}: its flagged region, enlarged",
                    "rank": (severity_rank(f0.severity), bool(f0.confirmed))})
    return sorted(out, key=lambda p: (-p["rank"][0], not p["rank"][1]))


def not_run(rec: RunRecord) -> list[str]:
    """Every check and method that could not run (or was not trusted), named as such, never as passed."""
    out = [f"{titled(RULES, n)}: {c.words}" for n, c in rec.coverage.rules.items() if c.state != "ran"]
    out += [f"{titled(METHODS, n)}: {c.words}" for n, c in rec.coverage.methods.items() if c.state != "ran"]
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
        what = titled(RULES, w.get("rule", "")) + (f", class '{cls}'" if cls else "")
        if w.get("paths") or w.get("hashes"):
            what += f", {plural(len(w.get('paths') or []) + len(w.get('hashes') or []), 'image pattern')}"
        rows.append({"owner": str(w.get("owner", "")), "what": what, "reason": str(w.get("reason", "")),
                     "expires": str(w.get("expires", "")), "covers": plural(count.get(k, 0), "finding")})
    return rows


# --- 1. verdict ---------------------------------------------------------------------------

def verdict(rec: RunRecord) -> tuple[str, list[str]]:
    """The verdict word and three to six plain sentences: checked, found, counts, meaning, what to do."""
    m, g, diff = rec.metrics, rec.gate, rec.diff
    flagged = len(rec.flagged())
    everything = rec.every_finding()
    word = g.verdict if g.verdict != "PASS" else ("PASS WITH WARNINGS" if everything else "PASS")
    rules = list(rec.run["rules"])
    trusted = trusted_methods(rec)
    how = (f"explanation {'method' if len(trusted) == 1 else 'methods'} ({and_list(trusted)}) showed where its evidence "
           f"lies" if trusted else "no explanation method could show where its evidence lies")
    lines = [f"We checked how the model decides on {plural(m.images, 'image')}: {how}, and "
             f"{plural(len(rules), 'check')} looked for shortcuts, such as a watermark or a shape that merely "
             f"resembles the class. It classified {m.accuracy:.0%} of the images correctly."]
    if everything:
        worst = max(everything, key=lambda f: (severity_rank(f.severity), is_class(f)))  # class on ties
        lines.append(f"The most serious finding ({worst.severity}): {_headline(rec, worst)}")
    confirmed, tested = confirmed_count(everything)
    ran = [r for r in rules if rec.coverage.rules.get(r) and rec.coverage.rules[r].state == "ran"]
    quiet = [r for r in ran if not any(f.rule == r for f in everything)]
    not_run = len(rules) - len(ran)
    counts = ((f"All {plural(len(rules), 'check')} ran and found nothing" if len(quiet) == len(rules) else
               f"{len(quiet)} of {plural(len(rules), 'check')} ran and found nothing") if not everything else
              f"{len(quiet)} of {plural(len(rules), 'check')} ran and found nothing; "
              f"{plural(len(rec.class_findings), 'class-level finding')} and "
              f"{plural(flagged, 'flagged misclassified image')} came from the others")
    if not_run:
        counts += f"; {not_run} did not run (see the table below)"
    if tested:
        counts += f", and intervention confirmed {confirmed} of the {plural(tested, 'finding')} it could test"
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
                       f"; {and_list(skipped)} did not apply and {'was' if len(skipped) == 1 else 'were'} not run "
                       f"(see 'Not checked')")
        rows.append({"name": c["name"].replace("_", " "), "threshold": str(c["threshold"]), "state": state,
                     "css": css, "message": message})
    return rows


def _headline(rec: RunRecord, f) -> str:
    """One sentence on a finding: where the evidence is, and what the intervention showed."""
    where = f.details.get("region")
    if is_class(f):
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
            n_cls = sum(is_class(f) for f in mine)
            parts = ([plural(n_cls, "class-level finding")] if n_cls else []) + \
                    ([plural(len(mine) - n_cls, "image finding")] if len(mine) > n_cls else [])
            confirmed, tested = confirmed_count(mine)
            result = f"{' and '.join(parts)}, worst {worst}"
            result += f"; {confirmed} of {tested} confirmed" if tested else ""
            css = "fail" if severity_rank(worst) >= severity_rank("high") else "warn"
        rows.append({"name": titled(RULES, name), "looks_for": described(RULES, name), "result": result,
                     "css": css})
    return rows


# --- 2. key numbers -------------------------------------------------------------------------

def key_numbers(rec: RunRecord) -> tuple[list[tuple], list[dict]]:
    m = rec.metrics
    lo, hi = wilson(m.images - m.misclassified, m.images)
    confirmed, tested = confirmed_count(rec.every_finding())
    flagged = rec.flagged()
    numbers = [("Accuracy", f"{m.accuracy:.1%}", f"95% CI {lo:.1%} to {hi:.1%}"),
               ("Images audited", m.images, f"{len(rec.skipped)} skipped"),
               ("Misclassified", m.misclassified, f"{m.explained} explained"),
               ("Images flagged", len(flagged), "misclassified, suspicious evidence"),
               ("Class-level findings", len(rec.class_findings), "how a whole class is decided"),
               ("Confirmed by intervention", confirmed, f"of {plural(tested, 'finding')} tested")]
    numbers += [n] if (n := views_key_number(rec)) else []  # the global views' metric
    flagged_pred: dict[str, int] = {}
    for s in flagged:
        flagged_pred[s.prediction] = flagged_pred.get(s.prediction, 0) + 1
    per_class = [{"class": r["class"], "support": int(r["support"]), "precision": pct(r["precision"]),
                  "recall": pct(r["recall"]), "flagged": flagged_pred.get(r["class"], 0),
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
