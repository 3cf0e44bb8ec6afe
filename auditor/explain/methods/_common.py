"""Steps every method adapter shares: registration, checks, channel reduction, upsampling,
per-image random generators and row chunking.

Registration adds two entries to each method's metadata:
  ``passes(params=None, hw=None) -> (n_forward, n_backward)``: model passes per image at
      ``params`` (missing keys take the function's defaults); ``hw`` = (H, W) matters only
      for occlusion, whose window count depends on the image size (default 224x224).
  ``defaults``: the function's keyword defaults.

``max_rows`` bounds the rows of one model call; on CPU the chunks are sized to the cache (see
``rows_per_call``). Chunking never changes which random draws an image gets.

Randomness: a stochastic method draws image i's numbers from its own generator, seeded by a
hash of (seed, the bytes of x[i]). An image therefore gets the same draws alone or at any
position in any batch (batch result == per-image result), and the global RNG is never used.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import warnings
import weakref
from typing import Annotated, Callable, Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from auditor.registry import METHODS


# Parameter types with their ranges: the registry validates configured params against them.
Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(gt=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


def register(name: str, passes: Callable[[dict, tuple[int, int] | None], tuple[int, int]], *, title: str,
             glossary: str, needs: tuple[str, ...] = (), **meta) -> Callable[[Callable], Callable]:
    """``METHODS.register`` plus ``passes`` (filled with the function's defaults), ``defaults``;
    ``needs_layer`` says to the engine that it must supply ``layer=``."""

    def decorate(fn: Callable) -> Callable:
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}

        def passes_at(params: dict | None = None, hw: tuple[int, int] | None = None):
            n_fwd, n_bwd = passes({**defaults, **(params or {})}, hw)
            return int(n_fwd), int(n_bwd)

        return METHODS.register(name, title=title, glossary=glossary, needs=needs, passes=passes_at,
                                defaults=defaults, needs_layer="layer" in needs, **meta)(fn)

    return decorate


def check_inputs(name: str, x: Tensor, target: Tensor) -> Tensor:
    """Validate at the door; return ``target`` as a LongTensor [B] on x's device."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a float tensor [B, C, H, W], got "
                         f"{getattr(x, 'shape', type(x))}")
    target = torch.as_tensor(target, device=x.device)
    if target.dim() != 1 or target.shape[0] != x.shape[0] or target.is_floating_point():
        raise ValueError(f"{name}: target must be a LongTensor [B={x.shape[0]}], "
                         f"got shape {tuple(target.shape)} dtype {target.dtype}")
    return target.long()


def finish(name: str, heat: Tensor) -> Tensor:
    """Return float32 [B, H, W]; refuse non-finite values (NaN/inf in the model or gradients)."""
    heat = heat.detach().float().contiguous()
    if not torch.isfinite(heat).all():
        raise ValueError(f"{name}: the heatmap has non-finite values (NaN or inf from the "
                         f"model's output or gradients); the method cannot explain this input")
    return heat


def abs_max(attr: Tensor) -> Tensor:
    """Gradient-magnitude reduction: |a| max over channels, [B, C, H, W] -> [B, H, W]."""
    return attr.abs().amax(dim=1)


def pos_sum(attr: Tensor) -> Tensor:
    """Signed-attribution reduction: positive part of the channel sum (evidence FOR the class)."""
    return attr.sum(dim=1).clamp_min(0)


def upsample(maps: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of [B, 1, h, w] (or [B, h, w]) layer maps to [B, H, W]."""
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    return F.interpolate(maps, size=tuple(hw), mode="bilinear", align_corners=False)[:, 0]


def image_generators(x: Tensor, seed: int) -> list[torch.Generator]:
    """One generator per image, seeded by blake2b(seed, bytes of x[i]), on x's device."""
    host = x.detach().to("cpu", torch.float32).contiguous().numpy()
    gens = []
    for img in host:
        h = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=8)
        h.update(img.tobytes())
        g = torch.Generator(device=x.device)
        g.manual_seed(int.from_bytes(h.digest(), "little") & (2 ** 63 - 1))
        gens.append(g)
    return gens


# On CPU a call runs fastest while its largest activation fits in the cache: past that, rows
# slow down 2-4x (and fresh large allocations are mapped and unmapped per call). Measured on
# this project's 2 cores (32 MiB L3), per-row time of forward and forward+backward was best at
# 4 rows for a 16-channel net at full 224 px resolution (3.2 MB a row), 16-32 rows for a
# net that strides by 4 at once (its 224 px input, 0.6 MB a row, is its largest tensor), 32
# for 16 channels at 64 px (0.26 MB). A fixed pixel cap could not fit all three.
CPU_BYTES_PER_CALL = 16 * 2 ** 20
_LARGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def largest_activation(model: nn.Module, x: Tensor) -> int:
    """Bytes of the largest tensor one row of ``x`` makes in the model's forward pass (its
    input included), from the outputs of the leaf modules on one row (functional ops inside a
    module's forward are not seen); memoised per model and row shape."""
    memo = _LARGEST.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    if key not in memo:
        largest = [x[:1].numel() * x.element_size()]

        def record(module, inputs, output) -> None:
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, Tensor):
                    largest[0] = max(largest[0], t.numel() * t.element_size())

        handles = [m.register_forward_hook(record) for m in model.modules()
                   if next(m.children(), None) is None]
        modes = [(m, m.training) for m in model.modules()]  # parents before their children
        try:  # in eval mode: a one-row batch must not move BatchNorm statistics (or fail on them)
            model.eval()
            with torch.no_grad():
                model(x[:1].detach())
        except Exception:  # not this probe's to report: the method's own call will, if it fails too
            largest[0] = x[:1].numel() * x.element_size()
        finally:
            for h in handles:
                h.remove()
            for m, training in modes:
                m.train(training)
        memo[key] = max(largest[0], 1)
    return memo[key]


def rows_per_call(model: nn.Module, x: Tensor, max_rows: int) -> int:
    """Rows per model call: ``max_rows``, and on CPU as many as keep the largest activation
    within ``CPU_BYTES_PER_CALL`` (at least 4)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if x.device.type == "cpu" and x.shape[0]:
        return min(max_rows, max(4, CPU_BYTES_PER_CALL // largest_activation(model, x)))
    return max_rows


def in_calls(model: nn.Module, x: Tensor, target: Tensor, max_rows: int,
             attribute: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``attribute(x_rows, target_rows)`` over calls of ``rows_per_call`` images, concatenated:
    the chunking of methods that need one or two model passes per image."""
    if not x.shape[0]:
        return x.new_zeros((0, *x.shape[2:]))
    step = rows_per_call(model, x, max_rows)
    return torch.cat([attribute(x[s:s + step], target[s:s + step])
                      for s in range(0, x.shape[0], step)])


def row_chunks(n_images: int, n_per_image: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """(start, stop) over the image-major expanded rows, at most ``max_rows`` per chunk."""
    total = n_images * n_per_image
    for start in range(0, total, max_rows):
        yield start, min(start + max_rows, total)


def image_spans(start: int, stop: int, n: int) -> Iterator[tuple[int, int, int]]:
    """The images that expanded rows start..stop-1 (n per image) belong to: (image, lo, hi),
    with lo..hi-1 the image's own row numbers (0..n-1) inside the span."""
    for i in range(start // n, (stop - 1) // n + 1):
        yield i, max(start, i * n) - i * n, min(stop, (i + 1) * n) - i * n


def grad_input(x: Tensor) -> Tensor:
    """A leaf copy of the caller's x that requires grad (x itself is never modified)."""
    return x.detach().clone().requires_grad_(True)


def chunked_draws(gens: list[torch.Generator], n: int, max_rows: int,
                  draw: Callable[[torch.Generator, int], tuple[Tensor, ...]]
                  ) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
    """Walk the B*n expanded rows in chunks; yield (image index per row, draws per row).

    ``draw(gen, n)`` makes all n draws of one image at once, so an image's draws never depend
    on where the chunk boundaries fall. At most the images that span one chunk are held.
    """
    cache: dict[int, tuple[Tensor, ...]] = {}
    for start, stop in row_chunks(len(gens), n, max_rows):
        parts: list[tuple[Tensor, ...]] = []
        for i, lo, hi in image_spans(start, stop, n):
            if i not in cache:
                cache[i] = draw(gens[i], n)
            parts.append(tuple(t[lo:hi] for t in cache[i]))
        for i in [i for i in cache if (i + 1) * n <= stop]:
            del cache[i]
        img = torch.arange(start, stop) // n
        yield img, tuple(torch.cat(ts) for ts in zip(*parts))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Captum's per-call notices (hooks set/removed, requires_grad set)."""
    with warnings.catch_warnings():
        for msg in (r"\s*Setting (forward, )?backward hooks", r"Input Tensor \d+ did not already",
                    r"Internal batch size cannot"):
            warnings.filterwarnings("ignore", message=msg, category=UserWarning)
        yield


@contextlib.contextmanager
def single_use(name: str, model: nn.Module, types: tuple[type, ...], why: str) -> Iterator[None]:
    """Refuse modules of ``types`` called more than once per model forward.

    Counts calls with forward pre-hooks during the method's own forward passes (no extra
    pass); hooks are removed on exit. Raises ValueError naming the method and the module.
    """
    calls: dict[str, int] = {}
    forwards = [0]

    def count_forward(module, inputs) -> None:
        forwards[0] += 1

    handles = [model.register_forward_pre_hook(count_forward)]
    for mod_name, mod in model.named_modules():
        if isinstance(mod, types) and mod is not model:
            calls[mod_name] = 0
            handles.append(mod.register_forward_pre_hook(
                lambda m, i, k=mod_name: calls.__setitem__(k, calls[k] + 1)))

    def check() -> None:
        reused = {k: c for k, c in calls.items() if c > max(forwards[0], 1)}
        if reused:
            k, c = next(iter(reused.items()))
            raise ValueError(
                f"{name}: module {k!r} ({type(model.get_submodule(k)).__name__}) is called "
                f"{c // max(forwards[0], 1)} times per forward pass; {why} Give each use its own "
                f"module instance (e.g. a separate nn.ReLU per activation).")

    try:
        yield
    except Exception:
        check()  # a reused module is the likelier cause (Captum's own error is cryptic): say so
        raise
    else:
        check()
    finally:
        for h in handles:
            h.remove()
