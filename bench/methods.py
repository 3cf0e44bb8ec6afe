"""Throughput of every registered explanation method against its floor, in one run.

    OMP_WAIT_POLICY=PASSIVE python bench/methods.py [--size 64] [--images 32] [--repeats 3]

Each method runs at its default params on one batch of ``--images`` random images through a
small ResNet-ish CNN (4 convolutions, one residual block) defined below; images/s is the
median over ``--repeats`` timed calls, after an untimed warm-up call on 2 images.

Floor: the model passes the method needs, from the registry (``passes(params, hw)`` =
(n_fwd, n_bwd) per image), run as plain batches. In the same run we measure the model's
forward rate r_f (no_grad) and forward+backward rate r_fb (gradient of the target logits with
respect to the input, as the gradient methods need) at the best of a few batch sizes (8 to
256 rows; on CPU the largest are not the fastest), and take

    floor seconds per image = n_fwd / r_f + n_bwd * (1 / r_fb - 1 / r_f)

i.e. every pass costs a forward, and each backward costs what a forward+backward costs beyond
its forward. ratio = floor images/s / method images/s (1.0 = at the floor).

Reference rows: ``lime_image`` (pip package ``lime``, if importable; its default batch_size=10)
and Captum's ``Lime`` at its defaults (Lasso surrogate, one perturbation per forward), both on
the same model, images, superpixels and n_samples as our ``lime``, against the same floor.

Measured on the 2-core dev machine at the defaults (64 px, 32 images): every method within
1.3x of its floor except deeplift, at ~2x. Why, and other things the ratios mean:
- deeplift: Captum's DeepLift hooks every non-linearity: it clones each one's input and
  output in the forward pass and computes the Rescale multipliers elementwise in the backward
  pass. On this small CNN elementwise work is a large share of a pass, so the hooks cost about
  as much as the two passes themselves (profiled: convolutions ~50% of its time). Reaching the
  floor would mean replacing Captum's DeepLift, which the design rules out.
- gradcam (and the Grad-CAM half of guided_gradcam) run below the floor: the backward pass
  stops at the layer, while the floor counts a full backward to the input.
- Expanding methods send at most ``max_rows`` rows per call, and on CPU at most 2^18 pixels'
  worth (64 rows at 64 px, 8 at 224 px; see ``auditor.methods._common.rows_per_call``): with
  256-row chunks at 64 px, LIME measured 3.9x its floor instead of 1.1x on this machine.
- The machine is shared: the floor is re-measured beside each timed call and the ratio is
  the median of the per-repeat ratios, but a busy machine still moves the numbers (+-15%).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
os.environ.setdefault("TQDM_DISABLE", "1")  # lime_image's per-image progress bar

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from auditor.methods import METHODS  # noqa: E402
from auditor.methods.surrogate import segment_one  # noqa: E402


class BenchNet(nn.Module):
    """conv-relu, conv(stride 2)-relu, residual block of two convs, global average pool, linear."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.conv1, self.relu1 = nn.Conv2d(3, w, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU()
        self.conv4, self.relu4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        a = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        a = self.relu4(a + self.conv4(self.relu3(self.conv3(a))))
        return self.fc(a.mean((2, 3)))


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class Floor:
    """The model's forward and forward+backward rates (rows/s) on plain batches of ``batch`` rows.

    ``rates()`` re-measures, so each timed method call is paired with a floor measured right
    beside it: on a shared machine the load drifts.
    """

    def __init__(self, model: nn.Module, x: Tensor, batch: int):
        self.model, self.batch = model, batch
        self.x = x[torch.arange(batch) % x.shape[0]] + 0.01 * torch.randn(batch, *x.shape[1:])
        self.t = torch.randint(0, 10, (batch, 1))

    def fwd(self) -> None:
        with torch.no_grad():
            self.model(self.x)

    def fwdbwd(self) -> None:
        xg = self.x.detach().requires_grad_(True)
        torch.autograd.grad(self.model(xg).gather(1, self.t).sum(), xg)

    def rates(self, seconds: float = 1.0) -> tuple[float, float]:
        """Mean rates over calls filling ``seconds`` each: a mean, like the methods' long calls,
        not a best-of (which would pick the machine's quiet moments)."""
        return self._rate(self.fwd, seconds), self._rate(self.fwdbwd, seconds)

    def _rate(self, fn, seconds: float) -> float:
        fn()
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            fn()
            calls += 1
        return calls * self.batch / elapsed

    def images_per_s(self, passes: tuple[int, int], rates: tuple[float, float]) -> float:
        (n_fwd, n_bwd), (r_f, r_fb) = passes, rates
        return 1.0 / (n_fwd / r_f + n_bwd * (1.0 / r_fb - 1.0 / r_f))


def best_batch(model: nn.Module, x: Tensor, candidates=(8, 16, 32, 64, 128, 256)) -> int:
    """The batch size with the best forward+backward rate (large batches can fall out of cache);
    batches over 2^22 pixels are not tried."""
    pixels = x.shape[-2] * x.shape[-1]
    rates = {b: Floor(model, x, b).rates(0.5)[1] for b in candidates
             if b == 8 or b * pixels <= 2 ** 22}
    return max(rates, key=rates.get)


def measure(fn, n_images: int, passes: tuple[int, int], floor: Floor, repeats: int):
    """(median images/s, median floor images/s, median of per-repeat ratios) of ``fn(n_images)``."""
    fn(2)  # warm-up
    rates, floors = [], []
    for _ in range(repeats):
        floors.append(floor.images_per_s(passes, floor.rates()))
        rates.append(n_images / timed(lambda: fn(n_images), 1)[0])
    ratios = [f / r for f, r in zip(floors, rates)]
    return statistics.median(rates), statistics.median(floors), statistics.median(ratios)


def reference_rows(model: nn.Module, x: Tensor, target: Tensor):
    """lime_image and Captum Lime on our lime's superpixels and n_samples: (name, callable)."""
    d = METHODS.get("lime").meta["defaults"]
    seg_kw = dict(segmentation=d["segmentation"], n_segments=d["n_segments"],
                  compactness=d["compactness"])
    n = d["n_samples"]

    def prob_np(batch):
        with torch.no_grad():
            inp = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
            return model(inp).softmax(1).numpy()

    try:
        from lime import lime_image
    except ImportError:
        print("lime not importable (pip install lime): no lime_image row", file=sys.stderr)
    else:
        def run_lime_image(n_images):
            explainer = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=0)
            images = x[:n_images].numpy().transpose(0, 2, 3, 1).astype(np.float64)
            for img, t in zip(images, target.tolist()):
                explainer.explain_instance(
                    img, prob_np, labels=(t,), top_labels=None, hide_color=0, num_samples=n,
                    segmentation_fn=lambda im: segment_one(im.transpose(2, 0, 1), **seg_kw))

        yield "lime_image (ref)", run_lime_image

    from captum.attr import Lime

    def run_captum_lime(n_images):
        lime = Lime(lambda inp: model(inp).softmax(1))
        with torch.no_grad():
            for i in range(n_images):  # superpixels differ per image: one call per image
                mask = torch.from_numpy(segment_one(x[i].numpy(), **seg_kw))
                lime.attribute(x[i:i + 1], target=target[i:i + 1], n_samples=n,
                               feature_mask=mask.expand_as(x[i])[None])

    yield "captum.Lime (ref)", run_captum_lime


def row(name, passes, rate, floor_rate, ratio):
    if isinstance(passes, tuple):
        passes, rate, floor_rate, ratio = (f"{passes[0]}/{passes[1]}", f"{rate:.1f}",
                                           f"{floor_rate:.1f}", f"{ratio:.2f}")
    return f"{name:<22}", f"{passes:>11}", f"{rate:>11}", f"{floor_rate:>13}", f"{ratio:>8}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", nargs="*", help="method names (default: all registered)")
    ap.add_argument("--no-ref", action="store_true", help="skip the lime_image/Captum Lime rows")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = BenchNet(width=args.width).eval()
    x = torch.randn(args.images, 3, args.size, args.size)
    with torch.no_grad():
        target = model(x).argmax(1)
    hw = (args.size, args.size)
    floor = Floor(model, x, best_batch(model, x))
    r_f, r_fb = floor.rates()
    print(f"model: forward {r_f:.0f} rows/s, forward+backward {r_fb:.0f} rows/s at batch "
          f"{floor.batch}; {torch.get_num_threads()} threads; {args.images} images "
          f"{args.size}x{args.size}; load average {os.getloadavg()[0]:.1f}")

    rows = []
    for entry in METHODS:
        if args.only and entry.name not in args.only:
            continue
        kw = {"layer": model.relu4} if entry.meta.get("needs_layer") else {}
        passes = entry.meta["passes"](None, hw)
        rows.append((entry.name, passes,
                     *measure(lambda n: entry(model, x[:n], target[:n], **kw), args.images, passes,
                              floor, args.repeats)))
        print(*row(*rows[-1]), sep="", flush=True)
    if not args.no_ref and (not args.only or "lime" in args.only):
        passes = METHODS.get("lime").meta["passes"](None, hw)
        for name, fn in reference_rows(model, x, target):
            rows.append((name, passes, *measure(fn, args.images, passes, floor, args.repeats)))
            print(*row(*rows[-1]), sep="", flush=True)

    print()
    print(*row("method", "passes f/b", "images/s", "floor img/s", "ratio"), sep="")
    for r in rows:
        print(*row(*r), sep="")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
