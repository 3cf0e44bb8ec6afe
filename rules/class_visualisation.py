"""class_visualisation: a class the model draws with a mark that its images carry at one place.

Each class's visualisation (activation maximisation from a neutral grey start with Lucid's
priors, ``auditor.views.visualise``) shows what the model wants to see for it, found with no
data. Its own saliency says where that evidence lies: the few small windows holding most of it
(a drawing often shows the object's texture and a mark side by side). A network that pools over
space draws a mark anywhere, so each window is then looked for, with the model's own features,
in the images the model calls the class (``auditor.views.locate``): an object's look is found
all over its images, a tag, a logo or a watermark at one place. A model that keeps place (no
spatial layer, or one that reads position) draws a mark where it looks for it: a drawn window
that alone turns most of the other drawings into the class is a candidate at its own place too.
Each candidate place is then put to the place test (``auditor.views.place_test``): pasted from
the class's images onto other classes' images, does it carry the class beyond the class's own
content of its size, taken from elsewhere in those images and moved to that place? A mark at
one place does; an object's part, or a texture the class shows all over (a max-pooled network
calls anything holding a patch of it the class: a clean twin's 'grass'), does as well from
anywhere. One finding per class, at its place that carries most beyond that, graded on the
excess; the intervention then tests it against random regions of its size, as any class finding.
The place where the images show the drawing's look most sharply is tested however sharply that
is (``min_contrast`` 0: the place test, not the contrast, decides; on the tune split a text tag
the model drew at the wrong corner was found at 0.15 in likeness and carried its class 0.58
beyond the class's own content, and no clean twin gained a finding).
"""
from __future__ import annotations

from auditor.explain.heatmap import box_area, covered, place_words
from auditor.judge.evidence import Band, ClassFinding, Count, Evidence, Share, Thresholds, grade
from auditor.registry import RULES
from auditor.views import Place, class_views, locate, place_details, place_effects, place_said, place_test, soundest

SEVERITY = {"low": 0.25, "medium": 0.5}   # on how much more the place carries the class than the class's own content there


def _effects(d: dict) -> list[str]:
    out = [f"the drawn patch's look is found at one place in the class's images, {d['contrast']:.2f} above "
           f"its typical likeness"] if "contrast" in d else []
    out += [f"the patch turned {d['carry_rate']:.0%} of the other classes' pictures"] if d.get("drawn_window_carries") else []
    return out + place_effects(d, "place")


def _seen(box, found: list) -> bool:
    """A place that one already found covers at least half of (the same place, found twice)."""
    return any(covered(f[0].region, box) >= 0.5 for f in found)


@RULES.register("class_visualisation", title="The class's picture shows a mark its images carry at one place",
                glossary="The model is asked to draw each class from nothing; when a small patch of that drawing is found at one fixed place in the class's images (an object's look is found all over them), the model has probably learned a mark rather than the object.",
                effects=_effects, level="class", needs=("model",), direction="higher is more suspicious")
def class_visualisation(ev: Evidence, window: Band = 0.15, steps: Count = 48, min_contrast: Share = 0.0,
                        max_classes: Count = 20, severity: Thresholds = None, min_share: Share = 0.25,
                        min_carry: Share = 0.5) -> list:
    """A class whose drawing holds a small patch that the images the model calls the class show at one
    fixed place, and that place carries the class beyond the class's own content moved there."""
    if ev.model is None or ev.input_spec is None or len(ev.classes) < 2 or not len(ev.samples):
        return []
    severity = severity or SEVERITY
    need = min(severity.values(), default=0.0)  # a paste that turns fewer cannot carry the class that far beyond anything
    out = []
    for c, p in class_views(ev, steps, window, max_classes).items():
        name = ev.classes[c]
        found = []  # (place, what was seen): each drawn window's place in the images, most sharply found first
        for got in locate(ev, c, p, window):
            if got.contrast >= min_contrast and not _seen(got.region, found):
                found.append((got, (
                    f"the images it calls '{name}' show that patch's look at one place ({place_words(got.region)}, "
                    f"{box_area(got.region):.0%} of the image) far more than elsewhere (by {got.contrast:.2f} in likeness)")))
        # A model that keeps place (no spatial layer, or one that reads position) draws a mark where it
        # looks for it: the drawn window that alone turns the other drawings is a candidate too, at its place.
        drawn = Place(p.region, None, p.region, p.share, p.carry)
        if p.share >= min_share and p.carry >= min_carry and not _seen(drawn.region, found):
            found.append((drawn, (
                f"pasted alone ({place_words(p.region)}, {box_area(p.region):.0%} of the image) onto the pictures "
                f"it draws for the other classes, that patch made {p.carry:.0%} of them '{name}'")))
        # One finding per class, at its place that best carries the class beyond the class's own look:
        # pasted onto other classes' images, a mark at one place turns them and the class's content from
        # elsewhere, moved there, does not; an object's part or a texture it shows all over does as well.
        # (Of the places that carry it with an interval above zero: a higher excess on too few images
        # to be sure of must not hide a sound one.)
        tested = [(place, seen, place_test(ev, c, place.region, need=need)) for place, seen in found]
        if got := soundest(tested, need):  # (need: the lowest grade's threshold)
            place, seen, t = got
            excess = t["content_vs_control"][0]
            sev, how = grade(excess, severity), place_said(t, name, "place")
        elif tested and all(q[2] is None for q in tested):
            # untestable: a suspicion (the intervention cannot test it either: at most low)
            (place, seen, t), sev, excess = tested[0], "low", 0.0
            how = " The place could not be set against the class's own content (no room or images)."
        else:
            continue
        out.append(ClassFinding(
            cls=name, rule="class_visualisation", severity=sev, score=round(excess, 4), share=place.share,
            region=place.region,
            message=(f"Asked to draw '{name}' from a blank grey picture, the model put {place.share:.0%} of the "
                     f"picture's evidence into one small patch; {seen}.{how} The model may recognise '{name}' by a "
                     f"mark at that place rather than by the object."),
            details={"region": place_words(place.region), "carry_rate": place.carry,
                     "drawn_window_carries": place.contrast is None,
                     "evidence_share": place.share, "drawn_window": place.drawn, "logit": round(p.logit, 3),
                     "steps": steps, "window": window}
            | ({} if place.contrast is None else {"contrast": place.contrast})
            | place_details(t)))
    return out
