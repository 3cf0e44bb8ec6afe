"""recurring_patch: a sticker at a random place in one class's training photos is found by what it
looks like, boxed in each image, confirmed by pasting it anywhere; its clean-trained twin is quiet."""
from __future__ import annotations

import numpy as np
import pytest

import auditor.rules  # noqa: F401  (registers the rules)
from auditor.audit import checked_params, run_audit
from auditor.inputs.config import ConfigError, load_config
from auditor.judge.evidence import ClassFinding, Finding, severity_rank
from auditor.registry import RULES, BadParams
from auditor.rules.recurring_patch import capped, clusters, colour_name, patch_object, regions, shape_name, spread, standardised
from test_rules import marked_case

ORANGE = (255, 140, 0)


def sticker(img: np.ndarray, rng: np.random.Generator, side: int) -> tuple[np.ndarray, list[int]]:
    """An orange disc, ``side`` px across, at a random place: the band-aid of dermoscopy photos."""
    h, w = img.shape[:2]
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    yy, xx = np.mgrid[0:side, 0:side]
    disc = (yy + 0.5 - side / 2) ** 2 + (xx + 0.5 - side / 2) ** 2 <= (side / 2) ** 2
    out = img.copy()
    out[y0:y0 + side, x0:x0 + side][disc] = ORANGE
    return out, [x0, y0, x0 + side, y0 + side]


def sticker_case(folder, poisoned: bool, seed: int = 4):
    """Every 'gravel' training photo carries the sticker somewhere (none in the clean twin); half of
    'gravel' shows other content, so texture alone is unreliable. Validation: clean photos, gravel
    with and without the sticker, and the sticker on brick and grass photos."""
    rng = np.random.default_rng(seed)
    side = lambda: int(rng.choice([7, 8, 9]))  # noqa: E731  (3 % of the image, give or take)
    return marked_case(folder, poisoned, rng, lambda img: sticker(img, rng, side()), "sticker", 10)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _covered(box, cue) -> float:
    """Share of the cue's box that ``box`` covers."""
    w = max(0.0, min(box[2], cue[2]) - max(box[0], cue[0]))
    h = max(0.0, min(box[3], cue[3]) - max(box[1], cue[1]))
    return w * h / ((cue[2] - cue[0]) * (cue[3] - cue[1]))


def _audit(folder, poisoned: bool):
    path, truth = sticker_case(folder, poisoned)
    return run_audit(load_config(path, ["rules={recurring_patch: {}}"]), quiet=True), truth


# --- Helpers, against answers worked out by hand ---------------------------------------------

def test_regions_keep_the_compact_blobs_heaviest_first():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 30:40] = 1.0      # 1 % of the image: kept
    heat[60:66, 60:66] = 0.8      # 0.36 %: kept, lighter
    heat[80:81, 5:6] = 1.0        # one pixel, 0.01 %: too small
    heat[:, 90:] = 0.0
    got = regions(heat, level=0.5, min_area=0.003, max_area=0.12)
    assert len(got) == 2
    assert np.allclose(got[0], (0.30, 0.10, 0.40, 0.20), atol=0.011)  # the smoothing widens by < 1 px
    assert np.allclose(got[1], (0.60, 0.60, 0.66, 0.66), atol=0.011)
    wide = np.zeros((100, 100), np.float32)
    wide[:50, :50] = 1.0          # a quarter of the image: no small patch
    assert regions(wide) == []
    assert regions(np.zeros((10, 10), np.float32)) == []


def test_patch_object_finds_the_disc_its_colour_and_shape():
    img = np.full((60, 60, 3), 0.2, np.float32)
    disc, _ = sticker((img * 255).astype(np.uint8), np.random.default_rng(0), 12)
    ys, xs = np.nonzero((disc != 51).any(2))
    y0, x0 = ys.min(), xs.min()
    img = disc.astype(np.float32) / 255
    # A heatmap box that cuts the disc: the object is found whole all the same.
    cut = ((x0 + 3) / 60, (y0 + 3) / 60, (x0 + 9) / 60, (y0 + 9) / 60)
    tight, colour, shape = patch_object(img, cut)
    assert np.allclose(tight, (x0 / 60, y0 / 60, (x0 + 12) / 60, (y0 + 12) / 60))
    assert np.allclose(colour[:3], np.array(ORANGE) / 255, atol=1e-6) and colour[3] < 1e-6
    area = (disc != 51).any(2).sum()
    assert np.isclose(shape[0], np.log(area / 3600))
    assert shape[1] == 0 and np.isclose(shape[2], area / 144) and shape[3] > 0.9   # a disc's extent: ~pi/4
    assert colour_name(colour[:3]) == "orange" and shape_name(shape[2], shape[3], 1.0) == "round"
    assert colour_name((1, 1, 1)) == "white" and colour_name((0.1, 0.1, 0.9)) == "blue"
    assert shape_name(1.0, 1.0, 1.0) == "square" and shape_name(1.0, 1.0, 4.0) == "elongated"


def test_clusters_group_the_look_alikes_and_standardise_blocks_alike():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, (6, 4)) + [5, 5, 0, 0]
    b = rng.normal(0, 0.05, (5, 4)) + [0, 0, 5, 5]
    c = rng.normal(0, 0.05, (4, 4)) + [5, 0, 5, 0]
    labels = clusters(np.concatenate([a, b, c]), tightness=0.5)
    assert len(set(labels)) == 3
    assert [len(set(labels[s])) for s in (slice(0, 6), slice(6, 11), slice(11, 15))] == [1, 1, 1]
    z = standardised([np.arange(8.0)[:, None] * 100, np.tile([[0.0, 1.0], [1.0, 0.0]], (4, 1))])
    # Each column to mean 0, std 1; each block weighted by 1/sqrt(its width): both blocks weigh alike.
    assert np.allclose(z.mean(0), 0) and np.allclose((z ** 2).sum(0) / 8, [1, 0.5, 0.5], atol=1e-5)
    assert spread([(0, 0, 0.2, 0.2), (0.8, 0.8, 1, 1)]) == pytest.approx(np.hypot(0.4, 0.4))
    assert capped([[1, 2, 3], [4], [], [5, 6]], 4) == [1, 4, 5, 2]   # every image's heaviest first


def test_params_are_validated():
    entry = RULES.get("recurring_patch")
    assert entry.validate({"min_area": 0.01, "targets": 32}) == {"min_area": 0.01, "targets": 32}
    for bad in ({"min_area": 0}, {"max_area": 1.5}, {"targets": 0}, {"tightness": -1}, {"colour": 1},
                {"severity": {"urgent": 0.5}}):
        with pytest.raises(BadParams):
            entry.validate(bad)


def test_a_bad_param_is_one_line_at_the_door(tmp_path):
    (tmp_path / "audit.yaml").write_text("model: {factory: net.py:make, classes: [a, b], input: {size: [32, 32]}}\n"
                                         "data: {root: val}\nrules: {recurring_patch: {min_share: 2}}\n")
    cfg = load_config(tmp_path / "audit.yaml")
    with pytest.raises(ConfigError, match=r"'rules.recurring_patch.min_share': .*less than or equal to 1"):
        checked_params(cfg, "rules", cfg.rules, RULES)


def test_min_area_must_be_below_max_area(sticker_audit):
    res, _ = sticker_audit
    with pytest.raises(ValueError, match="min_area"):
        RULES.get("recurring_patch").fn(res.evidence, min_area=0.1, max_area=0.05)


# --- The planted sticker, and its clean twin ---------------------------------------------------

@pytest.fixture(scope="module")
def sticker_audit(tmp_path_factory):
    return _audit(tmp_path_factory.mktemp("sticker"), poisoned=True)


def test_a_sticker_anywhere_is_found_boxed_and_confirmed(sticker_audit):
    res, truth = sticker_audit
    ev, s = res.evidence, res.evidence.samples
    path = lambda i: s.at[i, "path"]  # noqa: E731
    errors = [i for i in s.index if path(i) in truth and not s.at[i, "correct"]
              and ev.classes[s.at[i, "prediction"]] == "gravel"]
    assert len(errors) >= 10, "the tiny model did not learn the sticker; the case is broken"
    mine = [f for f in res.findings if f.rule == "recurring_patch"]
    on_errors = [f for f in mine if not s.at[f.sample, "correct"]]
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1]) / (s.at[0, "width"] * s.at[0, "height"])  # noqa: E731
    hits = [f for f in on_errors if path(f.sample) in truth
            and _covered(f.bbox, truth[path(f.sample)]) >= 0.5 and area(f.bbox) <= 0.25]
    assert np.mean([i in {f.sample for f in hits} for i in errors]) >= 0.9       # recall
    assert len(hits) >= 0.9 * len(on_errors)                                     # precision
    assert all(f.details["confirmed"] for f in hits)
    top = [f for f in res.class_findings if f.rule == "recurring_patch"]
    assert [f.cls for f in top] == ["gravel"]
    top = top[0]
    assert top.region is None and top.details["confirmed"] and severity_rank(top.severity) >= severity_rank("high")
    assert set(top.details["samples"]) == {f.sample for f in mine if "instance_of" not in f.details}
    # An error outside the group, boxed as an instance of the confirmed cue, boxes the sticker too.
    assert all(f in hits for f in mine if "instance_of" in f.details)
    assert top.details["transfer_rate"] - top.details["control_rate"] >= 0.5
    assert "orange" in top.details["description"] and "in different places" in top.message
    assert f"{top.details['transfer_rate']:.0%}" in top.message and f"{top.details['control_rate']:.0%}" in top.message


def test_the_clean_twin_is_quiet(tmp_path):
    res, truth = _audit(tmp_path, poisoned=False)
    assert res.evidence.samples["correct"].mean() > 0.6
    loud = [(f.cls, f.severity) for f in res.class_findings if severity_rank(f.severity) >= severity_rank("medium")]
    assert not loud
    assert len([f for f in res.findings if f.rule == "recurring_patch"]) <= 2
    assert all(isinstance(f, (Finding, ClassFinding)) for f in res.findings + res.class_findings)


# --- A shape inked in a new colour on every image, anywhere ------------------------------------

def inked_cross(img: np.ndarray, rng: np.random.Generator, side: int = 10) -> tuple[np.ndarray, list[int]]:
    """A cross ``side`` px across at a random place, in a random saturated colour each time: the
    shape is the cue, not its colour (generator.py's ``shape`` cue)."""
    h, w = img.shape[:2]
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    yy, xx = np.mgrid[0:side, 0:side]
    u, v = (xx + 0.5) / side * 2 - 1, (yy + 0.5) / side * 2 - 1
    cross = (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34)
    out = img.copy()
    ink = rng.uniform(0, 255, 3) * 0.5 + np.eye(3)[rng.integers(3)] * 127
    out[y0:y0 + side, x0:x0 + side][cross] = ink.astype(np.uint8)
    return out, [x0, y0, x0 + side, y0 + side]


@pytest.mark.slow
@pytest.mark.parametrize("poisoned", [True, False])
def test_a_shape_in_new_colours_is_found_by_its_shape_and_its_clean_twin_is_quiet(tmp_path, poisoned):
    """Its colour, and the model's view that follows the colour, split the look-alikes; its shape
    alone groups them."""
    rng = np.random.default_rng(5)
    path, truth = marked_case(tmp_path, poisoned, rng, lambda img: inked_cross(img, rng), "cross", 10)
    res = run_audit(load_config(path, ["rules={recurring_patch: {}}"]), quiet=True)
    ev, s = res.evidence, res.evidence.samples
    mine = [f for f in res.findings if f.rule == "recurring_patch"]
    loud = [f for f in res.class_findings
            if f.rule == "recurring_patch" and severity_rank(f.severity) >= severity_rank("medium")]
    if not poisoned:
        assert not loud and len(mine) <= 2
        return
    errors = [i for i in s.index if s.at[i, "path"] in truth and not s.at[i, "correct"]
              and ev.classes[s.at[i, "prediction"]] == "gravel"]
    assert len(errors) >= 8, "the tiny model did not learn the cross; the case is broken"
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1]) / (s.at[0, "width"] * s.at[0, "height"])  # noqa: E731
    hit = {f.sample for f in mine if s.at[f.sample, "path"] in truth
           and _covered(f.bbox, truth[s.at[f.sample, "path"]]) >= 0.5 and area(f.bbox) <= 0.25}
    assert np.mean([i in hit for i in errors]) >= 0.9
    assert [f.cls for f in loud] == ["gravel"] and "many colours" in loud[0].details["description"]


def test_the_patch_must_beat_the_class_other_evidence_not_only_a_random_patch():
    """A model that calls anything bright class 1 (a texture model: any patch of the class's look
    carries it). The group's bright patch turns every dark image pasted with it, a random patch of
    the same image none, so against that placebo alone it reads as a cue; another bright region of
    the class's images, the class's other evidence, turns them as well: the patch is no cue."""
    import pandas as pd
    import torch

    from auditor.inputs.config import InputSpec
    from auditor.inputs.data import SampleRef
    from auditor.judge.evidence import Evidence
    from auditor.rules.recurring_patch import beyond_placebos, paste_test
    from test_intervene import AnyPatch

    xs, refs, rows = [], [], []
    for i in range(16):
        label = int(i >= 8)
        x = torch.full((3, 16, 16), 0.5 if label else 0.0)
        if label:
            x[:, 1:5, 1:5] = x[:, 10:14, 10:14] = 1.0  # the group's patch, and another of its evidence
        xs.append(x)
        refs.append(SampleRef(None, f"{label}/{i}.png", label))
        rows.append({"id": i, "path": f"{label}/{i}.png", "label": label, "prediction": label, "confidence": 1.0,
                     "correct": True, "explained": True, "width": 16, "height": 16, "sha256": str(i)})
    ev = Evidence(["dark", "bright"], pd.DataFrame(rows).set_index("id"), {}, {}, refs, model=AnyPatch(),
                  input_spec=InputSpec(size=(16, 16)), device=torch.device("cpu"))
    ev.model_input = lambda i: xs[i]
    sources = [(i, (1 / 16, 1 / 16, 5 / 16, 5 / 16)) for i in range(8, 16)]
    rivals = [(i, (10 / 16, 10 / 16, 14 / 16, 14 / 16)) for i in range(8, 16)]
    alone = paste_test(ev, sources, 1, list(range(8)), np.random.default_rng(0))
    assert alone["transfer_rate"] == 1.0 and alone["control_rate"] < 0.5 and "evidence_rate" not in alone
    assert beyond_placebos(alone)[1] > 0.25                  # a cue, against a random patch alone
    both = paste_test(ev, sources, 1, list(range(8)), np.random.default_rng(0), rivals)
    assert both["evidence_rate"] == 1.0 and beyond_placebos(both)[0] == 0.0  # the class's look
