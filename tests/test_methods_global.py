"""CAM against its hand computation and Grad-CAM, the heads it refuses and why; Layer Gradient SHAP
against Captum's LayerGradientShap given the same draws, and against an exact oracle; LIME and
KernelSHAP on quickshift segments. (The registry-wide contract tests in test_methods.py cover
these methods too.)"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor.explain.methods import METHODS
from auditor.explain.methods._common import image_generators, pos_sum, upsample
from auditor.explain.methods.class_map import NEEDS, no_gap_head
from auditor.explain.methods.layer_shap import attributions, draws
from auditor.registry import BadParams

# ------------------------------------------------------------------------------------------ models


def features(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())


class GapNet(nn.Module):
    """features -> ``pool`` -> Flatten -> Linear; ``pool`` None: a functional mean."""

    def __init__(self, pool: nn.Module | None = None, seed: int = 0, relu_last: bool = True):
        super().__init__()
        self.features = features(seed)
        if not relu_last:
            self.features = self.features[:-1]
        self.pool, self.flatten, self.fc = pool, nn.Flatten(), nn.Linear(8, 4)
        with torch.no_grad():
            self.features[1].running_mean.uniform_(-0.2, 0.2), self.features[1].running_var.uniform_(0.5, 2)

    def forward(self, x):
        a = self.features(x)
        return self.fc(self.flatten(self.pool(a)) if self.pool is not None else a.mean((2, 3)))


class DenseHead(GapNet):
    """DenseNet's head: functional ReLU and pooling (no module sees the map that is pooled)."""

    def __init__(self):
        super().__init__(relu_last=False)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1))


class ChannelsLast(GapNet):
    """The last map channels-last [B, h, w, C], averaged over (1, 2)."""

    def forward(self, x):
        return self.fc(self.features(x).permute(0, 2, 3, 1).mean((1, 2)))


def cam_by_hand(model: nn.Module, maps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w = model.fc.weight.detach()[t]
    return upsample((w[:, :, None, None] * maps).sum(1).clamp_min(0), tuple(x.shape[2:]))


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 3])


def hooks_of(model):
    return {(name, attr): len(getattr(m, attr)) for name, m in model.named_modules()
            for attr in vars(m) if "hooks" in attr and isinstance(getattr(m, attr), dict) and getattr(m, attr)}


# -------------------------------------------------------------------------------------------- CAM

@pytest.mark.parametrize("pool", ["adaptive", "avgpool", "functional"])
def test_cam_is_the_hand_computation(pool, batch):
    x, t = batch
    model = GapNet({"adaptive": nn.AdaptiveAvgPool2d(1), "avgpool": nn.AvgPool2d(16),
                    "functional": None}[pool]).eval()
    assert no_gap_head(model) is None
    h = METHODS.get("cam")(model, x, t)
    with torch.no_grad():
        expected = cam_by_hand(model, model.features(x), x, t)
    assert h.shape == (3, 32, 32) and h.amax() > 0
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


def test_cam_reads_functional_and_channels_last_heads(batch):
    x, t = batch
    dense, nhwc = DenseHead().eval(), ChannelsLast().eval()
    assert no_gap_head(dense) is None and no_gap_head(nhwc) is None
    with torch.no_grad():
        torch.testing.assert_close(METHODS.get("cam")(dense, x, t),
                                   cam_by_hand(dense, F.relu(dense.features(x)), x, t), rtol=0, atol=0)
        torch.testing.assert_close(METHODS.get("cam")(nhwc, x, t),
                                   cam_by_hand(nhwc, nhwc.features(x), x, t), rtol=1e-6, atol=1e-7)


def test_cam_reads_patch_tokens(batch):
    x, t = batch
    model = PatchMean().eval()
    assert no_gap_head(model) is None
    with torch.no_grad():
        maps = model.tokens(x)[:, 1:].transpose(1, 2).reshape(3, 8, 4, 4)
        torch.testing.assert_close(METHODS.get("cam")(model, x, t), cam_by_hand(model, maps, x, t),
                                   rtol=1e-6, atol=1e-7)


def test_cam_is_gradcam_at_the_pooled_layer_times_its_positions(batch):
    """For GAP + linear, Grad-CAM's channel weights are w_k^c / (h w): CAM = h w Grad-CAM."""
    x, t = batch
    model = GapNet(nn.AdaptiveAvgPool2d(1)).eval()
    h = METHODS.get("cam")(model, x, t)
    g = METHODS.get("gradcam")(model, x, t, layer=model.features)
    ratio = float((h * g).sum() / (g * g).sum())
    assert abs(ratio / (16 * 16) - 1) < 1e-5, ratio
    torch.testing.assert_close(h, g * 16 * 16, rtol=1e-5, atol=1e-5 * float(h.max()))


class MaxHead(GapNet):
    def __init__(self):
        super().__init__(nn.AdaptiveMaxPool2d(1))


class MLPHead(GapNet):
    def __init__(self):
        super().__init__(nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


class PartialPool(GapNet):
    """An AvgPool2d that does not cover the 16x16 map: 2x2 cells, flattened."""

    def __init__(self):
        super().__init__(nn.AvgPool2d(8))
        self.fc = nn.Linear(32, 4)


class SoftmaxAfter(GapNet):
    def __init__(self):
        super().__init__(nn.AdaptiveAvgPool2d(1))
        self.out = nn.Softmax(dim=1)

    def forward(self, x):
        return self.out(super().forward(x))


class Scaled(GapNet):
    def forward(self, x):
        return super().forward(x) * 2


class ClassToken(nn.Module):
    """A ViT-style head: patch tokens plus a class token, the class token's norm to a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch, self.cls = nn.Conv2d(3, 8, 8, stride=8), nn.Parameter(torch.randn(1, 1, 8))
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def tokens(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1))

    def forward(self, x):
        return self.fc(self.tokens(x)[:, 0])


class PatchMean(ClassToken):
    """timm's ViT with global_pool="avg": the patch tokens' mean (the class token left out) to a linear layer."""

    def forward(self, x):
        return self.fc(self.tokens(x)[:, 1:].mean(1))


REFUSED = {  # model -> what the reason must say about its head
    MaxHead: r"AdaptiveMaxPool2d \('pool'\) → Flatten \('flatten'\) → Linear \('fc'\), whose input is not the average of the last feature map \('features', 8×\d+×\d+\)",
    MLPHead: r"Linear \('fc.0'\) → ReLU \('fc.1'\) → Linear \('fc.2'\), whose input is not the average",
    PartialPool: r"Linear \('fc'\), whose input is not the average of the last feature map \('pool', 8×2×2\)",
    SoftmaxAfter: r"which ends in Softmax \('out'\), not in a linear layer",
    Scaled: r"the model changes the output of its last linear layer Linear \('fc'\)",
    ClassToken: r"Linear \('fc'\), whose input is not the average of the last feature map \('norm', \d+×8\)",
}


@pytest.mark.parametrize("kind", REFUSED, ids=lambda k: k.__name__)
def test_cam_refuses_other_heads_and_says_what_they_are(kind, batch):
    x, t = batch
    model = kind().eval()
    why = METHODS.get("cam").meta["not_applicable"](model)
    assert why and why.startswith(NEEDS + "; this model's head is "), why
    assert re.search(REFUSED[kind], why), why
    with pytest.raises(ValueError, match="^cam: " + NEEDS + "; this model's head is .*" + REFUSED[kind]):
        METHODS.get("cam")(model, x, t)
    assert hooks_of(model) == {}


def test_cam_refuses_the_demo_model_global_max_pooling():
    from auditor.demo import DemoNet
    why = no_gap_head(DemoNet().eval())
    assert why and "MaxPool2d ('pool') → Linear ('fc'), whose input is not the average" in why, why


def test_cam_probe_keeps_modes_and_leaves_no_hooks():
    model = GapNet(nn.AdaptiveAvgPool2d(1)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    assert no_gap_head(model) is None
    assert all(m.training for m in model.modules()) and hooks_of(model) == {}
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())  # BatchNorm untouched


def test_cam_probe_undecided_where_no_size_runs():
    """A model that runs only at 40 px (a flatten to a fixed-size linear layer): the probe cannot
    tell, so the method's own call decides on the real inputs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4 * 5 * 5, 2)).eval()
    assert no_gap_head(model) is None
    with pytest.raises(ValueError, match="cam: CAM needs .*whose input is not the average"):
        METHODS.get("cam")(model, torch.randn(1, 3, 40, 40), torch.tensor([0]))


# ---------------------------------------------------------------------------- Layer Gradient SHAP

class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, a):
        return a.permute(*self.dims)


def shap_model(kind: str):
    """(model, layer): a convolution's map, or a channels-last one."""
    model = GapNet(nn.AdaptiveAvgPool2d(1), seed=3).eval()
    if kind == "conv":
        return model, model.features[3]
    model.features = nn.Sequential(*model.features, Permute(0, 2, 3, 1), Permute(0, 3, 1, 2))
    return model, model.features[5]


def same_draws(x, n, baseline_std, stdevs, seed):
    """The draws layer_gradient_shap makes: baselines, noises and alphas, image-major [B * n, ...]."""
    draw = draws(tuple(x.shape[1:]), baseline_std, stdevs, x.device, x.dtype)
    parts = [draw(g, n) for g in image_generators(x, seed)]
    base, noise, alpha = (torch.cat(p) for p in zip(*parts))
    return base, noise.expand_as(base) if stdevs == 0 else noise, alpha.flatten()


def captum_given(model, layer, x, t, n, stdevs, seed, monkeypatch) -> torch.Tensor:
    """Captum's LayerGradientShap with our draws: it draws baseline rows (numpy), alphas (numpy)
    and input noise (torch) from the global generators, so those calls are given ours."""
    from captum.attr import LayerGradientShap

    base, noise, alpha = same_draws(x, n, 0.5, stdevs, seed)
    with monkeypatch.context() as mp:
        mp.setattr(np.random, "choice", lambda k, size: np.arange(size))
        mp.setattr(np.random, "uniform", lambda lo, hi, size: alpha.double().numpy()[:size])
        mp.setattr(torch, "normal", lambda mean, std: noise.clone())
        return LayerGradientShap(model, layer).attribute(x, baselines=base, n_samples=n, stdevs=stdevs, target=t)


@pytest.mark.parametrize("kind", ["conv", "nhwc", "tokens"])
@pytest.mark.parametrize("stdevs", [0.0, 0.2])
def test_layer_gradient_shap_is_captums_given_the_same_draws(kind, stdevs, batch, monkeypatch):
    x, t = batch
    model, layer = shap_model(kind) if kind != "tokens" else (PatchMean().eval(), None)
    layer = layer or model.norm
    n, seed = 5, 7
    ours = attributions(model, layer, x, t, n, 0.5, stdevs, seed, max_rows=4)
    heat = METHODS.get("layer_gradient_shap")(model, x, t, layer=layer, n_samples=n, stdevs=stdevs,
                                              seed=seed, max_rows=4)
    ref = captum_given(model, layer, x, t, n, stdevs, seed, monkeypatch)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)
    ref_map = (ref if kind == "conv" else ref.permute(0, 3, 1, 2) if kind == "nhwc"
               else ref[:, 1:].transpose(1, 2).reshape(3, 8, 4, 4))
    ref_heat = upsample(pos_sum(ref_map), (32, 32))
    torch.testing.assert_close(heat, ref_heat, rtol=1e-5, atol=1e-5 * float(ref_heat.max()))


def test_layer_gradient_shap_refuses_a_layer_only_the_class_token_leaves(batch):
    """As Grad-CAM: a token layer whose patch tokens get no gradient would give an empty map."""
    x, t = batch
    model = ClassToken().eval()
    with pytest.raises(ValueError, match=r"layer_gradient_shap: layer 'norm' \(LayerNorm\): the target's "
                                         r"gradient reaches only its 1 leading \(class\) token"):
        METHODS.get("layer_gradient_shap")(model, x, t, layer=model.norm, n_samples=4)
    assert hooks_of(model) == {}


def test_layer_gradient_shap_exact_where_the_rest_is_linear(batch):
    """After a layer followed by GAP + linear, dy/dA = w^c / (h w) at every point, so the
    attribution is w^c / (h w) (A(x) - mean_j A(b_j)) whatever the alphas."""
    x, t = batch
    model = GapNet(nn.AdaptiveAvgPool2d(1), seed=3).eval()
    n, seed = 6, 2
    base, _, _ = same_draws(x, n, 0.5, 0.0, seed)
    with torch.no_grad():
        a_x, a_b = model.features(x), model.features(base).view(3, n, 8, 16, 16).mean(1)
    w = model.fc.weight[t].detach()[:, :, None, None] / (16 * 16)
    expected = w * (a_x - a_b)
    got = attributions(model, model.features, x, t, n, 0.5, 0.0, seed, max_rows=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_layer_gradient_shap_refuses_a_layer_called_twice(batch):
    x, t = batch

    class Twice(GapNet):
        def forward(self, x):
            return self.fc(self.features[4](self.features[4](self.features(x))).mean((2, 3)))

    model = Twice(nn.AdaptiveAvgPool2d(1)).eval()
    with pytest.raises(ValueError, match=r"layer_gradient_shap: layer 'features.4' \(ReLU\) is called 3 times"):
        METHODS.get("layer_gradient_shap")(model, x, t, layer=model.features[4])
    assert hooks_of(model) == {}


# ------------------------------------------------------------------------ quickshift superpixels

def blocks(n: int = 3, seed: int = 0) -> torch.Tensor:
    """Images of 2x2 flat blocks of positive colours and faint noise: quickshift finds the blocks
    (4 segments) where SLIC is asked for 12."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 32, 32)
    for r in (0, 16):
        for c in (0, 16):
            x[:, :, r:r + 16, c:c + 16] = 0.3 + 1.5 * torch.rand(n, 3, 1, 1, generator=g)
    return x + 0.02 * torch.randn(n, 3, 32, 32, generator=g)


def brightness_model() -> nn.Module:
    """Class 0's logit is the mean brightness: each superpixel adds its own share, all positive."""
    model = nn.Sequential(nn.Conv2d(3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0), model[0].bias.zero_(), model[3].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[3].bias.zero_()
    return model


def constant_on(heat: torch.Tensor, seg: np.ndarray) -> bool:
    return all(float(heat[seg == s].max() - heat[seg == s].min()) == 0 for s in np.unique(seg))


@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_superpixel_methods_use_quickshift_segments(name):
    from auditor.explain.methods.surrogate import segment_one

    entry = METHODS.get(name)
    assert entry.validate({"segmentation": "quickshift"}) == {"segmentation": "quickshift"}
    with pytest.raises(BadParams, match="segmentation"):
        entry.validate({"segmentation": "felzenszwalb"})
    x, model = blocks(), brightness_model()
    t = torch.zeros(3, dtype=torch.long)
    kw = dict(n_samples=64, n_segments=12, output="logit")
    quick = entry(model, x, t, segmentation="quickshift", **kw)
    slic = entry(model, x, t, segmentation="slic", **kw)
    for i, img in enumerate(x.numpy()):
        q_seg, s_seg = segment_one(img, "quickshift"), segment_one(img, "slic", 12)
        assert q_seg.max() + 1 == 4 and s_seg.max() + 1 > 4
        assert constant_on(quick[i], q_seg) and constant_on(slic[i], s_seg)
        assert not constant_on(slic[i], q_seg), "SLIC's map should vary inside a quickshift segment"
        assert len(torch.unique(quick[i])) == 4 and (quick[i] > 0).all()


@pytest.mark.parametrize("name", ["cam", "layer_gradient_shap"])
def test_an_empty_batch_gives_no_maps(name):
    model = GapNet(nn.AdaptiveAvgPool2d(1)).eval()
    kw = {"layer": model.features} if name == "layer_gradient_shap" else {}
    h = METHODS.get(name)(model, torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), **kw)
    assert h.shape == (0, 32, 32) and h.dtype == torch.float32
