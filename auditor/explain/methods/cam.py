"""Class-activation methods on a layer: Grad-CAM and guided Grad-CAM.

Grad-CAM reads the layer's output and its gradient through a forward hook, as Captum's
LayerGradCam does, but first turns both into a feature map [B, C, h, w] with
``auditor.explain.layers.feature_map``: a convolution's map as it is, a channels-last map
permuted, a transformer's tokens without their class (and register) tokens reshaped to the patch
grid; how is guessed from the shape unless ``model.reshape`` says it (``layers.set_reading``,
carried by the model). As in Captum, the model continues with a copy of the layer's output, so an in-place op
after the layer changes neither the map nor its gradient. The hook also counts the layer's calls: a module called several times per forward (a
shared ReLU) has no one feature map, and is refused with its name rather than read at one call.
"""
from __future__ import annotations

import torch
from captum.attr import GuidedBackprop
from torch import Tensor, nn

from auditor.explain.layers import feature_map, module_name, read_as, reading_of
from auditor.explain.methods._common import Count, abs_max, check_inputs, finish, grad_input, in_calls, quiet, register, upsample


def _layer_cam(name: str, model: nn.Module, layer: nn.Module | None, x: Tensor,
               target: Tensor) -> Tensor:
    """ReLU(sum_k mean(dy/dA_k) A_k) at ``layer``, bilinearly upsampled to [B, H, W]."""
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{name} needs layer= (an nn.Module of the model), "
                         f"got {type(layer).__name__}")
    outs: list = []

    def keep(module, inputs, output):  # the model goes on with a copy: its in-place ops (a ReLU's)
        outs.append(output)            # must not change the map read here, nor its gradient
        return output.clone() if isinstance(output, Tensor) else None

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # a graph even where weights are frozen
            where = f"{name}: layer {module_name(model, layer)!r} ({type(layer).__name__})"
            if len(outs) != 1:
                raise ValueError(f"{where} is called {len(outs)} times per forward pass, so Grad-CAM has no "
                                 f"one feature map to read; set model.target_layer to a module called once "
                                 f"(e.g. the block around it)" if outs else
                                 f"{where} is not called in the model's forward pass")
            act = outs[0]
            if not isinstance(act, Tensor):
                raise ValueError(f"{where} outputs {type(act).__name__}, not one tensor")
            grad, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), act, allow_unused=True)
    finally:
        handle.remove()
    hw = tuple(x.shape[2:])
    grad = torch.zeros_like(act) if grad is None else grad
    reading = reading_of(model, layer)  # model.reshape (auto: from the shape)
    a, g = feature_map(act.detach(), hw, where, reading), feature_map(grad, hw, where, reading)
    lay = read_as(tuple(act.shape), hw, reading)
    if lay.kind == "tokens" and lay.extra and not g.any() and grad.any():
        raise ValueError(f"{where}: the target's gradient reaches only its {lay.extra} leading (class) "
                         f"token(s), none of the patch tokens, so its map would be empty; choose an earlier "
                         f"layer, e.g. the last block's first norm (the default)")
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp_min(0)
    return upsample(cam.detach(), hw)


@register("gradcam", title='Grad-CAM',
          glossary="It looks at a layer deep in the network, where each position stands for a region of the image, and weighs the regions by how much they raise the class's score. Its maps are coarse (the layer's resolution) but class-specific, which makes it good at showing which region of the image the model relies on.",
          needs=("layer",), passes=lambda p, hw: (1, 1))
def gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | None = None,
            max_rows: Count = 256) -> Tensor:
    """Grad-CAM: layer maps weighted by their mean gradient, ReLU, bilinear upsampling.

    Selvaraju et al. 2017; on a transformer's tokens, the reshape of pytorch-grad-cam's recipe.
    """
    target = check_inputs("gradcam", x, target)
    return finish("gradcam", in_calls(model, x, target, max_rows,
                                      lambda xs, ts: _layer_cam("gradcam", model, layer, xs, ts)))


@register("guided_gradcam", title='Guided Grad-CAM',
          glossary="It multiplies Grad-CAM's coarse map by guided backpropagation's sharp one. It keeps Grad-CAM's region and adds guided backpropagation's fine detail, showing which edges inside the region matter.",
          needs=("layer",), passes=lambda p, hw: (2, 2))
def guided_gradcam(model: nn.Module, x: Tensor, target: Tensor,
                   layer: nn.Module | None = None, max_rows: Count = 256) -> Tensor:
    """Guided Grad-CAM: guided backprop times upsampled Grad-CAM, |.| max over channels.

    Captum's GuidedGradCam with bilinear (not nearest) upsampling, so the CAM matches gradcam.
    Two passes: Grad-CAM needs the plain gradient at the layer, guided backprop the modified one.
    On a model without nn.ReLU modules (a ViT) the guided part is the plain gradient.
    """
    target = check_inputs("guided_gradcam", x, target)

    guided = GuidedBackprop(model)

    def attribute(xs, ts):
        cam = _layer_cam("guided_gradcam", model, layer, xs, ts)
        with quiet():
            return abs_max(guided.attribute(grad_input(xs), target=ts)) * cam
    return finish("guided_gradcam", in_calls(model, x, target, max_rows, attribute))
