"""Sections 5 to 7 of the report: which methods could be trusted, the changes since the previous
audit, and the appendix (glossary, model card, provenance, sign-off)."""
from __future__ import annotations

from auditor.judge.diff import pts
from auditor.judge.trust import share_words
from auditor.outputs.report_words import described, plural, titled
from auditor.record import RunRecord
from auditor.registry import METHODS, RULES


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


# --- 5. method reliability ------------------------------------------------------------------

def _cascade_rule(trust: dict) -> str:
    """How to read the cascade chart, naming only what the chart draws."""
    if not any(t.get("max_spearman") is not None for t in trust.values()):
        return "the lower a method's line falls, the more its heatmaps depend on the model."
    if any(t.get("decisive_step") is not None for t in trust.values()):
        return "a method passes when its mark is below the dashed threshold at the step marked 'decided here'."
    return "a method passes when its line falls below the dashed threshold."


def reliability(rec: RunRecord, pictures: dict | None = None) -> dict:
    trust, spec = rec.run.get("trust") or {}, TrustSettings(rec.config.get("trust") or {})
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
                    f"to distrust), on {plural(t.get('images', 0), 'image')}." if t["reliable"] else
                    f"No configured method passed the trust gate, and this model-only fallback {t.get('reason')}.")
        elif t["reliable"]:
            curve = t.get("randomisation_spearman") or [float("nan")]
            d = min(t.get("decisive_step", len(curve) - 1), len(curve) - 1)
            n = len(t.get("randomisation_steps") or curve)
            status, css = "trusted", "pass"
            benefit = (f"a benefit of {t['deletion_benefit']:+.2f} in probability, "
                       f"{100 * t.get('deletion_level', 0.95):g}% interval {t['deletion_ci'][0]:+.2f} to "
                       f"{t['deletion_ci'][1]:+.2f}"
                       + (f" on {plural(t['deletion_images'], 'image')}, decided early"
                          if t.get("deletion_images", t.get("images")) != t.get("images") else "")
                       if "deletion_ci" in t else f"area under the curve {t['deletion_auc']:.2f} against "
                                                  f"{t['random_deletion_auc']:.2f}")
            text = (f"When {share_words(spec.decide_at)} was randomised, block by block from the output, its "
                    f"heatmaps changed: their rank correlation with the originals fell to {curve[d]:.2f} after "
                    f"{d + 1} of {n} steps (at most {t.get('max_spearman', spec.max_spearman):.2f} "
                    f"allowed). Removing the pixels it marks first, the prediction fell faster than removing random "
                    f"blobs ({benefit}). Tested on {plural(t.get('images', 0), 'image')}.")
            if t.get("note"):
                text += f" Kept although a test could not decide: {t['note']}."
        else:
            status, css = "not trusted", "fail"
            reason = t.get("reason") or "no reason given"
            text = (f"It failed the trust gate: {reason}. The checks ignored its heatmaps; the gallery shows them "
                    f"for comparison only.")
        rows.append({"name": titled(METHODS, name), "status": status, "css": css, "text": text,
                     "description": described(METHODS, name)})
    n_ok = sum(r["status"] == "trusted" for r in rows)
    if not spec.enabled:
        intro = "The trust gate was switched off (trust.enabled: false): no method was tested before use."
    else:
        intro = (f"{n_ok} of {plural(len(rows) - len(fallbacks), 'method')} passed the trust gate. A method passes when its "
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
    return ([{"name": titled(METHODS, e.name), "kind": "explanation method", "used": e.name in used,
              "text": e.glossary or e.description} for e in METHODS] +   # in words; the formula is in section 5
            [{"name": titled(RULES, e.name), "kind": "check", "used": e.name in used,
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
            ("Evaluation data", f"Page 1 and the configuration below: {plural(rec.metrics.images, 'image')}"),
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


class TrustSettings(dict):
    """A config section as the record holds it (a dict), read by attribute with the config's defaults."""

    def __getattr__(self, key):
        from auditor.inputs.config import TrustSpec
        return self[key] if key in self else getattr(TrustSpec(), key)
