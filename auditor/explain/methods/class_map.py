"""CAM: the class activation map of a model whose head is global average pooling and one linear layer.

Zhou et al. 2016: where the logits are y_c = sum_k w_k^c mean(A_k) + b_c over the last feature maps
A_k, the map of class c is sum_k w_k^c A_k, exact and without a gradient; ReLU, bilinear upsampling.

The head is found on a forward pass, not from module names or types alone: module hooks see which
leaf module is called last (it must be an nn.Linear whose output the model returns) and a
``TorchFunctionMode`` sees every tensor the forward makes, functional ops included (``x.mean((2,
3))``, DenseNet's ``F.relu`` before its functional pooling). The last spatial map made before that
linear layer is read as [B, C, h, w] with ``layers.feature_map`` (channels-last and token maps
too); the head is global average pooling exactly when the linear layer's input is that map's
spatial mean (nn.AdaptiveAvgPool2d(1), an nn.AvgPool2d covering the map, ``mean``, with or without
a Flatten). Any other head (max pooling, a norm or an MLP after the pooling, a class token) is
refused with what it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from auditor.explain.layers import feature_map, layout
from auditor.explain.methods._common import Count, check_inputs, finish, in_calls, register, upsample

NEEDS = "CAM needs a head of global average pooling and one linear layer"
PROBE_SIZES = (224, 64, 32)  # square inputs the applicability probe tries after the model's own size


class NoGapHead(ValueError):
    """The model's head is not global average pooling and one linear layer (the message says what it is)."""


@dataclass
class _Trace:
    hw: tuple[int, int]
    names: dict[int, str]
    spatial: Tensor | None = None      # the last spatial map made so far
    spatial_name: str = ""             # the outermost module that returned it ("" if functional)
    after: list[str] = field(default_factory=list)  # leaf modules called since it was made
    leaf: nn.Module | None = None      # the last leaf module called
    linear_in: Tensor | None = None
    linear_out: Tensor | None = None
    at_linear: tuple[Tensor | None, str, list[str]] = (None, "", [])

    def saw(self, out, module: nn.Module | None = None) -> None:
        if not isinstance(out, Tensor) or out.dim() not in (3, 4) or not out.is_floating_point():
            return
        if out is not self.spatial:
            if layout(tuple(out.shape), self.hw) is None:
                return
            self.spatial, self.spatial_name, self.after = out, "", []
        if module is not None:
            self.spatial_name = self.names[id(module)]

    def enter(self, module: nn.Module, inputs) -> None:
        self.leaf = module
        self.after.append(describe(self.names[id(module)], module))
        if isinstance(module, nn.Linear):
            self.linear_in = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            self.linear_out = None
            self.at_linear = (self.spatial, self.spatial_name, list(self.after))

    def left(self, module: nn.Module, output) -> None:
        if module is self.leaf and isinstance(module, nn.Linear):
            self.linear_out = output


class _Watch(TorchFunctionMode):
    """Shows the trace every tensor that a torch function or tensor method returns."""

    def __init__(self, trace: _Trace):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.trace.saw(out)
        return out


def describe(name: str, module: nn.Module) -> str:
    return f"{type(module).__name__} ({name!r})" if name else type(module).__name__


@dataclass(frozen=True)
class Head:
    maps: Tensor          # the last feature maps A [B, C, h, w]
    linear: nn.Linear     # the layer whose weights w^c weigh them


def gap_head(model: nn.Module, x: Tensor) -> Head:
    """The feature maps and the linear layer of ``model``'s global-average-pooling head on one
    forward pass of ``x`` (no gradient; hooks removed, modes untouched); NoGapHead says why not."""
    names = {id(m): n for n, m in model.named_modules()}
    trace = _Trace(tuple(x.shape[2:]), names)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_hook(lambda mod, i, out: trace.saw(out, mod)))
        if next(m.children(), None) is None:
            handles.append(m.register_forward_pre_hook(lambda mod, i: trace.enter(mod, i)))
            handles.append(m.register_forward_hook(lambda mod, i, out: trace.left(mod, out)))
    try:
        with torch.no_grad(), _Watch(trace):
            trace.saw(x)
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    spatial, spatial_name, chain = trace.at_linear
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise NoGapHead(f"{NEEDS}; this model's output is {getattr(out, 'shape', type(out).__name__)}, "
                        f"not a tensor of logits [B, K]")
    head = " → ".join(trace.after) or "functional operations only"
    if not isinstance(trace.leaf, nn.Linear):
        last = describe(names[id(trace.leaf)], trace.leaf) if trace.leaf is not None else "no module"
        raise NoGapHead(f"{NEEDS}; this model's head is {head}, which ends in {last}, not in a linear layer")
    linear = trace.leaf
    name = describe(names[id(linear)], linear)
    if trace.linear_out is None or not (trace.linear_out is out or torch.equal(trace.linear_out, out)):
        raise NoGapHead(f"{NEEDS}; this model's head is {head}, and the model changes the output of its "
                        f"last linear layer {name} before returning it")
    v = trace.linear_in
    if v is None or v.dim() != 2:
        raise NoGapHead(f"{NEEDS}; this model's head is {head}, whose last linear layer {name} reads "
                        f"{tuple(v.shape) if v is not None else 'no tensor'}, not one vector per image")
    if spatial is None:
        raise NoGapHead(f"{NEEDS}; this model's head is {head}, and no spatial feature map reaches it")
    maps = feature_map(spatial, tuple(x.shape[2:]))
    source = f" ({spatial_name!r}, {'×'.join(map(str, spatial.shape[1:]))})" if spatial_name else \
        f" ({'×'.join(map(str, spatial.shape[1:]))})"
    pooled = maps.mean((2, 3))
    tol = max(1e-5, 50 * torch.finfo(maps.dtype).eps) * max(float(maps.abs().amax()), 1.0)
    if pooled.shape != v.shape or not torch.allclose(pooled, v.to(pooled.dtype), rtol=0, atol=tol):
        raise NoGapHead(f"{NEEDS}; this model's head is {' → '.join(chain)}, whose input is not the "
                        f"average of the last feature map{source} over its positions")
    return Head(maps.detach(), linear)


def _probe_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """Input shapes [C, H, W] to find the head on: the model's own size where a config names it
    (Hugging Face ``config.image_size``, timm ``pretrained_cfg``), then PROBE_SIZES; C from the
    config or the first convolution."""
    channels, sizes = None, []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        size = getattr(cfg, "image_size", None)
        timm = getattr(m, "pretrained_cfg", None) or {}
        if isinstance(timm, dict) and len(timm.get("input_size") or ()) == 3:
            channels, size = channels or timm["input_size"][0], timm["input_size"][1:]
        channels = channels or getattr(cfg, "num_channels", None)
        if isinstance(m, nn.Conv2d):
            channels = channels or m.in_channels
        if isinstance(size, int):
            sizes.append((size, size))
        elif isinstance(size, (tuple, list)) and len(size) == 2:
            sizes.append(tuple(size))
    sizes += [(s, s) for s in PROBE_SIZES]
    return [(int(channels or 3), *hw) for hw in dict.fromkeys(sizes)]


def no_gap_head(model: nn.Module) -> str | None:
    """Why CAM cannot explain ``model`` (its head, in words), or None. Found on one seeded input of
    the first size in ``_probe_shapes`` the model runs on, in eval mode (modes restored); None too
    where it runs on none of them (the method's own call then says why on the real inputs)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = [(m, m.training) for m in model.modules()]
    gen = torch.Generator().manual_seed(0)
    try:
        model.eval()
        for shape in _probe_shapes(model):
            x = torch.randn(1, *shape, generator=gen).to(device)
            try:
                gap_head(model, x)
                return None
            except NoGapHead as e:
                return str(e)
            except Exception:  # not this size: try the next
                continue
        return None
    finally:
        for m, training in modes:
            m.train(training)


@register("cam", title="CAM (class activation map)",
          glossary="For a model that averages its last feature maps and weighs them with one linear layer, it shows exactly how much each region adds to the class score, with no gradient. It works only for that kind of head; for any other the audit says so and does not run it.",
          passes=lambda p, hw: (1, 0), not_applicable=no_gap_head)
def cam(model: nn.Module, x: Tensor, target: Tensor, max_rows: Count = 256) -> Tensor:
    """CAM: the last feature maps weighed by the linear head's class weights, ReLU, upsampled.

    Zhou et al. 2016; exact for a head of global average pooling and one linear layer, refused for any other.
    """
    target = check_inputs("cam", x, target)

    def attribute(xs, ts):
        try:
            head = gap_head(model, xs)
        except NoGapHead as e:
            raise ValueError(f"cam: {e}") from None
        w = head.linear.weight.detach()[ts].to(head.maps.dtype)
        return upsample((w[:, :, None, None] * head.maps).sum(1).clamp_min(0), tuple(xs.shape[2:]))
    return finish("cam", in_calls(model, x, target, max_rows, attribute))
