"""Throughput of every registered explanation method against its floor, in one run; then our
LIME and KernelSHAP against lime_image and Captum at equal samples and segmentation.

    OMP_WAIT_POLICY=PASSIVE python bench/methods.py [--size 64] [--images 32] [--repeats 3]
        [--width 16] [--only NAME ...] [--no-ref | --ref-only] [--ref-images 4]

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

Comparison table "LIME/KernelSHAP against references at equal samples and segmentation"
(skipped by ``--no-ref`` or by an ``--only`` without lime and kernel_shap; alone with
``--ref-only``), on ``--ref-images`` random images in two settings:
  (a) BenchNet at ``--size`` and ``--width`` (default 64 px, width 16);
  (b) SmallNet at 224 px: three convolutions (5x5 stride 4, 3->16; 3x3 stride 2, 16->32; 3x3
      stride 2, 32->32), ReLUs, global average pool, linear; 9.2 M multiply-adds a forward.
Every method gets the same SLIC superpixels (``segment_one`` at our lime's defaults, 50 asked),
computed once outside the timed calls, the same 256 samples (our default n_samples), the same
model output (softmax, under no_grad) and switched-off superpixels set to 0. Rows:
  - lime, kernel_shap (ours): the registered methods at their defaults minus the segmentation
    (``superpixel_fit(..., segments=...)``), all images in one call. Where the floor's batch is
    below our rows a call (on CPU, rows whose largest activation fits 16 MiB: 64 on BenchNet at
    64 px, 27 on SmallNet at 224 px), lime
    once more with max_rows = the floor's batch ("tuned"); speed-ups are against the defaults.
  - lime_image (pip ``lime``): ``LimeImageExplainer(kernel_width=0.25)`` (its default) and
    ``explain_instance(image, fn, labels=(target,), top_labels=None, hide_color=0,
    num_samples=256, segmentation_fn=<the superpixels>)``, everything else at its defaults
    (Ridge(alpha=1) surrogate, cosine distance); batch_size=10 (its default), and "tuned" =
    the floor's batch. hide_color=0 is the one departure: its default fills a superpixel with
    its mean colour, ours with 0.
  - Captum ``Lime`` and ``KernelShap``: constructed with the forward function only (Lime's
    defaults: Lasso(alpha=0.01) surrogate, exponential cosine kernel of width 1, Bernoulli
    sampling), ``attribute(x_i, target, feature_mask=<the superpixels>, n_samples=256)``, one
    image a call (superpixels differ per image), baseline 0; perturbations_per_eval=1 (the
    default) and, tuned, the floor's batch.
ideal (floor) = 256 no_grad forwards per image at the best forward batch (8 to 256 rows, at most
2^22 pixels), re-measured right before each timed call; "of ideal" = floor / time of the
explanation (segmentation excluded); "ours x faster" = the reference's time / our time (lime for
lime_image and Captum Lime, kernel_shap for Captum KernelShap); "incl. seg" = the same with the
segmentation time added to both sides. Segmentation (SLIC, ``segment_one``) is timed apart, per
image. Each of ``--repeats`` rounds times every row once on all images, in an order rotated per
round; every figure is the median over rounds of the per-round value or ratio.

Measured on the 2-core dev machine at the defaults (64 px, 32 images): every method within
1.3x of its floor. Why, and other things the ratios mean:
- deeplift: our own implementation (``auditor/methods/deeplift.py``) runs the baseline (the same
  for all images) through the model once per call, then the images, keeping one multiplier per
  non-linearity: 1 forward + 1 backward per image, 1.09-1.13x that floor at 64 px.
  Captum's DeepLift runs a baseline row per image and clones every non-linearity's input and
  output in hooks: 2.0-2.1x the floor of 2 + 2 passes, i.e. ~4x our time.
- gradcam (and the Grad-CAM half of guided_gradcam) run below the floor: the backward pass
  stops at the layer, while the floor counts a full backward to the input.
- Every method sends at most ``max_rows`` rows per model call, and on CPU only as many as keep
  the model's largest activation within 16 MiB (``auditor.explain.methods._common.rows_per_call``; 64
  rows for BenchNet at 64 px, 5 at 224 px): with 256-row chunks at 64 px, LIME measured 3.9x its
  floor instead of 1.1x, and a fixed 2^18-pixel cap (8 rows at 224 px) left LIME on SmallNet at
  0.54 of ideal, where 27 rows give 0.64-0.74. One-pass methods (saliency, gradcam, ...) are
  chunked the same way: at 224 px, BenchNet's forward+backward ran 3x slower per row at 64 rows
  than at 4.
- At 224 px (``--size 224 --images 8``, load 1.3-1.7): every method within 1.28x of its floor.
  deeplift was at 1.42-1.56x while each chunk carried the baseline row (25% more rows at 5 rows
  a call); with the baseline run once per call, 1.28x (the Rescale multipliers still cost a few
  elementwise passes per activation, which weigh where 16-channel maps are at full 224 px).
- The machine is shared: the floor is re-measured beside each timed call and the ratio is
  the median of the per-repeat ratios, but a busy machine still moves the numbers (+-15%).

Comparison, measured at the defaults (4 images, 3 rounds, the table alone ~2.5 min; four runs,
two at load 2.3-2.7 with the old 8-row cap at 224 px, two at load 1.1-1.4 with rows from the
activation size; a fifth run, not counted, timed its 64-px floor at a slow moment, giving ours
1.8 "of ideal"); "of ideal" and speed-ups at the references' defaults:
- (a) BenchNet, 64 px: ours 0.92-1.14 of ideal (lime), 0.98-1.14 (kernel_shap); lime_image
  0.54-0.71, Captum Lime 0.17-0.42, Captum KernelShap 0.17-0.30. Ours 1.1-1.8x faster than
  lime_image, 1.9-6.1x than Captum Lime, 2.9-6.2x than Captum KernelShap (tuned references:
  1.1-2.2x). Segmentation 4-6 ms/image, 0.02-0.03x our explanation.
- (b) SmallNet, 224 px, 27 rows a call: ours 0.64-0.70 of ideal (lime and kernel_shap);
  lime_image 0.10, Captum Lime 0.06-0.07, Captum KernelShap 0.06-0.08. Ours 6.5-7.9x faster
  than lime_image (5.3-5.7x with segmentation), 10.9-12.0x than Captum Lime (7.8-8.9x),
  9.7-10.1x than Captum KernelShap (7.1-7.8x); against tuned references 3.7-8.5x.
  Segmentation 35-47 ms/image, 0.25-0.47x our explanation. (With the 8-row cap: 0.71-0.77 of
  ideal at load 2.5 but 0.54 at load 1.1, and 5.3-6.0x the references.)
What sets the factors: the work per sample outside the model. lime_image copies the image
(float64) and compares the whole segment map once per switched-off superpixel, Captum builds
each perturbation and scores its similarity in Python: ~2-3 ms a sample at 224 px, ~0.1-0.3 ms
at 64 px, against ours ~0.15 ms at 224 px (writing the perturbed image) in batched calls. The
factor is (forward + theirs) / (forward + ours) per sample, so it shrinks as the model's forward
grows: at 64 px BenchNet's forward (~0.8 ms a row) dominates and lime_image runs at 54-71% of
ideal, so no implementation could be 4x faster there. Ours stays below 0.8 of ideal at 224 px
on SmallNet because the floor reuses one input while every sample needs its own perturbed
image: writing it (a 0/1 pixel mask gathered from the coalition, times the image) costs
~65-100 us a row, a quarter to a third of this 9-M-MAC net's forward (tried without gain: an
int32 segment index, a half-precision mask, channels-last rows, smaller sub-chunks).
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
from auditor.explain.methods import METHODS  # noqa: E402
from auditor.explain.methods._common import rows_per_call  # noqa: E402
from auditor.explain.methods.surrogate import _to_pixels, segment_one, superpixel_fit  # noqa: E402


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
        return self.rate(self.fwd, seconds), self.rate(self.fwdbwd, seconds)

    def rate(self, fn, seconds: float) -> float:
        """Rows/s of ``fn`` (``self.fwd`` or ``self.fwdbwd``) over calls filling ``seconds``."""
        fn()
        calls, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            fn()
            calls += 1
        return calls * self.batch / elapsed

    def images_per_s(self, passes: tuple[int, int], rates: tuple[float, float]) -> float:
        (n_fwd, n_bwd), (r_f, r_fb) = passes, rates
        return 1.0 / (n_fwd / r_f + n_bwd * (1.0 / r_fb - 1.0 / r_f))


def best_batch(model: nn.Module, x: Tensor, passes: str = "fwdbwd",
               candidates=(4, 8, 16, 32, 64, 128, 256)) -> int:
    """The batch size with the best rate of ``passes`` ("fwd": no_grad forwards, "fwdbwd":
    forward+backward); large batches can fall out of cache; batches over 2^22 pixels are not tried."""
    pixels = x.shape[-2] * x.shape[-1]
    rates = {}
    for b in candidates:
        if b == 4 or b * pixels <= 2 ** 22:
            floor = Floor(model, x, b)
            rates[b] = floor.rate(getattr(floor, passes), 0.5)
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


class SmallNet(nn.Module):
    """The comparison's 224 px model: conv 5x5 stride 4 (3->16), conv 3x3 stride 2 (16->32),
    conv 3x3 stride 2 (32->32), each followed by a ReLU, global average pool, linear (32->10).
    9.2 M multiply-adds a forward at 224 px (BenchNet width 16 at 64 px: 25 M), so the work per
    sample outside the model (building each perturbed image) weighs more than on BenchNet."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 16, 5, padding=2, stride=4), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU()
        self.conv3, self.relu3 = nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU()
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        a = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.relu3(self.conv3(a)).mean((2, 3)))


def comparison_methods(model: nn.Module, x: Tensor, target: Tensor, segs: list[np.ndarray],
                       n: int, tuned: int):
    """(name, settings, ours, fn) with fn(i, j) explaining images i..j-1 on the precomputed
    superpixels ``segs`` with n samples each; ``ours`` names our method it is compared with."""
    from captum.attr import KernelShap, Lime

    seg_t = torch.from_numpy(np.stack(segs))

    def ours(kind, max_rows=None):  # the registered method at its defaults, minus segmentation
        d = METHODS.get(kind).meta["defaults"]
        kw = {k: d[k] for k in ("kernel_width", "alpha") if k in d}

        def run(i, j):
            beta, seg = superpixel_fit(kind, model, x[i:j], target[i:j], n, d["segmentation"],
                                       d["n_segments"], d["compactness"], d["output"], d["seed"],
                                       max_rows or d["max_rows"], segments=seg_t[i:j], **kw)
            return _to_pixels(beta, seg)
        return run

    def prob(inp):
        return model(inp).softmax(1)

    def prob_np(batch):  # lime_image's classifier_fn: [N, H, W, C] float64 -> probabilities
        with torch.no_grad():
            inp = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
            return prob(inp).numpy()

    def captum(cls, **kw):
        def run(i, j):
            explainer = cls(prob)
            with torch.no_grad():
                for k in range(i, j):  # superpixels differ per image: one call per image
                    mask = seg_t[k].expand_as(x[k])[None]
                    explainer.attribute(x[k:k + 1], target=target[k:k + 1], n_samples=n,
                                        feature_mask=mask, **kw)
        return run

    rows_call = rows_per_call(model, x, METHODS.get("lime").meta["defaults"]["max_rows"])
    yield "lime (ours)", f"defaults ({rows_call} rows a call)", "lime", ours("lime")
    yield "kernel_shap (ours)", f"defaults ({rows_call} rows a call)", "kernel_shap", \
        ours("kernel_shap")
    if tuned < rows_call:  # the floor's batch is below the CPU cap on rows a call: ours there too
        yield "lime (ours)", f"max_rows={tuned} (tuned)", "lime", ours("lime", tuned)
    try:
        from lime import lime_image
    except ImportError:
        print("lime not importable (pip install lime): no lime_image rows", file=sys.stderr)
    else:
        def run_lime_image(batch_size):
            def run(i, j):
                images = x[i:j].numpy().transpose(0, 2, 3, 1).astype(np.float64)
                for k, (img, t) in enumerate(zip(images, target[i:j].tolist()), start=i):
                    explainer = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=0)
                    explainer.explain_instance(
                        img, prob_np, labels=(t,), top_labels=None, hide_color=0, num_samples=n,
                        batch_size=batch_size, segmentation_fn=lambda im, k=k: segs[k])
            return run

        yield "lime_image", "batch_size=10 (default)", "lime", run_lime_image(10)
        yield "lime_image", f"batch_size={tuned} (tuned)", "lime", run_lime_image(tuned)
    yield "captum Lime", "defaults (perturbations_per_eval=1)", "lime", captum(Lime)
    yield "captum Lime", f"perturbations_per_eval={tuned}", "lime", \
        captum(Lime, perturbations_per_eval=tuned)
    yield "captum KernelShap", "defaults (perturbations_per_eval=1)", "kernel_shap", \
        captum(KernelShap)
    yield "captum KernelShap", f"perturbations_per_eval={tuned}", "kernel_shap", \
        captum(KernelShap, perturbations_per_eval=tuned)


def compare(label: str, model: nn.Module, x: Tensor, repeats: int) -> None:
    """Print the comparison table for one model and image batch (see the module docstring)."""
    load0 = os.getloadavg()[0]
    d = METHODS.get("lime").meta["defaults"]
    n = d["n_samples"]
    seg_kw = dict(segmentation="slic", n_segments=d["n_segments"], compactness=d["compactness"])
    with torch.no_grad():
        target = model(x).argmax(1)
    batch = best_batch(model, x, "fwd")
    floor = Floor(model, x, batch)
    host = x.numpy()
    segs = [segment_one(img, **seg_kw) for img in host]
    methods = list(comparison_methods(model, x, target, segs, n, batch))
    B = x.shape[0]
    for _, _, _, fn in methods:  # warm-up
        fn(0, 1)

    rounds = []  # per repeat: s/image of "seg", of each method m and of its floor (m, "floor")
    for rep in range(repeats):
        r = {}
        t0 = time.perf_counter()
        for img in host:
            segment_one(img, **seg_kw)
        r["seg"] = (time.perf_counter() - t0) / B
        for k in range(len(methods)):  # each round in a rotated order: drift hits all methods
            m = (k + rep) % len(methods)
            r[m, "floor"] = n / floor.rate(floor.fwd, 0.5)  # the floor right beside each call
            r[m] = timed(lambda: methods[m][3](0, B), 1)[0] / B
        rounds.append(r)

    def med(f):
        return statistics.median(f(r) for r in rounds)

    ours = {kind: m for m, (name, settings, kind, _) in enumerate(methods)
            if name.endswith("(ours)") and settings.startswith("defaults")}
    seg_s = med(lambda r: r["seg"])
    floor_s = statistics.median(r[m, "floor"] for r in rounds for m in range(len(methods)))
    print(f"\n({label}) {B} images, {n} samples, SLIC with {d['n_segments']} segments asked "
          f"({statistics.mean(int(s.max()) + 1 for s in segs):.1f} made on average); floor: {n} "
          f"forwards at batch {batch} (the best forward batch), {floor_s * 1e3:.1f} ms/image; "
          f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"segmentation (SLIC, segment_one, timed apart): {seg_s * 1e3:.1f} ms/image = "
          f"{med(lambda r: r['seg'] / r[ours['lime']]):.2f}x our lime's explanation, "
          f"{seg_s / floor_s:.2f}x the floor")
    head = ("method", "settings", "ms/image", "images/s", "of ideal", "ours x faster",
            "incl. seg")
    fmt = "{:<19}{:<37}{:>9}{:>10}{:>10}{:>15}{:>11}"
    print(fmt.format(*head))
    print(fmt.format("ideal (floor)", f"{n} forwards at batch {batch}", f"{floor_s * 1e3:.1f}",
                     f"{1 / floor_s:.2f}", "1.00", "", ""))
    for m, (name, settings, kind, _) in enumerate(methods):
        o = ours[kind]
        t = med(lambda r: r[m])
        share = med(lambda r: r[m, "floor"] / r[m])
        if name.endswith("(ours)"):
            speed, speed_seg = "", ""
        else:
            speed = f"{med(lambda r: r[m] / r[o]):.1f}"
            speed_seg = f"{med(lambda r: (r[m] + r['seg']) / (r[o] + r['seg'])):.1f}"
        print(fmt.format(name, settings, f"{t * 1e3:.1f}", f"{1 / t:.2f}", f"{share:.2f}",
                         speed, speed_seg), flush=True)


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
    ap.add_argument("--no-ref", action="store_true",
                    help="skip the comparison with lime_image and Captum's Lime/KernelShap")
    ap.add_argument("--ref-only", action="store_true",
                    help="only the comparison with lime_image and Captum (no per-method table)")
    ap.add_argument("--ref-images", type=int, default=4,
                    help="images of each setting of the comparison (default 4)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if not args.ref_only:
        method_table(args)
    if args.no_ref or (args.only and not {"lime", "kernel_shap"} & set(args.only)):
        return
    print("\nLIME/KernelSHAP against references at equal samples and segmentation "
          f"({torch.get_num_threads()} threads)")
    torch.manual_seed(0)
    compare(f"a: BenchNet width {args.width}, {args.size}x{args.size}",
            BenchNet(width=args.width).eval(),
            torch.randn(args.ref_images, 3, args.size, args.size), args.repeats)
    torch.manual_seed(0)
    compare("b: SmallNet, 224x224", SmallNet().eval(), torch.randn(args.ref_images, 3, 224, 224),
            args.repeats)


def method_table(args: argparse.Namespace) -> None:
    """Every registered method (or ``--only``) against its floor, on BenchNet."""
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

    print()
    print(*row("method", "passes f/b", "images/s", "floor img/s", "ratio"), sep="")
    for r in rows:
        print(*row(*r), sep="")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
