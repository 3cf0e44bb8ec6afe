"""Gradient methods through Captum: saliency, SmoothGrad, Integrated Gradients, GradientSHAP,
guided backprop, deconvolution (DeepLift has its own module, deeplift.py).

Gradient-magnitude methods reduce |attribution| max over channels; signed ones keep the
positive part of the channel sum. Baselines are 0 = the dataset mean in normalised space.
"""
from __future__ import annotations

from typing import Literal

import torch
from captum.attr import Deconvolution, GuidedBackprop, IntegratedGradients, Saliency
from torch import Tensor, nn

from auditor.explain.methods._common import (Count, NonNegative, abs_max, check_inputs, chunked_draws, finish, grad_input,
                                     image_generators, in_calls, pos_sum, quiet, register, rows_per_call,
                                     single_use)


def _abs_grads(model: nn.Module, x: Tensor, target: Tensor, max_rows: int, explainer, **kw) -> Tensor:
    """|attributions| max over channels of one Captum gradient explainer, in calls of
    ``rows_per_call`` images."""
    def attribute(xs, ts):
        return abs_max(explainer.attribute(grad_input(xs), target=ts, **kw))
    with quiet():
        return in_calls(model, x, target, max_rows, attribute)


@register("saliency", title='Saliency',
          glossary='For every pixel it asks how much a tiny change there would move the model\'s score for the class. It shows which pixels would change the score fastest; fast but noisy, and it can follow image edges more than the model.',
          passes=lambda p, hw: (1, 1))
def saliency(model: nn.Module, x: Tensor, target: Tensor, max_rows: Count = 256) -> Tensor:
    """Saliency: |d logit / d input|, max over channels (Simonyan et al. 2014)."""
    target = check_inputs("saliency", x, target)
    return finish("saliency", _abs_grads(model, x, target, max_rows, Saliency(model), abs=True))


def _noisy_gradients(name: str, model: nn.Module, x: Tensor, target: Tensor, n: int,
                     seed: int, max_rows: int, draw, points_of) -> Tensor:
    """Mean over n seeded draws per image of the target logit's gradient at the points
    ``points_of(x_rows, image_index, draws) -> (points, factor)``, times ``factor``
    (|grad| if factor is None)."""
    if n < 1:
        raise ValueError(f"{name}: n_samples must be >= 1, got {n}")
    total = torch.zeros_like(x)
    sal = Saliency(model)
    rows_cap = rows_per_call(model, x, max_rows)
    for img, draws in chunked_draws(image_generators(x, seed), n, rows_cap, draw):
        img = img.to(x.device)
        points, factor = points_of(x[img], img, draws)
        with quiet():
            grad = sal.attribute(points.detach().requires_grad_(True), target=target[img],
                                 abs=factor is None)
        total.index_add_(0, img, grad if factor is None else grad * factor)
    return total / n


@register("smoothgrad", title='SmoothGrad',
          glossary="It is saliency computed on many slightly noisy copies of the image and averaged. Averaging over noisy copies removes much of plain saliency's speckle, at the cost of one pass per copy.",
          stochastic=True, passes=lambda p, hw: (p["n_samples"], p["n_samples"]))
def smoothgrad(model: nn.Module, x: Tensor, target: Tensor, n_samples: Count = 32,
               noise_level: NonNegative = 0.15, seed: int = 0, max_rows: Count = 256) -> Tensor:
    """SmoothGrad: saliency averaged over noisy copies, max over channels (Smilkov et al. 2017).

    Same quantity as Captum's NoiseTunnel(Saliency) with nt_type="smoothgrad" (mean of |grad|
    over samples), with seeded per-image noise: sigma = noise_level * (max - min) of each image.
    """
    target = check_inputs("smoothgrad", x, target)
    flat = x.detach().flatten(1)
    sigma = (noise_level * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)
    shape = x.shape[1:]

    def draw(g, n):
        return (torch.randn(n, *shape, generator=g, device=x.device, dtype=x.dtype),)

    def points_of(xr, img, draws):
        return xr + sigma[img] * draws[0], None

    total = _noisy_gradients("smoothgrad", model, x, target, n_samples, seed, max_rows, draw,
                             points_of)
    return finish("smoothgrad", abs_max(total))


@register("integrated_gradients", title='Integrated Gradients',
          glossary="It fades the image in from a plain grey one and adds up, pixel by pixel, how the score rises on the way. It adds up gradients along a straight path from the baseline to the image, so the pixel scores sum to the change in the model's output.",
          passes=lambda p, hw: (p["n_steps"], p["n_steps"]))
def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, n_steps: Count = 32,
                         method: Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                         "riemann_trapezoid"] = "gausslegendre", max_rows: Count = 256) -> Tensor:
    """Integrated Gradients from the mean image (0), positive part of the channel sum."""
    target = check_inputs("integrated_gradients", x, target)
    ig, rows = IntegratedGradients(model), rows_per_call(model, x, max_rows)
    out = []
    for s in range(0, x.shape[0], rows):  # images per call <= rows, so rows per forward <= rows
        xs = x[s:s + rows]
        with quiet():
            out.append(ig.attribute(grad_input(xs), baselines=0.0, target=target[s:s + rows],
                                    n_steps=n_steps, method=method,
                                    internal_batch_size=rows).detach())
    return finish("integrated_gradients", pos_sum(torch.cat(out)))


@register("gradient_shap", title='Gradient SHAP',
          glossary='It is Integrated Gradients started from many random plain images instead of one, and averaged: an estimate of each pixel\'s SHAP value. Averaging over many noisy baselines makes it depend less on one arbitrary reference image than Integrated Gradients does.',
          stochastic=True,
          passes=lambda p, hw: (p["n_samples"], p["n_samples"]))
def gradient_shap(model: nn.Module, x: Tensor, target: Tensor, n_samples: Count = 32,
                  baseline_std: NonNegative = 0.5, stdevs: NonNegative = 0.0, seed: int = 0,
                  max_rows: Count = 256) -> Tensor:
    """GradientSHAP (expected gradients) from noisy mean-image baselines, positive channel sum.

    Captum's GradientShap estimator with seeded per-image draws (Captum draws from the global
    RNG): per sample, baseline b ~ N(0, baseline_std^2) per pixel, input x~ = x + N(0, stdevs^2),
    alpha ~ U(0, 1); attribution = mean of grad(b + alpha (x~ - b)) * (x~ - b).
    """
    target = check_inputs("gradient_shap", x, target)
    shape = x.shape[1:]

    def draw(g, n):
        kw = dict(generator=g, device=x.device, dtype=x.dtype)
        base = torch.randn(n, *shape, **kw) * baseline_std
        noise = (torch.randn(n, *shape, **kw) * stdevs if stdevs > 0
                 else torch.zeros(n, 1, 1, 1, device=x.device, dtype=x.dtype))
        return base, noise, torch.rand(n, 1, 1, 1, **kw)

    def points_of(xr, img, draws):
        base, noise, alpha = draws
        delta = xr + noise - base
        return base + alpha * delta, delta

    total = _noisy_gradients("gradient_shap", model, x, target, n_samples, seed, max_rows, draw,
                             points_of)
    return finish("gradient_shap", pos_sum(total))


def no_relu(model: nn.Module) -> str | None:
    """Why guided backprop and deconvolution mean nothing here (no nn.ReLU module), or None."""
    if any(isinstance(m, nn.ReLU) for m in model.modules()):
        return None
    acts = sorted({type(m).__name__ for m in model.modules() if next(m.children(), None) is None
                   and any(w in type(m).__name__ for w in ("GELU", "SiLU", "Swish", "Mish", "Activation", "Tanh"))})
    return (f"the model has no nn.ReLU module ({'its activations: ' + ', '.join(acts) if acts else 'none is hooked'}); "
            f"this method changes only how ReLU modules pass gradients back, so here it would be exactly saliency")


def _refuse_without_relu(name: str, model: nn.Module) -> None:
    why = no_relu(model)
    if why:
        raise ValueError(f"{name}: {why}")


@register("guided_backprop", title='Guided backpropagation',
          glossary='It traces the score back to the pixels, keeping only the signals that increase it at every layer. Its maps are sharp, but they often look alike whatever the model has learned, so they are a weak witness on their own.',
          passes=lambda p, hw: (1, 1), not_applicable=no_relu)
def guided_backprop(model: nn.Module, x: Tensor, target: Tensor, max_rows: Count = 256) -> Tensor:
    """Guided backprop: gradient with negative signals cut at each nn.ReLU, |.| max over channels.

    Works with in-place and reused nn.ReLU modules (the guided rule uses only each call's own
    input gradient); functional F.relu is not hooked and acts as a plain ReLU gradient. Refuses
    a model with no nn.ReLU module (a ViT, a ConvNeXt): there it would be saliency exactly.
    """
    target = check_inputs("guided_backprop", x, target)
    _refuse_without_relu("guided_backprop", model)
    return finish("guided_backprop", _abs_grads(model, x, target, max_rows, GuidedBackprop(model)))


@register("deconvolution", title='Deconvolution',
          glossary="It runs the network backwards from the score to the pixels, keeping the patterns that excite it. It shows which input patterns excite the network, but barely depends on the model's top layers, so read it next to a class-specific method such as Grad-CAM.",
          passes=lambda p, hw: (1, 1), not_applicable=no_relu)
def deconvolution(model: nn.Module, x: Tensor, target: Tensor, max_rows: Count = 256) -> Tensor:
    """Deconvolution: ReLUs pass back only positive gradients, |.| max over channels.

    Zeiler & Fergus 2014.

    Refuses a reused nn.ReLU module: Captum keeps one output gradient per module.
    """
    target = check_inputs("deconvolution", x, target)
    _refuse_without_relu("deconvolution", model)
    why = "Captum's Deconvolution keeps one output gradient per ReLU module, so reuse can mix them."
    with single_use("deconvolution", model, (nn.ReLU,), why):
        heat = _abs_grads(model, x, target, max_rows, Deconvolution(model))
    return finish("deconvolution", heat)
