"""Class-activation methods on a layer, through Captum: Grad-CAM and guided Grad-CAM."""
from __future__ import annotations

from captum.attr import GuidedBackprop, LayerGradCam
from torch import Tensor, nn

from auditor.explain.methods._common import Count, abs_max, check_inputs, finish, grad_input, in_calls, quiet, register, upsample


def _layer_cam(name: str, model: nn.Module, layer: nn.Module | None, x: Tensor,
               target: Tensor) -> Tensor:
    """ReLU(sum_k mean(dy/dA_k) A_k) at ``layer``, bilinearly upsampled to [B, H, W]."""
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{name} needs layer= (an nn.Module of the model), "
                         f"got {type(layer).__name__}")
    with quiet():
        cam = LayerGradCam(model, layer).attribute(x.detach(), target=target,
                                                   relu_attributions=True)
    if isinstance(cam, tuple) or cam.dim() != 4 or cam.shape[1] != 1:
        shape = [tuple(c.shape) for c in cam] if isinstance(cam, tuple) else tuple(cam.shape)
        raise ValueError(f"{name}: layer {type(layer).__name__} must output one feature map "
                         f"[B, C, h, w]; Grad-CAM there has shape {shape}")
    return upsample(cam.detach(), x.shape[2:])


@register("gradcam", title='Grad-CAM',
          glossary="Its maps are coarse (the layer's resolution) but class-specific, which makes it good at showing which region of the image the model relies on.",
          needs=("layer",), passes=lambda p, hw: (1, 1))
def gradcam(model: nn.Module, x: Tensor, target: Tensor, layer: nn.Module | None = None,
            max_rows: Count = 256) -> Tensor:
    """Grad-CAM: layer maps weighted by their mean gradient, ReLU, bilinear upsampling.

    Selvaraju et al. 2017, through Captum's LayerGradCam on ``layer``.
    """
    target = check_inputs("gradcam", x, target)
    return finish("gradcam", in_calls(model, x, target, max_rows,
                                      lambda xs, ts: _layer_cam("gradcam", model, layer, xs, ts)))


@register("guided_gradcam", title='Guided Grad-CAM',
          glossary="It keeps Grad-CAM's region and adds guided backpropagation's fine detail, showing which edges inside the region matter.",
          needs=("layer",), passes=lambda p, hw: (2, 2))
def guided_gradcam(model: nn.Module, x: Tensor, target: Tensor,
                   layer: nn.Module | None = None, max_rows: Count = 256) -> Tensor:
    """Guided Grad-CAM: guided backprop times upsampled Grad-CAM, |.| max over channels.

    Captum's GuidedGradCam with bilinear (not nearest) upsampling, so the CAM matches gradcam.
    Two passes: Grad-CAM needs the plain gradient at the layer, guided backprop the modified one.
    """
    target = check_inputs("guided_gradcam", x, target)

    guided = GuidedBackprop(model)

    def attribute(xs, ts):
        cam = _layer_cam("guided_gradcam", model, layer, xs, ts)
        with quiet():
            return abs_max(guided.attribute(grad_input(xs), target=ts)) * cam
    return finish("guided_gradcam", in_calls(model, x, target, max_rows, attribute))
