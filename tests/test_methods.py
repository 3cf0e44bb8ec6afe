"""Contract tests for every registered explanation method (parametrized over METHODS), a
localisation sanity check, and checks against Captum's Lime/KernelShap and its DeepLift rules."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from auditor.explain.methods import METHODS
from auditor.explain.methods.surrogate import superpixel_fit

ALL = [pytest.param(e, id=e.name) for e in METHODS]


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).mean((2, 3)))


class Gate(nn.Module):
    """Multiplies feature maps by a fixed spatial mask."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, a):
        return a * self.mask


class QuadrantNet(nn.Module):
    """Class-0 logit grows with the top-left quadrant only; classes 1, 2 are constant."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1
        self.gate = Gate(mask)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27), self.conv.bias.zero_()
            self.fc.weight.zero_(), self.fc.bias.zero_(), self.fc.weight[0].fill_(4.0)

    def forward(self, x):
        return self.fc(self.gate(self.relu(self.conv(x))).mean((2, 3)))


def fast_params(entry, **extra):
    """Small sample counts for speed, and odd chunking (max_rows not a multiple of samples)."""
    d = entry.meta["defaults"]
    small = {"n_samples": 24 if "n_segments" in d else 6, "n_steps": 6, "n_segments": 12,
             "max_rows": 10}
    return {**{k: v for k, v in small.items() if k in d}, **extra}


def call(entry, model, x, target, layer, **params):
    if entry.meta.get("needs_layer"):
        params["layer"] = layer
    return entry(model, x, target, **params)


def hooks_of(model):
    return {(name, attr): len(getattr(m, attr)) for name, m in model.named_modules()
            for attr in vars(m) if "hooks" in attr and isinstance(getattr(m, attr), dict)
            and getattr(m, attr)}


@pytest.fixture(scope="module")
def tiny():
    model = TinyCNN().eval()
    model.conv1.weight.requires_grad_(False)  # a partly frozen model must stay so
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


@pytest.mark.parametrize("entry", ALL)
def test_registration(entry):
    sig = inspect.signature(entry.fn)
    assert list(sig.parameters)[:3] == ["model", "x", "target"]
    assert all(p.default is not inspect.Parameter.empty for p in list(sig.parameters.values())[3:])
    assert entry.description and entry.description[0].isupper()
    n_fwd, n_bwd = entry.meta["passes"]()
    assert n_fwd >= 1 and n_bwd >= 0 and (n_bwd == 0 or n_bwd <= n_fwd)
    assert ("seed" in sig.parameters) == bool(entry.meta.get("stochastic"))
    assert ("layer" in sig.parameters) == bool(entry.meta.get("needs_layer"))


@pytest.mark.parametrize("entry", ALL)
def test_contract(entry, tiny):
    model, x, target = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    attrs = {k: set(vars(m)) for k, m in model.named_modules()}
    params = fast_params(entry)
    h = call(entry, model, x, target, model.conv2, **params)

    assert h.shape == (3, 32, 32) and h.dtype == torch.float32 and h.device == x.device
    assert torch.isfinite(h).all() and (h >= 0).all()
    assert (h.flatten(1).amax(1) > 0).all(), "an image got an all-zero heatmap"
    single = torch.cat([call(entry, model, x[i:i + 1], target[i:i + 1], model.conv2, **params)
                        for i in range(3)])
    torch.testing.assert_close(single, h, rtol=1e-3, atol=1e-4 * h.max().item())
    again = call(entry, model, x, target, model.conv2, **params)
    torch.testing.assert_close(again, h, rtol=1e-5, atol=1e-6 * h.max().item())
    if entry.meta.get("stochastic"):
        other = call(entry, model, x, target, model.conv2, **params, seed=1)
        assert not torch.allclose(other, h), "the seed has no effect"

    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert hooks_of(model) == {}
    assert {k: set(vars(m)) for k, m in model.named_modules()} == attrs  # no leftovers


@pytest.mark.parametrize("entry", ALL)
def test_train_mode_kept(entry, tiny):
    model, x, target = tiny
    model.train()
    try:
        call(entry, model, x[:1], target[:1], model.conv2, **fast_params(entry))
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("entry", ALL)
def test_every_method_honours_max_rows(entry, tiny):
    """One row a model call gives the same heatmaps as the default calls (chunking is invisible)."""
    model, x, target = tiny
    params = fast_params(entry)
    assert "max_rows" in entry.meta["defaults"]
    h = call(entry, model, x, target, model.conv2, **params)
    one = call(entry, model, x, target, model.conv2, **{**params, "max_rows": 1})
    torch.testing.assert_close(one, h, rtol=1e-3, atol=1e-4 * h.max().item())


def test_rows_per_call_follow_the_largest_activation():
    """On CPU, a net with full-resolution feature maps gets fewer rows a call than one that strides
    at once; the one-row probe leaves a training model's mode and BatchNorm statistics alone."""
    from auditor.explain.methods._common import CPU_BYTES_PER_CALL, largest_activation, rows_per_call
    full = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2)).train()
    strided = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.zeros(2, 3, 128, 128)
    strided(x)  # materialise the lazy layer
    stats = {k: v.clone() for k, v in full.state_dict().items()}
    assert largest_activation(full, x) == 32 * 128 * 128 * 4           # the conv's output
    assert largest_activation(strided, x) == 3 * 128 * 128 * 4         # the input itself
    assert all(m.training for m in full.modules())
    assert all(torch.equal(v, stats[k]) for k, v in full.state_dict().items())
    assert rows_per_call(full, x, 256) == max(4, CPU_BYTES_PER_CALL // (32 * 128 * 128 * 4)) == 8
    assert rows_per_call(strided, x, 256) == CPU_BYTES_PER_CALL // (3 * 128 * 128 * 4) == 85
    assert rows_per_call(strided, x, 16) == 16                          # max_rows still bounds it


@pytest.mark.parametrize("entry", ALL)
def test_quadrant_sanity(entry):
    """Heatmap mass lies in the top-left quadrant, the only region the class-0 logit reads."""
    torch.manual_seed(0)
    model = QuadrantNet().eval()
    x = torch.rand(2, 3, 32, 32) * 0.5 - 1.0
    x[..., :16, :16] += 2.0  # a bright quadrant (positive evidence; SLIC follows its edge)
    surrogate = "n_segments" in entry.meta["defaults"]
    params = fast_params(entry, **{"n_samples": 64} if surrogate else {})
    h = call(entry, model, x, torch.zeros(2, dtype=torch.long), model.gate, **params)
    inside = h[:, :16, :16].sum((1, 2)) / h.sum((1, 2))
    assert (inside > 0.8).all(), f"share of heatmap mass in the quadrant: {inside.tolist()}"


@pytest.mark.parametrize("entry", ALL)
def test_nonfinite_is_refused(entry, tiny):
    model, x, target = tiny
    poisoned = nn.Sequential(model, Gate(torch.tensor(float("nan")))).eval()
    with pytest.raises(ValueError, match=entry.name):
        call(entry, poisoned, x[:1], target[:1], model.conv2, **fast_params(entry))


def test_layer_required():
    model = TinyCNN().eval()
    for entry in METHODS:
        if entry.meta.get("needs_layer"):
            with pytest.raises(ValueError, match="layer"):
                entry(model, torch.randn(1, 3, 16, 16), torch.tensor([0]))


class SharedReLU(nn.Module):
    """TinyCNN's weights with one in-place ReLU module used twice."""

    def __init__(self, tiny: TinyCNN):
        super().__init__()
        self.conv1, self.conv2, self.fc = tiny.conv1, tiny.conv2, tiny.fc
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fc(self.relu(self.conv2(self.relu(self.conv1(x)))).mean((2, 3)))


def test_relu_module_rules(tiny):
    model, x, target = tiny
    shared = SharedReLU(model).eval()
    # Captum's Deconvolution keeps one state per module: refuse reuse
    with pytest.raises(ValueError, match="deconvolution: module 'relu'.*2 times"):
        METHODS.get("deconvolution")(shared, x, target)
    assert hooks_of(shared) == {}
    # these use only each call's own input and gradient: reuse and in-place are fine
    for name in ("guided_backprop", "guided_gradcam", "deeplift"):
        kw = {"layer": model.conv2} if METHODS.get(name).meta.get("needs_layer") else {}
        torch.testing.assert_close(METHODS.get(name)(shared, x, target, **kw),
                                   METHODS.get(name)(model, x, target, **kw))
    inplace = TinyCNN().eval()
    inplace.relu1.inplace = inplace.relu2.inplace = True
    torch.testing.assert_close(METHODS.get("deeplift")(inplace, x, target),
                               METHODS.get("deeplift")(TinyCNN().eval(), x, target))
    assert shared.relu.inplace and inplace.relu1.inplace and "forward" not in vars(shared.relu)


class PoolNet(nn.Module):
    """Elementwise non-linearities of several kinds and overlapping max pooling."""

    def __init__(self, act: type[nn.Module]):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), act()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2, self.act2 = nn.Conv2d(6, 6, 3, padding=1), act()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.pool(self.act1(self.conv1(x))))).mean((2, 3)))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.ELU, nn.GELU])
def test_deeplift_rules(act, tiny):
    from captum.attr import DeepLift

    from auditor.explain.methods.deeplift import attributions

    _, x, target = tiny
    model = PoolNet(act).eval()
    attr = attributions(model, x, target)
    with torch.no_grad():  # summation to delta, also through overlapping pooling windows
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(attr.flatten(1).sum(1), gap, rtol=1e-4, atol=1e-5)
    model.pool = nn.Identity()  # without pooling, the same numbers as Captum's DeepLift
    if act in (nn.ReLU, nn.Tanh, nn.ELU):
        ref = DeepLift(model).attribute(x.clone().requires_grad_(True), baselines=0.0, target=target)
        torch.testing.assert_close(attributions(model, x, target), ref.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["lime", "kernel_shap"])
def test_superpixel_coefficients_match_captum(kind, tiny):
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import KernelShap, Lime

    model, x, target = tiny
    x, target = x[:1], target[:1]
    n = 1000
    beta, seg = superpixel_fit(kind, model, x, target, n, "slic", 12, 20.0, "prob", 0, 256)
    k = int(seg.max()) + 1

    def prob(inp):
        return model(inp).softmax(1)

    if kind == "lime":
        def kernel(_, __, z, **kw):
            d = 1 - torch.sqrt(z.float().sum() / z.shape[1])
            return torch.sqrt(torch.exp(-d ** 2 / 0.25 ** 2))

        ref = Lime(prob, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel)
    else:
        ref = KernelShap(prob)  # OLS surrogate, Shapley-kernel sampling, endpoints weight 1e6
    torch.manual_seed(0)
    coef = ref.attribute(x, target=target, feature_mask=seg[:, None].expand_as(x), baselines=0.0,
                         n_samples=n, perturbations_per_eval=250, return_input_shape=False)
    r = torch.corrcoef(torch.stack([beta[0, :k].float(), coef[0].float()]))[0, 1]
    assert r > 0.9, f"correlation of superpixel coefficients with Captum's {kind}: {r:.3f}"
    if kind == "kernel_shap":  # efficiency: the values add up to f(x) - f(all superpixels off)
        with torch.no_grad():
            gap = prob(x)[0, target[0]] - prob(torch.zeros_like(x))[0, target[0]]
        torch.testing.assert_close(beta[0].sum().float(), gap, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["lime", "kernel_shap"])
def test_superpixel_fit_precomputed_segments(kind, tiny):
    """``segments=`` (bench/methods.py times segmentation apart with it) gives the same fit;
    the segmentation settings are then ignored."""
    model, x, target = tiny
    beta, seg = superpixel_fit(kind, model, x, target, 24, "slic", 12, 20.0, "prob", 0, 10)
    again, seg2 = superpixel_fit(kind, model, x, target, 24, "quickshift", 3, 1.0, "prob", 0, 10,
                                 segments=seg.numpy())
    assert torch.equal(seg2, seg) and torch.equal(again, beta)


def test_an_empty_batch_neither_fails_nor_spoils_the_rows_memo(tiny):
    model, x, target = tiny
    fresh = TinyCNN(seed=3).eval()  # its rows-per-call memo is still empty
    h = METHODS.get("saliency")(fresh, x[:0], target[:0])
    assert h.shape == (0, *x.shape[2:])
    torch.testing.assert_close(METHODS.get("saliency")(fresh, x, target),
                               METHODS.get("saliency")(fresh, x, target, max_rows=1))
