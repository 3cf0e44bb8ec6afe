"""fixed_location: a mark at one fixed place inside the image (not a corner, not an edge) on one
class's training photos. The rule groups that class's heatmaps, names the spot, boxes each error
the mark caused from the image's own heatmap, and the intervention confirms it; the clean-trained
twin stays quiet."""
from __future__ import annotations

import numpy as np
import pytest

import auditor.rules  # noqa: F401  (registers the rules)
from auditor.audit import run_audit
from auditor.inputs.config import load_config
from auditor.judge.evidence import ClassFinding, severity_rank
from auditor.rules.fixed_location import best_window, downsample, spectral_groups, window_mass
from test_rules import marked_case

ORANGE = (255, 140, 0)
SPOT = (9, 22)    # the mark's top-left corner in a 48 px image: left, clear of the edge bands


def disc(img: np.ndarray, rng: np.random.Generator, side: int = 9) -> tuple[np.ndarray, list[int]]:
    """An orange disc ``side`` px across at SPOT, jittered by up to 1 px (a logo printed in place)."""
    x0, y0 = (int(v + rng.integers(-1, 2)) for v in SPOT)
    yy, xx = np.mgrid[0:side, 0:side]
    inside = (yy + 0.5 - side / 2) ** 2 + (xx + 0.5 - side / 2) ** 2 <= (side / 2) ** 2
    out = img.copy()
    out[y0:y0 + side, x0:x0 + side][inside] = ORANGE
    return out, [x0, y0, x0 + side, y0 + side]


def _covered(box, cue) -> float:
    """Share of the cue's box that ``box`` covers."""
    w = max(0.0, min(box[2], cue[2]) - max(box[0], cue[0]))
    h = max(0.0, min(box[3], cue[3]) - max(box[1], cue[1]))
    return w * h / ((cue[2] - cue[0]) * (cue[3] - cue[1]))


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """(poisoned run, its truth, clean twin's run): 'gravel' training photos carry the disc."""
    out = {}
    for poisoned in (True, False):
        folder = tmp_path_factory.mktemp("poisoned" if poisoned else "clean")
        rng = np.random.default_rng(3)
        path, truth = marked_case(folder, poisoned, rng, lambda img: disc(img, rng), "disc", 8)
        out[poisoned] = run_audit(load_config(path, ["rules={fixed_location: {}}"]), quiet=True), truth
    return out[True][0], out[True][1], out[False][0]


# --- Helpers, against answers worked out by hand ---------------------------------------------

def test_downsample_keeps_each_maps_mass():
    maps = np.random.default_rng(0).random((3, 48, 48)).astype(np.float32)
    small = downsample(maps, 16)
    assert small.shape == (3, 16, 16)
    assert np.allclose(small.sum(axis=(1, 2)), maps.sum(axis=(1, 2)), rtol=1e-5)
    assert np.isclose(small[0, 0, 0], maps[0, :3, :3].sum())


def test_best_window_finds_the_spot_and_its_mass():
    m = np.full((16, 16), 0.5 / 256)
    m[5:8, 9:12] += 0.5 / 9            # half of the mass in a 3x3 window at rows 5-7, columns 9-11
    mass, box, area = best_window(m)
    assert box == (9 / 16, 5 / 16, 12 / 16, 8 / 16)
    assert np.isclose(mass, 0.5 + 0.5 * 9 / 256) and np.isclose(area, 9 / 256)
    assert np.isclose(window_mass(m[None], box)[0], mass)


def test_spectral_groups_separate_two_spots():
    rng = np.random.default_rng(0)
    a, b = np.zeros((12, 16, 16)), np.zeros((12, 16, 16))
    a[:, 2:4, 2:4], b[:, 10:12, 10:12] = 1.0, 1.0
    x = np.concatenate([a, b]).reshape(24, -1) + rng.random((24, 256)) * 0.05
    labels, groups = spectral_groups(x)
    assert groups == 2
    assert len(set(labels[:12])) == 1 and len(set(labels[12:])) == 1 and labels[0] != labels[12]


# --- The planted case ------------------------------------------------------------------------

@pytest.mark.slow
def test_errors_the_mark_caused_are_boxed_and_confirmed(audits):
    res, truth, _ = audits
    s = res.evidence.samples
    every = [f for f in res.findings if f.rule == "fixed_location"]
    assert all(f.bbox is not None for f in every)
    # An error on a 'gravel' photo the model called something else is flagged where gravel's mark
    # belongs (an absence of the confirmed cue); the others are the errors the mark caused.
    lacking = [f for f in every if f.details.get("absence")]
    assert all(not s.at[f.sample, "correct"] and res.evidence.classes[s.at[f.sample, "label"]] == "gravel"
               for f in lacking)
    mine = [f for f in every if not f.details.get("absence")]
    # The errors: marked brick and grass photos the model calls 'gravel'.
    driven = [i for i in s.index if s.at[i, "path"] in truth and s.at[i, "path"].split("/")[0] != "gravel"
              and res.evidence.classes[s.at[i, "prediction"]] == "gravel"]
    assert len(driven) >= 4
    boxed = {f.sample: f for f in mine}
    hits = [i for i in driven if i in boxed and _covered(boxed[i].bbox, truth[s.at[i, "path"]]) >= 0.5
            and (boxed[i].bbox[2] - boxed[i].bbox[0]) * (boxed[i].bbox[3] - boxed[i].bbox[1]) <= 0.25 * 48 * 48]
    assert len(hits) >= 0.8 * len(driven)
    # Every other image finding is an error the model made, boxed on the mark.
    assert all(not s.at[f.sample, "correct"] and f.sample in driven for f in mine)
    assert sum(bool(f.details.get("confirmed")) for f in mine) >= 0.5 * len(mine)
    cf = [f for f in res.class_findings if f.rule == "fixed_location"]
    assert cf and cf[0].cls == "gravel" and severity_rank(cf[0].severity) >= severity_rank("high")
    assert isinstance(cf[0], ClassFinding) and cf[0].region is not None
    assert _covered([v * 48 for v in cf[0].region], truth[s.at[driven[0], "path"]]) >= 0.5
    assert sorted(cf[0].details["samples"]) == sorted(boxed)
    assert all(s.at[i, "path"] in truth for i in boxed)   # only marked images
    assert cf[0].details["region"] == "left"


@pytest.mark.slow
def test_clean_twin_stays_quiet(audits):
    clean = audits[2]
    assert not [f for f in clean.findings if f.rule == "fixed_location"
                and severity_rank(f.severity) >= severity_rank("medium")]
    assert not [f for f in clean.class_findings if f.rule == "fixed_location"
                and severity_rank(f.severity) >= severity_rank("medium")]
