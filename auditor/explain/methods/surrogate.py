"""LIME and KernelSHAP on superpixels, batched across images and samples.

Captum's Lime/KernelShap fit one image at a time (and lime_image forwards 10 rows at a time);
here every image is segmented, its coalitions drawn from its own seeded generator, all
perturbed images (images x samples) go through the model in chunks of ``max_rows``, and the
weighted ridge regressions of all images are solved at once (float64 ``torch.linalg.solve``;
images with fewer segments are padded with masked columns that get coefficient 0).

Perturbation: a switched-off superpixel is set to 0 = the dataset mean in normalised space
(lime_image's default fills it with the superpixel's mean colour instead). The explained
output is the softmax probability of the target (``output="prob"``, as lime_image), or its
logit (``output="logit"``). Each pixel gets its superpixel's coefficient (positive part).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from skimage.segmentation import quickshift, slic
from torch import Tensor, nn

from auditor.explain.methods._common import (Count, NonNegative, Positive, check_inputs, finish, image_generators, image_spans, register,
                                     row_chunks, rows_per_call)

SHAP_ENDPOINT_WEIGHT = 1e6  # weight of the empty and full coalitions (Captum's choice)
SHAP_RIDGE = 1e-4           # keeps the KernelSHAP system solvable when n_samples < segments


def to_skimage(img: np.ndarray) -> np.ndarray:
    """[C, H, W] normalised -> [H, W, C] in [0, 1] (per-image min-max), as skimage expects."""
    img = np.moveaxis(img.astype(np.float64), 0, -1)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def segment_one(img: np.ndarray, segmentation: Literal["slic", "quickshift"] = "slic", n_segments: Count = 50,
                compactness: Positive = 20.0) -> np.ndarray:
    """Superpixels of one [C, H, W] normalised image as labels 0..K-1 [H, W].

    RGB images are segmented in Lab (L in 0..100), so ``compactness`` keeps skimage's scale;
    other channel counts are scaled to 0..100 to match. SLIC smooths with sigma = 1 px first:
    without it, noisy or texture-heavy images collapse into a single superpixel once skimage
    enforces connectivity. Compactness 20 gave 44-49 superpixels of 50 asked on skimage's
    sample photos at 64 and 224 px. quickshift uses lime_image's settings.
    """
    rgb = img.shape[0] == 3
    im = to_skimage(img) if rgb else to_skimage(img) * 100.0
    if segmentation == "slic":
        seg = slic(im, n_segments=n_segments, compactness=compactness, sigma=1.0, start_label=0,
                   convert2lab=rgb, channel_axis=-1)
    elif segmentation == "quickshift":
        seg = quickshift(im if im.shape[-1] == 3 else np.repeat(im[..., :1], 3, -1),
                         kernel_size=4, max_dist=200, ratio=0.2, convert2lab=rgb, rng=0)
    else:
        raise ValueError(f"segmentation must be 'slic' or 'quickshift', got {segmentation!r}")
    return np.unique(seg, return_inverse=True)[1].reshape(seg.shape)


def _segments(x: Tensor, **kw) -> Tensor:
    host = x.detach().to("cpu", torch.float32).numpy()
    return torch.as_tensor(np.stack([segment_one(img, **kw) for img in host]), dtype=torch.long,
                           device=x.device)


def _lime_coalitions(g: torch.Generator, n: int, k: int, kernel_width: Positive):
    """lime_image's sampling: uniform on/off, first row all on; cosine-distance kernel to all-on."""
    z = torch.rand(n, k, generator=g, device=g.device) < 0.5
    z[0] = True
    d = 1 - torch.sqrt(z.sum(1, dtype=torch.float64) / k)  # cosine distance to the all-on row
    return z, torch.sqrt(torch.exp(-d ** 2 / kernel_width ** 2))


def _shap_coalitions(g: torch.Generator, n: int, k: int):
    """Full and empty coalitions (large weight), then sizes s ~ (k-1)/(s(k-s)), uniform subsets
    of that size, each followed by its complement (paired sampling); sampled rows weigh 1."""
    z = torch.zeros(n, k, dtype=torch.bool, device=g.device)
    z[0] = True
    rest = n - 2
    if rest > 0 and k > 1:
        s = torch.arange(1, k, device=g.device, dtype=torch.float64)
        size = 1 + torch.multinomial((k - 1) / (s * (k - s)), (rest + 1) // 2, replacement=True,
                                     generator=g)
        rank = torch.rand(size.shape[0], k, generator=g, device=g.device).argsort(1).argsort(1)
        half = rank < size[:, None]
        z[2:] = torch.stack([half, ~half], 1).flatten(0, 1)[:rest]
    elif rest > 0:
        z[2:] = (torch.arange(rest, device=g.device) % 2 == 0)[:, None]
    w = torch.ones(n, dtype=torch.float64, device=g.device)
    w[:2] = SHAP_ENDPOINT_WEIGHT
    return z, w


def _weighted_ridge(Z: Tensor, y: Tensor, w: Tensor, valid: Tensor, alpha: NonNegative) -> Tensor:
    """Batched sklearn-Ridge(alpha, fit_intercept=True) with sample weights: [B, n, K] -> [B, K]."""
    sw = w.sum(1, keepdim=True)
    zc = Z - (w[..., None] * Z).sum(1, keepdim=True) / sw[..., None]
    yc = y - (w * y).sum(1, keepdim=True) / sw
    zw = zc * w[..., None]
    A = zw.transpose(1, 2) @ zc
    A.diagonal(dim1=1, dim2=2).add_(alpha).masked_fill_(~valid, 1.0)
    beta = torch.linalg.solve(A, zw.transpose(1, 2) @ yc[..., None])[..., 0]
    return beta * valid


def superpixel_fit(kind: str, model: nn.Module, x: Tensor, target: Tensor, n_samples: int,
                   segmentation: str, n_segments: Count, compactness: Positive, output: str,
                   seed: int, max_rows: int, kernel_width: Positive = 0.25, alpha: NonNegative = 1.0,
                   segments: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Signed superpixel coefficients [B, Kmax] (0 on padding) and segment maps [B, H, W].

    ``segments``: precomputed maps [B, H, W] with labels 0..K-1 (as ``segment_one`` returns),
    used instead of segmenting here (``segmentation``, ``n_segments``, ``compactness`` are then
    ignored); bench/methods.py uses it to time segmentation apart from the explanation.
    """
    if output not in ("prob", "logit"):
        raise ValueError(f"{kind}: output must be 'prob' or 'logit', got {output!r}")
    if n_samples < 2:
        raise ValueError(f"{kind}: n_samples must be >= 2, got {n_samples}")
    seg = (_segments(x, segmentation=segmentation, n_segments=n_segments, compactness=compactness)
           if segments is None else torch.as_tensor(segments, dtype=torch.long, device=x.device))
    counts = (seg.flatten(1).amax(1) + 1).tolist()
    B, n, kmax = x.shape[0], n_samples, max(counts)
    Z = torch.zeros(B, n, kmax, dtype=torch.bool, device=x.device)
    w = torch.empty(B, n, dtype=torch.float64, device=x.device)
    for i, (g, k) in enumerate(zip(image_generators(x, seed), counts)):
        Z[i, :, :k], w[i] = (_lime_coalitions(g, n, k, kernel_width) if kind == "lime"
                             else _shap_coalitions(g, n, k))
    y = torch.empty(B * n, dtype=torch.float64, device=x.device)
    H, W = x.shape[2:]
    flat_seg, keep_all = seg.flatten(1), Z.to(x.dtype)
    rows = rows_per_call(model, x, max_rows)
    # One input buffer, refilled per chunk (so a model must not keep its input between calls):
    # each row is its image times its 0/1 pixel mask (the row's coalition indexed by the image's
    # segment map), written straight into the buffer. Gathering x and an int64 index map per row
    # (x[rows] * masks[rows]) cost ~400 us a row at 224 px on 2 cores, ~8x this and as much as
    # a forward of bench/methods.py's 3-convolution SmallNet.
    fmt = (torch.channels_last if not x.is_contiguous()
           and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    buf = torch.empty(min(rows, B * n), *x.shape[1:], dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    keep = torch.empty(buf.shape[0], H * W, dtype=x.dtype, device=x.device)  # reused: -15% time
    with torch.no_grad():
        for start, stop in row_chunks(B, n, rows):
            for i, lo, hi in image_spans(start, stop, n):  # the images this chunk spans
                at = slice(i * n + lo - start, i * n + hi - start)  # their rows in the buffer
                torch.index_select(keep_all[i, lo:hi], 1, flat_seg[i], out=keep[at])
                torch.mul(x[i], keep[at].view(-1, 1, H, W), out=buf[at])
            logits = model(buf[:stop - start])
            score = logits.float().softmax(1) if output == "prob" else logits.float()
            img = torch.arange(start, stop, device=x.device) // n
            y[start:stop] = score.gather(1, target[img, None])[:, 0].double()
    counts_t = torch.tensor(counts, device=x.device)
    valid = torch.arange(kmax, device=x.device)[None] < counts_t[:, None]
    beta = _weighted_ridge(Z.double(), y.view(B, n), w, valid,
                           alpha if kind == "lime" else SHAP_RIDGE)
    return beta, seg


def _to_pixels(beta: Tensor, seg: Tensor) -> Tensor:
    return torch.gather(beta.clamp_min(0), 1, seg.flatten(1)).view(seg.shape)


@register("lime", title='LIME',
          glossary='It explains one prediction with a simple stand-in model that only looks at which parts of the image are shown. It hides random sets of superpixels and fits a simple model of which ones the prediction depends on; slow, but it treats the model as a black box.',
          stochastic=True, passes=lambda p, hw: (p["n_samples"], 0))
def lime(model: nn.Module, x: Tensor, target: Tensor, n_samples: Count = 256,
         n_segments: Count = 50, compactness: Positive = 20.0, segmentation: Literal["slic", "quickshift"] = "slic",
         kernel_width: Positive = 0.25, alpha: NonNegative = 1.0, output: Literal["prob", "logit"] = "prob", seed: int = 0,
         max_rows: Count = 256) -> Tensor:
    """LIME on superpixels: weighted ridge surrogate over on/off superpixels (Ribeiro et al. 2016).

    As lime_image: coalitions uniform with the first all-on (the original image, counted in
    n_samples), weights sqrt(exp(-d^2 / kernel_width^2)) with d the cosine distance to
    all-on, ridge ``alpha`` with intercept. SLIC superpixels by default (or quickshift).
    """
    target = check_inputs("lime", x, target)
    beta, seg = superpixel_fit("lime", model, x, target, n_samples, segmentation, n_segments,
                               compactness, output, seed, max_rows, kernel_width, alpha)
    return finish("lime", _to_pixels(beta, seg))


@register("kernel_shap", title='Kernel SHAP',
          glossary="It shares the prediction fairly among the image's parts, as game theory's Shapley values share a payout among players. It switches groups of pixels on and off, watches the model, and estimates each group's Shapley value; slow, but it treats the model as a black box.",
          stochastic=True, passes=lambda p, hw: (p["n_samples"], 0))
def kernel_shap(model: nn.Module, x: Tensor, target: Tensor, n_samples: Count = 256,
                n_segments: Count = 50, compactness: Positive = 20.0, segmentation: Literal["slic", "quickshift"] = "slic",
                output: Literal["prob", "logit"] = "prob", seed: int = 0, max_rows: Count = 256) -> Tensor:
    """KernelSHAP on superpixels: Shapley-kernel regression over on/off superpixels.

    Lundberg & Lee 2017.

    Full and empty coalitions enter with weight 1e6 (as Captum), the rest are sampled by the
    Shapley kernel's size distribution in complementary pairs with weight 1; n_samples counts all.
    """
    target = check_inputs("kernel_shap", x, target)
    beta, seg = superpixel_fit("kernel_shap", model, x, target, n_samples, segmentation,
                               n_segments, compactness, output, seed, max_rows)
    return finish("kernel_shap", _to_pixels(beta, seg))
