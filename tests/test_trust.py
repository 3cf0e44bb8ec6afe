"""The trust gate's cascading randomisation test: the decision rule on hand-made curves, the
cascade's steps, a trained deep ReLU network (guided backprop fails, saliency, Integrated
Gradients and Grad-CAM pass), and the cascade chart."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import auditor.explain.methods  # noqa: F401  (registers the methods)
from auditor.demo import synth
from auditor.inputs.config import InputSpec, TrustSpec
from auditor.inputs.data import SampleRef
from auditor.judge.evidence import Evidence
from auditor.judge.trust import _heat, cascade_steps, decisive_step, judge_cascade, trust_gate

# --- the decision rule ---------------------------------------------------------------------------


def test_decisive_step_is_the_top_share_rounded_up():
    assert decisive_step(19, 0.5) == 9       # 10 of 19 steps randomised
    assert decisive_step(10, 0.5) == 4       # 5 of 10
    assert decisive_step(5, 0.5) == 2        # 3 of 5
    assert decisive_step(19, 1.0) == 18      # the whole model: the old rule
    assert decisive_step(4, 0.01) == 0       # at least one step
    assert decisive_step(1, 0.5) == 0


def test_a_method_fails_when_its_maps_stay_similar_halfway_even_if_the_end_is_low():
    spec = TrustSpec(max_spearman=0.5)
    gbp = [0.9, 0.86, 0.8, 0.75, 0.7, 0.68, 0.6, 0.45, 0.31, 0.16]  # low only at the end
    v = judge_cascade(gbp, None, spec)
    assert v["decisive_step"] == 4 and v["first_below"] == 7 and v["max_spearman"] == 0.5
    assert v["randomisation_reason"] == ("its heatmaps barely change when the top half of the model is randomised "
                                         "(rank correlation 0.70 after 5 of 10 steps; at most 0.50 allowed)")
    sal = [0.6, 0.28, 0.25, 0.22, 0.21, 0.15, 0.1, 0.08, 0.07, 0.09]
    v = judge_cascade(sal, None, spec)
    assert v["randomisation_reason"] == "" and v["first_below"] == 1
    # a curve that dips only after the decisive step: still similar when it is judged
    assert judge_cascade([0.9] * 6 + [0.1] * 4, None, spec)["randomisation_reason"]
    # the whole-model setting is the old rule: judged at the end
    assert judge_cascade(gbp, None, TrustSpec(max_spearman=0.5, decide_at=1.0))["randomisation_reason"] == ""


def test_ssim_counts_only_when_configured():
    rho, sim = [0.3] * 4, [0.9] * 4
    assert judge_cascade(rho, sim, TrustSpec())["randomisation_reason"] == ""
    v = judge_cascade(rho, sim, TrustSpec(max_ssim=0.5))
    assert "structural similarity 0.90" in v["randomisation_reason"] and v["first_below"] is None
    assert judge_cascade([], None, TrustSpec())["decisive_step"] is None


# --- the cascade's steps ---------------------------------------------------------------------------

class Res(nn.Module):
    """Defined out of data-flow order on purpose: fc first, stem last."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        a = self.stem(x)
        return self.fc(torch.relu(a + self.block(a)).mean((2, 3)))


def test_cascade_follows_the_data_flow_and_folds_batchnorm_into_its_convolution():
    x = torch.zeros(1, 3, 8, 8)
    steps = [s.label for s in cascade_steps(Res().eval(), x)]
    assert steps == ["fc", "block.3+block.4", "block.0+block.1", "stem.0+stem.1"]
    assert [s.label for s in cascade_steps(Res().eval(), x, "blocks", max_steps=3)] == ["fc", "block", "stem"]
    assert len(cascade_steps(Res().eval(), x, "modules")) == 7


def test_the_cascade_randomises_in_place_as_a_copy_would_and_puts_the_model_back():
    """Oracle: a deep copy randomised and recalibrated step by step with the same generator."""
    import copy
    from auditor.judge.trust import _norms, _recalibrate, cascade, randomise_
    model, x = Res().eval(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for m in model.modules():  # trained-looking BatchNorm statistics, so a reset would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.num_batches_tracked.fill_(7)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    steps = cascade_steps(model, x)
    twin, gen, norms = copy.deepcopy(model), torch.Generator().manual_seed(3), []
    with cascade(model, x, steps, seed=3) as randomised:
        for step, rand in randomised:
            randomise_(twin, step, gen)
            norms += _norms(twin, step)
            if norms:
                _recalibrate(twin, norms, x)
            assert rand is model
            for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
                assert torch.equal(a, b), (step.label, k)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert not model.training and all(not m.training for m in model.modules())
    with pytest.raises(RuntimeError, match="stop"), cascade(model, x, steps, seed=3) as randomised:
        next(randomised)
        next(randomised)
        raise RuntimeError("stop")  # an error half-way: the model is put back all the same
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


# --- a trained deep ReLU network -------------------------------------------------------------------

CLASSES = ("box", "noise", "brick", "grass", "gravel")
SIZE = 32


def _image(cls: str, rng) -> np.ndarray:
    if cls == "box":
        img = synth.white_rectangle(synth.noise_image(64, rng), rng)[0]
    elif cls == "noise":
        img = synth.noise_image(64, rng)
    else:
        img = synth.texture_crop(cls, 64, rng)
    return np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR))


def _data(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    x = np.stack([_image(c, rng) for c in CLASSES for _ in range(n_per_class)])
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    order = np.random.default_rng(seed + 1).permutation(len(y))
    return x[order], y[order]


def deep_relu_net(width: int = 12, seed: int = 0) -> nn.Sequential:
    """Ten 3x3 convolutions with ReLUs (two max pools), global max, linear: 11 cascade steps. The global
    max (as in the demo's net) keeps Grad-CAM's map sharp enough for the deletion test at 32 px."""
    torch.manual_seed(seed)
    layers, c = [], 3
    for k, w in enumerate([width] * 3 + [2 * width] * 3 + [4 * width] * 4):
        conv = nn.Conv2d(c, w, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # a plain deep ReLU net trains from here
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()] + ([nn.MaxPool2d(2)] if k in (2, 5) else [])
        c = w
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, len(CLASSES)))


def gate_on_deep_net(folder, n_per_class: int = 200, epochs: int = 3, images: int = 12, spec=None,
                     seed: int = 0) -> dict:
    """Train the deep ReLU net a few seconds, write validation PNGs to ``folder`` and run the gate."""
    mean, std = [0.5] * 3, [0.25] * 3
    x, y = _data(n_per_class, seed=seed)
    model = synth.train_classifier(deep_relu_net(seed=seed), x, y, (SIZE, SIZE), mean, std, epochs=epochs, seed=seed,
                                   lr=1e-3)
    xv, yv = _data(8, seed=5)
    refs = []
    for i, (img, label) in enumerate(zip(xv, yv)):
        Image.fromarray(img).save(folder / f"{i}.png")
        refs.append(SampleRef(path=folder / f"{i}.png", rel=f"{i}.png", label=int(label)))
    ev = Evidence(classes=list(CLASSES), samples=pd.DataFrame(), heatmaps={}, contrast={}, refs=refs, model=model,
                  input_spec=InputSpec(size=(SIZE, SIZE), channels=3, mean=mean, std=std), device=torch.device("cpu"))
    with torch.no_grad():
        pred = model(ev.model_inputs(range(len(refs)))).argmax(1).numpy()
    ev.samples = pd.DataFrame({"label": yv, "prediction": pred, "correct": pred == yv, "explained": True})
    assert ev.samples["correct"].mean() > 0.6, ev.samples["correct"].mean()  # it learned the task (chance: 0.2)
    layer = [m for m in model if isinstance(m, nn.Conv2d)][-1]
    methods = {m: {} for m in ("guided_backprop", "saliency", "integrated_gradients", "gradcam")}
    return trust_gate(ev, methods, layer, spec or TrustSpec(images=images), seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return gate_on_deep_net(tmp_path_factory.mktemp("val"))


def test_guided_backprop_fails_and_the_others_pass_on_a_deep_relu_net(trained):
    out = trained
    steps = out["saliency"]["randomisation_steps"]
    # 11 layers grouped into 8 steps (trust.cascade_steps): linear head first, the first convolutions last
    assert len(steps) == 8 and steps[0] == "24" and steps[-1] == "0 to 2"
    gbp = out["guided_backprop"]
    assert not gbp["reliable"] and gbp["randomisation"] == "failed"
    assert gbp["reason"].startswith("its heatmaps barely change when the top half of the model is randomised")
    assert f"after {gbp['decisive_step'] + 1} of 8 steps" in gbp["reason"]
    assert gbp["randomisation_ci"][0] > TrustSpec().max_spearman  # failed on evidence: the whole interval above
    for m in ("saliency", "integrated_gradients", "gradcam"):
        assert out[m]["reliable"], (m, out[m]["reason"], out[m]["randomisation_spearman"])
        assert out[m]["first_below"] is not None and out[m]["first_below"] <= out[m]["decisive_step"]
        # On 12 images a method's deletion interval can reach below 0 (inconclusive): kept either way.
        assert out[m]["deletion"] in ("passed", "inconclusive") and out[m]["deletion_benefit"] > 0, out[m]
    # The cascade stops at the decisive step: the steps below it cannot change the decision.
    assert len(gbp["randomisation_spearman"]) == gbp["decisive_step"] + 1 == 4


def test_result_keys_stay_backward_compatible(trained):
    t = trained["saliency"]
    old = {"reliable", "reason", "randomisation_spearman", "deletion_auc", "random_deletion_auc", "images"}
    new = {"randomisation_steps", "randomisation_ssim", "decisive_step", "first_below", "max_spearman", "max_ssim",
           "note", "randomisation", "randomisation_ci", "fill", "fill_check", "deletion", "deletion_benefit",
           "deletion_ci", "deletion_effect", "cascade_images", "seconds"}
    assert old | new <= set(t)
    n = len(t["randomisation_spearman"])
    # Explained after the decisive step only (trust.curve false): the steps above it are None.
    assert isinstance(t["randomisation_spearman"][-1], float) and set(t["randomisation_spearman"][:-1]) == {None}
    assert len(t["randomisation_ssim"]) == n <= len(t["randomisation_steps"]) and 0 <= t["decisive_step"] < n
    assert t["max_spearman"] == TrustSpec().max_spearman and t["images"] == 12 and t["cascade_images"] == 8
    assert set(t["fill_check"]) == {"road", "blur", "mean", "zero"} and t["fill"] in t["fill_check"]


def test_the_decisive_step_alone_gives_the_curves_value_there():
    """trust.curve false explains the cascade images after the decisive step only: the model there
    (BatchNorms recalibrated once, not after every step) and so every image's similarity are those
    of the full curve's decisive step."""
    from auditor.judge.trust import randomisation
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model.train()(x)  # running statistics that are not the defaults
    model.eval()
    target = model(x).argmax(1)
    methods = {"saliency": {}, "gradcam": {}}
    heats = {m: _heat(m, {}, model, model[6], x, target, 0) for m in methods}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {c: randomisation(methods, model, model[6], x, target, 0, heats, TrustSpec(curve=c)) for c in (False, True)}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # put back either way
    for m in methods:
        (short, rho_s, _), (full, rho_f, _) = runs[False][m], runs[True][m]
        d = len(full["randomisation_spearman"]) - 1
        assert d == len(short["randomisation_spearman"]) - 1 == decisive_step(len(full["randomisation_steps"]), 0.5)
        assert all(isinstance(v, float) for v in full["randomisation_spearman"]) and d >= 1
        assert short["randomisation_spearman"][:d] == [None] * d and rho_s[:d] == [None] * d
        assert short["randomisation_spearman"][d] == full["randomisation_spearman"][d], m
        np.testing.assert_array_equal(rho_s[d], rho_f[d])


def test_cascade_chart_writes_a_png(trained, tmp_path):
    from auditor.outputs.charts import cascade_chart
    path = cascade_chart(trained, tmp_path / "cascade.png")
    assert path == tmp_path / "cascade.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        w, h = im.size
    assert 600 <= w <= 800 and 300 <= h <= 420   # about 120 x 60 mm at 150 dpi
    assert cascade_chart({"x": {"reliable": False, "reason": "could not be tested"}}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# --- removal that creates no new signal --------------------------------------------------------------

def test_linear_imputation_reproduces_a_plane_and_fills_an_empty_image_with_its_mean():
    """Oracle: a weighted mean of symmetric neighbours reproduces any linear image exactly."""
    from auditor.judge.trust import _impute, road_impute
    r, c = np.mgrid[0:24, 0:20].astype(np.float64)
    img = np.stack([0.3 * r - 0.2 * c + 1, 0.05 * c])
    removed = np.zeros((24, 20), bool)
    removed[5:15, 3:12] = True  # inside: at the border a one-sided mean flattens the plane (as it should)
    np.testing.assert_allclose(_impute(img, removed), img, atol=2e-2)
    assert np.allclose(_impute(img, np.ones_like(removed)), img.mean((1, 2))[:, None, None])
    # The noisy version: small noise on the removed pixels only; a large image solved on a coarse grid.
    out = road_impute(img, removed, np.random.default_rng(0))
    assert np.array_equal(out[:, ~removed], img[:, ~removed]) and 0 < np.abs(out - img)[:, removed].max() < 0.2
    r, c = np.mgrid[0:200, 0:150].astype(np.float64)
    big = (0.01 * r + 0.02 * c)[None]
    hole = np.zeros((200, 150), bool)
    hole[60:140, 40:110] = True
    assert np.abs(road_impute(big, hole, np.random.default_rng(0), noise=0) - big).max() < 0.05


def test_deletion_verdicts_fail_only_on_evidence():
    from auditor.judge.trust import judge_deletion
    spec, rng = TrustSpec(), np.random.default_rng(0)
    start = np.full(16, 0.9)
    rand = rng.uniform(0.4, 0.6, 16)
    good = judge_deletion(rand - 0.2, rand, start, spec, 0)
    assert good["deletion"] == "passed" and good["deletion_ci"][0] > 0
    same = judge_deletion(rand, rand, start, spec, 0)  # the random order itself (a constant map)
    assert same["deletion"] == "failed" and same["deletion_ci"] == [0.0, 0.0]
    assert same["deletion_reason"].startswith("removing the pixels it marks hurts the prediction no more than")
    noisy = judge_deletion(rand + rng.normal(0, 0.3, 16).clip(-0.4, 0.3), rand, start, spec, 0)
    assert noisy["deletion"] == "inconclusive" and noisy["deletion_note"].startswith("deletion inconclusive")
    flat = judge_deletion(np.full(16, 0.89), np.full(16, 0.9), start, spec, 0)  # removal changes nothing
    assert flat["deletion"] == "inconclusive" and "barely changes the prediction" in flat["deletion_note"]


def test_randomisation_fails_only_when_the_interval_is_above_the_threshold():
    spec = TrustSpec(max_spearman=0.6)
    rho = [0.9, 0.8, 0.7, 0.65]
    tight = [np.full(8, v) + np.linspace(-0.02, 0.02, 8) for v in rho]
    wide = [np.full(8, v) + np.linspace(-0.4, 0.4, 8) for v in rho]
    assert judge_cascade(rho, None, spec, 8, tight)["randomisation"] == "failed"
    v = judge_cascade(rho, None, spec, 8, wide)
    assert v["randomisation"] == "inconclusive" and v["randomisation_reason"] == ""
    assert v["randomisation_ci"][0] < 0.6 < v["randomisation_ci"][1] and "inconclusive" in v["randomisation_note"]


# --- un-normalised inputs, black-background data, wrong methods, the fallback -----------------------

def _small_cnn(classes: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def _evidence(model, images, labels, folder, classes, spec: InputSpec) -> Evidence:
    refs = []
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(folder / f"{i}.png")
        refs.append(SampleRef(path=folder / f"{i}.png", rel=f"{i}.png", label=int(label)))
    ev = Evidence(classes=list(classes), samples=pd.DataFrame(), heatmaps={}, contrast={}, refs=refs, model=model,
                  input_spec=spec, device=torch.device("cpu"))
    with torch.no_grad():
        pred = model(ev.model_inputs(range(len(refs)))).argmax(1).numpy()
    ev.samples = pd.DataFrame({"label": labels, "prediction": pred, "correct": pred == labels, "explained": True})
    return ev


def _holes(n: int, seed: int):
    """Bright smooth textures; class 1 has a black 8-px square somewhere (un-normalised: black is 0)."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    x, y = [], np.arange(n) % 2
    for k in range(n):
        img = gaussian_filter(rng.uniform(0, 1, (32, 32, 3)), (3, 3, 0))
        img = 110 + 145 * (img - img.min()) / np.ptp(img)
        if y[k]:
            r, c = rng.integers(0, 24, 2)
            img[r:r + 8, c:c + 8] = 0
        x.append(img.astype(np.uint8))
    return np.stack(x), y


@pytest.fixture(scope="module")
def holes(tmp_path_factory):
    """A model trained on un-normalised inputs (mean 0, std 1) where a black hole means class 1."""
    x, y = _holes(400, 0)
    spec = InputSpec(size=(32, 32), channels=3, mean=[0.0] * 3, std=[1.0] * 3)
    model = synth.train_classifier(_small_cnn(2), x, y, (32, 32), spec.mean, spec.std, epochs=4, seed=0)
    xv, yv = _holes(24, 1)
    ev = _evidence(model, xv, yv, tmp_path_factory.mktemp("holes"), ("bright", "hole"), spec)
    assert ev.samples["correct"].mean() > 0.9
    return ev, model


def test_a_zero_fill_that_flips_the_model_is_not_chosen_and_the_method_stays_reliable(holes):
    ev, model = holes
    out = trust_gate(ev, {"gradcam": {}, "saliency": {}}, model[5], TrustSpec(images=12), seed=0)
    check = out["gradcam"]["fill_check"]
    assert check["zero"]["flip_rate"] >= 0.3, check  # random black blobs alone turn "bright" into "hole"
    assert out["gradcam"]["fill"] != "zero" and check[out["gradcam"]["fill"]]["flip_rate"] < 0.1, check
    assert out["gradcam"]["reliable"], out["gradcam"]
    assert out["saliency"]["reliable"], out["saliency"]
    # With the zero fill forced, random removal alone wrecks the predictions (what silenced the old gate).
    forced = trust_gate(ev, {"gradcam": {}}, model[5], TrustSpec(images=12, fill="zero"), seed=0)["gradcam"]
    assert forced["fill"] == "zero" and set(forced["fill_check"]) == {"zero"} and forced["reliable"]
    assert forced["deletion"] == "inconclusive" and "flips" in forced["note"]


def test_the_fill_race_drops_only_a_clear_signal_and_chooses_as_the_full_check(holes):
    """On images of "bright" only, the zero fill (black blobs) turns every one into "hole": clearly
    worse on the 8 early images, it is not tried on the rest; the others are, and the choice is the
    full check's, with the same numbers. Without early images the check is the full one."""
    from auditor.judge.trust import choose_fill, random_blobs
    ev, model = holes
    ids = [int(i) for i in ev.samples.index[(ev.samples["prediction"] == 0).to_numpy()]][:12]
    x = ev.model_inputs(ids)
    target = torch.zeros(len(ids), dtype=torch.long)
    field = random_blobs(len(ids), 32, 32, 0)
    full_fill, full = choose_fill(model, x, target, field, 0.3, 0, first=None)
    fill, raced = choose_fill(model, x, target, field, 0.3, 0, first=list(range(8)))
    assert full["zero"]["flip_rate"] == 1.0 and all("images" not in v for v in full.values())
    assert fill == full_fill != "zero" and raced["zero"]["images"] == 8 and raced["zero"]["flip_rate"] == 1.0
    for f in ("road", "blur", "mean"):
        assert raced[f] == full[f] | {"images": 12}, f  # not clearly worse on 8 images: tried on all 12


@pytest.fixture
def wrong_methods():
    """Two methods that are wrong whatever the model: a constant map, and the input's edges."""
    from auditor.registry import METHODS

    @METHODS.register("constant_test_only", title="Constant", glossary="A broken method for tests.")
    def constant(model, x, target):
        """The same value everywhere (test only)."""
        return torch.ones(x.shape[0], *x.shape[2:])

    from test_rules import sobel_edges
    METHODS.register("edges_test_only2", title="Edges", glossary="A broken method for tests.")(sobel_edges)

    yield "constant_test_only", "edges_test_only2"
    METHODS._entries.pop("constant_test_only")
    METHODS._entries.pop("edges_test_only2")


def test_methods_that_are_truly_wrong_are_dropped(holes, wrong_methods):
    ev, model = holes
    constant, edges = wrong_methods
    out = trust_gate(ev, {constant: {}, edges: {}, "gradcam": {}}, model[5], TrustSpec(images=12), seed=0)
    assert not out[constant]["reliable"] and out[constant]["deletion"] == "failed", out[constant]
    assert not out[edges]["reliable"] and out[edges]["randomisation"] == "failed", out[edges]
    assert out["gradcam"]["reliable"]


def test_deletion_stops_early_only_where_the_cascade_images_already_decide(holes, wrong_methods):
    """A known-good method (Grad-CAM) and a known-broken one (a constant map): the verdicts with
    the early look are those on all the images, each decided on the 8 cascade images or on all 16
    (where the 99.5% t interval or the effect's does not yet decide; decided_early's own test)."""
    ev, model = holes
    constant, _ = wrong_methods
    methods = {constant: {}, "gradcam": {}}
    early = trust_gate(ev, methods, model[5], TrustSpec(images=16), seed=0)
    full = trust_gate(ev, methods, model[5], TrustSpec(images=16, early_stop=False), seed=0)
    for m in methods:
        assert early[m]["deletion"] == full[m]["deletion"] and early[m]["reliable"] == full[m]["reliable"], m
        assert early[m]["deletion_images"] in (8, 16) and full[m]["deletion_images"] == 16
        assert early[m]["randomisation_spearman"] == full[m]["randomisation_spearman"]  # the cascade is untouched
    assert early["gradcam"]["deletion"] == "passed" and early[constant]["deletion"] == "failed"
    assert early[constant]["deletion_ci"] == [0.0, 0.0]  # its order is the random one: no benefit on any image
    assert set(early["gradcam"]["timing"]) >= {"maps", "deletion", "cascade", "clean", "fill_check", "random_order",
                                               "cascade_models"}


def test_an_undecided_early_look_goes_on_to_every_image():
    """Only passed or failed stops the test at the early look (or a fill that decides it anyway)."""
    from auditor.judge.trust import EARLY_LEVEL, Removal, deletion_test
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(12, dtype=torch.long)
    field = np.random.default_rng(0).standard_normal((12, 256))
    heats = {"noise": np.random.default_rng(1).uniform(0, 1, (12, 16, 16))}  # no better than random
    with torch.no_grad():
        clean = model(x).softmax(1)[:, 0].numpy()
    spec = TrustSpec(images=12)
    out = deletion_test(model, x, target, clean, Removal("mean", x, 0), field, heats, spec, 0, 0.0,
                        first=list(range(6)))
    # Removal barely moves this untrained model: inconclusive at the early look, so on to all 12 images.
    assert out["noise"]["deletion"] == "inconclusive" and out["noise"]["deletion_images"] == 12, out
    assert "barely changes the prediction" in out["noise"]["deletion_note"] and EARLY_LEVEL > 0.95
    # The batched curves of a subset of images are those of the whole batch's rows.
    from auditor.judge.trust import deletion_curves, relevance_order
    removal, order = Removal("mean", x, 0), relevance_order(heats["noise"], field)
    with torch.no_grad():
        gone = model(removal(np.ones((12, 16, 16), bool))).softmax(1)[:, 0].numpy()
    whole = deletion_curves(model, x, target, {"o": order}, removal, 4, (clean, gone))["o"]
    rows = np.array([2, 7, 11])
    part = deletion_curves(model, x, target, {"o": order[rows]}, removal, 4, (clean[rows], gone[rows]), rows)["o"]
    np.testing.assert_allclose(part, whole[rows], rtol=1e-5, atol=1e-6)


def test_a_method_that_raises_is_untestable_and_the_others_are_judged(holes):
    from auditor.registry import METHODS
    ev, model = holes

    @METHODS.register("raises_test_only", title="Raises", glossary="A broken method for tests.")
    def raises(model, x, target):
        """Always raises (test only)."""
        raise RuntimeError("no maps today")
    try:
        out = trust_gate(ev, {"raises_test_only": {}, "gradcam": {}}, model[5], TrustSpec(images=8), seed=0)
        alone = trust_gate(ev, {"raises_test_only": {}}, model[5], TrustSpec(images=8), seed=0)
    finally:
        METHODS._entries.pop("raises_test_only")
    assert list(out) == ["raises_test_only", "gradcam"] and out["gradcam"]["reliable"]
    for t in (out["raises_test_only"], alone["raises_test_only"]):
        assert t["untestable"] and not t["reliable"] and "no maps today" in t["reason"]


def test_the_fallback_is_bounded_on_large_inputs():
    from auditor.judge.trust import fallback_params
    from auditor.explain.methods.perturbation import _n_windows
    assert fallback_params("occlusion", (64, 64)) == {}
    big = fallback_params("occlusion", (224, 224))
    assert big == {"stride": 1.0} and _n_windows((224, 224), 0.125, big["stride"]) == 64


def _digits(n_per_class: int, seed: int):
    """sklearn's handwritten digits 0, 1 and 7, white on black, 32 px."""
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng(seed)
    x, y = [], []
    for k, digit in enumerate((0, 1, 7)):
        pool = np.flatnonzero(d.target == digit)
        for i in rng.choice(pool, n_per_class, replace=False):
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
            x.append(np.repeat(np.asarray(img)[..., None], 3, 2))
            y.append(k)
    return np.stack(x), np.array(y)


def test_white_digits_on_black_keep_their_methods(tmp_path):
    """Black is the background and the input zero: deletion cannot silence the methods any more."""
    x, y = _digits(60, 0)
    spec = InputSpec(size=(32, 32), channels=3, mean=[0.0] * 3, std=[1.0] * 3)
    model = synth.train_classifier(_small_cnn(3), x, y, (32, 32), spec.mean, spec.std, epochs=6, seed=0)
    xv, yv = _digits(8, 1)
    ev = _evidence(model, xv, yv, tmp_path, ("zero", "one", "seven"), spec)
    assert ev.samples["correct"].mean() > 0.8
    out = trust_gate(ev, {"gradcam": {}, "saliency": {}}, model[5], TrustSpec(images=12), seed=0)
    for m, t in out.items():
        assert t["reliable"] and t["fill"] != "zero", (m, t["reason"], t["fill_check"])
        assert t["deletion"] in ("passed", "inconclusive") and t["randomisation"] in ("passed", "inconclusive")
    # The old fill (black: the background, and the input's zero) flips the predictions by itself: inconclusive.
    out = trust_gate(ev, {"gradcam": {}, "saliency": {}}, model[5], TrustSpec(images=12, fill="zero"), seed=0)
    for m, t in out.items():
        assert t["reliable"] and t["deletion"] == "inconclusive", (m, t["reason"], t["fill_check"])
        assert t["note"].startswith("deletion inconclusive: removing random blobs alone")


def test_when_every_method_fails_the_rules_read_occlusion(project, wrong_methods):
    from auditor.audit import run_audit
    from auditor.inputs.config import load_config
    _, edges = wrong_methods
    project.cfg["explain"]["methods"] = [edges]
    project.cfg["trust"] = {"enabled": True, "images": 6}
    project.write()
    res = run_audit(load_config(project.path), quiet=True)
    trust, cov = res.record.run["trust"], res.record.coverage
    assert not trust[edges]["reliable"] and cov.methods[edges].state == "unreliable"
    assert trust["occlusion"]["fallback"] and trust["occlusion"]["reliable"]
    assert cov.methods["occlusion"].state == "ran" and cov.methods["occlusion"].examined == 12
    assert cov.methods["occlusion"].reason.startswith("fallback: no configured explanation method passed")
    assert res.evidence.methods == ["occlusion"] and len(res.evidence.heatmaps["occlusion"]) == 12
    assert cov.rules["corner_border"].state == "ran"
    assert any("the rules read occlusion's heatmaps instead" in w for w in res.record.warnings)
    # Switched off: no evidence, as before.
    project.cfg["trust"]["fallback"] = None
    project.write()
    res = run_audit(load_config(project.path), quiet=True)
    assert "occlusion" not in res.record.coverage.methods and res.record.coverage.rules["corner_border"].state == "no_evidence"


def test_the_early_looks_t_interval_covers_the_mean_as_it_says():
    """On 8 values the percentile bootstrap's nominal 99.5% interval misses the mean far more than
    0.5% of the time; Student's t keeps its word (an exact oracle for normal values)."""
    from auditor.judge.trust import mean_ci
    rng = np.random.default_rng(0)
    misses = {s: np.mean([not (lo <= 0 <= hi) for lo, hi in (mean_ci(rng.normal(0, 1, 8), k, 0.995, s)
                                                                 for k in range(400))]) for s in (False, True)}
    assert misses[True] <= 0.02 < misses[False]


def test_an_early_pass_below_min_benefit_waits_for_every_image():
    """Seen on a random-init ResNet-50: a benefit in (0, min_benefit) passed on 8 images at 99.5%
    and failed on all 12 at 95% (failing is read first), so such a pass must not stop the test."""
    from auditor.judge.trust import EARLY_LEVEL, decided_early, judge_deletion
    spec, rng = TrustSpec(), np.random.default_rng(0)
    start, rand = np.full(8, 0.5), rng.uniform(0.4, 0.45, 8)
    small = judge_deletion(rand - np.linspace(0.002, 0.04, 8), rand, start, spec, 0, level=EARLY_LEVEL, student=True)
    assert small["deletion"] == "passed" and 0 < small["deletion_ci"][0] < spec.min_benefit
    assert not decided_early(small, spec, 0.0)
    big = judge_deletion(rand - 0.2, rand, start, spec, 0, level=EARLY_LEVEL, student=True)
    assert big["deletion"] == "passed" and decided_early(big, spec, 0.0)
    assert not decided_early(big, spec, 0.0, effect_lo=spec.min_effect / 2)  # the effect may yet fall under min_effect
    same = judge_deletion(rand, rand, start, spec, 0, level=EARLY_LEVEL, student=True)
    assert same["deletion"] == "failed" and decided_early(same, spec, 0.0)
    assert decided_early({"deletion": "inconclusive", "deletion_ci": [-1, 1]}, spec, spec.max_fill_flips + 0.1)
