"""class_visualisation: a class the model draws with a mark that its images carry at one place.

Each class's visualisation (activation maximisation from a neutral grey start with Lucid's
priors, ``auditor.views.visualise``) shows what the model wants to see for it, found with no
data. Its own saliency says where that evidence lies: the few small windows holding most of it
(a drawing often shows the object's texture and a mark side by side). A network that pools over
space draws a mark anywhere, so each window is then looked for, with the model's own features,
in the images the model calls the class (``auditor.views.locate``): an object's look is found
all over its images, a tag, a logo or a watermark at one place. The finding names that place
(graded by how much more the window's look is found there than typically in the image), and
the intervention then pastes that region of the class's real images onto other classes' images
(with placebo regions), as for any class finding: an object's part does not carry the class.
A model that keeps place (no spatial layer, or one that reads position) draws a mark where it
looks for it: a drawn window that alone turns most of the other drawings into the class is
also named at its own place, and put to the same test.
"""
from __future__ import annotations

from auditor.explain.heatmap import box_area, boxes_overlap, place_words
from auditor.judge.evidence import Band, ClassFinding, Count, Evidence, Share, Thresholds, grade
from auditor.registry import RULES
from auditor.views import Place, class_views, locate

SEVERITY = {"low": 0.25, "medium": 0.5}   # on the contrast: the window's likeness at its place above the typical
CARRY = {"low": 0.5, "medium": 0.75}      # a drawn window tested at its own place: on the drawings it turned


def _effects(d: dict) -> list[str]:
    out = [f"the drawn patch's look is found at one place in the class's images, {d['contrast']:.2f} above "
           f"its typical likeness"] if "contrast" in d else []
    return out + ([f"the patch turned {d['carry_rate']:.0%} of the other classes' pictures"] if "carry_rate" in d else [])


@RULES.register("class_visualisation", title="The class's picture shows a mark its images carry at one place",
                glossary="The model is asked to draw each class from nothing; when a small patch of that drawing is found at one fixed place in the class's images (an object's look is found all over them), the model has probably learned a mark rather than the object.",
                effects=_effects, level="class", needs=("model",), direction="higher is more suspicious")
def class_visualisation(ev: Evidence, window: Band = 0.15, steps: Count = 48, min_contrast: Share = 0.25,
                        max_classes: Count = 20, severity: Thresholds = None, min_share: Share = 0.25,
                        carry_severity: Thresholds = None) -> list:
    """A class whose drawing holds a small patch that the images the model calls the class show at one fixed place."""
    if ev.model is None or ev.input_spec is None or len(ev.classes) < 2 or not len(ev.samples):
        return []
    severity, carry_severity = severity or SEVERITY, carry_severity or CARRY
    out = []
    for c, p in class_views(ev, steps, window, max_classes).items():
        name = ev.classes[c]
        got = locate(ev, c, p, window)
        found = []  # (place, score, severity, what was seen)
        if got is not None and got.contrast >= min_contrast and (sev := grade(got.contrast, severity)):
            found.append((got, got.contrast, sev, (
                f"the images it calls '{name}' show that patch's look at one place ({place_words(got.region)}, "
                f"{box_area(got.region):.0%} of the image) far more than elsewhere (by {got.contrast:.2f} in likeness)")))
        # A model that keeps place (no spatial layer, or one that reads position) draws a mark where it
        # looks for it: the drawn window that alone turns the other drawings is tested too, at its place.
        drawn = Place(p.region, None, p.region, p.share, p.carry)
        if p.share >= min_share and (sev := grade(p.carry, carry_severity)) and not any(
                boxes_overlap(f[0].region, drawn.region) for f in found):
            found.append((drawn, p.carry, sev, (
                f"pasted alone ({place_words(p.region)}, {box_area(p.region):.0%} of the image) onto the pictures "
                f"it draws for the other classes, that patch made {p.carry:.0%} of them '{name}'")))
        for place, score, sev, seen in found:
            out.append(ClassFinding(
                cls=name, rule="class_visualisation", severity=sev, score=score, share=place.share,
                region=place.region,
                message=(f"Asked to draw '{name}' from a blank grey picture, the model put {place.share:.0%} of the "
                         f"picture's evidence into one small patch; {seen}. The model may recognise '{name}' by a "
                         f"mark at that place rather than by the object."),
                details={"region": place_words(place.region), "carry_rate": place.carry,
                         "evidence_share": place.share, "drawn_window": place.drawn, "logit": round(p.logit, 3),
                         "steps": steps, "window": window}
                | ({} if place.contrast is None else {"contrast": place.contrast})))
    return out
