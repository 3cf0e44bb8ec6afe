"""Real architectures (issue 14): Hugging Face folders end to end, the default Grad-CAM layer of a
ViT, a ConvNeXt and a ResNet-50-style net, Grad-CAM on tokens against pytorch-grad-cam's recipe,
methods that refuse a model with the reason, and occlusion against an exact oracle.

Models are tiny and randomly initialised (built from configs; no weights are downloaded)."""
from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from auditor.cli import app  # noqa: E402
from auditor.explain.layers import default_layer, feature_map, layout, module_name  # noqa: E402
from auditor.explain.methods import METHODS  # noqa: E402
from auditor.inputs.huggingface import Logits  # noqa: E402



def hf():
    """transformers, imported at first use (about 10 s here), so collecting this file costs nothing."""
    return pytest.importorskip("transformers")

CLASSES = ["cat", "dog", "fox"]  # conftest's ImageFolder classes
ID2LABEL = {i: c for i, c in enumerate(CLASSES)}


# ----------------------------------------------------------------------------------------- models

def tiny_vit(seed: int = 0, cls=None, **kw) -> nn.Module:
    torch.manual_seed(seed)
    transformers = hf()
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3,
                                 id2label=ID2LABEL, label2id={c: i for i, c in ID2LABEL.items()}, **kw)
    return (cls or transformers.ViTForImageClassification)(cfg).eval()


def tiny_convnext(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    transformers = hf()
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 2], num_stages=2,
                                      num_labels=3, id2label=ID2LABEL, label2id={c: i for i, c in ID2LABEL.items()})
    return transformers.ConvNextForImageClassification(cfg).eval()


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: one in-place nn.ReLU called three times, the add before it."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout ([3, 4, 6, 3] Bottlenecks) at 1/8 of its width."""

    def __init__(self, width: int = 8, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        inplanes, stages = width, []
        for i, n in enumerate((3, 4, 6, 3)):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def save_folder(model: nn.Module, folder, size: int = 32) -> None:
    """A save_pretrained folder with the processor config a ViTImageProcessor writes."""
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25], "rescale_factor": 1 / 255, "resample": 2,
        "size": {"height": size, "width": size}}))


def hf_project(project, folder, methods):
    project.cfg["model"] = {"huggingface": str(folder)}
    project.cfg["explain"] = {"methods": methods, "samples": "all", "resolution": 16, "per_class": 1}
    project.write()
    return CliRunner().invoke(app, ["run", str(project.path), "--quiet"])


def findings_of(project, output: str) -> dict:
    from conftest import report_folder
    return json.loads((report_folder(project, output) / "findings.json").read_text())


# ------------------------------------------------------------------------------ Hugging Face folders

def test_a_hugging_face_folder_is_audited_end_to_end(project, tmp_path):
    """Classes from id2label, input from preprocessor_config.json; methods that do not apply to a
    ViT are recorded with their reason (exit 1: incomplete), never a crash (exit 2)."""
    save_folder(tiny_vit(), tmp_path / "vit")
    r = hf_project(project, "vit", ["gradcam", "saliency", "deeplift", "guided_backprop"])  # relative to audit.yaml
    assert r.exit_code in (0, 1), r.output
    doc = findings_of(project, r.output)
    assert doc["run"]["classes"] == CLASSES
    model = doc["run"]["config"]["model"]
    assert model["input"] == {"size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                              "resize": "squash", "resize_to": None, "crop": "none", "interpolation": "bilinear"}
    methods = doc["coverage"]["methods"]
    assert methods["gradcam"]["state"] == "ran" and methods["saliency"]["state"] == "ran"
    assert "DeepLift has no rule for" in methods["deeplift"]["reason"] and "LayerNorm" in methods["deeplift"]["reason"]
    assert "no nn.ReLU module" in methods["guided_backprop"]["reason"]
    assert methods["deeplift"]["state"] in ("error", "not_applicable")
    assert doc["run"]["weights_sha256"]  # the folder's model.safetensors, hashed into the record


def test_a_hugging_face_folder_needs_classes_and_input_from_somewhere(project, tmp_path):
    folder = tmp_path / "vit"
    save_folder(tiny_vit(), folder)
    (folder / "preprocessor_config.json").unlink()
    r = hf_project(project, folder, ["saliency"])
    assert r.exit_code == 2 and "'model.input': not given, and" in r.output and "preprocessor_config.json" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    project.cfg["model"]["input"] = {"size": [32, 32], "mean": [0.5], "std": [0.25]}  # given: no processor needed
    project.write()
    assert CliRunner().invoke(app, ["run", str(project.path), "--quiet"]).exit_code in (0, 1)


def test_a_factory_returning_a_hugging_face_output_is_unwrapped(project, tmp_path):
    """``.logits`` (or ``["logits"]``) is taken with a note, not refused; weights saved from a bare
    model that no longer fit a hand-written wrapper say why (the prefix)."""
    from auditor.inputs.config import load_config
    from auditor.inputs.model import build_model

    (tmp_path / "hf.py").write_text(
        "import json, torch\nfrom torch import nn\nfrom transformers import ViTConfig, ViTForImageClassification\n"
        "def make(wrapped=False):\n    torch.manual_seed(0)\n"
        "    m = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,"
        " num_attention_heads=4, intermediate_size=64, num_labels=3))\n"
        "    if not wrapped: return m\n"
        "    class W(nn.Module):\n        def __init__(s):\n            super().__init__(); s.model = m\n"
        "        def forward(s, x): return {'logits': s.model(x).logits}\n    return W()\n")
    from safetensors.torch import save_file
    save_file(tiny_vit().state_dict(), str(tmp_path / "vit.safetensors"))
    project.cfg["model"] = {"factory": "hf.py:make", "classes": CLASSES, "weights": "vit.safetensors",
                            "input": {"size": [32, 32]}}
    project.write()
    cfg = load_config(project.path, ["model.kwargs={wrapped: false}", "model.weights=null"])
    model = build_model(cfg, 3, torch.device("cpu"))
    assert isinstance(model, Logits) and "its .logits are audited" in model.note
    cfg = load_config(project.path, ["model.kwargs={wrapped: true}", "model.weights=null"])
    assert "[\"logits\"]" in build_model(cfg, 3, torch.device("cpu")).note
    cfg = load_config(project.path, ["model.kwargs={wrapped: true}"])
    with pytest.raises(Exception, match="add the prefix 'model.'"):
        build_model(cfg, 3, torch.device("cpu"))


# ---------------------------------------------------------------------------------- default layer

@pytest.mark.parametrize("arch, expected", [
    ("vit", "model.vit.layers.1.layernorm_before"),      # pytorch-grad-cam's blocks[-1].norm1
    ("convnext", "model.convnext.encoder.stages.1"),     # the last stage's output, not its depthwise conv
    ("resnet50", "layer4"),                              # the last block's output after the add and ReLU
])
def test_the_default_layer_per_architecture(arch, expected):
    model = {"vit": lambda: Logits(tiny_vit()), "convnext": lambda: Logits(tiny_convnext()),
             "resnet50": lambda: ResNet50().eval()}[arch]()
    layer = default_layer(model, (3, 64, 64) if arch == "resnet50" else (3, 32, 32))  # layer4: 2x2 at 64 px
    assert module_name(model, layer) == expected
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert layer is not last_conv  # the old default: patch embedding, depthwise conv, pre-add conv


def test_layouts_of_layer_outputs():
    hw = (224, 224)
    assert layout((2, 197, 768), hw).extra == 1 and layout((2, 197, 768), hw).grid == (14, 14)     # ViT-B/16
    assert layout((2, 198, 768), hw).extra == 2                                                   # DeiT distilled
    assert layout((2, 201, 768), hw).extra == 5                                                   # 1 + 4 registers
    assert layout((2, 49, 768), hw).kind == "tokens" and layout((2, 49, 768), hw).extra == 0      # Swin, last stage
    assert layout((2, 7, 7, 768), hw).kind == "nhwc" and layout((2, 768, 7, 7), hw).kind == "nchw"
    assert layout((2, 1 + 14 * 20, 64), (224, 320)).grid == (14, 20)                             # not square
    assert layout((2, 768, 1, 1), hw) is None and layout((2, 10), hw) is None
    t = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    m = feature_map(t, (32, 32))
    assert m.shape == (2, 3, 4, 4) and torch.equal(m[:, :, 0, 1], t[:, 2])  # class token dropped, row-major


# -------------------------------------------------------------------------------- Grad-CAM on a ViT

def recipe_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's ViT recipe, written out: gradients of the target logit at the layer's
    tokens, class token dropped, reshaped to the grid; weights = spatial mean of the gradients;
    ReLU of the weighted sum of the activations (at the layer's resolution)."""
    acts = []
    h = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    grad, = torch.autograd.grad(out.gather(1, target[:, None]).sum(), acts[0])

    def reshape_transform(t, height=4, width=4):
        return t[:, 1:, :].reshape(t.size(0), height, width, t.size(2)).permute(0, 3, 1, 2)

    a, g = reshape_transform(acts[0].detach()), reshape_transform(grad)
    return torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))


def test_vit_gradcam_matches_the_recipe():
    model = Logits(tiny_vit(seed=1))
    layer = default_layer(model, (3, 32, 32))
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    target = torch.arange(8) % 3
    ours = METHODS.get("gradcam")(model, x, target, layer=layer)
    ref = nn.functional.interpolate(recipe_cam(model, layer, x, target)[:, None], size=(32, 32),
                                    mode="bilinear", align_corners=False)[:, 0]  # resized to the input, as it does
    r = [torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item() for a, b in zip(ours, ref)]
    assert sum(r) / len(r) >= 0.9, r  # measured: 1.000000 (identical maps) over 5 seeds x 16 images
    assert (ours.flatten(1).amax(1) > 0).all()
    guided = METHODS.get("guided_gradcam")(model, x[:2], target[:2], layer=layer)
    assert guided.shape == (2, 32, 32) and torch.isfinite(guided).all()


def test_gradcam_on_a_convolution_is_captums():
    from captum.attr import LayerGradCam
    model = ResNet50(seed=3).eval()
    with torch.no_grad():  # BatchNorm that is not the identity, so the maps are not all zero
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.bias.uniform_(-0.2, 0.2)
    x, t = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    ref = LayerGradCam(model, model.layer4).attribute(x, target=t, relu_attributions=True)
    ref = nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    ours = METHODS.get("gradcam")(model, x, t, layer=model.layer4)
    assert ref.amax() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * ref.amax().item())


def test_a_layer_after_the_class_token_is_taken_is_refused_with_the_reason():
    model = Logits(tiny_vit())
    with pytest.raises(ValueError, match="reaches only its 1 leading .class. token"):
        METHODS.get("gradcam")(model, torch.randn(1, 3, 32, 32), torch.tensor([0]),
                               layer=model.model.vit.layernorm)


def test_gradcam_refuses_a_module_called_several_times():
    model = ResNet50().eval()
    with pytest.raises(ValueError, match=r"layer 'layer4.2.relu' \(ReLU\) is called 3 times per forward pass"):
        METHODS.get("gradcam")(model, torch.randn(1, 3, 64, 64), torch.tensor([0]), layer=model.layer4[2].relu)
    h = METHODS.get("gradcam")(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), layer=model.layer4)
    assert h.shape == (2, 64, 64)


# --------------------------------------------------------------------------------------- refusals

def test_methods_that_do_not_apply_say_why():
    vit, cnx = Logits(tiny_vit()), Logits(tiny_convnext())
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([0])
    for model in (vit, cnx):
        with pytest.raises(ValueError, match="deeplift: DeepLift has no rule for .*LayerNorm.*would not sum"):
            METHODS.get("deeplift")(model, x, t)
        for name in ("guided_backprop", "deconvolution"):
            with pytest.raises(ValueError, match=f"{name}: the model has no nn.ReLU module.*exactly saliency"):
                METHODS.get(name)(model, x, t)
            assert METHODS.get(name).meta["not_applicable"](model)
        assert METHODS.get("deeplift").meta["not_applicable"](model)
    resnet = ResNet50().eval()
    assert METHODS.get("deeplift").meta["not_applicable"](resnet) is None
    assert METHODS.get("guided_backprop").meta["not_applicable"](resnet) is None


def test_deeplift_checks_summation_to_delta():
    """A ResNet-50 of modules sums to the logit change; F.gelu in forward (no module, no rule) is
    caught by the sums and refused."""
    from auditor.explain.methods.deeplift import attributions
    resnet = ResNet50().eval()
    for m in resnet.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with torch.no_grad():
        gap = (resnet(x) - resnet(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(attributions(resnet, x, t).flatten(1).sum(1), gap, rtol=1e-3, atol=1e-4)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(nn.functional.gelu(self.conv(x) * 3).mean((2, 3)))

    with pytest.raises(ValueError, match="deeplift: the attributions miss the change of the target logit"):
        METHODS.get("deeplift")(Functional().eval(), x + 1, t)


# -------------------------------------------------------------------------------------- occlusion

class Linear(nn.Module):
    """logit_k = sum(w_k * x): hiding a window (filling it with 0) drops the logit by exactly
    sum over the window of w_k * x."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        return (x[:, None] * self.w).flatten(2).sum(2)


@pytest.mark.parametrize("hw, window, stride", [((16, 16), 0.25, 0.5), ((12, 20), 0.25, 1.0)])
def test_occlusion_is_the_logit_drop(hw, window, stride):
    from auditor.explain.methods.perturbation import _window
    torch.manual_seed(0)
    C, (H, W) = 3, hw
    model = Linear(torch.randn(2, C, H, W)).eval()
    x = torch.rand(2, C, H, W) + 0.1
    target = torch.tensor([0, 1])
    heat = METHODS.get("occlusion")(model, x, target, window=window, stride=stride)
    (wh, ww), (sh, sw) = _window((H, W), window, stride)
    total, count = torch.zeros(2, H, W), torch.zeros(H, W)
    contrib = (model.w[target] * x).sum(1)  # [B, H, W]: each pixel's share of the logit
    for i in range(0, H - wh + 1, sh):
        for j in range(0, W - ww + 1, sw):
            total[:, i:i + wh, j:j + ww] += contrib[:, i:i + wh, j:j + ww].sum((1, 2))[:, None, None]
            count[i:i + wh, j:j + ww] += 1
    oracle = (total / count.clamp_min(1)).clamp_min(0)
    torch.testing.assert_close(heat, oracle, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- model.output, model.reshape, the record

FACTORY_PY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.conv, self.fc = kind, nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        feat = self.conv(x).relu().mean((2, 3))
        logits = self.fc(feat)
        return (feat, logits) if self.kind == "tuple" else {"features": feat, "scores": logits}

def make(kind="tuple"):
    return Net(kind)
"""


def test_model_output_names_the_logits(project, tmp_path):
    """model.output: an INDEX into a tuple, a NAME in a dict (or a field); a wrong one names the key
    and what the output holds."""
    from auditor.inputs.config import ConfigError, load_config
    from auditor.inputs.model import build_model

    (project.folder / "multi.py").write_text(FACTORY_PY)
    project.cfg["model"] = {"factory": "multi.py:make", "classes": CLASSES, "input": {"size": [24, 24]}}
    project.write()
    x = torch.randn(2, 3, 24, 24)
    for kind, output in (("tuple", 1), ("tuple", -1), ("dict", "scores"), ("dict", 1)):
        model = build_model(load_config(project.path, [f"model.kwargs={{kind: {kind}}}", f"model.output={output}"]),
                            3, torch.device("cpu"))
        assert isinstance(model, Logits)
        torch.testing.assert_close(model(x), model.model.fc(model.model.conv(x).relu().mean((2, 3))))
    for kind, output, says in (("tuple", 2, "(a tuple of 2) has no element 2"),
                               ("tuple", "logits", "(a tuple of 2) has no element 'logits'"),
                               ("dict", "logits", "(dict with keys features, scores) has no element 'logits'")):
        with pytest.raises(ConfigError, match=re.escape(f"'model.output': the model's output {says}")):
            build_model(load_config(project.path, [f"model.kwargs={{kind: {kind}}}", f"model.output={output}"]),
                        3, torch.device("cpu"))
    with pytest.raises(ConfigError, match="model output has shape tuple"):  # no model.output: the dry run says what it is
        build_model(load_config(project.path, ["model.kwargs={kind: tuple}"]), 3, torch.device("cpu"))


def test_model_output_on_a_hugging_face_folder(project, tmp_path):
    from auditor.inputs.config import load_config
    from auditor.inputs.model import build_model
    save_folder(tiny_vit(), tmp_path / "vit")
    project.cfg["model"] = {"huggingface": str(tmp_path / "vit"), "output": "logits", "reshape": "vit"}
    project.write()
    model = build_model(load_config(project.path), 3, torch.device("cpu"))
    assert model.output == "logits" and model.input_shape == (3, 32, 32)
    from auditor.explain.layers import reading_of
    assert reading_of(model, None) == "vit"


class ChannelsLast(nn.Module):
    """A 4x4 map of 4 channels, read channels last by a LayerNorm (ConvNeXt's inner layout): the
    shape [B, 4, 4, 4] is ambiguous, and auto reads it channels first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_model_reshape_says_how_a_layer_is_read():
    """auto guesses from the shape; swin reads an ambiguous [B, 4, 4, 4] channels last (the map
    pytorch-grad-cam's Swin reshape gives); vit / none refuse a shape that is not theirs, saying so.
    The reading rides on the model, so the trust gate's deep copies keep it."""
    import copy
    from auditor.inputs.model import set_reading
    from auditor.explain.layers import describe_layer, reading_of
    model = ChannelsLast().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    gradcam = METHODS.get("gradcam")
    auto = gradcam(model, x, t, layer=model.norm)
    set_reading(model, "swin")
    swin = gradcam(model, x, t, layer=model.norm)
    acts = []
    h = model.norm.register_forward_hook(lambda m, i, o: acts.append(o))
    out = model(x)
    h.remove()
    grad, = torch.autograd.grad(out.gather(1, t[:, None]).sum(), acts[0])
    a, g = acts[0].detach().permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
    ref = nn.functional.interpolate(torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)),
                                    size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(swin, ref)
    assert not torch.allclose(auto, swin)
    assert reading_of(copy.deepcopy(model), None) == "swin"
    assert describe_layer(model, model.norm, None, (3, 16, 16))["reading"] == \
        "channels-last feature map (4×4) (model.reshape: swin)"
    for reading, says in (("vit", "model.reshape is vit: expected tokens .B, 1 . h.w, C."),
                          ("none", "model.reshape is none: expected a feature map")):
        with pytest.raises(ValueError, match=says):
            _refused(reading, model, x, t)


def _refused(reading, model, x, t):
    from auditor.inputs.model import set_reading
    if reading == "vit":  # a channels-last map is no token sequence
        return METHODS.get("gradcam")(set_reading(model, "vit"), x, t, layer=model.norm)
    vit = Logits(tiny_vit())
    layer = default_layer(vit, (3, 32, 32))
    set_reading(vit, "none")  # tokens are no [B, C, h, w] map
    return METHODS.get("gradcam")(vit, torch.randn(1, 3, 32, 32), torch.tensor([0]), layer=layer)


def test_vit_and_swin_readings_match_auto_on_their_models():
    from auditor.inputs.model import set_reading
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    for make, reading in ((lambda: Logits(tiny_vit()), "vit"), (lambda: Logits(tiny_swin()), "swin")):
        model = make()
        layer = default_layer(model, (3, 32, 32))
        auto = METHODS.get("gradcam")(model, x, t, layer=layer)
        torch.testing.assert_close(METHODS.get("gradcam")(set_reading(model, reading), x, t, layer=layer), auto)


def test_the_layer_is_described_for_the_record():
    from auditor.explain.layers import describe_layer
    vit = Logits(tiny_vit())
    assert describe_layer(vit, default_layer(vit, (3, 32, 32)), None, (3, 32, 32)) == {
        "name": "model.vit.layers.1.layernorm_before", "kind": "LayerNorm",
        "reading": "tokens (class token dropped, 4×4 grid)", "why": "the last block's norm (token model)"}
    swin = Logits(tiny_swin())
    assert describe_layer(swin, default_layer(swin, (3, 32, 32)), None, (3, 32, 32))["reading"] == \
        "tokens (no class token, 4×4 grid)"
    resnet = ResNet50().eval()
    assert describe_layer(resnet, resnet.layer4, None, (3, 64, 64)) == {
        "name": "layer4", "kind": "Sequential", "reading": "feature map (2×2)",
        "why": "the last spatial feature map before pooling"}
    assert describe_layer(resnet, resnet.layer3[0].conv1, "layer3.0.conv1", (3, 64, 64))["why"] == "model.target_layer"
    assert describe_layer(resnet, resnet.layer4[2].relu, "layer4.2.relu", (3, 64, 64))["reading"] == \
        "none: called 3 times per forward pass"
    assert describe_layer(resnet, None, None)["name"] is None


# ------------------------------------------------------------------------------- architecture zoo
#
# Every registered method on every architecture below, with its default layer (``default_layer``):
# it works (finite, [B, H, W], non-negative), or says why not, before running (its registry entry's
# ``not_applicable``) or as a ValueError. ``zoo_table()`` is the table in docs/models.md
# (``python tests/test_architectures.py`` prints it).

ZOO_SIZE = 32
# Few samples, steps and windows: the cells check that a method runs and what it refuses, not its maps.
ZOO_PARAMS = {"n_samples": 4, "n_steps": 4, "n_segments": 8, "window": 0.25, "stride": 1.0}
ZOO_SURROGATE_SAMPLES = 16  # lime, kernel_shap: a few coalitions beyond the full and the empty one


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add, ReLU: one in-place nn.ReLU called twice."""

    def __init__(self, c_in: int, c: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.down = None if stride == 1 and c_in == c else nn.Sequential(
            nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResidualBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1, self.layer2 = BasicBlock(8, 8), BasicBlock(8, 16, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, c // r, 1), nn.SiLU(), nn.Conv2d(c // r, c, 1), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet's block: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1 (SiLU)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 2):
        super().__init__()
        c = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.se = SqueezeExcite(c)
        self.project = nn.Sequential(nn.Conv2d(c, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class DepthwiseSE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(8, 8, 1), MBConv(8, 16, 2))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class GNGELUNet(nn.Module):  # (a class name with "GroupNorm" in it would itself be named by deeplift's refusal)
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.GELU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.GELU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.features(x))


def tiny_hf_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    transformers = hf()
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="bottleneck", num_labels=3, id2label=ID2LABEL,
                                    label2id={c: i for i, c in ID2LABEL.items()})
    return transformers.ResNetForImageClassification(cfg).eval()


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    transformers = hf()
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                  window_size=4, mlp_ratio=2.0, num_labels=3, id2label=ID2LABEL,
                                  label2id={c: i for i, c in ID2LABEL.items()})
    return transformers.SwinForImageClassification(cfg).eval()


ZOO = {  # architecture -> a model returning logits
    "plain CNN": lambda: PlainCNN().eval(),
    "residual, BatchNorm, reused in-place ReLU": lambda: ResidualBN().eval(),
    "depthwise, SiLU, squeeze-excite": lambda: DepthwiseSE().eval(),
    "GroupNorm, GELU": lambda: GNGELUNet().eval(),
    "HF ResNet": lambda: Logits(tiny_hf_resnet()),
    "HF ConvNeXt": lambda: Logits(tiny_convnext()),
    "HF ViT": lambda: Logits(tiny_vit()),
    "HF Swin": lambda: Logits(tiny_swin()),
}
_zoo_models: dict[str, tuple[nn.Module, nn.Module | None]] = {}
_zoo_cells: dict[tuple[str, str], str] = {}


def zoo_model(arch: str) -> tuple[nn.Module, nn.Module | None]:
    """The architecture's model (BatchNorm statistics that are not the identity) and its default layer."""
    if arch not in _zoo_models:
        model = ZOO[arch]()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        for p in model.parameters():
            p.requires_grad_(False)
        _zoo_models[arch] = model, default_layer(model, (3, ZOO_SIZE, ZOO_SIZE))
    return _zoo_models[arch]


def zoo_params(name: str) -> dict:
    entry = METHODS.get(name)
    defaults = entry.meta["defaults"]
    out = {k: v for k, v in ZOO_PARAMS.items() if k in defaults}
    if "n_segments" in defaults:  # lime, kernel_shap
        out["n_samples"] = ZOO_SURROGATE_SAMPLES
    return out


def zoo_cell(name: str, arch: str) -> str:
    """'works', or 'not applicable: REASON' (declared) or 'refused: REASON' (a ValueError)."""
    if (name, arch) in _zoo_cells:
        return _zoo_cells[name, arch]
    entry = METHODS.get(name)
    model, layer = zoo_model(arch)
    why = (entry.meta.get("not_applicable") or (lambda _: None))(model)
    if why:
        cell = f"not applicable: {why}"
    else:
        torch.manual_seed(0)
        x, target = torch.randn(2, 3, ZOO_SIZE, ZOO_SIZE), torch.tensor([0, 2])
        kwargs = zoo_params(name) | ({"layer": layer} if entry.meta.get("needs_layer") else {})
        try:
            heat = entry(model, x, target, **kwargs)
        except ValueError as e:
            cell = f"refused: {e}"
        else:
            assert heat.shape == (2, ZOO_SIZE, ZOO_SIZE), (name, arch, heat.shape)
            assert torch.isfinite(heat).all() and (heat >= 0).all(), (name, arch)
            cell = "works"
    _zoo_cells[name, arch] = cell
    return cell


def zoo_names() -> list[str]:
    import auditor.explain.methods  # noqa: F401  (registers every method)
    return list(METHODS.names())


@pytest.mark.parametrize("arch", list(ZOO))
@pytest.mark.parametrize("name", zoo_names())
def test_every_method_on_every_architecture(name, arch):
    """Each cell works or gives a reason that names what is missing (never an empty or cryptic one)."""
    cell = zoo_cell(name, arch)
    assert cell == "works" or len(cell.split(": ", 1)[1]) > 40, cell
    if cell.startswith("refused"):
        assert cell.startswith(f"refused: {name}: "), cell  # the method names itself
    if arch.startswith("HF") and arch != "HF ResNet" and name in ("deeplift", "guided_backprop", "deconvolution"):
        assert cell.startswith("not applicable"), cell  # LayerNorm, attention, GELU: decided before running
    if arch == "plain CNN":
        assert cell == "works", cell


def test_every_architecture_has_a_default_layer():
    names = {arch: module_name(zoo_model(arch)[0], zoo_model(arch)[1]) for arch in ZOO}
    assert names == {
        "plain CNN": "features",
        "residual, BatchNorm, reused in-place ReLU": "layer2",
        "depthwise, SiLU, squeeze-excite": "head.1",   # the head's 1x1 conv + SiLU, before pooling
        "GroupNorm, GELU": "features",
        "HF ResNet": "model.resnet.encoder.stages.1",  # the encoder returns an output object
        "HF ConvNeXt": "model.convnext.encoder.stages.1",
        "HF ViT": "model.vit.layers.1.layernorm_before",
        "HF Swin": "model.swin.layernorm",
    }, names


def short(cell: str) -> str:
    """A cell for the docs table: its state and the first clause of its reason."""
    if cell == "works":
        return "works"
    state, why = cell.split(": ", 1)
    why = why.split(": ", 1)[1] if why.split(": ", 1)[0] in METHODS.names() else why
    why = why.split(";")[0].split(" (e.g.")[0].replace(" per forward pass", " per forward")
    why = re.sub(r"^(the model|DeepLift) has ", "", why).replace(" module (its activations: ", " (")
    return f"{state}: {why}"


def zoo_table() -> str:
    """The method × architecture table in Markdown."""
    archs = list(ZOO)
    lines = ["| method | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|",
             "| default layer | " + " | ".join(f"`{module_name(*zoo_model(a))}`" for a in archs) + " |"]
    for name in zoo_names():
        lines.append(f"| `{name}` | " + " | ".join(short(zoo_cell(name, a)) for a in archs) + " |")
    return "\n".join(lines)


def test_the_zoo_table_in_the_docs_is_current():
    from pathlib import Path
    docs = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    stale = [line.split(" | ")[0] for line in zoo_table().splitlines() if line not in docs.splitlines()]
    assert not stale, f"docs/models.md: rows {stale} differ; paste the table from `python tests/test_architectures.py`"


if __name__ == "__main__":
    print(zoo_table())
