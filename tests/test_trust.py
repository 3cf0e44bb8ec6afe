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
from auditor.judge.trust import cascade_steps, decisive_step, judge_cascade, trust_gate

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
    assert len(steps) == 11 and steps[0] == "24" and steps[-1] == "0"  # linear head first, first conv last
    gbp = out["guided_backprop"]
    assert not gbp["reliable"]
    assert gbp["reason"].startswith("its heatmaps barely change when the top half of the model is randomised")
    assert f"after {gbp['decisive_step'] + 1} of 11 steps" in gbp["reason"]
    # the old rule (judged at the end of the cascade) would have trusted it
    assert judge_cascade(gbp["randomisation_spearman"], None, TrustSpec(decide_at=1.0))["randomisation_reason"] == ""
    for m in ("saliency", "integrated_gradients", "gradcam"):
        assert out[m]["reliable"], (m, out[m]["reason"], out[m]["randomisation_spearman"])
        assert out[m]["first_below"] is not None and out[m]["first_below"] <= out[m]["decisive_step"]


def test_result_keys_stay_backward_compatible(trained):
    t = trained["saliency"]
    old = {"reliable", "reason", "randomisation_spearman", "deletion_auc", "random_deletion_auc", "images"}
    new = {"randomisation_steps", "randomisation_ssim", "decisive_step", "first_below", "max_spearman", "max_ssim"}
    assert old | new <= set(t)
    n = len(t["randomisation_spearman"])
    assert all(isinstance(v, float) for v in t["randomisation_spearman"])
    assert len(t["randomisation_steps"]) == len(t["randomisation_ssim"]) == n and 0 <= t["decisive_step"] < n
    assert t["max_spearman"] == TrustSpec().max_spearman and t["images"] == 12


def test_cascade_chart_writes_a_png(trained, tmp_path):
    from auditor.outputs.charts import cascade_chart
    path = cascade_chart(trained, tmp_path / "cascade.png")
    assert path == tmp_path / "cascade.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        w, h = im.size
    assert 600 <= w <= 800 and 300 <= h <= 420   # about 120 x 60 mm at 150 dpi
    assert cascade_chart({"x": {"reliable": False, "reason": "could not be tested"}}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
