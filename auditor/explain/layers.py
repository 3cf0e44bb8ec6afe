"""Where Grad-CAM looks: a layer's output as a feature map, and the default layer of a model.

A layer's output is read as a feature map [B, C, h, w] in one of three layouts, from its shape
and the input's aspect ratio alone (so a method needs nothing but the layer):
  ``nchw``    a convolution's map [B, C, h, w] (CNNs, ConvNeXt stages);
  ``nhwc``    channels last [B, h, w, C] (Swin stages, ConvNeXt's inner LayerNorm): permuted;
  ``tokens``  [B, k + h*w, C] (ViT, DeiT, BEiT): the k leading class, distillation or register
              tokens are dropped and the rest reshaped to the patch grid (pytorch-grad-cam's
              ``reshape_transform``); k is the fewest (at most 8) that leave a grid of the
              input's aspect ratio.

The default layer comes from one forward and one backward pass on one seeded input: among the
modules called once whose output is such a map, with h, w > 1 and a non-zero gradient of the
top logit on its spatial positions, take the last; where several modules return the same tensor
(a block and its last ReLU, a stage and its last block) the outermost. A CNN thus gets its last
residual block or stage output before global pooling, not a convolution inside it. Where that
last map is made of tokens (a transformer), take the last normalisation layer with such a
gradient instead: the last block's first norm on a ViT (``layernorm_before`` in Hugging Face's,
``blocks[-1].norm1`` in timm's), the recipe of pytorch-grad-cam; later layers see patch tokens
that no longer reach a class-token head, so their gradient there is zero.

``model.reshape`` replaces the guess from the shape with a stated reading (``read_as``), carried
by the model (``reading_of``); ``describe_layer`` says for the record which layer was read, how,
and why it was chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from auditor.inputs.model import READING_ATTR, READINGS, set_reading  # noqa: F401  (set_reading: re-exported)

MAX_EXTRA_TOKENS = 8   # class + distillation + register tokens a token layout may lead with
ASPECT_SLACK = math.log(1.25)  # a grid's aspect may differ this much from the input's (padding, rounding)


@dataclass(frozen=True)
class Layout:
    kind: str          # "nchw" | "nhwc" | "tokens"
    extra: int = 0     # leading tokens dropped (tokens only)
    grid: tuple[int, int] = (0, 0)  # (h, w)


def _aspect_error(h: int, w: int, hw: tuple[int, int]) -> float:
    return abs(math.log((h / w) / (hw[0] / hw[1])))


def _token_grid(n: int, hw: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) with h * w == n, h, w > 1 and the aspect ratio nearest the input's; None if none
    is within ASPECT_SLACK."""
    best = None
    for h in range(2, int(math.isqrt(n)) + 1):
        if n % h:
            continue
        for gh, gw in ((h, n // h), (n // h, h)):
            if gw > 1 and (best is None or _aspect_error(gh, gw, hw) < _aspect_error(*best, hw)):
                best = (gh, gw)
    return best if best is not None and _aspect_error(*best, hw) <= ASPECT_SLACK else None


def layout(shape: tuple[int, ...], hw: tuple[int, int]) -> Layout | None:
    """How to read an output of ``shape`` for an input of spatial size ``hw``; None when it is
    not a spatial map (a vector, a pooled 1x1 map, a sequence that fits no grid)."""
    if len(shape) == 4:
        _, a, b, c = shape
        if b > 1 and c > 1 and _aspect_error(b, c, hw) <= _aspect_error(a, b, hw):
            return Layout("nchw", grid=(b, c))
        if a > 1 and b > 1 and c > 1:
            return Layout("nhwc", grid=(a, b))
        return None
    if len(shape) == 3 and shape[2] > 1:
        tokens = shape[1]
        for exact in (True, False):  # a grid of the input's exact aspect first, then a near one
            for k in range(0, min(MAX_EXTRA_TOKENS, tokens - 4) + 1):
                grid = _token_grid(tokens - k, hw)
                if grid and (not exact or grid[0] * hw[1] == grid[1] * hw[0]):
                    return Layout("tokens", k, grid)
    return None


# How a layer's output is read (model.reshape; see auditor.inputs.model.set_reading): "auto"
# guesses from the shape (``layout``); the others say it: "vit" tokens [B, 1 + h*w, C] (the class
# token dropped), "swin" tokens [B, h*w, C] or channels-last [B, h, w, C], "none" a map
# [B, C, h, w] as it is. The reading rides on the model (or a layer) as an attribute, so deep
# copies (the trust gate's randomised models) keep it.


def reading_of(model: nn.Module | None, layer: nn.Module | None) -> str:
    """The layer's reading, else the model's, else "auto"."""
    for m in (layer, model):
        if m is not None and getattr(m, READING_ATTR, None):
            return getattr(m, READING_ATTR)
    return "auto"


def read_as(shape: tuple[int, ...], hw: tuple[int, int], reading: str = "auto") -> Layout | None:
    """``layout`` under a given reading: None when the shape does not fit it."""
    if reading == "auto":
        return layout(shape, hw)
    if reading == "none":
        return Layout("nchw", grid=tuple(shape[2:])) if len(shape) == 4 and min(shape[2:]) > 1 else None
    if len(shape) == 4 and reading == "swin":
        return Layout("nhwc", grid=tuple(shape[1:3])) if min(shape[1:3]) > 1 else None
    if len(shape) != 3:
        return None
    extra = 1 if reading == "vit" else 0
    grid = _token_grid(shape[1] - extra, hw) if shape[1] - extra >= 4 else None
    return Layout("tokens", extra, grid) if grid else None


_EXPECTED = {"auto": "neither [B, C, h, w] nor channels-last [B, h, w, C] nor tokens [B, k + h*w, C] "
                     "with a patch grid of the input's aspect ratio",
             "vit": "model.reshape is vit: expected tokens [B, 1 + h*w, C] (a class token, then a patch grid "
                    "of the input's aspect ratio)",
             "swin": "model.reshape is swin: expected tokens [B, h*w, C] (a patch grid of the input's aspect "
                     "ratio, no class token) or channels-last [B, h, w, C]",
             "none": "model.reshape is none: expected a feature map [B, C, h, w] with h, w > 1"}


def feature_map(t: Tensor, hw: tuple[int, int], what: str = "the layer", reading: str = "auto") -> Tensor:
    """``t`` (an output or its gradient) as [B, C, h, w]; ValueError when it is no spatial map
    (under ``reading``: see ``READINGS``)."""
    lay = read_as(tuple(t.shape), hw, reading) if isinstance(t, Tensor) else None
    if lay is None:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} outputs {shape}, which is no spatial feature map: {_EXPECTED[reading]}")
    if lay.kind == "nchw":
        return t
    if lay.kind == "nhwc":
        return t.permute(0, 3, 1, 2)
    h, w = lay.grid
    return t[:, lay.extra:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def spatial_part(t: Tensor, hw: tuple[int, int], reading: str = "auto") -> Tensor:
    """The patch tokens of a token layout (the rest of ``t`` otherwise), for gradient checks."""
    lay = read_as(tuple(t.shape), hw, reading)
    return t[:, lay.extra:] if lay is not None and lay.kind == "tokens" else t


def module_name(model: nn.Module, layer: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is layer), type(layer).__name__) or "(the model)"


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__ and not isinstance(
        m, nn.modules.batchnorm._BatchNorm)


@dataclass
class _Seen:
    names: list[str]          # modules that returned this tensor, in the order they finished
    tensor: Tensor
    first: int                # when it was first returned (completion order)


def default_layer(model: nn.Module, input_shape: tuple[int, int, int],
                  device: torch.device | None = None) -> nn.Module | None:
    """The default Grad-CAM layer (module docstring) for inputs [C, H, W] = ``input_shape``, or
    None when no module called once gives a spatial map the output depends on (``module_name``
    names it). One forward and backward pass of one row; the model's modes are restored."""
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    hw = tuple(input_shape[1:])
    calls: dict[str, int] = {}
    seen: dict[int, _Seen] = {}
    order = [0]

    def hook(name):
        def note(module, inputs, output) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, Tensor) and output.is_floating_point() and output.requires_grad \
                    and layout(tuple(output.shape), hw) is not None:
                order[0] += 1
                s = seen.setdefault(id(output), _Seen([], output, order[0]))
                s.names.append(name)
        return note

    mods = dict(model.named_modules())
    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items() if n]
    modes = [(m, m.training) for m in model.modules()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *input_shape, generator=gen).to(device).requires_grad_(True)
    try:
        model.eval()
        with torch.enable_grad():
            out = model(x)
            if not isinstance(out, Tensor) or out.dim() != 2:
                return None
            for s in seen.values():  # a module called more than once gives no one map
                s.names = [n for n in s.names if calls[n] == 1]
            groups = [s for s in seen.values() if s.names]
            if not groups:
                return None
            grads = torch.autograd.grad(out[0].max(), [s.tensor for s in groups], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.train(training)
    live = [s for s, g in zip(groups, grads)
            if g is not None and spatial_part(g, hw).abs().amax() > 0]
    if not live:
        return None
    live.sort(key=lambda s: s.first)
    last = live[-1]
    if layout(tuple(last.tensor.shape), hw).kind != "nchw":  # a transformer: its last live norm
        norms = [s for s in live if layout(tuple(s.tensor.shape), hw).kind != "nchw"
                 and _is_norm(mods[s.names[-1]])]
        last = norms[-1] if norms else last
    return mods[last.names[-1]]  # the outermost: it finished last among those returning this tensor


def describe(lay: Layout) -> str:
    """A layout in words, for the record."""
    h, w = lay.grid
    if lay.kind == "nchw":
        return f"feature map ({h}×{w})"
    if lay.kind == "nhwc":
        return f"channels-last feature map ({h}×{w})"
    dropped = {0: "no class token", 1: "class token dropped"}.get(lay.extra, f"{lay.extra} leading tokens dropped")
    return f"tokens ({dropped}, {h}×{w} grid)"


def describe_layer(model: nn.Module, layer: nn.Module | None, configured: str | None,
                   input_shape: tuple[int, int, int] | None = None) -> dict:
    """The Grad-CAM layer for the record: its dotted name, class, how its output is read and why
    it was chosen. The reading comes from one forward pass of a seeded input of ``input_shape``
    (default: ``model.input_shape``, else 3×224×224); None where no layer was found."""
    if layer is None:
        return {"name": None, "kind": None, "reading": None,
                "why": "no module gives a spatial feature map the output depends on; set model.target_layer"}
    name = next((n for n, m in model.named_modules() if m is layer), None)
    shape = input_shape or getattr(model, "input_shape", None) or (3, 224, 224)
    reading = reading_of(model, layer)
    seen: list = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape) if isinstance(o, Tensor) else None))
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device))
    except Exception as e:  # noqa: BLE001  (the record says so; Grad-CAM reports its own error)
        seen = [f"not read: the forward pass failed ({type(e).__name__})"]
    finally:
        handle.remove()
        for m, training in modes:
            m.train(training)
    lay = read_as(seen[0], tuple(shape[1:]), reading) if len(seen) == 1 and isinstance(seen[0], tuple) else None
    if lay is not None:
        words = describe(lay)
    elif len(seen) == 1:
        words = seen[0] if isinstance(seen[0], str) else f"none: {seen[0]} is no spatial feature map"
    else:
        words = f"none: called {len(seen)} times per forward pass"
    if reading != "auto":
        words += f" (model.reshape: {reading})"
    if configured:
        why = "model.target_layer"
    elif lay is not None and lay.kind != "nchw" and _is_norm(layer):  # step 4 of default_layer
        why = "the last block's norm (token model)" if lay.extra else "the last norm over the tokens (token model)"
    else:
        why = "the last spatial feature map before pooling"
    return {"name": name, "kind": type(layer).__name__, "reading": words, "why": why}
