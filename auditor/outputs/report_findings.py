"""Sections 3 and 4 of the report: the class-level findings, and the flagged images (cards, groups,
tables and tiled sheets)."""
from __future__ import annotations

from auditor.outputs.overlay import GAP_MM, INSET_MM, PANEL_MM
from auditor.outputs.report_words import (and_list, badge, class_links, is_minor, pct, plural, predicted_counts,
                                          tests, titled, trusted_methods, waiver_words, without_tests)
from auditor.record import RunRecord, severity_rank
from auditor.registry import RULES


# --- 3. class-level findings ----------------------------------------------------------------

def _intervention_rows(f, cls: str) -> list[tuple[str, str]]:
    e = f.details.get("intervention")
    if e is None:
        return [("Intervention", "not tested: the finding names no region, or intervention is switched off")]
    if "samples_tested" in e:  # a class finding made of image findings: their transplant tests decide
        return [("Pasting the regions", f"of {plural(e['samples_tested'], 'flagged image')}, "
                                        f"{e['samples_transferring']} turned most images of other classes into '{cls}'"),
                ("Result", "confirmed" if f.details.get("confirmed") else "not confirmed")]
    if "removed_from" not in e:
        return [("Intervention", f"not tested: {e.get('skipped', 'no test applied')}")]
    rows = [("Hiding the region", f"in {plural(e['removed_from'], 'image')} the model called '{cls}': "
                                  f"{e['decision_changed']} changed decision ({e['removal_rate']:.0%}); confidence in "
                                  f"'{cls}' {'fell' if e['confidence_drop'] >= 0 else 'rose'} by "
                                  f"{abs(100 * e['confidence_drop']):.0f} points on average")]
    if e.get("pasted_onto"):
        rows.append(("Pasting the region", f"onto {plural(e['pasted_onto'], 'correctly classified image')} of "
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
        called = predicted_counts(rec).get(f.cls)
        out.append({"class": f.cls, "rule": titled(RULES, f.rule), "severity": f.severity,
                    "message": without_tests(f),
                    "badge": badge(rec, f), "tests": tests(rec, f),
                    "inset": (pic.get("inset") or {}).get("file"),
                    "inset_caption": (f"The region in {samples[pic['inset']['sample']].path}, enlarged"
                                      if pic.get("inset") else ""),
                    "called": (f"The model calls {called} images '{f.cls}'; {pic['images']} of them "
                               f"{'was' if pic['images'] == 1 else 'were'} explained and examined."
                               if called is not None and pic.get("images") is not None else ""),
                    "waived": waiver_words(f),
                    "confirmed": f.details.get("confirmed"), "method": f.method or "",
                    "share": pct(f.share), "agree": and_list(f.details["methods_agreeing"])
                    if f.details.get("methods_agreeing") else "",
                    "mean": pic.get("mean"), "mean_alt": f"mean explanation ({pic.get('method', '')}) of "
                                                        f"{pic.get('images', 0)} images the model called {f.cls}",
                    "mean_caption": f"Mean of {plural(pic.get('images', 0), 'image')} called '{f.cls}' "
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
        out.append(f"methods agreeing: {and_list(agree)}")
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
    links, groups, done = class_links(rec), {}, set()
    for s in rec.flagged():
        main = [f for f in s.findings if not is_minor(f)]
        pic = pictures["samples"].get(s.id) or {}
        if not main or not pic.get("inset") or any(id(f) not in links for f in main):
            continue
        # The errors the class's cue made, apart from the class's own images that lack it.
        groups.setdefault((links[id(main[0])], bool(main[0].details.get("absence"))), []).append((s, main))
        done.add(s.id)
    out = []
    for (n, absent), items in sorted(groups.items()):
        c = rec.class_findings[n]
        found = [f for _, fs in items for f in fs]
        passed: dict[str, int] = {}
        for f in found:
            for t in tests(rec, f):
                if t["ok"] and t["name"]:
                    passed[t["name"]] = passed.get(t["name"], 0) + 1
        labels = sorted({s.label for s, _ in items})
        rules = and_list(list(dict.fromkeys(f"“{titled(RULES, f.rule)}”" for f in found)))
        confirmed = sum(any(f.confirmed for f in fs) for _, fs in items)
        called = sorted({f"'{s.prediction}'" for s, _ in items})
        text = ((f"{plural(len(items), 'image')} of '{c.cls}' that the model calls {and_list(called)} "
                 f"{'does' if len(items) == 1 else 'do'} not show what the class-level finding "
                 f"“{titled(RULES, c.rule)}” says the model looks for in '{c.cls}' images, at that place"
                 if absent else
                 f"{plural(len(items), 'misclassified image')} the model calls '{c.cls}' (truly {and_list(labels)}) "
                 f"{'shows' if len(items) == 1 else 'show'} what the class-level finding “{titled(RULES, c.rule)}” "
                 f"describes")
                + (f", flagged by {rules}" if {f.rule for f in found} != {c.rule} else "") + "; "
                f"intervention confirmed {confirmed} of them"
                + (f" ({'; '.join(f'{k} passed in {v}' for k, v in passed.items())})" if passed else "") + ".")
        out.append({"severity": max((f.severity for f in found), key=severity_rank), "class": c.cls,
                    "small": len(items) <= 6,
                    "check": titled(RULES, c.rule), "text": text,
                    "shots": [{"file": pictures["samples"][s.id]["inset"], "path": s.path,
                               "caption": f"{s.path}: {s.label} → {s.prediction}; " + "; ".join(
                                   dict.fromkeys(badge(rec, f).split(" · ", 1)[1] for f in fs))}
                              for s, fs in items]})
    return out, done


def gallery(rec: RunRecord, pictures: dict) -> tuple[list[dict], list[dict]]:
    """Flagged images worst first: those with pictures as cards, the rest as table rows. Images
    that only repeat a class finding (``shared``) and minor ones (``minor_findings``) are shown there."""
    trusted = set(trusted_methods(rec))
    cards, rest = [], []
    _, grouped = shared(rec, pictures)
    for s in rec.flagged():
        if all(is_minor(f) for f in s.findings) or s.id in grouped:
            continue  # minor (``is_minor``): the appendix lists it (minor_findings); or in a group
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
        item["badge"] = badge(rec, mine[0])
        item["inset"] = pic.get("inset")
        item["rows"] = [{"file": r["file"], "n": len(r["methods"]), "captions": _captions(r["methods"], trusted),
                         "width": (f"{(len(r['methods']) - 1) * (PANEL_MM + GAP_MM) + INSET_MM}mm"
                                   if r["methods"][-1] == "@inset" else ""),
                         "alt": f"{s.path}, left to right: " + ", ".join(
                             "the image as given" if m is None else "the flagged region, enlarged" if m == "@inset" else
                             f"{m} explanation{'' if m in trusted else ' (not trusted)'}" for m in r["methods"])
                                + ("; flagged region boxed" if r.get("boxed") and any(r["methods"]) else "")}
                        for r in pic["rows"]]
        item["findings"] = [{"severity": f.severity, "rule": titled(RULES, f.rule), "method": f.method or "",
                             "message": without_tests(f), "effects": _effects(f), "waived": waiver_words(f),
                             "badge": badge(rec, f), "tests": tests(rec, f)}
                            for f in mine]
        cards.append(item)
    return cards, rest


def minor_findings(rec: RunRecord) -> list[dict]:
    """Images whose every finding is minor (low, and unconfirmed or ``isolated``): one table row each, in the appendix."""
    return [{"path": s.path, "label": s.label, "prediction": s.prediction,
             "checks": ", ".join(dict.fromkeys(titled(RULES, f.rule) for f in s.findings)),
             "outcome": "; ".join(dict.fromkeys(badge(rec, f) for f in s.findings))}
            for s in rec.flagged() if all(is_minor(f) for f in s.findings)]


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
