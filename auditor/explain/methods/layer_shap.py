"""Layer GradientSHAP: Captum's LayerGradientShap estimator on a layer, with seeded per-image draws.

Per image and sample j (as Captum's LayerGradientShap, whose draws come from the global numpy and
torch generators; here from the image's own generator, so batch == per image): a baseline
b_j ~ N(0, baseline_std^2) per pixel (0 is the mean image: gradient.py's recipe), the input
x_j = x + N(0, stdevs^2), alpha_j ~ U(0, 1), and the layer attribution

    mean_j  dy/dA at (alpha_j x_j + (1 - alpha_j) b_j)  *  (A(x_j) - A(b_j)),

A the layer's output, y the target logit. The attribution is read as a feature map [B, C, h, w]
(``layers.feature_map``: channels-last and token maps too), summed over channels, its positive
part upsampled to the input. The model goes on with a copy of the layer's output, as in Captum.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from auditor.explain.layers import feature_map, layout, module_name
from auditor.explain.methods._common import (Count, NonNegative, check_inputs, chunked_draws, finish, image_generators,
                                             pos_sum, register, rows_per_call, upsample)

NAME = "layer_gradient_shap"


def draws(shape: tuple[int, ...], baseline_std: float, stdevs: float, device, dtype
          ) -> Callable[[torch.Generator, int], tuple[Tensor, Tensor, Tensor]]:
    """``draw(gen, n)``: n baselines, input noises (zeros [n, 1, 1, 1] when stdevs is 0) and alphas [n, 1, 1, 1]."""
    def draw(g: torch.Generator, n: int):
        kw = dict(generator=g, device=device, dtype=dtype)
        base = torch.randn(n, *shape, **kw) * baseline_std
        noise = (torch.randn(n, *shape, **kw) * stdevs if stdevs > 0
                 else torch.zeros(n, 1, 1, 1, device=device, dtype=dtype))
        return base, noise, torch.rand(n, 1, 1, 1, **kw)
    return draw


def _at_layer(model: nn.Module, layer: nn.Module, xs: Tensor, target: Tensor | None = None) -> Tensor:
    """The layer's output on ``xs`` or, given ``target``, the target logit's gradient there."""
    outs: list = []

    def keep(module, inputs, output):
        outs.append(output)
        return output.clone() if isinstance(output, Tensor) else None

    handle = layer.register_forward_hook(keep)
    try:
        with torch.set_grad_enabled(target is not None):
            logits = model(xs.detach().requires_grad_(target is not None))
            where = f"{NAME}: layer {module_name(model, layer)!r} ({type(layer).__name__})"
            if len(outs) != 1:
                raise ValueError(f"{where} is called {len(outs)} times per forward pass, so it has no one "
                                 f"output to attribute to; set model.target_layer to a module called once"
                                 if outs else f"{where} is not called in the model's forward pass")
            act = outs[0]
            if not isinstance(act, Tensor):
                raise ValueError(f"{where} outputs {type(act).__name__}, not one tensor")
            if target is None:
                return act.detach()
            grad, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), act, allow_unused=True)
    finally:
        handle.remove()
    return torch.zeros_like(act) if grad is None else grad


def attributions(model: nn.Module, layer: nn.Module, x: Tensor, target: Tensor, n_samples: int = 32,
                 baseline_std: float = 0.5, stdevs: float = 0.0, seed: int = 0, max_rows: int = 256) -> Tensor:
    """The layer attributions [B, *layer output] (module docstring), in calls of ``rows_per_call`` rows."""
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{NAME} needs layer= (an nn.Module of the model), got {type(layer).__name__}")
    if not x.shape[0]:
        return x.new_zeros((0,))
    rows = rows_per_call(model, x, max_rows)
    acts_x = None
    if stdevs == 0:  # the same input for every sample: its layer output once per image
        acts_x = torch.cat([_at_layer(model, layer, x[s:s + rows]) for s in range(0, x.shape[0], rows)])
    total = reach = None  # reach: |gradient| summed over the rows, per position of the layer's output
    draw = draws(tuple(x.shape[1:]), baseline_std, stdevs, x.device, x.dtype)
    for img, (base, noise, alpha) in chunked_draws(image_generators(x, seed), n_samples, rows, draw):
        img = img.to(x.device)
        xt = x[img] + noise
        grad = _at_layer(model, layer, alpha * xt + (1 - alpha) * base, target[img])
        a_x = acts_x[img] if acts_x is not None else _at_layer(model, layer, xt)
        part = grad * (a_x - _at_layer(model, layer, base))
        if total is None:
            total, reach = part.new_zeros((x.shape[0], *part.shape[1:])), grad.new_zeros(grad.shape[1:])
        total.index_add_(0, img, part)
        reach += grad.abs().sum(0)
    lay = layout(tuple(total.shape), tuple(x.shape[2:]))
    if lay is not None and lay.kind == "tokens" and lay.extra and not reach[lay.extra:].any() and reach.any():
        raise ValueError(f"{NAME}: layer {module_name(model, layer)!r} ({type(layer).__name__}): the target's "
                         f"gradient reaches only its {lay.extra} leading (class) token(s), none of the patch "
                         f"tokens, so its map would be empty; choose an earlier layer, e.g. the last block's "
                         f"first norm (the default)")
    return total / n_samples


@register(NAME, title="Layer Gradient SHAP",
          glossary="It averages, over many noisy plain baselines, how much each position of a layer's feature maps moved the class score, so its maps are coarse like Grad-CAM's but estimate SHAP values instead of reading one gradient. It is slower than Grad-CAM (many passes per image) but depends less on one arbitrary reference.",
          needs=("layer",), stochastic=True,
          passes=lambda p, hw: (2 * p["n_samples"] + (1 if p["stdevs"] == 0 else p["n_samples"]), p["n_samples"]))
def layer_gradient_shap(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | None = None,
                        n_samples: Count = 32, baseline_std: NonNegative = 0.5, stdevs: NonNegative = 0.0,
                        seed: int = 0, max_rows: Count = 256) -> Tensor:
    """Layer Gradient SHAP: expected gradients at a layer from noisy baselines, positive channel sum, upsampled.

    Captum's LayerGradientShap (Lundberg & Lee 2017) with seeded per-image draws.
    """
    target = check_inputs(NAME, x, target)
    hw = tuple(x.shape[2:])
    attr = attributions(model, layer, x, target, n_samples, baseline_std, stdevs, seed, max_rows)
    if not x.shape[0]:
        return x.new_zeros((0, *hw))
    where = f"{NAME}: layer {module_name(model, layer)!r} ({type(layer).__name__})"
    return finish(NAME, upsample(pos_sum(feature_map(attr, hw, where)), hw))
