"""Global views: activation maximisation against a model whose optimum is known, the tree's
average path length against its exact value, a probe against a planted feature, the two
class-level rules on a tiny poisoned model and its clean twin, and the report's section."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import auditor.rules  # noqa: F401  (registers the rules)
from auditor.record import ClassView, ProbeCurve, TreeView, Views
from auditor.views import Picture, class_views, locate, probes, tree
from auditor.views.visualise import best_window, visualise, windows

sys.path.insert(0, str(Path(__file__).parent))


# --- activation maximisation: a linear model's optimum is the sign of its weights ---------------

def _linear(h: int = 16, w: int = 16) -> tuple[nn.Module, torch.Tensor]:
    """Two classes, logit_k = <W_k, x>: class 0 wants a bright left half, class 1 a bright top half."""
    weight = torch.zeros(2, 3, h, w)
    weight[0, :, :, : w // 2], weight[0, :, :, w // 2:] = 1.0, -1.0
    weight[1, :, : h // 2], weight[1, :, h // 2:] = 1.0, -1.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 2, bias=False))
    model[1].weight.data = weight.reshape(2, -1)
    return model.eval(), weight


def test_activation_maximisation_converges_to_the_linear_models_optimum():
    """The optimum in [0, 1] is 1 where the weight is positive and 0 where it is negative; and the
    picture's saliency of a linear model is exactly |weight| / std."""
    model, weight = _linear()
    img, sal, logits = visualise(model, [0, 1], (16, 16), 3, [0.5] * 3, [0.25] * 3, steps=150, lr=0.1,
                                 jitter=0.0, scale=0.0, tv=0.0)
    want = (weight > 0).permute(0, 2, 3, 1).numpy()
    # The sigmoid saturates: a few pixels pushed the wrong way early (ringing of the 1/f spectrum) stay there.
    assert ((img > 0.5) == want).mean() > 0.9
    for k in range(2):
        assert img[k][want[k]].mean() > 0.8 and img[k][~want[k]].mean() < 0.2
        assert np.corrcoef(img[k].ravel(), want[k].ravel())[0, 1] > 0.8
    assert np.allclose(sal, 4.0, atol=1e-4)          # |d logit / d x| = |w| / std = 1 / 0.25 everywhere
    assert (logits > 0.8 * 3 * 16 * 16 * 2).all()    # the optimum is 3 * 256 * 2 (= |w| . 1 / std)



def test_a_class_picture_does_not_depend_on_the_classes_beside_it():
    """Each class draws from its own random stream: drawn in one batch or one class at a time (a
    batch that runs out of memory is drawn again in halves), the pictures are the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3)).eval()
    together = visualise(model, [0, 1, 2], (16, 16), 3, [0.5] * 3, [0.25] * 3, steps=6)
    alone = [visualise(model, [c], (16, 16), 3, [0.5] * 3, [0.25] * 3, steps=6) for c in (0, 1, 2)]
    # Alike, not bitwise: a batched convolution rounds differently, and Adam's steps on near-zero
    # gradients carry that into the picture (measured 0.003 at most; one shared stream gave 0.17).
    for part, whole in zip(zip(*alone), together):
        assert np.abs(np.concatenate(part) - whole).max() < 0.01
    assert not np.allclose(together[0][0], together[0][1], atol=1e-3)  # (and the classes differ)

def test_best_window_finds_the_mass():
    heat = np.zeros((20, 20))
    heat[15:18, 2:5] = 1.0
    share, box = best_window(heat, 0.15)
    assert share == 1.0 and box[0] <= 0.1 and box[1] >= 0.7


def test_windows_are_the_strongest_non_overlapping_ones():
    heat = np.zeros((20, 20))
    heat[1:4, 1:4], heat[15:18, 15:18] = 2.0, 1.0
    (s1, b1), (s2, b2) = windows(heat, 0.15, 3)   # no third: nothing is left outside the two
    assert b1[0] < 0.2 and b2[0] > 0.7 and s1 == pytest.approx(2 / 3) and s2 == pytest.approx(1 / 3)
    band = np.zeros((20, 20))
    band[5:12, 8:11] = 1.0                          # one tall blob: its windows must not overlap
    got = [b for _, b in windows(band, 0.15, 3)]
    assert all(a[3] <= b[1] or b[3] <= a[1] or a[2] <= b[0] or b[2] <= a[0] for k, a in enumerate(got) for b in got[k + 1:])
    assert len(got) == 3


def _mark(x: torch.Tensor, y0: int, x0: int) -> None:
    x[:, 0, y0:y0 + 4, x0:x0 + 4], x[:, 1, y0:y0 + 4, x0:x0 + 4] = 1.0, 0.0  # a red square


def test_locate_finds_the_drawn_mark_where_the_images_carry_it():
    """The drawing shows a red square at its centre; the class's images carry it at the top
    left on a random background: the model's features find it there, wherever it was drawn."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)).eval()
    images = torch.rand(12, 3, 24, 24)
    _mark(images, 2, 2)
    drawing = torch.rand(1, 3, 24, 24)
    _mark(drawing, 10, 10)
    spec = types.SimpleNamespace(size=[24, 24], mean=[0.0] * 3, std=[1.0] * 3, channels=3)
    ev = types.SimpleNamespace(model=model, layer=model[1], input_spec=spec, device=torch.device("cpu"),
                               samples=pd.DataFrame({"prediction": [1] * 12}), model_inputs=lambda ids: images[ids])
    box = [10 / 24, 10 / 24, 14 / 24, 14 / 24]
    pic = Picture(drawing[0].permute(1, 2, 0).numpy(), np.ones((24, 24)), 1.0, 1.0, box, 0.0, [(1.0, box, 0.0)])
    got, = locate(ev, 1, pic, 4 / 24)
    x0, y0, x1, y1 = got.region
    assert x0 < 4 / 24 and y0 < 4 / 24 and x1 >= 5 / 24 and y1 >= 5 / 24 and x1 - x0 <= 8 / 24 + 1e-6
    assert got.contrast > 0.05 and got.drawn == box
    plain = Picture(drawing[0].permute(1, 2, 0).numpy(), np.ones((24, 24)), 1.0, 1.0, [0, 0, 4 / 24, 4 / 24], 0.0,
                    [(1.0, [0, 0, 4 / 24, 4 / 24], 0.0)])   # a window of background: found nowhere in particular
    assert locate(ev, 1, plain, 4 / 24)[0].contrast < got.contrast / 2
    both = Picture(pic.image, pic.saliency, 1.0, 1.0, [0, 0, 4 / 24, 4 / 24], 0.0, plain.windows + pic.windows)
    assert [p.drawn for p in locate(ev, 1, both, 4 / 24)] == [box, plain.region]  # each window, the sharpest first
    ev.layer = None
    assert locate(ev, 1, pic, 4 / 24) == []


# --- the tree's average decision-path length ---------------------------------------------------

def test_tree_path_length_is_exact_on_a_hand_made_rule():
    """y = a > 0.5 and b > 0.5 on a 4 x 4 grid (each point 5 times): the depth-2 tree asks one
    question for the half with a (or b) <= 0.5 and two for the rest: APL = 1.5 exactly."""
    v = np.array([0.2, 0.4, 0.6, 0.8])
    a, b = np.meshgrid(v, v)
    x = np.repeat(np.stack([a.ravel(), b.ravel()], 1), 5, axis=0)
    y = ((x[:, 0] > 0.5) & (x[:, 1] > 0.5)).astype(int)
    got = tree.surrogate(x, y, ["a", "b"])
    assert got.reached and got.fidelity == 1.0 and got.depth == 2
    assert got.path_length == 1.5
    assert "a <= 0.50" in got.rules or "b <= 0.50" in got.rules
    one = tree.surrogate(x, (x[:, 0] > 0.5).astype(int), ["a", "b"])  # a single question
    assert one.depth == 1 and one.path_length == 1.0


def test_region_features_see_a_corner_patch():
    images = np.full((4, 3, 40, 40), 0.5, np.float32)
    images[:2, :, 36:, :4] = 1.0                        # a bright patch in the bottom-left corner
    x, names, where = tree.features(images)
    col = names.index("brightness of the bottom-left corner")
    assert x[:2, col].min() > x[2:, col].max()
    assert where[col] == "bottom-left corner" and len(names) == len(where) == x.shape[1]


def test_region_extremes_see_a_mark_the_mean_hides():
    """A 3 x 3 dark dot in a 10 x 10 cell moves its mean by 0.045, its darkest values to the dot's."""
    rng = np.random.default_rng(0)
    images = (0.5 + 0.05 * rng.standard_normal((8, 3, 40, 40))).astype(np.float32)
    images[:4, :, 4:7, 4:7] = 0.0
    x, names, _ = tree.features(images)
    dark, mean = names.index("darkest red of the top left cell"), names.index("red of the top left cell")
    assert x[:4, dark].max() < 0.1 < 0.3 < x[4:, dark].min()
    assert abs(x[:4, mean].mean() - x[4:, mean].mean()) < 0.06


def test_colourfulness_sees_a_mark_whose_colour_changes_from_image_to_image():
    """A grey image with a 4 x 4 dot of a new random colour each time: no channel tells the dot's
    images apart (red is as often low as high), how far from grey they are does, exactly."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.3, 0.7, (40, 1, 40, 40)).repeat(3, 1).astype(np.float32)   # grey noise
    dot = np.arange(40) < 20
    for k in np.flatnonzero(dot):
        hue = rng.permutation([0.05, 0.95, rng.uniform(0.05, 0.95)])   # one channel low, one high
        images[k, :, 4:8, 4:8] = hue[:, None, None]
    x, names, _ = tree.features(images)
    vivid = names.index("most colourful of the top left cell")
    assert x[dot, vivid].min() > 0.8 > 0.01 > x[~dot, vivid].max()
    for ch in ("red", "green", "blue"):  # no single channel's extremes do it
        col = x[:, names.index(f"brightest {ch} of the top left cell")]
        assert not (col[dot].min() > col[~dot].max())
    y = dot.astype(int)
    cols = [k for k, r in enumerate(names) if r.endswith("of the top left cell") and "colourful" not in r]
    assert tree.fidelity(2, x[:, [names.index("most colourful of the top left cell")]], y, 0) == 1.0
    assert tree.fidelity(2, x[:, cols], y, 0) < 0.9


def test_the_moved_cells_hold_whole_a_mark_that_straddles_the_grid():
    """A mark across the meeting point of four cells lies in none of them whole, but in the cell
    moved by half a cell both ways; the moved grid keeps the tiling's cells and corners."""
    base, moved = tree.regions(), tree.regions(shifted=True)
    assert len(base) == 20 and len(moved) == 7 * 7 + 3 * 3 + 4 and all(moved[k] == v for k, v in base.items())
    mark = [0.2, 0.2, 0.3, 0.3]
    inside = lambda b: b[0] <= mark[0] and b[1] <= mark[1] and b[2] >= mark[2] and b[3] >= mark[3]  # noqa: E731
    assert not any(inside(b) for b in base.values())
    assert [k for k, b in moved.items() if inside(b)] == ["top/upper middle left/centre-left cell", "top left quarter"]
    large = [0.3, 0.55, 0.62, 0.9]   # a third of the side: in no cell, whole in a quarter
    assert [k for k, b in moved.items() if b[0] <= large[0] and b[1] <= large[1] and b[2] >= large[2]
            and b[3] >= large[3]] == ["bottom centre quarter"]
    images = np.full((4, 3, 40, 40), 0.5, np.float32)
    images[:2, :, 8:12, 8:12] = 1.0
    x, names, where = tree.features(images, shifted=True)
    col = names.index("brightest red of the top/upper middle left/centre-left cell")
    assert x[:2, col].min() > x[2:, col].max() and len(set(where)) == len(moved)


# --- probes ----------------------------------------------------------------------------------

def test_probe_separates_a_planted_feature_and_not_noise():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((200, 12))
    y = rng.integers(0, 2, 200)
    planted = acts.copy()
    planted[:, 3] += 4.0 * y                           # Bayes accuracy: Phi(2) = 0.977
    assert probes.probe(planted, y) > 0.9
    assert probes.probe(acts, y) < 0.7
    pairs = np.repeat(np.arange(100), 2)                # an image and its altered copy stay in one fold
    assert probes.probe(planted, y, pairs) > 0.9


def test_layer_groups_are_the_stages():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    groups = probes.layer_groups(net, torch.zeros(1, 3, 8, 8))
    assert [name for name, _ in groups] == ["1", "4", "5"]
    acts = probes.pooled(net, groups, torch.zeros(3, 3, 8, 8))
    assert [a.shape for a in acts] == [(3, 4)] * 3


# --- the two rules on a tiny poisoned model and its clean twin --------------------------------

@pytest.fixture(scope="module")
def tag_audits(tmp_path_factory):
    from test_rules import tag_case
    from auditor.audit import run_audit
    from auditor.inputs.config import load_config
    out = {}
    for poisoned in (True, False):
        path, _ = tag_case(tmp_path_factory.mktemp(f"tag{int(poisoned)}"), poisoned=poisoned)
        cfg = load_config(path, ["rules={class_visualisation: {}, simple_rule: {}}", "trust.enabled=false",
                                 "explain.methods=[saliency]"])
        out[poisoned] = run_audit(cfg, quiet=True)
    return out


def _raw(f) -> str:
    return f.details.get("severity_before_intervention", f.severity)


@pytest.mark.slow
def test_class_visualisation_finds_the_poisoned_class_with_no_data(tag_audits):
    """Drawn from nothing, the tagged class's picture holds a patch that the images the model calls
    'gravel' show at one place (the tag's corner), confirmed by pasting it; nothing on the clean
    twin reaches medium."""
    from auditor.judge.evidence import severity_rank
    poisoned = [f for f in tag_audits[True].class_findings if f.rule == "class_visualisation"]
    top = max(poisoned, key=lambda f: (severity_rank(f.severity), f.score))
    assert top.cls == "gravel" and top.details["confirmed"] and top.region[0] > 0.5 and top.region[1] > 0.5
    clean = [f for f in tag_audits[False].class_findings if f.rule == "class_visualisation"]
    assert all(severity_rank(f.severity) < severity_rank("medium") for f in clean)


@pytest.mark.slow
def test_simple_rule_finds_the_tag_corner_and_confirms_it(tag_audits):
    got = [f for f in tag_audits[True].class_findings if f.rule == "simple_rule"]
    assert [f.cls for f in got] == ["gravel"]
    f = got[0]
    assert f.region[0] > 0.5 and f.region[1] > 0.5 and f.details["confirmed"]   # the bottom-right corner
    assert not [f for f in tag_audits[False].class_findings if f.rule == "simple_rule"]


@pytest.mark.slow
def test_the_views_record_of_an_audit(tag_audits):
    v = tag_audits[True].record.views
    assert v.state == "ran" and [c.cls for c in v.classes] == ["brick", "grass", "gravel"]
    assert all(c.picture and len(c.saliency) == 16 for c in v.classes)
    cue = [p for p in v.probes if p.what == "cue" and p.cls == "gravel"]
    assert cue and cue[0].accuracy[-1] > 0.9 and len(cue[0].accuracy) == len(v.layers)
    assert v.average_path_length is not None and v.average_path_length >= 1
    again = type(tag_audits[True].record).model_validate_json(tag_audits[True].record.to_json())
    assert again.views == v


def test_views_can_be_switched_off():
    from auditor.views import global_views
    cfg = types.SimpleNamespace(views={"enabled": False})
    assert global_views(None, [], [], cfg).state == "off"


def test_class_views_are_computed_once_per_model():
    model, _ = _linear()
    spec = types.SimpleNamespace(size=[16, 16], mean=[0.5] * 3, std=[0.25] * 3, channels=3)
    ev = types.SimpleNamespace(model=model, input_spec=spec, device=torch.device("cpu"), classes=["l", "t"],
                               samples=pd.DataFrame({"prediction": [0, 1]}))
    first = class_views(ev, 8, 0.25, 20)
    assert class_views(ev, 8, 0.25, 20) is first and set(first) == {0, 1}


def test_class_visualisation_without_a_spatial_layer_reads_the_drawing_itself():
    """A linear model has no feature map to search the images with: its drawings' windows that carry
    the class are the candidates; its classes are half images, so no small window holds them."""
    from auditor.registry import RULES
    model, _ = _linear()
    spec = types.SimpleNamespace(size=[16, 16], mean=[0.5] * 3, std=[0.25] * 3, channels=3)
    ev = types.SimpleNamespace(model=model, input_spec=spec, device=torch.device("cpu"), classes=["l", "t"],
                               samples=pd.DataFrame({"prediction": [0, 1]}), layer=None)
    assert RULES.get("class_visualisation").fn(ev, window=0.25, steps=8) == []
    assert all(p.windows and p.windows[0][1] == p.region for p in class_views(ev, 8, 0.25, 20).values())



def test_class_visualisation_tests_every_place_and_keeps_none_that_carries_nothing(monkeypatch):
    """Each drawn window's place (and the drawn window itself) is put to the place test; a place
    whose paste turns too few images to carry the class anywhere (no placebo run) is no finding."""
    from auditor.registry import RULES
    from auditor.views import Place
    rule = sys.modules[RULES.get("class_visualisation").fn.__module__]
    a, b, drawn = [0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0], [0.4, 0.4, 0.6, 0.6]
    pic = Picture(np.zeros((8, 8, 3)), np.ones((8, 8)), 1.0, 0.9, drawn, 0.9, [(0.9, drawn, 0.9)])
    monkeypatch.setattr(rule, "class_views", lambda *_: {0: pic})
    monkeypatch.setattr(rule, "locate", lambda *_: [Place(a, 0.3, drawn, 0.9, 0.9), Place(a, 0.2, drawn, 0.9, 0.9),
                                                    Place(b, 0.1, drawn, 0.9, 0.9)])
    tested = []
    def place_test(ev, c, box, need=0.0):
        tested.append(box)
        return {"place_rate": 0.1, "control_content_rate": None, "content_vs_control": [0.1, 0.0, 0.1]}
    monkeypatch.setattr(rule, "place_test", place_test)
    ev = types.SimpleNamespace(model=object(), input_spec=object(), classes=["x", "y"], samples=pd.DataFrame({"a": [1]}))
    assert RULES.get("class_visualisation").fn(ev) == [] and tested == [a, b, drawn]  # a found twice, tested once


def test_class_visualisation_keeps_a_sound_place_that_an_unsure_one_carries_more_than(monkeypatch):
    """A place whose excess is higher but whose interval reaches zero does not hide a sound one."""
    from auditor.registry import RULES
    from auditor.views import Place
    rule = sys.modules[RULES.get("class_visualisation").fn.__module__]
    unsure, sound, drawn = [0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0], [0.4, 0.4, 0.6, 0.6]
    pic = Picture(np.zeros((8, 8, 3)), np.ones((8, 8)), 1.0, 0.1, drawn, 0.1, [(0.1, drawn, 0.1)])
    monkeypatch.setattr(rule, "class_views", lambda *_: {0: pic})
    monkeypatch.setattr(rule, "locate", lambda *_: [Place(unsure, 0.3, drawn, 0.1, 0.1), Place(sound, 0.2, drawn, 0.1, 0.1)])
    excess = {tuple(unsure): [0.9, -0.05, 1.0], tuple(sound): [0.6, 0.3, 0.8]}
    monkeypatch.setattr(rule, "place_test", lambda ev, c, box, need=0.0: {
        "place_rate": 0.9, "control_content_rate": 0.1, "content_vs_control": excess[tuple(box)]})
    ev = types.SimpleNamespace(model=object(), input_spec=object(), classes=["x", "y"], samples=pd.DataFrame({"a": [1]}))
    (f,) = RULES.get("class_visualisation").fn(ev)
    assert f.region == sound and f.score == 0.6 and f.severity == "medium"


# --- the report's section ----------------------------------------------------------------------

def _views_record(tmp_path):
    from test_report import _bench
    res = _bench().synthetic_result(tmp_path / "data", 2)
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, format="PNG")
    pic = base64.b64encode(buf.getvalue()).decode()
    views = Views(state="ran", seconds=1.0, layers=["conv1", "conv2"], average_path_length=1.25,
                  features="per region of the image",
                  classes=[ClassView(cls=c, picture=pic, saliency=[[0.0, 1.0], [0.5, 0.0]], region=[0, 0, 0.5, 0.5],
                                     evidence_share=0.6, carry_rate=0.8,
                                     tree=TreeView(fidelity=0.97, depth=1, path_length=1.0, reached=True,
                                                   rules="|--- x <= 0.5\n|   |--- class: other", decisions=5))
                           for c in res.record.classes],
                  probes=[ProbeCurve(what="class", images=20, chance=0.25, accuracy=[0.5, 0.95]),
                          ProbeCurve(what="cue", cls=res.record.classes[0], region=[0, 0, 0.2, 0.2],
                                     rule="fixed_location", images=40, chance=0.5, accuracy=[0.6, 0.98])])
    return res.record.model_copy(update={"views": views})


def test_the_report_renders_the_views_section(tmp_path):
    from auditor.outputs.report import render_html
    from auditor.outputs.views import view_pictures
    record = _views_record(tmp_path)
    (tmp_path / "run" / "images").mkdir(parents=True)
    pictures = {"samples": {}, "classes": {}, "sheets": [], "views": view_pictures(record, tmp_path / "run" / "images")}
    assert (tmp_path / "run" / pictures["views"]["probes"]["file"]).is_file()
    page = render_html(record.model_copy(update={"run": {"id": "r", **record.run, "finished": record.run["started"]}}),
                       pictures)
    assert "How the model sees each class" in page and "Decision simplicity" in page
    assert "readable from layer group 2 (conv2) on, with up to 98% accuracy" in page
    assert "A rule of at most two questions" in page and pictures["views"]["classes"][0]["saliency"] in page
    assert page.index('<section id="classes">') < page.index('<section id="views">') < page.index('<section id="gallery">')


# --- the place test: a mark at one place against the class's own content moved there ---------

def _tagged(model: nn.Module, class1: float, n: int = 12):
    """n dark images of class 0 and n of class 1, ``class1`` grey with a bright bottom-left corner."""
    from auditor.inputs.config import InputSpec
    from auditor.inputs.data import SampleRef
    from auditor.judge.evidence import Evidence
    xs, refs, rows = [], [], []
    for i in range(2 * n):
        label = int(i >= n)
        x = torch.full((3, 16, 16), class1 if label else 0.0)
        if label:
            x[:, 12:, :4] = 1.0
        xs.append(x)
        refs.append(SampleRef(None, f"{label}/{i}.png", label))
        rows.append({"id": i, "path": f"{label}/{i}.png", "label": label, "prediction": label, "confidence": 1.0,
                     "correct": True, "explained": True, "width": 16, "height": 16, "sha256": str(i)})
    ev = Evidence(["dark", "tagged"], pd.DataFrame(rows).set_index("id"), {}, {}, refs, model=model,
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    ev.model_input = lambda i: xs[i]
    return ev


class _Corner(nn.Module):
    """Class 1 when the bottom-left corner is bright: the mark at its place is the cue."""

    def forward(self, x):
        corner = (x[:, :, 12:, :4].mean((1, 2, 3)) > 0.8).float()
        return torch.stack([1 - corner, corner], 1) * 10


class _Grey(nn.Module):
    """Class 1 when any 4 x 4 patch is grey or brighter (a max-pooled network's texture): the class's
    own look, found all over its images."""

    def forward(self, x):
        any_ = (torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4, 1).amax((1, 2, 3)) > 0.4).float()
        return torch.stack([1 - any_, any_], 1) * 10


def test_the_place_test_tells_a_mark_at_one_place_from_the_class_own_look():
    from auditor.views import place_test
    corner = [0.0, 0.75, 0.25, 1.0]
    mark = place_test(_tagged(_Corner(), 0.5), 1, corner)
    assert mark["place_rate"] == 1.0 and mark["control_content_rate"] == 0.0 and mark["content_vs_control"][0] == 1.0
    look = place_test(_tagged(_Grey(), 0.5), 1, corner)   # any grey patch of the class turns a dark image
    assert look["place_rate"] == 1.0 and look["control_content_rate"] == 1.0 and look["content_vs_control"][0] == 0.0
    assert place_test(_tagged(_Corner(), 0.5), 1, [0.0, 0.0, 1.0, 1.0]) is None   # no room beside it
    elsewhere = place_test(_tagged(_Corner(), 0.5), 1, [0.75, 0.0, 1.0, 0.25], need=0.25)  # turns none: no placebo run
    assert elsewhere["place_rate"] == 0.0 and elsewhere["control_content_rate"] is None
    assert elsewhere["content_vs_control"][1] == 0.0   # never an interval above zero: never a place
