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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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


def feature_map(t: Tensor, hw: tuple[int, int], what: str = "the layer") -> Tensor:
    """``t`` (an output or its gradient) as [B, C, h, w]; ValueError when it is no spatial map."""
    lay = layout(tuple(t.shape), hw) if isinstance(t, Tensor) else None
    if lay is None:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} outputs {shape}, which is no spatial feature map: neither "
                         f"[B, C, h, w] nor channels-last [B, h, w, C] nor tokens [B, k + h*w, C] "
                         f"with a patch grid of the input's aspect ratio")
    if lay.kind == "nchw":
        return t
    if lay.kind == "nhwc":
        return t.permute(0, 3, 1, 2)
    h, w = lay.grid
    return t[:, lay.extra:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def spatial_part(t: Tensor, hw: tuple[int, int]) -> Tensor:
    """The patch tokens of a token layout (the rest of ``t`` otherwise), for gradient checks."""
    lay = layout(tuple(t.shape), hw)
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
