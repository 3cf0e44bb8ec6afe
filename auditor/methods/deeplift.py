"""DeepLift (Rescale rule) in one batched forward and backward pass over [inputs; baseline].

Captum's DeepLift hooks every non-linear module, clones its input and output in the forward
pass and recomputes the multipliers in the backward pass; on a small CNN those hooks cost as
much as the two passes themselves (measured 2x its floor in bench/methods.py). Here, for the
duration of one call, each supported module's ``forward`` is swapped for an autograd Function
that computes the module's output and its DeepLift multiplier together, keeps only the
multiplier for the backward pass, and leaves the module as it was afterwards. Because every
call carries its own multiplier, a module used twice per forward (one nn.ReLU shared by
several layers, as in torchvision's ResNets) and in-place activations are both fine.

Rules, as in Captum (Shrikumar et al. 2017): an elementwise non-linearity f gets the Rescale
multiplier (f(a) - f(a0)) / (a - a0), or f'(a) where a and a0 coincide; a MaxPool2d sends
the change of each window's maximum to the position that is the maximum in the input (when
the input's maximum is larger) or in the baseline (otherwise), through scatter-add, which
stays exact for overlapping windows. Linear modules need no rule. Activations called as
functions (F.relu in ``forward``) are not modules, so they pass the plain gradient: the sum of
the attributions then no longer equals f(x) - f(baseline) exactly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.methods._common import check_inputs, finish, pos_sum, register, rows_per_call

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
               nn.Hardsigmoid)
EPS = 1e-10  # Captum's: below this difference the multiplier is the local derivative


class _Rescale(torch.autograd.Function):
    """f on [inputs; baseline]; backward multiplies the inputs' rows by the Rescale multiplier."""

    @staticmethod
    def forward(ctx, a: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        out = f(a)
        n = a.shape[0] - 1
        a1, a0 = a[:n], a[n:]                       # the baseline's row broadcasts over the inputs'
        delta = a1 - a0
        m = (out[:n] - out[n:]).div_(delta)
        if isinstance(f, _ReLU):  # exact for any nonzero delta; 0/0 (NaN) only where a1 == a0 (rare)
            if m.sum().isnan():  # one pass, no mask kept: there a1 == a0, so its slope is a0 > 0
                m = torch.where(delta == 0, (a0 > 0).to(m.dtype), m)
        else:  # the local derivative where a1 ~ a0, by autograd on the inputs' rows
            with torch.enable_grad():
                t = a1.detach().requires_grad_(True)
                slope, = torch.autograd.grad(f(t).sum(), t)
            m = torch.where(delta.abs() < EPS, slope, m)
        ctx.save_for_backward(m)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        m, = ctx.saved_tensors
        n = m.shape[0]
        out = torch.empty_like(grad)
        torch.mul(grad[:n], m, out=out[:n])
        out[n:] = grad[n:]
        return out, None


class _ReLU:
    """F.relu as a plain callable, so _Rescale can take the cheap derivative path."""

    def __call__(self, a: Tensor) -> Tensor:
        return F.relu(a)


class _MaxPool2d(torch.autograd.Function):
    """Max pooling on [inputs; baseline]; backward sends each window's change to its winner."""

    @staticmethod
    def forward(ctx, a: Tensor, pool: nn.MaxPool2d) -> Tensor:
        out, idx = F.max_pool2d(a, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                pool.ceil_mode, return_indices=True)
        n = a.shape[0] - 1
        top = torch.maximum(out[:n], out[n:])
        # The change of each window's max, split between the input's winner and the baseline's.
        ctx.save_for_backward(idx, top - out[n:], out[:n] - top, a[:n] - a[n:])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        idx, gain, loss, delta = ctx.saved_tensors
        n = delta.shape[0]
        flat = delta.flatten(2)
        mine, base = idx[:n].flatten(2), idx[n:].flatten(2).expand(n, -1, -1)
        spread = torch.zeros_like(flat)
        spread.scatter_add_(2, mine, (grad[:n] * gain).flatten(2))
        spread.scatter_add_(2, base, (grad[:n] * loss).flatten(2))
        plain = torch.zeros_like(flat).scatter_add_(2, mine, grad[:n].flatten(2))
        near = flat.abs() < EPS
        g1 = torch.where(near, plain, spread / flat.masked_fill(near, 1)).view_as(delta)
        return torch.cat([g1, torch.zeros_like(g1[:1])]), None


@contextlib.contextmanager
def rescaled(model: nn.Module) -> Iterator[None]:
    """Swap each supported module's forward for its DeepLift Function; restore on exit."""
    swapped = []
    for mod in model.modules():
        if isinstance(mod, ELEMENTWISE):
            f = _ReLU() if type(mod) is nn.ReLU else (lambda a, m=mod: type(m).forward(m, a))
            # In-place activations would overwrite the input the multiplier needs.
            swapped.append((mod, mod.__dict__.get("forward"), getattr(mod, "inplace", None)))
            if hasattr(mod, "inplace"):
                mod.inplace = False
            mod.forward = lambda a, f=f: _Rescale.apply(a, f)
        elif isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
            swapped.append((mod, mod.__dict__.get("forward"), None))
            mod.forward = lambda a, m=mod: _MaxPool2d.apply(a, m)
    try:
        yield
    finally:
        for mod, own_forward, inplace in swapped:
            del mod.forward
            if own_forward is not None:
                mod.forward = own_forward
            if inplace is not None:
                mod.inplace = inplace


def attributions(model: nn.Module, x: Tensor, target: Tensor, max_rows: int = 256) -> Tensor:
    """Signed DeepLift attributions [B, C, H, W] from the zero baseline (the mean image).

    The images run as one batch with a single row for the baseline, which is the same for every
    image (so one forward and backward per image, chunked to max_rows); the attribution is
    (x - baseline) times the DeepLift multipliers, which for a network of modules sums to
    logit(x) - logit(baseline)."""
    step = max(1, rows_per_call(model, x, max_rows) - 1)
    out = []
    with rescaled(model), torch.enable_grad():
        for s in range(0, x.shape[0], step):
            xs, ts = x[s:s + step].detach(), target[s:s + step]
            rows = torch.cat([xs, torch.zeros_like(xs[:1])]).requires_grad_(True)
            logits = model(rows)[: len(xs)]
            grad, = torch.autograd.grad(logits.gather(1, ts[:, None]).sum(), rows)
            out.append(xs * grad[: len(xs)])
    return torch.cat(out)


@register("deeplift", passes=lambda p, hw: (1, 1))
def deeplift(model: nn.Module, x: Tensor, target: Tensor, max_rows: int = 256) -> Tensor:
    """DeepLift (Rescale rule) from the mean image (0), positive part of the channel sum."""
    target = check_inputs("deeplift", x, target)
    return finish("deeplift", pos_sum(attributions(model, x, target, max_rows)))
