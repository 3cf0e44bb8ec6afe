"""Occlusion through Captum: slide a mean-grey patch, record the drop of the target logit."""
from __future__ import annotations

import torch
from captum.attr import Occlusion
from torch import Tensor, nn

from auditor.explain.methods._common import Count, Share, check_inputs, finish, quiet, register, rows_per_call


def _window(hw: tuple[int, int], window: Share, stride: Share) -> tuple[tuple, tuple]:
    """Window and stride in pixels from fractions of the image side and of the window."""
    win = tuple(min(s, max(1, round(s * window))) for s in hw)
    step = tuple(max(1, round(w * stride)) for w in win)
    return win, step


def _n_windows(hw: tuple[int, int], window: Share, stride: Share) -> int:
    win, step = _window(hw, window, stride)
    n = 1
    for s, w, st in zip(hw, win, step):
        n *= (s - w) // st + 1
    return n


@register("occlusion", title='Occlusion',
          glossary='It covers the image with a grey patch, one place at a time, and records how much the score falls. Where hiding a patch lowers the score most is where the evidence is; slow, but easy to understand and to trust.',
         
          passes=lambda p, hw: (1 + _n_windows(hw or (224, 224), p["window"], p["stride"]), 0))
def occlusion(model: nn.Module, x: Tensor, target: Tensor, window: Share = 0.125,
              stride: Share = 0.5, max_rows: Count = 256) -> Tensor:
    """Occlusion: drop of the target logit when a patch is set to the mean (0), positive part.

    Window = ``window`` x the image side (1/8: 8 px at 64, 28 px at 224), stride = ``stride`` x
    the window; each pixel averages the windows covering it (Captum's Occlusion). Forwards
    per image: 1 + number of windows (225 at the defaults when the side is a multiple of 16).
    A window spans every channel, so Captum gives each of a pixel's C channels the same drop:
    one channel is the map (their sum would be C times the drop).
    """
    target = check_inputs("occlusion", x, target)
    C, H, W = x.shape[1:]
    win, step = _window((H, W), window, stride)
    occ, rows = Occlusion(model), rows_per_call(model, x, max_rows)
    out = []
    with torch.no_grad(), quiet():
        for s in range(0, x.shape[0], rows):
            xs = x[s:s + rows].detach()
            out.append(occ.attribute(xs, sliding_window_shapes=(C, *win), strides=(C, *step),
                                     baselines=0.0, target=target[s:s + rows],
                                     perturbations_per_eval=max(1, rows // xs.shape[0])))
    return finish("occlusion", torch.cat(out)[:, 0].clamp_min(0))
