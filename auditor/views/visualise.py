"""Class visualisation: what each class looks like to the model, from no data at all.

Activation maximisation with Lucid's priors (Olah et al., Distill 2017; lucid/optvis/param/
spatial.py ``fft_image`` and color.py ``to_valid_rgb``): the image is a Fourier spectrum scaled
by 1/frequency (so gradient steps change coarse structure first, not pixel noise), mapped
through the square root of ImageNet's colour correlation (decorrelated colour) and a sigmoid
into [0, 1]. Each step sees a randomly jittered and rescaled copy (robust to a shift of a few
pixels and a few per cent of scale), with a small total-variation penalty. The start is
neutral grey (a near-zero spectrum), the seed fixed and the steps bounded; all classes are
optimised at once, one batch, each from its own random stream.

A visualisation's own saliency (|d logit / d pixel|, averaged over jittered copies) says where
in it the class's evidence lies.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# lucid/optvis/param/color.py: the square root of ImageNet's colour correlation matrix.
COLOR_SVD_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32)
COLOR = COLOR_SVD_SQRT / np.max(np.linalg.norm(COLOR_SVD_SQRT, axis=0))


def _freqs(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None]
    return np.sqrt(fx * fx + fy * fy)


def fft_rgb(spectrum: torch.Tensor, h: int, w: int, channels: int, decay: float = 1.0) -> torch.Tensor:
    """[B, 2, C, h, w//2+1] spectrum parameters -> images [B, C, h, w] in [0, 1] (Lucid's fft_image
    then to_valid_rgb with decorrelated colour)."""
    scale = 1.0 / np.maximum(_freqs(h, w), 1.0 / max(h, w)) ** decay * np.sqrt(h * w)
    scale = torch.as_tensor(scale, dtype=spectrum.dtype, device=spectrum.device)
    img = torch.fft.irfft2(torch.complex(spectrum[:, 0], spectrum[:, 1]) * scale, s=(h, w)) / 4.0
    if channels == 3:
        img = torch.einsum("bchw,dc->bdhw", img, torch.as_tensor(COLOR, device=img.device))
    return torch.sigmoid(img)


def _transform(x: torch.Tensor, gens: list[torch.Generator], jitter: float, scale: float) -> torch.Tensor:
    """Each image shifted by up to ``jitter`` of its side and rescaled by up to ``scale`` (one
    affine resampling, edges reflected), drawn from its own generator."""
    b = len(x)
    s = 1 + (torch.cat([torch.rand(1, generator=g) for g in gens]) * 2 - 1) * scale
    t = (torch.cat([torch.rand(1, 2, generator=g) for g in gens]) * 2 - 1) * 2 * jitter
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def visualise(model: torch.nn.Module, classes: list[int], size: tuple[int, int], channels: int, mean, std,
              device=None, steps: int = 48, lr: float = 0.05, jitter: float = 0.04, scale: float = 0.08,
              tv: float = 0.05, seed: int = 0, saliency_copies: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the image (in [0, 1], [K, h, w, C]) that maximises its logit, its saliency
    [K, h, w] and the logits it reaches [K] (the class's own logit on the untransformed image)."""
    h, w = size
    device = device or next(model.parameters()).device
    # Each class its own random stream: its picture does not depend on which classes share its batch
    # (a batch that runs out of memory is drawn again in halves).
    gens = [torch.Generator().manual_seed(seed * 100_003 + int(c)) for c in classes]
    spectrum = (0.01 * torch.cat([torch.randn(1, 2, channels, h, w // 2 + 1, generator=g) for g in gens])).to(device)
    spectrum.requires_grad_(True)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    sd = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    target = torch.as_tensor(classes, device=device)
    opt = torch.optim.Adam([spectrum], lr=lr)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            img = fft_rgb(spectrum, h, w, channels)
            logits = model((_transform(img, gens, jitter, scale) - m) / sd)
            loss = -logits.gather(1, target[:, None]).sum() + tv * len(classes) * _tv(img)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            img = fft_rgb(spectrum, h, w, channels)
            reached = model((img - m) / sd).gather(1, target[:, None])[:, 0]
        sal = torch.zeros(len(classes), h, w, device=device)
        for _ in range(saliency_copies):  # SmoothGrad-like: over small shifts of the picture
            x = img.detach().clone().requires_grad_(True)
            model((_transform(x, gens, jitter / 2, 0.0) - m) / sd).gather(1, target[:, None]).sum().backward()
            sal += x.grad.abs().amax(1)
    finally:
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
    return (img.detach().permute(0, 2, 3, 1).cpu().numpy(), (sal / saliency_copies).cpu().numpy(),
            reached.cpu().numpy())


def _window_sums(heat: np.ndarray, side: float) -> tuple[np.ndarray, int, int]:
    """The mass of every square window of ``side`` (a fraction of the image), by its top-left pixel."""
    h, w = heat.shape
    kh, kw = max(1, round(side * h)), max(1, round(side * w))
    cum = np.pad(heat.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return cum[kh:, kw:] - cum[:-kh, kw:] - cum[kh:, :-kw] + cum[:-kh, :-kw], kh, kw


def best_window(heat: np.ndarray, side: float) -> tuple[float, list[float]]:
    """The square window of ``side`` (a fraction of the image) holding the largest share of the
    map's mass: (share, [x0, y0, x1, y1] as fractions)."""
    return windows(heat, side, 1)[0]


def windows(heat: np.ndarray, side: float, n: int) -> list[tuple[float, list[float]]]:
    """Up to ``n`` windows of ``side`` that do not overlap, strongest first (as best_window), and
    none that holds nothing after the first: a drawing often holds the object's texture and a mark
    side by side, and the mark need not be the strongest."""
    h, w = heat.shape
    sums, kh, kw = _window_sums(heat, side)
    total = float(heat.sum()) or 1.0
    out = []
    for _ in range(n):
        y, x = np.unravel_index(np.argmax(sums), sums.shape)
        if out and not sums[y, x] > 0:
            break
        out.append((float(sums[y, x] / total), [x / w, y / h, (x + kw) / w, (y + kh) / h]))
        sums[max(0, y - kh + 1):y + kh, max(0, x - kw + 1):x + kw] = -np.inf  # windows overlapping this one
    return out
