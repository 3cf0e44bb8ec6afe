"""class_visualisation: a class the model makes out of one small patch, found with no data.

Each class's visualisation (activation maximisation from a neutral grey start with Lucid's
priors, ``auditor.views.visualise``) shows what the model wants to see for it. Its own saliency
says where that evidence lies; the small window holding most of it is cut out and pasted, at
the same place, onto the other classes' visualisations. An object the model knows needs more
than a small patch at one place to be recognised; a tag, a logo or a watermark that the model
reads as the class is enough on its own, and turns the others into the class. The finding
names that window, and the intervention then pastes the same region of the class's real
images onto other classes' images (with placebo regions), as for any class finding.
"""
from __future__ import annotations

from auditor.explain.heatmap import box_area, place_words
from auditor.judge.evidence import Band, ClassFinding, Count, Evidence, Share, Thresholds, grade
from auditor.registry import RULES
from auditor.views import class_views

SEVERITY = {"low": 0.5, "medium": 0.75}   # on the share of the other classes' visualisations turned


def _effects(d: dict) -> list[str]:
    out = [f"the patch turned {d['carry_rate']:.0%} of the other classes' pictures"] if "carry_rate" in d else []
    return out + ([f"{d['evidence_share']:.0%} of the picture's evidence in the patch"] if "evidence_share" in d else [])


@RULES.register("class_visualisation", title="The class's picture hinges on one small patch",
                glossary="The model is asked to draw each class from nothing; when a small patch of that picture alone makes the model see the class in other pictures, it has probably learned a mark rather than the object.",
                effects=_effects, level="class", needs=("model",), direction="higher is more suspicious")
def class_visualisation(ev: Evidence, window: Band = 0.15, steps: Count = 48, min_share: Share = 0.25,
                        max_classes: Count = 20, severity: Thresholds = None) -> list:
    """A class whose visualisation's small evidence window, pasted onto the other classes' visualisations, makes them the class."""
    if ev.model is None or ev.input_spec is None or len(ev.classes) < 2 or not len(ev.samples):
        return []
    severity = severity or SEVERITY
    out = []
    for c, p in class_views(ev, steps, window, max_classes).items():
        sev = grade(p.carry, severity)
        if sev is None or p.share < min_share:
            continue
        name = ev.classes[c]
        where = place_words(p.region)
        out.append(ClassFinding(
            cls=name, rule="class_visualisation", severity=sev, score=round(p.carry, 4), share=round(p.share, 4),
            region=p.region,
            message=(f"Asked to draw '{name}' from a blank grey picture, the model put {p.share:.0%} of the "
                     f"picture's evidence into one small patch ({where}, {box_area(p.region):.0%} of the image); "
                     f"pasted alone onto the pictures it draws for the other classes, that patch made "
                     f"{p.carry:.0%} of them '{name}'. The model may recognise '{name}' by a mark at that "
                     f"place rather than by the object."),
            details={"region": where, "carry_rate": p.carry, "evidence_share": p.share, "logit": round(p.logit, 3),
                     "steps": steps, "window": window}))
    return out
