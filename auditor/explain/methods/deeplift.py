"""DeepLift (Rescale rule) in one batched forward and backward pass per chunk of inputs.

Captum's DeepLift hooks every non-linear module, clones its input and output in the forward
pass and recomputes the multipliers in the backward pass; on a small CNN those hooks cost as
much as the two passes themselves (measured 2x its floor in bench/methods.py). Here, for the
duration of one call, each supported module's ``forward`` is swapped for an autograd Function
that computes the module's output and its DeepLift multiplier together, keeps only the
multiplier for the backward pass, and leaves the module as it was afterwards. The baseline goes
through the model once per call of the method, each module keeping what it saw (per call of
the module, so one nn.ReLU shared by several layers, as in torchvision's ResNets, is fine, and
so are in-place activations); the inputs' chunks then carry no baseline row (a row per chunk
cost 25% more passes where the cache allows 5 rows a call, as for a ResNet-18 at 224 px).

Rules, as in Captum (Shrikumar et al. 2017): an elementwise non-linearity f gets the Rescale
multiplier (f(a) - f(a0)) / (a - a0), or f'(a) where a and a0 coincide; a MaxPool2d sends
the change of each window's maximum to the position that is the maximum in the input (when
the input's maximum is larger) or in the baseline (otherwise), through scatter-add, which
stays exact for overlapping windows. Linear modules need no rule.

DeepLift has no rule for LayerNorm, softmax or attention (products of two inputs): through them
the multipliers are plain gradients, and on a ViT or a ConvNeXt the result is input x gradient
to the bit, missing the change of the logit by half or more. A model holding such modules is
refused before any pass (``no_rule``). Activations called as functions (F.relu or F.gelu in
``forward``) are not modules and pass the plain gradient too; they are caught afterwards by
summation to delta: the attributions of each image must add up to logit(x) - logit(baseline)
within ``SUM_TOLERANCE`` of that change, or the method refuses rather than show them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.explain.methods._common import Count, check_inputs, finish, in_calls, pos_sum, register, rows_per_call

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
               nn.Hardsigmoid)
EPS = 1e-10  # Captum's: below this difference the multiplier is the local derivative
SUM_TOLERANCE = 0.01  # share of |logit(x) - logit(baseline)| the attributions' sum may miss
# Non-linear modules with no DeepLift rule here; also any class whose name says it is one.
NO_RULE = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.instancenorm._InstanceNorm,
           nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention, nn.GLU,
           nn.MaxPool1d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
NO_RULE_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm", "Attention", "Softmax")
ACTIVATION_NAMES = ("GELU", "SiLU", "Swish", "Mish", "ReLU", "Sigmoid", "Tanh", "Activation")


def no_rule(model: nn.Module) -> str | None:
    """Why DeepLift cannot explain ``model`` (its modules without a rule), or None."""
    found: dict[str, str] = {}
    for name, m in model.named_modules():
        kind = type(m).__name__
        ruled = isinstance(m, ELEMENTWISE) or (isinstance(m, nn.MaxPool2d) and not m.return_indices)
        if not ruled and (isinstance(m, NO_RULE) or any(w in kind for w in NO_RULE_NAMES)
                          or (next(m.children(), None) is None and any(w in kind for w in ACTIVATION_NAMES))):
            found.setdefault(kind, name)
    if not found:
        return None
    kinds = ", ".join(found)
    first = next(iter(found.values()))
    return (f"DeepLift has no rule for {kinds} (e.g. {first!r}: normalisation, attention or an activation "
            f"it does not know); its attributions would not sum to the output change")


class _Rescale(torch.autograd.Function):
    """f on the inputs' rows; backward multiplies by the Rescale multiplier against the baseline's
    input ``a0`` and output ``out0`` at this call (one row, broadcast over the inputs')."""

    @staticmethod
    def forward(ctx, a: Tensor, f: Callable[[Tensor], Tensor], a0: Tensor, out0: Tensor) -> Tensor:
        out = f(a)
        delta = a - a0
        m = (out - out0).div_(delta)
        if isinstance(f, _ReLU):  # exact for any nonzero delta; 0/0 (NaN) only where a == a0 (rare)
            if m.sum().isnan():  # one pass, no mask kept: there a == a0, so its slope is a0 > 0
                m = torch.where(delta == 0, (a0 > 0).to(m.dtype), m)
        else:  # the local derivative where a ~ a0, by autograd on the inputs' rows
            with torch.enable_grad():
                t = a.detach().requires_grad_(True)
                slope, = torch.autograd.grad(f(t).sum(), t)
            m = torch.where(delta.abs() < EPS, slope, m)
        ctx.save_for_backward(m)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        m, = ctx.saved_tensors
        return grad * m, None, None, None


class _ReLU:
    """F.relu as a plain callable, so _Rescale can take the cheap derivative path."""

    def __call__(self, a: Tensor) -> Tensor:
        return F.relu(a)


def _max_pool(a: Tensor, pool: nn.MaxPool2d) -> tuple[Tensor, Tensor]:
    return F.max_pool2d(a, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                        pool.ceil_mode, return_indices=True)


class _MaxPool2d(torch.autograd.Function):
    """Max pooling on the inputs' rows; backward sends each window's change to its winner, the
    input's position or the baseline's (``a0``, ``out0``, ``idx0``: the baseline at this call)."""

    @staticmethod
    def forward(ctx, a: Tensor, pool: nn.MaxPool2d, a0: Tensor, out0: Tensor, idx0: Tensor) -> Tensor:
        out, idx = _max_pool(a, pool)
        top = torch.maximum(out, out0)
        # The change of each window's max, split between the input's winner and the baseline's.
        ctx.save_for_backward(idx, idx0, top - out0, out - top, a - a0)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        idx, idx0, gain, loss, delta = ctx.saved_tensors
        n = delta.shape[0]
        flat = delta.flatten(2)
        mine, base = idx.flatten(2), idx0.flatten(2).expand(n, -1, -1)
        spread = torch.zeros_like(flat)
        spread.scatter_add_(2, mine, (grad * gain).flatten(2))
        spread.scatter_add_(2, base, (grad * loss).flatten(2))
        plain = torch.zeros_like(flat).scatter_add_(2, mine, grad.flatten(2))
        near = flat.abs() < EPS
        return torch.where(near, plain, spread / flat.masked_fill(near, 1)).view_as(delta), None, None, None, None


@contextlib.contextmanager
def rescaled(model: nn.Module, baseline: Tensor) -> Iterator[None]:
    """Swap each supported module's forward for its DeepLift Function; restore on exit.

    On entry the baseline (one row) goes through the model once, and every swapped module keeps
    what it saw at each of its calls (a module may be called several times per forward); each
    later forward of the inputs takes the k-th call's baseline for a module's k-th call, so no
    call carries a baseline row. Yields the model's output for the baseline."""
    seen: dict[nn.Module, list] = {}   # module -> per call: the baseline's input and output(s)
    calls: dict[nn.Module, int] = {}   # module -> calls so far in the current forward
    recording = [True]

    def swap(mod: nn.Module, plain: Callable, rule: Callable) -> Callable:
        def forward(a: Tensor) -> Tensor:
            if recording[0]:
                out = plain(a)  # copies kept: later in-place ops of the model must not change them
                seen.setdefault(mod, []).append(
                    (a.clone(), tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()))
                return out[0] if isinstance(out, tuple) else out
            k = calls[mod] = calls.get(mod, -1) + 1
            if k >= len(seen.get(mod, ())):
                raise ValueError(f"deeplift: module {type(mod).__name__} is called more often for these "
                                 f"images than for the baseline; the model's control flow depends on its "
                                 f"input, so a per-call DeepLift baseline is not defined")
            a0, out0 = seen[mod][k]
            return rule(a, a0, out0)
        return forward

    swapped = []
    for mod in model.modules():
        if isinstance(mod, ELEMENTWISE):
            f = _ReLU() if type(mod) is nn.ReLU else (lambda a, m=mod: type(m).forward(m, a))
            # In-place activations would overwrite the input the multiplier needs.
            swapped.append((mod, mod.__dict__.get("forward"), getattr(mod, "inplace", None)))
            if hasattr(mod, "inplace"):
                mod.inplace = False
            mod.forward = swap(mod, f, lambda a, a0, out0, f=f: _Rescale.apply(a, f, a0, out0))
        elif isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
            swapped.append((mod, mod.__dict__.get("forward"), None))
            mod.forward = swap(mod, lambda a, m=mod: _max_pool(a, m),
                               lambda a, a0, out0, m=mod: _MaxPool2d.apply(a, m, a0, *out0))
    reset = model.register_forward_pre_hook(lambda *_: calls.clear())
    try:
        with torch.no_grad():
            out0 = model(baseline)
        recording[0] = False
        yield out0
    finally:
        reset.remove()
        for mod, own_forward, inplace in swapped:
            del mod.forward
            if own_forward is not None:
                mod.forward = own_forward
            if inplace is not None:
                mod.inplace = inplace


def attributions(model: nn.Module, x: Tensor, target: Tensor, max_rows: Count = 256) -> Tensor:
    """Signed DeepLift attributions [B, C, H, W] from the zero baseline (the mean image).

    The baseline, the same for every image, goes through the model once; the images then run in
    chunks of ``rows_per_call``, one forward and one backward per image. The attribution is
    (x - baseline) times the DeepLift multipliers, which for a network of modules sums to
    logit(x) - logit(baseline); ValueError where the model's modules have no rule, or an image's
    attributions miss that change by more than ``SUM_TOLERANCE`` of it (summation to delta)."""
    why = no_rule(model)
    if why:
        raise ValueError(f"deeplift: {why}")

    def attribute(xs, ts):
        xs = xs.detach().requires_grad_(True)
        y = model(xs).gather(1, ts[:, None])[:, 0]
        grad, = torch.autograd.grad(y.sum(), xs)
        attr = xs.detach() * grad
        summed_to_delta(attr, y.detach() - y0[0, ts], y.detach().abs() + y0[0, ts].abs())
        return attr

    if not x.shape[0]:
        return torch.zeros_like(x)
    rows_per_call(model, x, max_rows)  # sizes the calls on the model as it is, before the swap
    with rescaled(model, torch.zeros_like(x[:1])) as y0, torch.enable_grad():
        return in_calls(model, x, target, max_rows, attribute)


def summed_to_delta(attr: Tensor, delta: Tensor, scale: Tensor) -> None:
    """Refuse attributions whose per-image sums miss ``delta`` (the logit's change) by more than
    ``SUM_TOLERANCE`` of it (plus float rounding at the logits' ``scale``); NaN is left to finish."""
    miss = (attr.flatten(1).sum(1) - delta).abs()
    bad = miss > SUM_TOLERANCE * delta.abs() + 1e-4 * scale + 1e-6
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        share = miss[i] / delta[i].abs().clamp_min(1e-12)
        raise ValueError(f"deeplift: the attributions miss the change of the target logit by {share:.0%} "
                         f"on {int(bad.sum())} of {len(bad)} images (summation to delta); a non-linear "
                         f"function called in forward (F.relu, F.gelu, a product) has no DeepLift rule "
                         f"here, so they are refused rather than shown")


@register("deeplift", title='DeepLift',
          glossary='It explains the difference between the model\'s score on the image and on a plain grey image. It compares the image with a plain baseline and shares the change in the output among the pixels; bright pixels moved the score towards the class.',
          passes=lambda p, hw: (1, 1), not_applicable=no_rule)
def deeplift(model: nn.Module, x: Tensor, target: Tensor, max_rows: Count = 256) -> Tensor:
    """DeepLift (Rescale rule) from the mean image (0), positive part of the channel sum."""
    target = check_inputs("deeplift", x, target)
    return finish("deeplift", pos_sum(attributions(model, x, target, max_rows)))
