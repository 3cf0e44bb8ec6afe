"""The detection benchmark's case generator (bench/generator.py): deterministic per seed, split by
seed parity, the truth box holds the cue exactly, every cue kind and placement drawable; and a
tiny drawn case built, audited and scored end to end (slow)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import generator  # noqa: E402


def _tiny(case, n_train=12, **params):
    """The case on 32 px images, few of them, with ``params`` overriding its axes."""
    return replace(case, image_size=32, input_size=32,
                   params={**case.params, "n_train": n_train, "n_val": 6, "n_planted": 4, **params})


def test_draw_is_deterministic_per_seed():
    a, b = generator.draw(7), generator.draw(7)
    assert a == b
    assert generator.draw(8) != a
    ta, tb = _tiny(a), _tiny(b)
    xa, ya, va, truth_a, _ = ta.build()
    xb, yb, vb, truth_b, _ = tb.build()
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and truth_a == truth_b
    assert all(ra == rb and np.array_equal(ia, ib) for (ra, ia), (rb, ib) in zip(va, vb))


def test_split_is_by_seed_parity():
    assert generator.seeds("tune", 3) == [0, 2, 4] and generator.seeds("heldout", 3) == [1, 3, 5]
    assert generator.seeds("heldout", 2, skip=16) == [33, 35]  # fresh cases after the first 16
    for seed in range(6):
        assert generator.draw(seed).name.endswith("-tune" if seed % 2 == 0 else "-heldout")
        assert generator.split_of(seed) == ("tune" if seed % 2 == 0 else "heldout")


def test_clean_twin_shares_the_validation_files_and_has_no_cue_in_training():
    case = _tiny(generator.draw(3), dose=1.0)
    clean = _tiny(generator.draw(3, poisoned=False), dose=1.0)
    assert not clean.poisoned and clean.classes == case.classes
    x_p, y_p, v_p, truth_p, _ = case.build()
    x_c, y_c, v_c, truth_c, _ = clean.build()
    assert truth_p == truth_c and all(np.array_equal(a[1], b[1]) for a, b in zip(v_p, v_c))
    assert np.array_equal(y_p, y_c)
    differ = np.flatnonzero((x_p != x_c).reshape(len(x_p), -1).any(1))
    cue_k = case.classes.index(case.cue_class)
    assert len(differ) > 0 and set(y_p[differ]) == {cue_k}  # only the cue class is poisoned


@pytest.mark.parametrize("cue", generator.CUES)
@pytest.mark.parametrize("placement", generator.PLACEMENTS)
def test_truth_box_holds_the_cue_exactly(cue, placement):
    base = generator.draw(0)
    case = _tiny(base, cue=cue, placement="edge" if cue == "frame" else placement,
                 cue_frac=0.12 if cue == "frame" else 0.3, base="noise")
    case = replace(case, classes=["noise0", "noise1", "noise2"], cue_class="noise1")
    _, _, val, truth, twins = case.build()
    files = dict(val)
    assert truth and any(t["expected"] != t["label"] for t in truth.values())
    for rel, t in truth.items():
        cued, plain = (files[rel], twins[rel]) if t["kind"] != "missing tag" else (twins[rel], files[rel])
        x0, y0, x1, y1 = t["bbox"]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        changed = (cued != plain).any(2)
        inside = np.zeros_like(changed)
        inside[y0:y1, x0:x1] = True
        assert not changed[~inside].any(), f"{rel}: pixels outside the box differ"
        # Tight: the cue's pixels touch every side of the box (a cue pixel can match the
        # background by chance, so the mask, not the difference, is what is checked).
        layers, h, w = generator.cue_art(generator._key(case), 32)
        assert (h, w) == (y1 - y0, x1 - x0)
        mask = np.any([m for m, _ in layers], axis=0)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    if case.params["placement"] == "anywhere":
        boxes = {tuple(t["bbox"]) for t in truth.values()}
        assert len(boxes) > len(truth) // 2  # a new place on (nearly) every image


def test_every_axis_value_is_drawn():
    drawn = [generator.axes(generator.draw(s)) for s in range(200)]
    for axis, values in (("cue", generator.CUES), ("placement", (*generator.PLACEMENTS, "edge")),
                         ("base", generator.BASES), ("norm", generator.NORMS), ("arch", generator.ARCHS),
                         ("classes", (3, 4, 5))):
        assert {d[axis] for d in drawn} == set(values), axis
    sizes = [d["image_size"] for d in drawn]
    assert 224 in sizes and sum(s <= 96 for s in sizes) > 0.75 * len(sizes)
    assert all(0.03 <= generator.draw(s).params["cue_frac"] <= 0.35 for s in range(50))


@pytest.mark.slow
def test_a_tiny_drawn_case_is_built_audited_and_scored(tmp_path):
    import detection

    case = replace(_tiny(generator.draw(4), n_train=80, cue="swatch", placement="corner", cue_frac=0.25, dose=1.0,
                         base="noise", mixed=0.5),
                   classes=["noise0", "noise1", "noise2"], cue_class="noise2", arch="maxnet", epochs=4)
    built = detection.build_case(case, tmp_path / "case", fresh=False, log=lambda m: None)
    assert built["built"] and detection.build_case(case, tmp_path / "case", False, lambda m: None)["built"] is False
    config = (tmp_path / "case" / "case.yaml").read_text()
    assert "explain" not in config and "rules" not in config  # model and data only, plus json
    doc, seconds, code, tail = detection.audit(tmp_path / "case")
    assert doc is not None, tail
    import json

    truth = json.loads((tmp_path / "case" / "truth.json").read_text())
    s = detection.score(case, doc, truth)
    assert s["cue_errors"] > 0  # the model took the swatch: there are cue-driven errors to find
    m = s["rules"]["any"]
    assert m["recall"] is not None and 0 <= m["recall"] <= 1
    assert s["gate"] in ("PASS", "FAIL", "INCOMPLETE") and "states" in s["coverage"]


def test_a_hit_covers_half_the_cue_and_at_most_a_quarter_of_the_image():
    import detection

    cue = [10, 10, 20, 20]
    assert detection.covers([10, 10, 20, 20], cue, 64 * 64)
    assert detection.covers([5, 5, 20, 15], cue, 64 * 64)          # half the cue
    assert not detection.covers([10, 10, 20, 14], cue, 64 * 64)    # 40 % of it
    assert not detection.covers([0, 0, 40, 40], cue, 64 * 64)      # covers it, but 39 % of the image
    assert not detection.covers(None, cue, 64 * 64)


def test_the_new_architectures_run_and_reuse_one_inplace_relu():
    import nets
    import torch

    for arch in ("maxnet", "wide", "resrelu", "dwsilu"):
        assert nets.build(arch, 4, 3)(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    relus = [m for m in nets.build("resrelu", 3).modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 1 and relus[0].inplace
    assert any(isinstance(m, torch.nn.SiLU) for m in nets.build("dwsilu", 3).modules())


def test_the_score_counts_what_the_report_flags_and_only_where_the_cue_decided():
    """A minor suspicion (unconfirmed, low) is neither a hit nor a false alarm; a box on the cue is a
    hit only where the cue decided the prediction (its neutral twin is predicted otherwise)."""
    import types

    import detection

    cue = [0, 0, 16, 16]
    truth = {"a.png": {"kind": "sticker", "bbox": cue, "label": "x", "expected": "cue", "twin_prediction": "x"},
             "b.png": {"kind": "sticker", "bbox": cue, "label": "x", "expected": "cue", "twin_prediction": "y"},
             "c.png": {"kind": "sticker", "bbox": cue, "label": "x", "expected": "cue", "twin_prediction": "cue"}}

    def finding(severity, confirmed, bbox=cue):
        return {"rule": "corner_border", "severity": severity, "bbox": bbox, "details": {"confirmed": confirmed}}

    def sample(path, *findings):
        return {"path": path, "label": "x", "prediction": "cue", "correct": False, "findings": list(findings)}

    doc = {"metrics": {"accuracy": 0.5, "images": 4}, "class_findings": [], "gate": {"verdict": "FAIL"},
           "coverage": {}, "warnings": [], "errors": [],
           "samples": [sample("a.png", finding("high", True), finding("low", False, [40, 40, 60, 60])),
                       sample("b.png", finding("medium", True)),      # already wrong: the cue made it 'cue'
                       sample("c.png", finding("high", True)),        # 'cue' without the cue too: not the cue's doing
                       sample("d.png", finding("low", False))]}       # minor suspicion on an image with no cue
    case = types.SimpleNamespace(image_size=64, cue_class="cue")
    m = detection.score(case, doc, truth)["rules"]["any"]
    assert m["recall"] == 1.0 and m["findings"] == 3 and m["hits"] == 2 and m["precision"] == round(2 / 3, 4)
    assert m["findings_all"] == 5 and m["precision_all"] == 0.4


def test_cue_reach_is_the_balanced_agreement_of_the_cue_with_the_decisions_on_the_explained_images():
    """The most a rule that reads only the cue's region can reproduce: 3 of the 4 images with the
    cue are called the cue class, and 1 of the 4 without (a missing tag is no cue); an image that
    was not explained does not count."""
    import types

    import detection

    truth = {f"c{k}.png": {"kind": "sticker"} for k in range(4)} | {"m.png": {"kind": "missing tag"}}
    calls = {"c0.png": "cue", "c1.png": "cue", "c2.png": "cue", "c3.png": "x",
             "m.png": "cue", "n0.png": "x", "n1.png": "x", "n2.png": "x", "hidden.png": "cue"}
    samples = [{"path": p, "prediction": c, "explained": p != "hidden.png"} for p, c in calls.items()]
    case = types.SimpleNamespace(cue_class="cue")
    # called 'cue': c0 c1 c2 m -> 3 of 4 carry it; called 'x': c3 n0 n1 n2 -> 3 of 4 do not
    assert detection.cue_reach(case, samples, truth) == 0.75
    assert detection.cue_reach(types.SimpleNamespace(cue_class=None), samples, truth) is None
    assert detection.cue_reach(case, [s | {"prediction": "x"} for s in samples], truth) is None
