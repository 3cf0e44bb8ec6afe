"""How the report says things about findings: counts and lists in words, the intervention tests
line by line, and the small facts about a finding the report's sections share."""
from __future__ import annotations

import math
import os
from pathlib import Path

from auditor.record import ClassFindingRecord, RunRecord, beats, pastes, severity_rank


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def pct(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.0%}"  # NaN: no images predicted as / labelled as this class


def and_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))


def confirmed_count(findings) -> tuple[int, int]:
    tested = [f for f in findings if "intervention" in f.details]
    return sum(bool(f.details.get("confirmed")) for f in tested), len(tested)


def waiver_words(f) -> str:
    w = f.waived
    return f"waived by {w.owner} until {w.expires}: {w.reason}" if w else ""


def trusted_methods(rec: RunRecord) -> list[str]:
    """The methods whose heatmaps the checks used (they ran, and passed the trust gate or were not tested)."""
    return [m for m, c in rec.coverage.methods.items() if c.state == "ran"]


def is_class(f) -> bool:
    return isinstance(f, ClassFindingRecord)


# --- the intervention tests, one line each ------------------------------------------------


def _placebo(e: dict, name: str, n: int, cls: str | None = None) -> str:
    """' (random region of the same size: 2)'; for a paste, also the predicted class's own content
    of that size pasted there, the second placebo of every paste."""
    rate, said = e.get(f"control_{name}_rate"), []
    if rate is not None:
        said.append(f"random region of the same size: {round(rate * n)}")
    if cls is not None and (own := e.get("control_content_rate")) is not None:
        said.append(f"a region of that size from other '{cls}' images: {round(own * n)}")
    return f" ({'; '.join(said)})" if said else ""


def tests(rec: RunRecord, f) -> list[dict]:
    """Each intervention test of a finding on its own line: passed or not (✓/✗), its numbers and
    its placebo's. ``name`` is the test's short name, for "confirmed by ...". """
    e = f.details.get("intervention")
    if e is None:
        return []
    if e.get("skipped"):
        return [{"ok": False, "mark": "–", "name": "", "text": f"not tested: {e['skipped']}"}]
    spec = {"remove_drop": 0.5, "transplant_rate": 0.5, "control_margin": 0.25} | (rec.config.get("intervention") or {})
    cls = f.cls if is_class(f) else next((s.prediction for s in rec.samples if any(g is f for g in s.findings)), "")
    out = []
    if "samples_tested" in e:  # a class finding made of image findings: their pasting tests decide
        out.append({"ok": bool(f.confirmed), "name": "pasting",
                    "text": f"pasting each of the {plural(e['samples_tested'], 'flagged region')} onto images of "
                            f"other classes: {e['samples_transferring']} turned at least half of them into '{cls}', "
                            f"beyond both placebos "
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
            moved = e["transfer_rate"] >= spec["transplant_rate"]
            # every paste must also beat the class's own content moved to its place (docs/severity.md)
            ok = pastes(e, moved, spec["control_margin"])
            out.append({"ok": ok, "name": "pasting",
                        "text": f"pasting the region onto {e['pasted_onto']} other images turned {e['turned']} into "
                                f"'{cls}'" + _placebo(e, "transfer", e["pasted_onto"], cls)})
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
    return "confirmed" + (f" by {and_list(names)}" if names else "")


def badge(rec: RunRecord, f) -> str:
    """'high · confirmed by restoring' / 'low · not confirmed' / 'medium · not tested' /
    'low · confirmed by restoring, for this error alone' (``isolated``: or 'for only 2 errors')."""
    tag = confirmed_by(rec, f) or ("not confirmed" if f.confirmed is False else "not tested")
    n = f.details.get("shared_by", 1)
    alone = ", for this error alone" if n == 1 else f", for only {n} errors"
    return f"{f.severity} · {tag}" + (alone if f.details.get("isolated") else "")


# --- where a finding sits in the run -------------------------------------------------------

def relative_path(path, rec: RunRecord) -> str:
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


def predicted_counts(rec: RunRecord) -> dict[str, int]:
    """How many images the model called each class (the confusion matrix's columns)."""
    classes, matrix = rec.metrics.confusion.get("classes") or rec.classes, rec.metrics.confusion.get("matrix") or []
    return {c: int(sum(row[k] for row in matrix)) for k, c in enumerate(classes)} if matrix else {}


def class_links(rec: RunRecord) -> dict[int, int]:
    """id(image finding) -> position of the class finding it belongs to: the class finding names
    its image (``details.samples``), or is the same check on the class the image was called, or
    (an absence, ``details.absence``) on the class the image truly is."""
    out = {}
    for s in rec.samples:
        for f in s.findings:
            for n, c in enumerate(rec.class_findings):
                if s.id in (c.details.get("samples") or []) or (c.rule == f.rule and c.cls == (
                        s.label if f.details.get("absence") else s.prediction)):
                    out[id(f)] = n
                    break
    return out


def without_tests(f) -> str:
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


def first_sentence(text: str) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head + "."


def is_minor(f) -> bool:
    """A low (or info) finding, unconfirmed or one error that nothing else points to (``isolated``):
    listed in the appendix, not in the gallery."""
    return (not f.confirmed or bool(f.details.get("isolated"))) and severity_rank(f.severity) <= severity_rank("low")


def described(registry, name: str) -> str:
    return registry.get(name).description if name in registry else ""


def titled(registry, name: str) -> str:
    """'Mark in a corner or along an edge (corner_border)': the plain name, and the one in the config."""
    return f"{registry.get(name).title} ({name})" if name in registry else name
